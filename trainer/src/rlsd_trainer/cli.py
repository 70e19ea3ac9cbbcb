"""`rlsd-trainer`: the command line of the training runtime."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from importlib import resources

from rlsd_trainer.config import ConfigError, load_config
from rlsd_trainer.data import DataError

EXIT_BAD_CONFIG = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlsd-trainer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    local = commands.add_parser("local", help="run a whole training run in this process (no Kubernetes)")
    local.add_argument("--config", required=True, help="YAML run configuration (see configs/embedded.yaml)")
    local.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. --set algorithm.name=grpo (repeatable)",
    )
    validate = commands.add_parser(
        "validate", help="check a config file and print it with defaults filled in"
    )
    validate.add_argument("--config", required=True)
    validate.add_argument("--set", dest="overrides", action="append", default=[])
    commands.add_parser("default-config", help="print the path of the embedded default config")
    return parser


def quiet_libraries() -> None:
    """Keep our progress bar readable: no per-load progress bars or advisories from transformers."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # transformers >= 5.2x renames the `past_key_values` argument to `cache`; we keep the old name,
    # which every supported version (pinned below 5.40, where it goes) understands.
    warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    if args.command == "default-config":
        print(resources.files("rlsd_trainer") / "configs" / "embedded.yaml")
        return 0
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if args.command == "validate":
        from rlsd_trainer.config import dump_config

        print(dump_config(config), end="")
        return 0
    from rlsd_trainer.local import run_local

    try:
        summary = run_local(config)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    print(f"finished {summary.steps} steps; metrics: {summary.metrics_path}")
    if summary.start_accuracy is not None and summary.final_accuracy is not None:
        gain = 100 * (summary.final_accuracy - summary.start_accuracy)
        print(
            f"held-out accuracy: {summary.start_accuracy:.1%} -> {summary.final_accuracy:.1%} "
            f"({gain:+.1f} points)"
        )
    if summary.plot_path is not None:
        print(f"plot: {summary.plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

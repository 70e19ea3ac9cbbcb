"""`rlsd-trainer`: the command line of the training runtime."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import subprocess
import sys
import tempfile
import warnings
from importlib import resources
from pathlib import Path

from rlsd_contracts.config import ConfigError, RunConfig, load_config
from rlsd_contracts.exit_codes import EXIT_BAD_CONFIG, EXIT_FAILED, EXIT_FINISHED, EXIT_PREEMPTED
from rlsd_contracts.wire import RUN_TOKEN_MIDDLEWARE, SERVER_PORT, SERVER_ROLES
from rlsd_trainer.data.example import DataError
from rlsd_trainer.lifecycle import (
    STATUS_DIR_ENV,
    Preempted,
    PreemptionWatch,
    child_pids,
    end_process,
    launcher_exit_code,
    record_exit,
    report_error,
    watch_for_preemption,
)

log = logging.getLogger("rlsd_trainer")


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML run configuration (see configs/embedded.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. --set algorithm.name=grpo (repeatable)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlsd-trainer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    local = commands.add_parser("local", help="run a whole training run in this process (no Kubernetes)")
    _add_config_arguments(local)
    learner = commands.add_parser(
        "learner",
        help="the learner role: one rank under torchrun, or a launcher that starts torchrun when given "
        "torchrun options (e.g. --nproc-per-node 2); exits 0/1/3/75/76 (see lifecycle.py)",
    )
    _add_config_arguments(learner)
    validate = commands.add_parser(
        "validate", help="check a config file and print it with defaults filled in"
    )
    _add_config_arguments(validate)
    commands.add_parser("default-config", help="print the path of the embedded default config")
    _add_serve_parser(commands)
    return parser


def quiet_libraries() -> None:
    """Keep our progress bar readable: no per-load progress bars or advisories from transformers."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # httpx logs every request at INFO: a line per completion, score and weight-transfer call.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # transformers >= 5.2x renames the `past_key_values` argument to `cache`; we keep the old name,
    # which every supported version (pinned below 5.40, where it goes) understands.
    warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)
    # DCP notes that it saves in one process when there is no process group: that is the local mode.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)


def main(argv: list[str] | None = None) -> int:
    args, extra = _parser().parse_known_args(argv)
    if extra and args.command != "learner":
        _parser().error(f"unrecognized arguments: {' '.join(extra)}")
    # A learner watches for SIGTERM from the start: a pod may be preempted while it loads.
    watch = watch_for_preemption() if args.command == "learner" and "RANK" in os.environ else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    if args.command == "default-config":
        print(resources.files("rlsd_trainer") / "configs" / "embedded.yaml")
        return EXIT_FINISHED
    if args.command == "serve":
        return _serve(args)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        report_error(str(exc))
        record_exit(EXIT_BAD_CONFIG)
        return EXIT_BAD_CONFIG
    if args.command == "validate":
        from rlsd_contracts.config import dump_config

        print(dump_config(config), end="")
        return EXIT_FINISHED
    if args.command == "learner" and "RANK" not in os.environ:
        if extra or _torchrun_env():
            return _launch_torchrun(argv if argv is not None else sys.argv[1:], extra)
        watch = watch_for_preemption()
    if watch is not None:
        watch.grace_s = config.checkpoint.preemption_grace_s
    code = _train(config, watch)
    record_exit(code)
    end_process(code)  # not a return: see end_process


def _train(config: RunConfig, watch: PreemptionWatch | None) -> int:
    """Run training in this process (alone, or as one torchrun rank) and map the outcome to a code."""
    from rlsd_trainer.training.distributed import barrier, init_distributed, shutdown_distributed
    from rlsd_trainer.training.trainer import run_training

    # A rank that dies of a signal (SIGSEGV, SIGABRT, ...) prints every thread's Python stack first,
    # so a crash in a pod leaves in its log where each thread was, not only torchrun's "exitcode -11".
    faulthandler.enable(all_threads=True)
    ctx = init_distributed(config.learner.collective_timeout_s)
    try:
        summary = run_training(config, ctx, watch)
        # Every rank finished before any tears its groups down: gloo can abort a peer whose pairs are
        # still open when the other side goes away.
        barrier(ctx)
    except (ConfigError, DataError) as exc:
        report_error(str(exc))
        return EXIT_BAD_CONFIG
    except Preempted as exc:
        log.warning("%s", exc)
        return EXIT_PREEMPTED
    except Exception as exc:
        log.exception("learner rank %d failed", ctx.rank)
        report_error(f"learner rank {ctx.rank} failed: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    finally:
        shutdown_distributed()
    if ctx.is_main:
        _print_summary(summary)
    return EXIT_FINISHED


def _print_summary(summary: object) -> None:
    print(f"finished {summary.steps} steps; metrics: {summary.metrics_path}")  # type: ignore[attr-defined]
    start, final = summary.start_accuracy, summary.final_accuracy  # type: ignore[attr-defined]
    if start is not None and final is not None:
        print(f"held-out accuracy: {start:.1%} -> {final:.1%} ({100 * (final - start):+.1f} points)")
    if summary.plot_path is not None:  # type: ignore[attr-defined]
        print(f"plot: {summary.plot_path}")  # type: ignore[attr-defined]


def _torchrun_env() -> bool:
    """torchrun options given as PET_* environment variables (how the operator configures pods)."""
    return any(name.startswith("PET_") for name in os.environ)


def _launch_torchrun(argv: list[str], torchrun_args: list[str]) -> int:
    """Start `torchrun <torchrun_args> -m rlsd_trainer learner ...` and own the pod's exit code.

    SIGTERM goes straight to the worker ranks (torchrun would kill them after its own fixed
    timeout, and could not tell a preempted exit from a failure); each worker records its exit
    code, from which `launcher_exit_code` derives ours.
    """
    ours = [a for a in argv if a not in torchrun_args]
    with tempfile.TemporaryDirectory(prefix="rlsd-exit-") as status_dir:
        command = [sys.executable, "-m", "torch.distributed.run", *torchrun_args, "-m", "rlsd_trainer", *ours]
        process = subprocess.Popen(command, env={**os.environ, STATUS_DIR_ENV: status_dir})
        terminated = False

        def forward(signum: int, frame: object) -> None:
            nonlocal terminated
            terminated = True
            # Before torchrun has started the ranks there is nothing to save: stop torchrun itself.
            for pid in child_pids(process.pid) or [process.pid]:
                os.kill(pid, signal.SIGTERM)

        signal.signal(signal.SIGTERM, forward)
        torchrun_code = process.wait()
        codes = [int(p.read_text()) for p in sorted(Path(status_dir).glob("rank-*"))]
    code = launcher_exit_code(torchrun_code, codes, terminated)
    log.info("torchrun exited %d, workers %s: exit %d", torchrun_code, codes, code)
    return code


def _add_serve_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve", help="serve the policy over HTTP as a rollout or teacher replica (vLLM's routes, on CPU)"
    )
    serve.add_argument("role", choices=SERVER_ROLES)
    serve.add_argument(
        "--model",
        required=True,
        help="Hugging Face model directory: the initial policy; 'embedded': the embedded task's tiny model, "
        "built here from --config as the learners build it (the learners push their weights before use)",
    )
    serve.add_argument(
        "--config", default=None, help="the run's config file (with --model embedded: the task and seed)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=SERVER_PORT)
    serve.add_argument(
        "--served-model-name", default=None, help="the model name requests use (default: --model)"
    )
    serve.add_argument("--max-batch-size", type=int, default=256, help="sequences per forward pass")
    serve.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    serve.add_argument(
        "--weight-transfer-config",
        default='{"backend": "gloo"}',
        help='as vLLM\'s flag; only {"backend": "gloo"} here (vLLM\'s nccl needs GPUs). Reloading from a '
        "shared directory (weight transfer 'filesystem') works with any backend, as with vLLM",
    )
    serve.add_argument(
        "--transfer-timeout-s", type=float, default=600.0, help="weight-transfer group timeout"
    )
    serve.add_argument(
        "--middleware",
        action="append",
        default=[],
        help="as vLLM's flag: an ASGI middleware class (or an HTTP middleware function) by import path, "
        f"repeatable; the operator passes {RUN_TOKEN_MIDDLEWARE} (the run's token)",
    )


def _serve(args: argparse.Namespace) -> int:
    from rlsd_contracts.run_token import RunTokenError
    from rlsd_trainer.serving.common import add_middleware, check_transfer_config, serve

    try:
        check_transfer_config(args.weight_transfer_config)
        model = _served_model(args.model, args.config)
    except (ValueError, ConfigError) as exc:
        report_error(str(exc))
        return EXIT_BAD_CONFIG
    if args.role == "rollout":
        from rlsd_trainer.serving.rollout_server import build_app
    else:
        from rlsd_trainer.serving.teacher_server import build_app
    app = build_app(model, args.served_model_name, args.max_batch_size, args.dtype, args.transfer_timeout_s)
    try:
        add_middleware(app, args.middleware)
    except (ImportError, AttributeError, ValueError, RunTokenError) as exc:
        report_error(f"--middleware: {exc}")
        return EXIT_BAD_CONFIG
    serve(app, args.host, args.port)
    return EXIT_FINISHED


def _served_model(model: str, config_path: str | None) -> str:
    """The model directory to serve: `model`, or for `embedded` the embedded task's model built from the
    run's config (the same function and inputs as the learners': the same architecture and tokenizer)."""
    if model != "embedded":
        return model
    if config_path is None:
        raise ValueError("--model embedded: the model is built from the run's config; pass --config FILE")
    from rlsd_trainer.model.embedded import build_model_dir

    config = load_config(config_path)
    directory = Path(tempfile.mkdtemp(prefix="rlsd-embedded-model-"))
    return str(build_model_dir(directory, config.data.embedded, config.run.seed))


if __name__ == "__main__":
    sys.exit(main())

"""The two runs of `test_on_policy_golden.py` and their fingerprints, importable by any trainer.

Run as a script, it trains both variants with the trainer found in a source tree given on the
command line (the tree of commit `BEFORE_SPLIT`, extracted by the test) and prints their
fingerprints as JSON. Nothing here imports `rlsd_trainer` at module level, so the same definitions
drive today's trainer in the test and the old one in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

# The last commit before the planner/learner split and asynchronous rollouts.
BEFORE_SPLIT = "3d6eb6d"
WALL_TIME_KEYS = ("time", "step_seconds", "tokens_per_second")


def variants(directory: Path, tiny_config: Callable[..., dict]) -> dict[str, dict]:
    rlsd = tiny_config(directory / "rlsd", total_steps=4)
    grpo = tiny_config(directory / "grpo", total_steps=3, algorithm="grpo")
    grpo["algorithm"].update(ppo_epochs=2, kl_coef=0.05, entropy_coef=0.01)
    for config in (rlsd, grpo):  # a warmer start, so that groups carry signal and weights move
        config["warmup"].update(steps=60, lr=3e-3)
    return {"rlsd": rlsd, "grpo_kl_two_epochs": grpo}


def fingerprint(output_dir: Path) -> dict:
    """SHA-256 of the final weights (by name) and the logged values of every step but wall times."""
    from safetensors.torch import load_file

    weights = load_file(output_dir / "final-policy" / "model.safetensors")
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].contiguous().numpy().tobytes())
    steps = []
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps.append({k: v for k, v in sorted(record.items()) if not k.startswith(WALL_TIME_KEYS)})
    return {"weights_sha256": digest.hexdigest(), "metrics": steps}


def main(source_tree: Path, output_dir: Path) -> None:
    """Train both variants with the trainer of `source_tree` and print their fingerprints."""
    sys.path[:0] = [
        str(source_tree / "trainer" / "contracts" / "src"),
        str(source_tree / "trainer" / "src"),
        str(source_tree / "tests" / "trainer"),
    ]
    from rlsd_trainer.loop import run_training  # the module of the trainer before the split
    from test_local_run import tiny_config

    from rlsd_contracts.config import parse_config

    for module in (parse_config, run_training, tiny_config):  # not today's installed packages
        assert Path(module.__code__.co_filename).is_relative_to(source_tree), module.__code__.co_filename

    runs = variants(output_dir, tiny_config)
    for config in runs.values():
        run_training(parse_config(config))
    # The last line of stdout (the old trainer prints too).
    print(json.dumps({name: fingerprint(Path(c["run"]["output_dir"])) for name, c in runs.items()}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

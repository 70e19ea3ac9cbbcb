"""`rollout.max_staleness: 0` reproduces the runs of the trainer before the planner/learner split and
asynchronous rollouts, bit for bit: the final weights and every logged value but wall times.

`golden/on_policy_runs.json` was written by this file's `fingerprint` of the two `variants` run with
the trainer at commit 3d6eb6d (the last one before the split), on this CI machine's CPU and torch;
regenerate it only for a change that is meant to alter the numbers (`python
tests/trainer/test_on_policy_golden.py OUT_DIR` prints the new fingerprints), and say why in the
commit.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_local_run import tiny_config

from rlsd_contracts.config import parse_config
from rlsd_trainer.training.trainer import run_training

pytestmark = pytest.mark.slow
GOLDEN = Path(__file__).parent / "golden" / "on_policy_runs.json"
WALL_TIME_KEYS = ("time_", "step_seconds", "tokens_per_second")


def variants(directory: Path) -> dict[str, dict]:
    rlsd = tiny_config(directory / "rlsd", total_steps=4)
    grpo = tiny_config(directory / "grpo", total_steps=3, algorithm="grpo")
    grpo["algorithm"].update(ppo_epochs=2, kl_coef=0.05, entropy_coef=0.01)
    for config in (rlsd, grpo):  # a warmer start, so that groups carry signal and weights move
        config["warmup"].update(steps=60, lr=3e-3)
    return {"rlsd": rlsd, "grpo_kl_two_epochs": grpo}


def fingerprint(output_dir: Path) -> dict:
    """SHA-256 of the final weights (by name) and the logged values of every step but wall times."""
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


@pytest.mark.parametrize("variant", ["rlsd", "grpo_kl_two_epochs"])
def test_on_policy_run_is_bitwise_the_run_before_async_rollouts(variant: str, tmp_path: Path) -> None:
    config = variants(tmp_path)[variant]
    assert parse_config(config).rollout.max_staleness == 0  # the default
    run_training(parse_config(config))
    expected = json.loads(GOLDEN.read_text())[variant]
    actual = fingerprint(Path(config["run"]["output_dir"]))
    assert len(actual["metrics"]) == len(expected["metrics"])
    for step, (want, got) in enumerate(zip(expected["metrics"], actual["metrics"], strict=True)):
        # Metrics added since are allowed; every value logged before is equal, bit for bit.
        assert {k: got.get(k) for k in want} == want, f"record {step}"
    assert actual["weights_sha256"] == expected["weights_sha256"]


if __name__ == "__main__":
    out = Path(sys.argv[1])
    print(
        json.dumps(
            {
                name: (run_training(parse_config(c)), fingerprint(Path(c["run"]["output_dir"])))[1]
                for name, c in variants(out).items()
            },
            indent=1,
        )
    )

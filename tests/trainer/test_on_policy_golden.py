"""`rollout.max_staleness: 0` reproduces the runs of the trainer before the planner/learner split and
asynchronous rollouts, bit for bit: the final weights and every logged value but wall times.

The reference is that trainer itself (commit `BEFORE_SPLIT`, taken from this repository's history),
run side by side in this environment: fingerprints recorded once held only on the CPU and torch that
wrote them (a new machine changed the fifth digit of step 1's entropy, for old and new trainer alike).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from io import BytesIO
from pathlib import Path

import pytest
from on_policy_reference import BEFORE_SPLIT, fingerprint, variants
from test_local_run import tiny_config

from rlsd_contracts.config import parse_config
from rlsd_trainer.training.trainer import run_training

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
REPOSITORY = HERE.parents[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Fingerprints of both variants trained by the trainer at `BEFORE_SPLIT`, in a subprocess."""
    tree = tmp_path_factory.mktemp(f"trainer-{BEFORE_SPLIT}")
    archive = subprocess.run(
        ["git", "-C", str(REPOSITORY), "archive", BEFORE_SPLIT, "trainer", "tests/trainer"],
        capture_output=True,
    )
    assert archive.returncode == 0, (
        f"the reference trainer is commit {BEFORE_SPLIT} of this repository's history: "
        f"{archive.stderr.decode()} (clone without --depth)"
    )
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as files:
        files.extractall(tree, filter="data")
    runs = tmp_path_factory.mktemp("reference-runs")
    done = subprocess.run(
        [sys.executable, str(HERE / "on_policy_reference.py"), str(tree), str(runs)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("variant", ["rlsd", "grpo_kl_two_epochs"])
def test_on_policy_run_is_bitwise_the_run_before_async_rollouts(
    variant: str, reference: dict, tmp_path: Path
) -> None:
    config = variants(tmp_path, tiny_config)[variant]
    assert parse_config(config).rollout.max_staleness == 0  # the default
    run_training(parse_config(config))
    expected = reference[variant]
    actual = fingerprint(Path(config["run"]["output_dir"]))
    assert len(actual["metrics"]) == len(expected["metrics"])
    assert any(record.get("grad_norm") for record in expected["metrics"]), "the weights never moved"
    for step, (want, got) in enumerate(zip(expected["metrics"], actual["metrics"], strict=True)):
        # Metrics added since are allowed; every value logged before is equal, bit for bit.
        assert {k: got.get(k) for k in want} == want, f"record {step}"
    assert actual["weights_sha256"] == expected["weights_sha256"]

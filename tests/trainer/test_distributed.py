"""The distributed pipeline on CPU: 2 torchrun learner ranks (FSDP2 over gloo), 2 rollout servers and
1 teacher server, all real processes on loopback; preemption, crashes and lost servers.

The chaos test interrupts one run at random moments with SIGTERM (graceful preemption) and SIGKILL
(a node lost), corrupts its newest checkpoint once, and requires the final weights to be bitwise
equal to those of an uninterrupted run with the same seed; on-policy and with rollouts generated one
batch ahead (`rollout.max_staleness: 1`). Each interruption is timed from the moment its attempt is
past start-up, in units of this machine's step time, so however slow start-ups are (a loaded
machine), every interruption lands within the first steps of its attempt.
"""

from __future__ import annotations

import random
import shutil
import signal
import statistics
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from processes import (
    RUN_TIMEOUT_S,
    Server,
    kill_session,
    start_learners,
    start_server,
    wait_for,
    wait_healthy,
    wait_past_startup,
)
from safetensors.torch import load_file

from rlsd_contracts.config import EmbeddedTaskSection
from rlsd_contracts.exit_codes import EXIT_BAD_CONFIG, EXIT_FINISHED, EXIT_PREEMPTED, EXIT_PREEMPTED_UNSAVED
from rlsd_trainer.model.embedded import build_model_dir
from rlsd_trainer.monitoring.metrics import read_jsonl

pytestmark = pytest.mark.slow

SEED = 3
TASK = {"num_train": 200, "num_eval": 8, "min_terms": 2, "max_terms": 3}
TOTAL_STEPS = 12


def run_config(output_dir: Path, servers: dict[str, list[Server]], **changes: dict) -> Path:
    """A 2-rank RLSD run with remote rollout and teacher; returns the path of its YAML file."""
    # A learner killed in the middle of a push leaves its server in the transfer until the server's
    # group timeout (60 s, processes.py) frees it; the next attempt waits for a live server up to
    # request_timeout_s, which must outlast that on a loaded machine (a cluster's liveness probe
    # replaces such a server instead). At 60 s both, CI saw the wait give up first.
    remote = {"model_name": "policy", "request_timeout_s": 150, "max_retries": 2}
    config = {
        "run": {"seed": SEED, "output_dir": str(output_dir), "total_steps": TOTAL_STEPS},
        "model": {"path": "embedded"},
        "data": {
            "train": {"kind": "embedded", "split": "train"},
            "eval": {"kind": "embedded", "split": "eval"},
            "embedded": TASK,
        },
        "algorithm": {"name": "rlsd", "group_size": 4, "lam": {"decay_steps": TOTAL_STEPS}},
        "rollout": {
            "backend": "remote",
            "servers": {
                **remote,
                "urls": [s.url for s in servers["rollout"]],
                "weight_transfer": {"backend": "gloo"},
            },
            "prompts_per_step": 4,
            "sampling": {"max_new_tokens": 12},
        },
        "teacher": {
            "mode": "frozen",
            "sync_interval": 4,
            "placement": "remote",
            "servers": {
                **remote,
                "urls": [s.url for s in servers["teacher"]],
                "weight_transfer": {"backend": "gloo"},
            },
        },
        "optim": {"lr": 1e-3},
        "reward": {"verifier": "callable", "callable": "verifier_fixtures:digit_share", "workers": 1},
        "checkpoint": {"every": 2, "keep_last": 3, "async_save": True, "preemption_grace_s": 60},
        "metrics": {"prometheus_port": None, "progress_bar": False},
        "eval": {"every": 100, "max_examples": 8, "max_new_tokens": 12},
        "learner": {"micro_batch_tokens": 128},
    }
    for section, values in changes.items():
        config[section] = {**config[section], **values}
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def prepare_output(output_dir: Path, model_dir: Path) -> None:
    """The embedded model the servers serve, where the learners look for it."""
    shutil.copytree(model_dir, output_dir / "embedded-model")


def run_to_end(config: Path, log: Path) -> int:
    process = start_learners(config, log)
    try:
        return process.wait(timeout=RUN_TIMEOUT_S)
    finally:
        kill_session(process)


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "final-policy" / "model.safetensors")


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"tensors differ: {different[:5]}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("model") / "embedded-model"
    build_model_dir(directory, EmbeddedTaskSection(**TASK), SEED)
    return directory


@pytest.fixture(scope="module")
def servers(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, list[Server]]]:
    logs = tmp_path_factory.mktemp("server-logs")
    started = {
        "rollout": [start_server("rollout", model_dir, logs, "policy") for _ in range(2)],
        "teacher": [start_server("teacher", model_dir, logs, "policy")],
    }
    everything = [s for group in started.values() for s in group]
    try:
        wait_healthy(everything)
        yield started
    finally:
        for server in everything:
            server.stop()


@dataclass
class Reference:
    weights: dict[str, torch.Tensor]
    step_seconds: float  # the median step of the run: how long a step takes on this machine, now


@pytest.fixture(scope="module")
def references(
    servers: dict[str, list[Server]], model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[int], Reference]:
    """The uninterrupted run with `rollout.max_staleness` k (each run once)."""
    runs: dict[int, Reference] = {}

    def reference(max_staleness: int) -> Reference:
        if max_staleness not in runs:
            output = tmp_path_factory.mktemp(f"reference-k{max_staleness}")
            prepare_output(output, model_dir)
            log = output / "learner.log"
            config = run_config(output, servers, rollout={"max_staleness": max_staleness})
            code = run_to_end(config, log)
            assert code == 0, log.read_text()[-5000:]
            records = read_jsonl(output / "metrics.jsonl")
            seconds = statistics.median(r["step_seconds"] for r in records if "step_seconds" in r)
            runs[max_staleness] = Reference(final_weights(output), seconds)
        return runs[max_staleness]

    return reference


def newest_checkpoint(output_dir: Path) -> Path | None:
    committed = sorted(p for p in (output_dir / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))
    return committed[-1] if committed else None


def corrupt(checkpoint: Path) -> None:
    shard = next(checkpoint.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("max_staleness", [0, 1])
def test_chaos_sigterm_and_sigkill_resume_bitwise(
    servers: dict[str, list[Server]],
    model_dir: Path,
    references: Callable[[int], Reference],
    tmp_path: Path,
    max_staleness: int,
) -> None:
    reference = references(max_staleness)  # first: its step time sets the interruptions' timing
    prepare_output(tmp_path, model_dir)
    config = run_config(tmp_path, servers, rollout={"max_staleness": max_staleness})
    log = tmp_path / "learner.log"
    chance = random.Random(20261126)
    signals = [signal.SIGTERM, signal.SIGKILL] * 6
    chance.shuffle(signals)
    outcomes: list[tuple[str, float, int]] = []
    corrupted = False
    for index, sent in enumerate(signals):
        since = log.stat().st_size if log.exists() else 0
        # Timed from the moment this attempt is past start-up (its ranks loaded the model, restored
        # the checkpoint and are about to step), however long that took: a SIGTERM within its first
        # step (it saves that step and stops: one step of progress per preemption, so the 12 steps
        # outlast the interruptions), a SIGKILL within its first two (often mid-checkpoint).
        steps = chance.uniform(0.0, 1.0 if sent == signal.SIGTERM else 2.0)
        process = start_learners(config, log)
        try:
            try:
                if wait_past_startup(process, log, since):
                    process.wait(timeout=steps * reference.step_seconds)
            except subprocess.TimeoutExpired:
                if sent == signal.SIGTERM:
                    process.send_signal(sent)  # the pod is being deleted: the launcher forwards it
                else:
                    kill_session(process)  # the node is gone: every process dies at once
                code = process.wait(timeout=RUN_TIMEOUT_S)
                outcomes.append((sent.name, round(steps, 2), code))
            else:
                assert process.returncode == EXIT_FINISHED, f"interruption {index + 1}: {outcomes}"
                break  # the run ended before this interruption
        finally:
            kill_session(process)
        if sent == signal.SIGTERM:
            # Saved at a step boundary (75); or caught before a rank could save in the grace period
            # (76); or in the last step, which ends the run (0). (Never -15: past start-up, the
            # launcher forwards the signal to the ranks.)
            allowed = (EXIT_PREEMPTED, EXIT_PREEMPTED_UNSAVED, EXIT_FINISHED)
            assert code in allowed, outcomes
            if code == EXIT_FINISHED:
                break
        else:
            assert code == -signal.SIGKILL, outcomes
        newest = newest_checkpoint(tmp_path)
        if not corrupted and index >= 5 and newest is not None and newest.name != "step-00000002":
            corrupt(newest)
            corrupted = True
    assert len(outcomes) >= 10, outcomes
    assert sum(code == EXIT_PREEMPTED for _, _, code in outcomes) >= 2, outcomes
    assert corrupted
    assert run_to_end(config, log) == 0, log.read_text()[-5000:]
    text = log.read_text()
    assert "failed verification; falling back" in text
    assert "resumed from" in text
    assert_bitwise_equal(final_weights(tmp_path), reference.weights)


def test_lost_rollout_server_is_routed_around(
    servers: dict[str, list[Server]],
    model_dir: Path,
    references: Callable[[int], Reference],
    tmp_path: Path,
) -> None:
    prepare_output(tmp_path, model_dir)
    config = run_config(tmp_path, servers)
    log = tmp_path / "learner.log"
    process = start_learners(config, log)
    try:
        has_checkpoint = wait_for(
            lambda: newest_checkpoint(tmp_path) is not None, process, RUN_TIMEOUT_S, "a checkpoint"
        )
        assert has_checkpoint, log.read_text()[-5000:]
        servers["rollout"][1].kill()
        code = process.wait(timeout=RUN_TIMEOUT_S)
    finally:
        kill_session(process)
    assert code == 0, log.read_text()[-5000:]
    # Requests are split by the configured replica count, so the surviving replica serves exactly
    # what the lost one would have: the run is unchanged.
    assert_bitwise_equal(final_weights(tmp_path), references(0).weights)


def test_config_error_found_by_the_ranks_exits_3(model_dir: Path, tmp_path: Path) -> None:
    prepare_output(tmp_path, model_dir)
    servers = {"rollout": [], "teacher": []}
    config = run_config(
        tmp_path,
        servers,
        rollout={"backend": "local", "servers": {}, "prompts_per_step": 1},
        teacher={"placement": "colocated", "servers": {}},
    )
    log = tmp_path / "learner.log"
    assert run_to_end(config, log) == EXIT_BAD_CONFIG, log.read_text()[-5000:]
    assert "every rank needs at least one group" in log.read_text()

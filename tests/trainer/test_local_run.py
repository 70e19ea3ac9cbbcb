"""End-to-end runs of the local mode on the embedded task: metrics, checkpoints, resume, CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from rlsd_contracts.config import parse_config
from rlsd_contracts.wire import TERMINATION_LOG_ENV
from rlsd_trainer.lifecycle import Preempted
from rlsd_trainer.training.trainer import Trainer
from rlsd_trainer.training.trainer import run_training as run_local

pytestmark = pytest.mark.slow


def tiny_config(output_dir: Path, total_steps: int, algorithm: str = "rlsd") -> dict:
    return {
        "run": {"seed": 7, "output_dir": str(output_dir), "total_steps": total_steps},
        "model": {"path": "embedded"},
        "data": {
            "train": {"kind": "embedded", "split": "train"},
            "eval": {"kind": "embedded", "split": "eval"},
            "embedded": {"num_train": 400, "num_eval": 16, "min_terms": 2, "max_terms": 3},
        },
        "warmup": {"steps": 8, "batch_size": 16, "lr": 2e-3},
        "algorithm": {"name": algorithm, "group_size": 4, "lam": {"decay_steps": 4}},
        "rollout": {"prompts_per_step": 3, "sampling": {"max_new_tokens": 20}},
        "optim": {"lr": 1e-3},
        "teacher": {"mode": "frozen", "sync_interval": 2},
        "reward": {"verifier": "math", "workers": 1},
        "checkpoint": {"every": 2, "keep_last": 2},
        "metrics": {"prometheus_port": None, "progress_bar": False},
        "eval": {"every": 2, "max_examples": 16, "max_new_tokens": 20},
        "learner": {"micro_batch_tokens": 256},
    }


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def final_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "final-policy" / "model.safetensors")


def test_run_writes_metrics_checkpoints_plot_and_resumes_exactly(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    summary = run_local(parse_config(tiny_config(straight, total_steps=4)))

    assert summary.steps == 4
    steps = [r for r in records(straight) if "policy_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    # The step of the newest committed checkpoint (every 2 steps), which the operator shows.
    assert [r["checkpoint_step"] for r in steps] == [0, 2, 2, 4]
    for record in steps:
        assert math.isfinite(record["policy_loss"])
        assert 0.0 <= record["reward_mean"] <= 1.0
        assert record["time_teacher_seconds"] > 0
        assert record["lambda"] == pytest.approx(0.5 * (1 - (record["step"] - 1) / 4))
    assert 0.0 <= summary.final_accuracy <= 1.0
    assert summary.plot_path is not None and summary.plot_path.stat().st_size > 10_000
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert (straight / "checkpoints" / "step-00000004" / "manifest.json").exists()
    assert (straight / "final-policy" / "config.json").exists()

    # Interrupted after step 2, then resumed with no flag: same weights, bit for bit.
    resumed = tmp_path / "resumed"
    run_local(parse_config(tiny_config(resumed, total_steps=2)))
    run_local(parse_config(tiny_config(resumed, total_steps=4)))
    assert [r["step"] for r in records(resumed) if "policy_loss" in r] == [1, 2, 3, 4]
    expected, actual = final_weights(straight), final_weights(resumed)
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), name


@pytest.mark.parametrize("algorithm", ["grpo", "opsd", "grpo+opsd"])
def test_baselines_run_through_the_same_pipeline(tmp_path: Path, algorithm: str) -> None:
    summary = run_local(parse_config(tiny_config(tmp_path, total_steps=1, algorithm=algorithm)))
    (record,) = [r for r in records(tmp_path) if "policy_loss" in r]
    assert math.isfinite(record["policy_loss"]) and summary.steps == 1
    assert ("time_teacher_seconds" in record) == (algorithm != "grpo")
    assert "lambda" not in record


def test_cli_reports_a_bad_config_with_exit_code_3(tmp_path: Path) -> None:
    """On stderr, and in a pod's termination log too (where the operator reads why a learner failed)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm:\n  name: ppo\n")
    termination_log = tmp_path / "termination-log"
    result = subprocess.run(
        [sys.executable, "-m", "rlsd_trainer.cli", "local", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, TERMINATION_LOG_ENV: str(termination_log)},
    )
    assert result.returncode == 3
    assert "algorithm.name" in result.stderr and "'rlsd'" in result.stderr
    written = termination_log.read_text()
    assert written.startswith(f"{bad}: invalid configuration") and "algorithm.name" in written


def test_optional_terms_live_teacher_and_several_epochs(tmp_path: Path) -> None:
    raw = tiny_config(tmp_path, total_steps=2)
    raw["algorithm"].update(kl_coef=0.1, entropy_coef=0.01, ppo_epochs=2)
    raw["teacher"]["mode"] = "live"
    raw["learner"]["micro_batch_tokens"] = 64  # several micro-batches per step
    raw["optim"]["warmup_steps"] = 4
    run_local(parse_config(raw))
    first, second = [r for r in records(tmp_path) if "policy_loss" in r]
    # The first epoch is on-policy (ratio 1, policy == reference), so the KL term starts at 0.
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["entropy"] > 0 and math.isfinite(first["grad_norm"])
    # The learning-rate warm-up counts steps, whatever the epochs of each: lr * (s + 1) / 4 for the
    # step after step s (each step of 2 epochs once counted twice).
    lr = raw["optim"]["lr"]
    assert [first["lr"], second["lr"]] == pytest.approx([lr * 2 / 4, lr * 3 / 4])


def test_rollouts_ahead_with_dynamic_sampling_resume_exactly(tmp_path: Path) -> None:
    """`rollout.max_staleness: 2`: the batch of step s is generated by policy max(0, s - 2), and a run
    preempted after step 2 (the batches it generated for steps 3 and 4 go into its checkpoint)
    resumes bit for bit."""

    def config(directory: Path, total_steps: int) -> dict:
        raw = tiny_config(directory, total_steps)
        raw["warmup"].update(steps=60, lr=3e-3)  # groups with signal, for dynamic sampling to keep
        raw["rollout"].update(max_staleness=2, dynamic_sampling={"enabled": True, "max_rounds": 2})
        return raw

    straight = tmp_path / "straight"
    run_local(parse_config(config(straight, total_steps=4)))
    steps = [r for r in records(straight) if "policy_loss" in r]
    assert [r["rollout_staleness"] for r in steps] == [0.0, 1.0, 2.0, 2.0]
    assert [r["rollout_staleness_max"] for r in steps] == [0.0, 1.0, 2.0, 2.0]
    for record in steps:
        # Groups without signal were replaced while rounds were left.
        assert record["groups_with_signal"] == 1.0 or record["dynamic_sampling_rounds"] == 2.0
        # A refill round runs only because a group was dropped, and refills at least one.
        rounds, dropped = record["dynamic_sampling_rounds"], record["dynamic_sampling_dropped_groups"]
        assert (rounds == 0) == (dropped == 0) and dropped >= rounds, record
        if record["rollout_staleness"] == 0.0:  # the same weights (up to float rounding), no correction
            assert record["importance_ratio_max"] == pytest.approx(1.0, rel=1e-4)
            assert record["importance_capped_fraction"] == 0.0
        assert record["importance_ratio_p50"] > 0 and math.isfinite(record["importance_ratio_p99"])
    assert sum(r["dynamic_sampling_dropped_groups"] for r in steps) > 0
    assert any(r["importance_ratio_max"] != pytest.approx(1.0) for r in steps)

    resumed = tmp_path / "resumed"
    trainer = Trainer(parse_config(config(resumed, total_steps=4)))
    # What SIGTERM sets (lifecycle.PreemptionWatch), raised once step 2 is done.
    trainer.preemption = SimpleNamespace(requested=SimpleNamespace(is_set=lambda: trainer.step >= 2))
    with pytest.raises(Preempted):
        trainer.run()
    run_local(parse_config(config(resumed, total_steps=4)))
    assert [r["rollout_staleness"] for r in records(resumed) if "policy_loss" in r] == [0.0, 1.0, 2.0, 2.0]
    expected, actual = final_weights(straight), final_weights(resumed)
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), name

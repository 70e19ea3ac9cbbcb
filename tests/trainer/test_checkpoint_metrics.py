"""Crash-safe checkpoints and the metrics logger (JSONL + Prometheus endpoint)."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rlsd_trainer.checkpoint import MANIFEST, STATE, CheckpointManager
from rlsd_trainer.metrics import MetricsLogger, format_console, prometheus_name, read_jsonl


def _state(step: int) -> dict:
    return {"step": step, "weights": torch.arange(6, dtype=torch.float32) * step, "note": f"s{step}"}


def test_save_load_round_trip(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=3)
    path = manager.save(20, _state(20))
    assert path == tmp_path / "ckpt" / "step-00000020"
    assert (path / STATE).is_file() and (path / MANIFEST).is_file()
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["step"] == 20 and set(manifest["files"]) == {STATE}
    assert manager.verify(path)
    loaded = manager.load_latest()
    assert loaded is not None
    step, state = loaded
    assert step == 20
    assert torch.equal(state["weights"], _state(20)["weights"])
    assert state["note"] == "s20"


def test_latest_is_the_highest_step(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=5)
    for step in (5, 100, 40):
        manager.save(step, _state(step))
    loaded = manager.load_latest()
    assert loaded is not None and loaded[0] == 100


def test_keep_last_prunes_old_checkpoints(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30, 40):
        manager.save(step, _state(step))
    assert [p.name for p in manager.committed()] == ["step-00000030", "step-00000040"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000030", "step-00000040"]


def test_staging_directory_is_ignored(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(10, _state(10))
    # A crash mid-write leaves a half-written, newer staging directory behind.
    staging = tmp_path / "step-00000020.tmp"
    staging.mkdir()
    (staging / STATE).write_bytes(b"partial")
    assert [p.name for p in manager.committed()] == ["step-00000010"]
    loaded = manager.load_latest()
    assert loaded is not None and loaded[0] == 10
    # Saving that step later replaces the stale staging directory and commits normally.
    manager.save(20, _state(20))
    assert not staging.exists()
    loaded = manager.load_latest()
    assert loaded is not None and loaded[0] == 20


def test_corrupted_latest_falls_back_to_previous(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(10, _state(10))
    newest = manager.save(20, _state(20))
    data = bytearray((newest / STATE).read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])
    (newest / STATE).write_bytes(bytes(data))
    assert not manager.verify(newest)
    loaded = manager.load_latest()
    assert loaded is not None
    step, state = loaded
    assert step == 10 and state["note"] == "s10"


def test_missing_manifest_is_not_a_checkpoint(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(10, _state(10))
    newest = manager.save(20, _state(20))
    (newest / MANIFEST).unlink()
    loaded = manager.load_latest()
    assert loaded is not None and loaded[0] == 10


def test_no_checkpoints_gives_none(tmp_path: Path) -> None:
    assert CheckpointManager(tmp_path / "absent", keep_last=3).load_latest() is None
    assert CheckpointManager(tmp_path, keep_last=3).load_latest() is None
    (tmp_path / "step-00000001.tmp").mkdir()
    assert CheckpointManager(tmp_path, keep_last=3).load_latest() is None


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def metrics(tmp_path: Path) -> Iterator[MetricsLogger]:
    logger = MetricsLogger(tmp_path / "out" / "metrics.jsonl", prometheus_port=0)
    yield logger
    logger.close()


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def _sample(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def test_prometheus_endpoint_serves_gauges_and_counters(metrics: MetricsLogger, tmp_path: Path) -> None:
    assert metrics.port is not None and metrics.port > 0
    metrics.log(3, {"reward_mean": 0.5, "clip_ratio": 0.04, "nan_value": float("nan")})
    text = _scrape(metrics.port)
    assert "rlsd_reward_mean 0.5" in text
    assert _sample(text, "rlsd_step") == 3.0
    assert _sample(text, "rlsd_clip_ratio") == pytest.approx(0.04)
    assert _sample(text, "rlsd_nan_value") is None  # non-finite values are not exported
    assert "# HELP rlsd_reward_mean Mean verifier reward" in text
    metrics.increment("verifier_errors", 2)
    metrics.increment("verifier_errors", 1)
    metrics.log(4, {"reward_mean": 0.75, "verifier_errors": 1.0})
    text = _scrape(metrics.port)
    assert _sample(text, "rlsd_verifier_errors_total") == 3.0
    # It stays a counter: no gauge sample of the logged per-step value (1.0) appears beside it.
    assert re.search(r"^# TYPE rlsd_verifier_errors(_total)? counter$", text, re.MULTILINE)
    assert _sample(text, "rlsd_verifier_errors") is None
    assert _sample(text, "rlsd_reward_mean") == 0.75
    assert _sample(text, "rlsd_step") == 4.0


def test_jsonl_records(metrics: MetricsLogger, tmp_path: Path) -> None:
    metrics.log(1, {"reward_mean": 0.5})
    metrics.log(2, {"reward_mean": 0.25, "policy_loss": -0.1})
    records = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["reward_mean"] == 0.5
    assert records[1]["policy_loss"] == -0.1
    assert all(isinstance(r["time"], float) for r in records)


def test_jsonl_appends_across_loggers(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    for step in (1, 2):
        logger = MetricsLogger(path, prometheus_port=None)
        assert logger.port is None
        logger.log(step, {"x": float(step)})
        logger.close()
    assert [r["x"] for r in read_jsonl(path)] == [1.0, 2.0]


def test_name_and_console_helpers() -> None:
    assert prometheus_name("eval/accuracy-at.1") == "rlsd_eval_accuracy_at_1"
    line = format_console(7, {"reward_mean": 0.123456, "lambda": 0.5}, ("reward_mean", "missing", "lambda"))
    assert line == "step 7: reward_mean=0.1235 lambda=0.5"

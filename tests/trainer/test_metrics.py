"""The metrics logger: JSONL lines, console summary and the Prometheus endpoint."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlsd_trainer.monitoring.metrics import MetricsLogger, format_console, prometheus_name, read_jsonl


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

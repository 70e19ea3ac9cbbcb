"""Metrics: one JSONL line per step, a console summary, Prometheus gauges on `/metrics`, and the
experiment trackers of `metrics.trackers` (trackers.py).

Every JSONL key `k` is exported as the gauge `rlsd_k` (its latest value); cumulative counts are
also exported as counters `rlsd_<name>_total`. The trackers get the same values as the JSONL line.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

if TYPE_CHECKING:
    from rlsd_trainer.monitoring.trackers import Tracker

_INVALID = re.compile(r"[^a-zA-Z0-9_]")

# Human descriptions of the main series (others get a generic one).
DESCRIPTIONS = {
    "step": "Training steps completed",
    "reward_mean": "Mean verifier reward of this step's rollouts",
    "eval_accuracy": "Held-out accuracy (fraction of eval questions answered correctly)",
    "lambda": "RLSD mixing coefficient lambda at this step",
    "delta_mean": "Mean privileged-information gain log P_T - log P_S over response tokens",
    "weight_clipped_fraction": "Share of RLSD evidence weights clipped to [1-eps_w, 1+eps_w]",
    "advantage_shift": (
        "Mean |A_t - A| / |A| over tokens with A != 0: how far RLSD's token advantages are from GRPO's "
        "(at most lambda * eps_w)"
    ),
    "delta_mean_positive": "Mean Delta = log P_T - log P_S over tokens of responses with advantage > 0",
    "delta_mean_negative": "Mean Delta = log P_T - log P_S over tokens of responses with advantage < 0",
    "weight_mean_positive": "Mean unclipped evidence weight over tokens of responses with advantage > 0",
    "weight_mean_negative": "Mean unclipped evidence weight over tokens of responses with advantage < 0",
    "delta_correct": "Mean Delta over tokens of correct responses (embedded task)",
    "delta_before_error": "Mean Delta over tokens of incorrect responses before their first wrong token",
    "delta_first_error": "Mean Delta at the first wrong token of incorrect responses (embedded task)",
    "delta_after_error": "Mean Delta over tokens of incorrect responses after their first wrong token",
    "delta_paired_fraction": (
        "Share of the step's responses whose Delta came from one teacher server version, with and "
        "without the privileged prompt (remote teacher)"
    ),
    "teacher_version_lag": (
        "The learner's teacher version minus that of the teacher server weights that scored the step"
    ),
    "policy_loss": "Clipped policy-gradient surrogate loss",
    "clip_ratio": "Share of tokens whose ratio was clipped",
    "tokens_per_second": "Rollout plus learner tokens processed per second",
}


# Cumulative series exported as counters `rlsd_<name>_total`, never as gauges.
COUNTERS = {
    "verifier_errors": "Verifier calls that raised or returned a non-number (scored 0)",
    "verifier_timeouts": "Verifier calls that exceeded reward.timeout_s (scored 0)",
}


def prometheus_name(key: str) -> str:
    return "rlsd_" + _INVALID.sub("_", key)


class MetricsLogger:
    def __init__(
        self,
        jsonl_path: Path,
        prometheus_port: int | None,
        prometheus_host: str = "127.0.0.1",
        trackers: Sequence[Tracker] = (),
    ) -> None:
        jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = jsonl_path.open("a", encoding="utf-8")
        self.registry = CollectorRegistry()
        self._gauges: dict[str, Gauge] = {}
        self._counters: dict[str, Counter] = {}
        self.port: int | None = None
        self._server = None
        self._trackers = list(trackers)
        if prometheus_port is not None:
            self._server, _ = start_http_server(prometheus_port, addr=prometheus_host, registry=self.registry)
            self.port = self._server.server_port

    def log(self, step: int, values: dict[str, float]) -> None:
        """Append one JSONL record and update the gauges (COUNTERS keys stay counters only)."""
        record = {"step": step, "time": time.time(), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in record.items():
            if key == "time" or key in COUNTERS or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            self._gauge(key).set(value)
        for tracker in self._trackers:
            tracker.log(step, values)

    def increment(self, name: str, amount: float) -> None:
        if name not in self._counters:
            description = COUNTERS.get(name, name.replace("_", " "))
            self._counters[name] = Counter(prometheus_name(name), description, registry=self.registry)
        self._counters[name].inc(amount)

    def _gauge(self, key: str) -> Gauge:
        if key not in self._gauges:
            description = DESCRIPTIONS.get(key, key.replace("_", " "))
            self._gauges[key] = Gauge(prometheus_name(key), description, registry=self.registry)
        return self._gauges[key]

    def close(self) -> None:
        for tracker in self._trackers:
            tracker.close()
        self._file.close()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def read_jsonl(path: Path) -> list[dict[str, float]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def format_console(step: int, values: dict[str, float], keys: tuple[str, ...]) -> str:
    shown = [f"{key}={values[key]:.4g}" for key in keys if key in values]
    return f"step {step}: " + " ".join(shown)

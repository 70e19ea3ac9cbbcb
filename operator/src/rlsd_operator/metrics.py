"""The operator's own Prometheus metrics (prefix `rlsd_operator_`), and reading a learner's.

Progress in a run's status comes from learner rank 0's `/metrics` (trainer gauges `rlsd_*`).
"""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from rlsd_contracts.wire import PROGRESS_GAUGES

PHASES = ("Pending", "Initializing", "Running", "Restarting", "Succeeded", "Failed", "Suspended")
RUNS = Gauge("rlsd_operator_runs", "RLSDRuns this operator reconciles, by phase", ["phase"])
RECONCILE_SECONDS = Histogram(
    "rlsd_operator_reconcile_duration_seconds", "Duration of one reconcile of a run"
)
RESTARTS = Counter("rlsd_operator_restarts_total", "Gang restarts after application failures of learners")
PREEMPTIONS = Counter(
    "rlsd_operator_preemptions_total", "Gang restarts after preemptions or lost learner pods"
)
ERRORS = Counter("rlsd_operator_errors_total", "Reconciles that raised, and failed metric scrapes", ["kind"])
# Exported at 0 from the start: a series born at its first error would hide that error from rate()
# and increase() (and so from the dashboard and RLSDOperatorReconcileErrors).
for _kind in ("reconcile", "scrape"):
    ERRORS.labels(_kind)

# Trainer gauge -> status field.
PROGRESS_METRICS = dict(
    zip(PROGRESS_GAUGES, ("step", "reward", "accuracy", "latestCheckpointStep", "staleness"), strict=True)
)


def publish_phases(phases: dict[object, str]) -> None:
    """Set the runs-by-phase gauge from every known run's phase."""
    counts = Tally(phases.values())
    for phase in PHASES:
        RUNS.labels(phase).set(counts.get(phase, 0))


def parse_progress(text: str) -> dict[str, float]:
    """The PROGRESS_METRICS status fields a learner's Prometheus text has (step, reward, ...)."""
    progress: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in PROGRESS_METRICS:
                progress[PROGRESS_METRICS[sample.name]] = sample.value
    return progress

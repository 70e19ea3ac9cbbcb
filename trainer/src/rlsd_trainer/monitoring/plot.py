"""PNG plots of a run's metrics against step: reward, held-out accuracy, RLSD weight statistics, the
teacher's informativeness and the learner's terms."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from rlsd_trainer.monitoring.metrics import read_jsonl

PANELS = (
    ("Reward", ("reward_mean",)),
    ("Held-out accuracy", ("eval_accuracy",)),
    ("RLSD evidence weights", ("delta_mean", "weight_clipped_fraction", "advantage_shift", "lambda")),
    (
        "Teacher informativeness (Delta)",
        (
            "delta_mean_positive",
            "delta_mean_negative",
            "delta_correct",
            "delta_before_error",
            "delta_first_error",
            "delta_after_error",
        ),
    ),
    ("Learner", ("policy_loss", "clip_ratio", "entropy")),
)


def series(records: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(metrics_path: Path, output: Path) -> Path:
    """Draw the run's panels from its metrics JSONL into `output` (PNG) and return the path."""
    records = read_jsonl(metrics_path)
    figure, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    for axis, (title, keys) in zip(axes, PANELS, strict=True):
        for key in keys:
            steps, values = series(records, key)
            if steps:
                axis.plot(
                    steps, values, marker="o" if key == "eval_accuracy" else None, markersize=3, label=key
                )
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output

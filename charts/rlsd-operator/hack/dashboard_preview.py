#!/usr/bin/env python3
"""Draws the main panels of the Grafana dashboard (dashboards/rlsd.json) from a real run's
metrics.jsonl: the same series, as Prometheus would have scraped them, against the step.

    .venv/bin/python charts/rlsd-operator/hack/dashboard_preview.py runs/embedded-rlsd/metrics.jsonl

writes charts/rlsd-operator/dashboard-preview.png (shown in the chart's README and docs/kubernetes.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from dashboard import PHASES  # the panels it draws: one list

CHART = Path(__file__).resolve().parents[1]
# (dashboard panel title, [(jsonl key = rlsd_<key>, legend)])
PANELS = [
    ("Reward", [("reward_mean", "rlsd_reward_mean"), ("reward_std", "rlsd_reward_std")]),
    ("Held-out accuracy", [("eval_accuracy", "rlsd_eval_accuracy")]),
    ("Privileged-information gain (delta mean)", [("delta_mean", "rlsd_delta_mean")]),
    (
        "Weights clipped, lambda",
        [("weight_clipped_fraction", "rlsd_weight_clipped_fraction"), ("lambda", "rlsd_lambda")],
    ),
    ("Policy loss", [("policy_loss", "rlsd_policy_loss")]),
    ("Clip ratio, entropy", [("clip_ratio", "rlsd_clip_ratio"), ("entropy", "rlsd_entropy")]),
    ("Response length (tokens)", [("response_length_mean", "rlsd_response_length_mean")]),
    ("Tokens per second", [("tokens_per_second", "rlsd_tokens_per_second")]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("metrics", type=Path, help="a run's metrics.jsonl")
    parser.add_argument("--out", type=Path, default=CHART / "dashboard-preview.png")
    args = parser.parse_args()
    records = [json.loads(line) for line in args.metrics.read_text().splitlines() if line.strip()]
    figure, axes = plt.subplots(3, 3, figsize=(15, 9.5))
    figure.suptitle(f"RLSD training runs: main dashboard panels ({args.metrics.parent.name}, real local run)")
    for axis, (title, series) in zip(axes.flat, PANELS, strict=False):
        for key, legend in series:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                steps, values = zip(*points, strict=True)
                axis.plot(steps, values, label=legend, marker="o" if key == "eval_accuracy" else None, ms=3)
        axis.set_title(title, fontsize=10)
        axis.legend(fontsize=7, loc="best")
        axis.grid(alpha=0.3)
    # Step time by phase, stacked (rlsd_time_<phase>_seconds).
    axis = axes.flat[-1]
    rows = [r for r in records if "time_learn_seconds" in r]
    steps = [r["step"] for r in rows]
    stacks = [[r.get(f"time_{phase}_seconds", 0.0) for r in rows] for phase in PHASES]
    axis.stackplot(steps, stacks, labels=[f"rlsd_time_{phase}_seconds" for phase in PHASES], alpha=0.8)
    axis.set_title("Step time by phase (s)", fontsize=10)
    axis.legend(fontsize=6, loc="upper left")
    axis.grid(alpha=0.3)
    for axis in axes[-1]:
        axis.set_xlabel("step (rlsd_policy_version)")
    figure.tight_layout()
    figure.savefig(args.out, dpi=80)
    print(args.out)


if __name__ == "__main__":
    main()

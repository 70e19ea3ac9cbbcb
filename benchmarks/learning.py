"""Learning benchmark: the embedded default trained with rlsd, grpo and opsd, several seeds each.

For every seed the warm-up (SFT) runs once, in the rlsd run; the other algorithms start from a
copy of that same warmed-up policy, so the comparison isolates the RL phase. Each run is the real
CLI (`rlsd-trainer local`) with the packaged default config, only `run.seed`, `algorithm.name`
and `run.output_dir` changed. Prints held-out accuracy at fixed steps (mean ± std over seeds), the
gain of every run over its warmed-up start, the wall time of each run, and writes a JSON and a PNG.

    python benchmarks/learning.py                  # rlsd, grpo, opsd x seeds 0 1 2
    python benchmarks/learning.py --seeds 0 --algorithms rlsd grpo
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "trainer/src/rlsd_trainer/configs/embedded.yaml"
SHARED_DIRS = ("embedded-model", "initial-policy")


def run_one(config: Path, output_dir: Path, seed: int, algorithm: str) -> float:
    """Run one training to the end through the CLI; returns its wall time in seconds."""
    command = [
        sys.executable,
        "-m",
        "rlsd_trainer.cli",
        "local",
        "--config",
        str(config),
        "--set",
        f"run.seed={seed}",
        "--set",
        f"algorithm.name={algorithm}",
        "--set",
        f"run.output_dir={output_dir}",
        "--set",
        "metrics.progress_bar=false",
        "--set",
        "metrics.prometheus_port=null",
    ]
    started = time.perf_counter()
    with (output_dir.parent / f"{output_dir.name}.log").open("w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
    return time.perf_counter() - started


def eval_curve(output_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {int(r["step"]): float(r["eval_accuracy"]) for r in records if "eval_accuracy" in r}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--algorithms", nargs="+", default=["rlsd", "grpo", "opsd"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs/bench-learning")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks/results")
    args = parser.parse_args()
    if args.algorithms[0] != "rlsd":
        args.algorithms = ["rlsd", *[a for a in args.algorithms if a != "rlsd"]]

    curves: dict[str, dict[int, dict[int, float]]] = {a: {} for a in args.algorithms}
    wall: dict[str, dict[int, float]] = {a: {} for a in args.algorithms}
    for seed in args.seeds:
        for algorithm in args.algorithms:
            output_dir = args.work_dir / f"{algorithm.replace('+', '_')}-seed{seed}"
            shutil.rmtree(output_dir, ignore_errors=True)
            output_dir.mkdir(parents=True)
            if algorithm != "rlsd":
                for name in SHARED_DIRS:
                    shutil.copytree(args.work_dir / f"rlsd-seed{seed}" / name, output_dir / name)
            wall[algorithm][seed] = run_one(args.config, output_dir, seed, algorithm)
            curves[algorithm][seed] = eval_curve(output_dir)
            final = curves[algorithm][seed]
            print(
                f"{algorithm:>5} seed {seed}: {final[0]:.3f} -> {final[max(final)]:.3f} "
                f"in {wall[algorithm][seed]:.0f} s",
                flush=True,
            )

    steps = sorted(set.intersection(*(set(c) for a in curves.values() for c in a.values())))
    print("\nHeld-out accuracy (greedy, %), mean ± std over seeds", args.seeds)
    print(f"{'step':>6} " + " ".join(f"{a:>14}" for a in args.algorithms))
    summary: dict[str, dict[str, list[float]]] = {}
    for algorithm in args.algorithms:
        per_step = [[100 * curves[algorithm][s][step] for s in args.seeds] for step in steps]
        summary[algorithm] = {
            "mean": [statistics.fmean(v) for v in per_step],
            "std": [statistics.pstdev(v) for v in per_step],
            "gain": [100 * (curves[algorithm][s][steps[-1]] - curves[algorithm][s][0]) for s in args.seeds],
        }
    for index, step in enumerate(steps):
        cells = [
            f"{summary[a]['mean'][index]:6.1f} ± {summary[a]['std'][index]:4.1f}" for a in args.algorithms
        ]
        print(f"{step:>6} " + " ".join(f"{c:>14}" for c in cells))
    print("\nGain over the warmed-up start at the last step (points), per seed:")
    for algorithm in args.algorithms:
        gains = summary[algorithm]["gain"]
        print(
            f"  {algorithm:>5}: "
            + ", ".join(f"{g:+.1f}" for g in gains)
            + f"  (mean {statistics.fmean(gains):+.1f})"
        )
    print("\nWall time per run (s, 2 CPU threads; rlsd includes the shared warm-up):")
    for algorithm in args.algorithms:
        print(f"  {algorithm:>5}: " + ", ".join(f"{wall[algorithm][s]:.0f}" for s in args.seeds))

    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "learning.json").write_text(
        json.dumps({"steps": steps, "seeds": args.seeds, "summary": summary, "wall_seconds": wall}, indent=2)
    )
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for algorithm in args.algorithms:
        mean, std = summary[algorithm]["mean"], summary[algorithm]["std"]
        axis.plot(steps, mean, marker="o", label=algorithm)
        axis.fill_between(
            steps,
            [m - s for m, s in zip(mean, std, strict=True)],
            [m + s for m, s in zip(mean, std, strict=True)],
            alpha=0.2,
        )
    axis.set_xlabel("RL step")
    axis.set_ylabel("held-out accuracy (%)")
    axis.set_title(f"Embedded task, {len(args.seeds)} seeds (mean ± std)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(args.results / "learning.png", dpi=110)
    print(f"\nwrote {args.results / 'learning.json'} and {args.results / 'learning.png'}")


if __name__ == "__main__":
    main()

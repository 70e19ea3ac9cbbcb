"""Learning benchmark: the embedded default trained with rlsd, grpo and opsd, several seeds each,
or (`--max-staleness`) on-policy against asynchronous RL.

For every seed the warm-up (SFT) runs once, in the first run (rlsd, first staleness); the other
runs start from a copy of that same warmed-up policy, so the comparison isolates the RL phase. Each
run is the real CLI (`rlsd-trainer local`) with the packaged default config, only `run.seed`,
`algorithm.name`, `rollout.max_staleness` and `run.output_dir` changed. Prints held-out accuracy at
fixed steps (mean ± std over seeds), the gain of every run over its warmed-up start, the wall time
of each run, and writes a JSON and a PNG (`--name`, under `--results`).

    python benchmarks/learning.py                  # rlsd, grpo, opsd x seeds 0 1 2
    python benchmarks/learning.py --seeds 0 --algorithms rlsd grpo
    python benchmarks/learning.py --algorithms rlsd --max-staleness 0 1 --name learning_async
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
from harness import environment, finish

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "trainer/src/rlsd_trainer/configs/embedded.yaml"
SHARED_DIRS = ("embedded-model", "initial-policy")


def run_one(config: Path, output_dir: Path, seed: int, algorithm: str, staleness: int) -> float:
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
        f"rollout.max_staleness={staleness}",
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


def variant_name(algorithm: str, staleness: int, staleness_values: list[int]) -> str:
    """`rlsd`, or `rlsd k=1` when staleness values are compared."""
    return algorithm if staleness_values == [0] else f"{algorithm} k={staleness}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--algorithms", nargs="+", default=["rlsd", "grpo", "opsd"])
    parser.add_argument(
        "--max-staleness",
        nargs="+",
        type=int,
        default=[0],
        help="rollout.max_staleness values, each run for every algorithm (0: on-policy)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs/bench-learning")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks/results")
    parser.add_argument("--name", default="learning", help="file name of the JSON and PNG")
    args = parser.parse_args()
    if args.algorithms[0] != "rlsd":
        args.algorithms = ["rlsd", *[a for a in args.algorithms if a != "rlsd"]]
    report = {"environment": environment()}
    runs = [
        (a, k, variant_name(a, k, args.max_staleness)) for a in args.algorithms for k in args.max_staleness
    ]
    variants = [name for _, _, name in runs]

    curves: dict[str, dict[int, dict[int, float]]] = {v: {} for v in variants}
    wall: dict[str, dict[int, float]] = {v: {} for v in variants}
    for seed in args.seeds:
        first_dir = None
        for algorithm, staleness, variant in runs:
            output_dir = args.work_dir / f"{variant.replace('+', '_').replace(' k=', '-k')}-seed{seed}"
            shutil.rmtree(output_dir, ignore_errors=True)
            output_dir.mkdir(parents=True)
            if first_dir is not None:
                for name in SHARED_DIRS:
                    shutil.copytree(first_dir / name, output_dir / name)
            wall[variant][seed] = run_one(args.config, output_dir, seed, algorithm, staleness)
            first_dir = first_dir or output_dir
            curves[variant][seed] = eval_curve(output_dir)
            final = curves[variant][seed]
            print(
                f"{variant:>10} seed {seed}: {final[0]:.3f} -> {final[max(final)]:.3f} "
                f"in {wall[variant][seed]:.0f} s",
                flush=True,
            )

    steps = sorted(set.intersection(*(set(c) for a in curves.values() for c in a.values())))
    print("\nHeld-out accuracy (greedy, %), mean ± std over seeds", args.seeds)
    print(f"{'step':>6} " + " ".join(f"{a:>14}" for a in variants))
    summary: dict[str, dict[str, list[float]]] = {}
    for variant in variants:
        per_step = [[100 * curves[variant][s][step] for s in args.seeds] for step in steps]
        summary[variant] = {
            "mean": [statistics.fmean(v) for v in per_step],
            "std": [statistics.pstdev(v) for v in per_step],
            "gain": [100 * (curves[variant][s][steps[-1]] - curves[variant][s][0]) for s in args.seeds],
        }
    for index, step in enumerate(steps):
        cells = [f"{summary[a]['mean'][index]:6.1f} ± {summary[a]['std'][index]:4.1f}" for a in variants]
        print(f"{step:>6} " + " ".join(f"{c:>14}" for c in cells))
    print("\nGain over the warmed-up start at the last step (points), per seed:")
    for variant in variants:
        gains = summary[variant]["gain"]
        print(
            f"  {variant:>10}: "
            + ", ".join(f"{g:+.1f}" for g in gains)
            + f"  (mean {statistics.fmean(gains):+.1f})"
        )
    print("\nWall time per run (s, 2 CPU threads; the first of each seed includes the shared warm-up):")
    for variant in variants:
        print(f"  {variant:>10}: " + ", ".join(f"{wall[variant][s]:.0f}" for s in args.seeds))

    report.update(
        {
            "steps": steps,
            "seeds": args.seeds,
            "max_staleness": args.max_staleness,
            "summary": summary,
            "wall_seconds": wall,
        }
    )
    finish(report, args.results / f"{args.name}.json")
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for variant in variants:
        mean, std = summary[variant]["mean"], summary[variant]["std"]
        axis.plot(steps, mean, marker="o", label=variant)
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
    figure.savefig(args.results / f"{args.name}.png", dpi=110)
    print(f"wrote {args.results / args.name}.png")


if __name__ == "__main__":
    main()

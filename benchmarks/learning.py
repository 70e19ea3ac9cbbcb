"""The learning study: RLSD against GRPO, OPSD and GRPO+OPSD on the embedded tasks, paired seeds,
95% intervals; or (`--max-staleness`) on-policy against asynchronous RL.

Design:
- Every run is the real CLI (`rlsd-trainer local`) with a packaged config (`--tasks`), changing only
  `run.seed`, `algorithm.name` (and that variant's own settings, `rlsd:algorithm.eps_w=0.9`),
  `rollout.max_staleness`, `run.total_steps` (`--steps`), `run.output_dir` and what `--set` adds.
- Paired seeds: each task's warm-up (SFT) runs once; every run of that task starts from a copy of
  the same warmed-up policy, and a seed fixes the RL phase's questions (the embedded task's train
  and held-out rows are generated from it), their order and the sampling for every algorithm, so
  per-seed differences between algorithms measure the algorithms (the intervals do not include
  warm-up-to-warm-up variation).
- Runs go `--jobs` at a time (default 2, one thread each: the 2 cores this is sized for).
- Intervals are Student-t 95% intervals over seeds; a difference between two algorithms is the
  interval of the per-seed differences (paired), with the count of seeds where the first is ahead.

Prints held-out accuracy per evaluation step, the final and the mean accuracy over the run's
evaluations, entropy and response length over the last steps, the paired differences, and RLSD's
teacher diagnostics (Delta split by correctness and by the advantage's sign); writes `<name>.json`
and `<name>.png` under `--results`.

    python benchmarks/learning.py                                     # the whole study
    python benchmarks/learning.py --tasks embedded --seeds 0 1 --algorithms rlsd grpo
    python benchmarks/learning.py --algorithms rlsd --max-staleness 0 1 --name learning_async
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from harness import environment, finish, save_figure
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "trainer/src/rlsd_trainer/configs"
TASKS = {"embedded": CONFIGS / "embedded.yaml", "chains": CONFIGS / "embedded-chains.yaml"}
SHARED_DIRS = ("embedded-model", "initial-policy")
# Entropy and response length are compared over the runs' last steps (their per-step noise is large).
TAIL_STEPS = 10
DIAGNOSTICS = (
    "delta_correct",
    "delta_before_error",
    "delta_first_error",
    "delta_after_error",
    "delta_mean_positive",
    "delta_mean_negative",
    "advantage_shift",
)


@dataclass(frozen=True)
class Run:
    task: str
    algorithm: str  # as given: a name, or a name and settings (`rlsd:algorithm.eps_w=0.9`)
    staleness: int
    seed: int
    variant: str  # the algorithm, with ` k=1` when staleness values are compared

    def directory(self, work: Path) -> Path:
        name = re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.variant.replace(" k=", "-k"))
        return work / self.task / f"{name}-seed{self.seed}"

    def settings(self) -> list[str]:
        name, *extra = self.algorithm.split(":")
        return [f"algorithm.name={name}", f"rollout.max_staleness={self.staleness}", *extra]


def cli(config: Path, output_dir: Path, settings: Sequence[str]) -> list[str]:
    command = [sys.executable, "-m", "rlsd_trainer.cli", "local", "--config", str(config)]
    for setting in (
        f"run.output_dir={output_dir}",
        "metrics.progress_bar=false",
        "metrics.prometheus_port=null",
        *settings,
    ):
        command += ["--set", setting]
    return command


def train(command: list[str], log: Path, threads: int) -> float:
    """Run one training to the end; returns its wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}; see {log}")
    return time.perf_counter() - started


def warm_up(task: str, work: Path, settings: Sequence[str], threads: int) -> tuple[Path, float]:
    """The task's warmed-up policy, trained once (a one-step run: the warm-up is saved before RL)."""
    directory = work / task / "warm-up"
    if not (directory / "initial-policy" / "config.json").exists():
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        command = cli(TASKS[task], directory, [*settings, "run.total_steps=1", "run.seed=0"])
        return directory, train(command, work / task / "warm-up.log", threads)
    return directory, 0.0


def finished(output_dir: Path, steps: int) -> bool:
    path = output_dir / "metrics.jsonl"
    return path.exists() and any(r["step"] == steps and "eval_accuracy" in r for r in records(output_dir))


def run_one(run: Run, work: Path, warm: Path, settings: Sequence[str], threads: int) -> float:
    output_dir = run.directory(work)
    shutil.rmtree(output_dir, ignore_errors=True)
    output_dir.mkdir(parents=True)
    for name in SHARED_DIRS:
        shutil.copytree(warm / name, output_dir / name)
    command = cli(
        TASKS[run.task],
        output_dir,
        [*settings, f"run.seed={run.seed}", *run.settings()],
    )
    return train(command, output_dir.parent / f"{output_dir.name}.log", threads)


def records(output_dir: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def t_quantile(p: float, df: int) -> float:
    """Quantile `p` (> 0.5) of Student's t with `df` degrees of freedom: bisection on its CDF,
    `F(x) = 1/2 + integral_0^x f`, integrated with Simpson's rule (no SciPy in this environment)."""
    scale = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float, intervals: int = 2000) -> float:
        h = x / intervals
        weights = (1 if i in (0, intervals) else 4 if i % 2 else 2 for i in range(intervals + 1))
        area = sum(w * scale * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i, w in enumerate(weights))
        return 0.5 + area * h / 3

    low, high = 0.0, 200.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < p else (low, middle)
    return (low + high) / 2


def interval(values: Sequence[float]) -> dict[str, float]:
    """Mean and 95% Student-t interval half-width over seeds (NaN half-width with one seed)."""
    clean = [v for v in values if math.isfinite(v)]
    if not clean:
        return {"mean": math.nan, "half": math.nan, "n": 0}
    mean = statistics.fmean(clean)
    if len(clean) < 2:
        return {"mean": mean, "half": math.nan, "n": 1}
    half = t_quantile(0.975, len(clean) - 1) * statistics.stdev(clean) / math.sqrt(len(clean))
    return {"mean": mean, "half": half, "n": len(clean)}


def fmt(cell: dict[str, float], digits: int = 1) -> str:
    if not math.isfinite(cell["mean"]):
        return "-"
    if not math.isfinite(cell["half"]):
        return f"{cell['mean']:.{digits}f}"
    return f"{cell['mean']:.{digits}f} ± {cell['half']:.{digits}f}"


def tail_mean(history: list[dict[str, float]], key: str) -> float:
    values = [r[key] for r in history if key in r and math.isfinite(r[key])][-TAIL_STEPS:]
    return statistics.fmean(values) if values else math.nan


def summarise(histories: dict[int, list[dict[str, float]]]) -> dict:
    """One variant of one task over its seeds: the per-step accuracy intervals and the run's figures."""
    seeds = sorted(histories)
    curves = {
        s: {int(r["step"]): 100 * r["eval_accuracy"] for r in histories[s] if "eval_accuracy" in r}
        for s in seeds
    }
    steps = sorted(set.intersection(*(set(c) for c in curves.values())))
    per_seed = {
        "final": [curves[s][steps[-1]] for s in seeds],
        "average": [statistics.fmean(curves[s][t] for t in steps[1:]) for s in seeds],
        # The rollouts' reward is the sampled (T = 1) accuracy on questions new to the run.
        "reward": [100 * tail_mean(histories[s], "reward_mean") for s in seeds],
        "entropy": [tail_mean(histories[s], "entropy") for s in seeds],
        "length": [tail_mean(histories[s], "response_length_mean") for s in seeds],
        **{key: [tail_mean(histories[s], key) for s in seeds] for key in DIAGNOSTICS},
    }
    per_step = {}
    for key in ("entropy", "response_length_mean", *DIAGNOSTICS):
        by_step: dict[int, list[float]] = {}
        for s in seeds:
            for r in histories[s]:
                if key in r and math.isfinite(r[key]):
                    by_step.setdefault(int(r["step"]), []).append(r[key])
        per_step[key] = {step: statistics.fmean(v) for step, v in sorted(by_step.items())}
    return {
        "steps": steps,
        "accuracy": [interval([curves[s][t] for s in seeds]) for t in steps],
        "curves": {s: [curves[s][t] for t in steps] for s in seeds},
        "per_seed": per_seed,
        **{key: interval(values) for key, values in per_seed.items()},
        "per_step": per_step,
    }


def paired(first: dict, second: dict) -> dict:
    """Per-seed differences first - second (final, mean and sampled accuracy, and the accuracy curve):
    intervals, and the seeds where first is ahead."""
    out = {}
    for key in ("final", "average", "reward"):
        differences = [a - b for a, b in zip(first["per_seed"][key], second["per_seed"][key], strict=True)]
        out[key] = {**interval(differences), "wins": sum(d > 0 for d in differences), "of": len(differences)}
    out["curve"] = [
        interval([first["curves"][s][i] - second["curves"][s][i] for s in first["curves"]])
        for i in range(len(first["steps"]))
    ]
    return out


def print_tables(task: str, summary: dict[str, dict], baseline: str | None, comparisons: dict) -> None:
    variants = list(summary)
    steps = summary[variants[0]]["steps"]
    n = summary[variants[0]]["final"]["n"]
    print(f"\n### {task}: held-out accuracy (%, greedy), mean ± 95% interval over {n} paired seeds\n")
    print("| step | " + " | ".join(variants) + " |")
    print("|---|" + "---|" * len(variants))
    for index, step in enumerate(steps):
        print(f"| {step} | " + " | ".join(fmt(summary[v]["accuracy"][index]) for v in variants) + " |")
    print(f"\n### {task}: figures (mean ± 95% interval; entropy and length: last {TAIL_STEPS} steps)\n")
    columns = (
        "final accuracy",
        "mean accuracy over evals",
        "sampled accuracy (T=1)",
        "entropy",
        "response tokens",
    )
    header = "| method | " + " | ".join(columns) + " |"
    if baseline:
        header += f" final - {baseline} | mean - {baseline} | sampled - {baseline} |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for v in variants:
        figures = summary[v]
        cells = [
            fmt(figures[k], 3 if k == "entropy" else 1)
            for k in ("final", "average", "reward", "entropy", "length")
        ]
        if baseline:
            for key in ("final", "average", "reward"):
                if v == baseline:
                    cells.append("")
                else:
                    c = comparisons[v][key]
                    cells.append(f"{fmt(c)} ({c['wins']}/{c['of']} ahead)")
        print(f"| {v} | " + " | ".join(cells) + " |")
    with_teacher = [v for v in variants if math.isfinite(summary[v]["delta_mean_positive"]["mean"])]
    if with_teacher:
        print(f"\n### {task}: teacher diagnostics, Delta = log P_T - log P_S (last {TAIL_STEPS} steps)\n")
        print("| method | " + " | ".join(DIAGNOSTICS) + " |")
        print("|---|" + "---|" * len(DIAGNOSTICS))
        for v in with_teacher:
            print(f"| {v} | " + " | ".join(fmt(summary[v][k], 2) for k in DIAGNOSTICS) + " |")


def band(
    axis: plt.Axes, steps: list[int], cells: list[dict[str, float]], label: str, color: str | None = None
) -> str:
    """A mean line with its 95% band; returns the line's colour."""
    mean = [c["mean"] for c in cells]
    half = [c["half"] if math.isfinite(c["half"]) else 0.0 for c in cells]
    (line,) = axis.plot(steps, mean, marker="o", markersize=3, label=label, color=color)
    low = [m - h for m, h in zip(mean, half, strict=True)]
    high = [m + h for m, h in zip(mean, half, strict=True)]
    axis.fill_between(steps, low, high, alpha=0.15, color=line.get_color())
    return line.get_color()


def plot(study: dict[str, dict[str, dict]], comparisons: dict, baseline: str | None, path: Path) -> None:
    columns = ("accuracy", "difference", "entropy", "length", "diagnostics")
    figure, axes = plt.subplots(
        len(study), len(columns), figsize=(4.2 * len(columns), 3.4 * len(study)), squeeze=False
    )
    for row, (task, summary) in zip(axes, study.items(), strict=True):
        for variant, figures in summary.items():
            color = band(row[0], figures["steps"], figures["accuracy"], variant)
            if variant in comparisons[task]:
                curve = comparisons[task][variant]["curve"]
                band(row[1], figures["steps"], curve, f"{variant} - {baseline}", color)
            for axis, key in ((row[2], "entropy"), (row[3], "response_length_mean")):
                series = figures["per_step"][key]
                axis.plot(list(series), list(series.values()), color=color, label=variant)
        # The first variant with a teacher (RLSD where it runs) draws Delta by token correctness.
        teacher = next((v for v, f in summary.items() if f["per_step"]["delta_correct"]), None)
        for key in DIAGNOSTICS[:4] if teacher else ():
            series = summary[teacher]["per_step"][key]
            row[4].plot(list(series), list(series.values()), label=key)
        row[1].axhline(0.0, color="black", linewidth=0.8)
        titles = (
            f"{task}: held-out accuracy (%), 95% bands",
            f"paired difference vs {baseline} (points)",
            "entropy (mean over seeds)",
            "response tokens (mean over seeds)",
            f"{teacher}: Delta by token correctness",
        )
        for axis, title in zip(row, titles, strict=True):
            axis.set_title(title, fontsize=9)
            axis.set_xlabel("RL step")
            axis.grid(alpha=0.3)
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=7)
    save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=list(TASKS))
    parser.add_argument(
        "--algorithms",
        nargs="+",
        default=["rlsd", "grpo", "opsd", "grpo+opsd"],
        help="algorithm names, each optionally with settings of its own: rlsd:algorithm.eps_w=0.9",
    )
    parser.add_argument(
        "--max-staleness",
        nargs="+",
        type=int,
        default=[0],
        help="rollout.max_staleness values, each run for every algorithm (0: on-policy)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(8)))
    parser.add_argument(
        "--steps", type=int, default=30, help="RL steps per run (the configs' 50 do not fit the hour)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--set", dest="settings", action="append", default=[], help="KEY=VALUE for every run")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs/bench-learning")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks/results")
    parser.add_argument("--name", default="learning", help="file name of the JSON and PNG")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="read the runs --work-dir already holds to the end, not rerun them",
    )
    args = parser.parse_args()
    args.settings = [f"run.total_steps={args.steps}", *args.settings]
    started = time.perf_counter()
    report = {"environment": environment(), "settings": args.settings, "seeds": args.seeds}

    compare_staleness = args.max_staleness != [0]
    # Task by task, so that a task's runs start as soon as its own warm-up is done (the first task
    # listed should be the one with the quicker warm-up).
    runs = [
        Run(task, algorithm, k, seed, f"{algorithm} k={k}" if compare_staleness else algorithm)
        for task in args.tasks
        for seed in args.seeds
        for algorithm in args.algorithms
        for k in args.max_staleness
    ]
    wall: dict[str, float] = {}
    with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(runs), desc="runs", unit="run") as progress:
        warm = {t: pool.submit(warm_up, t, args.work_dir, args.settings, args.threads) for t in args.tasks}

        def after_warm_up(run: Run) -> float:
            if args.reuse and finished(run.directory(args.work_dir), args.steps):
                return 0.0
            return run_one(run, args.work_dir, warm[run.task].result()[0], args.settings, args.threads)

        futures = {pool.submit(after_warm_up, r): r for r in runs}
        for future in as_completed(futures):
            run = futures[future]
            wall[str(run.directory(args.work_dir).relative_to(args.work_dir))] = future.result()
            progress.update(1)
    warm_seconds = {task: future.result()[1] for task, future in warm.items()}
    print("warm-ups: " + ", ".join(f"{t} {s:.0f} s" for t, s in warm_seconds.items()), flush=True)

    # Differences are taken against GRPO, or against on-policy when staleness values are compared.
    baseline = runs[0].variant if compare_staleness else ("grpo" if "grpo" in args.algorithms else None)
    study: dict[str, dict[str, dict]] = {}
    comparisons: dict[str, dict[str, dict]] = {}
    for task in args.tasks:
        variants = list(dict.fromkeys(r.variant for r in runs if r.task == task))
        study[task] = {
            v: summarise(
                {
                    r.seed: records(r.directory(args.work_dir))
                    for r in runs
                    if r.task == task and r.variant == v
                }
            )
            for v in variants
        }
        comparisons[task] = (
            {v: paired(study[task][v], study[task][baseline]) for v in variants if v != baseline}
            if baseline
            else {}
        )
        print_tables(task, study[task], baseline, comparisons[task])
    total = time.perf_counter() - started
    trained = [seconds for seconds in wall.values() if seconds > 0]  # not those --reuse read
    print(
        f"\n{len(trained)} runs trained, {len(runs) - len(trained)} reused, in {total / 60:.1f} min "
        f"({args.jobs} at a time, {args.threads} thread(s) each); run wall times: median "
        f"{statistics.median(trained or [0]):.0f} s, max {max(trained or [0]):.0f} s"
    )
    report.update(
        {
            "study": study,
            "comparisons": comparisons,
            "wall_seconds": wall,
            "warm_up_seconds": warm_seconds,
            "total_seconds": total,
        }
    )
    finish(report, args.results / f"{args.name}.json")
    plot(study, comparisons, baseline, args.results / f"{args.name}.png")


if __name__ == "__main__":
    main()

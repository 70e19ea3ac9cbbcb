"""Learner scaling benchmark: step time with 1 and 2 learner ranks on the same global batch.

What is measured
    The real entrypoint, `rlsd-trainer learner --config ... --nproc-per-node N --standalone` (torchrun,
    gloo, FSDP2 across 2 ranks), on the embedded default (its 0.8M-parameter model, RLSD with the
    colocated frozen teacher) with `warmup.steps: 0`, the in-process rollout engine on rank 0,
    `--prompts` prompts x G=8 responses of up to `--max-new-tokens` tokens per step and
    `learner.micro_batch_tokens` of `--micro-batch-tokens` (a few micro-batches per rank), evaluation
    reduced to one example of one token, checkpoint only at the last step. Three settings:

    * 1 rank  x 1 thread  (OMP_NUM_THREADS=1)
    * 2 ranks x 1 thread each (OMP_NUM_THREADS=1): each rank learns on half the groups
    * 1 rank  x 2 threads (OMP_NUM_THREADS=2)

    From each run's `metrics.jsonl` we read `time_learn_seconds` (student log-probs, loss, backward,
    optimizer step: the phase the ranks split) and `step_seconds` (the whole step: rollout on rank 0,
    rewards, teacher, learn, weight sync), skipping step 1 (warm-up) and, for `step_seconds`, the
    last step (it saves the final checkpoint). Scaling efficiency = T(1 rank, 1 thread) /
    (2 x T(2 ranks)); 1.0 would be perfect. Every setting runs `--repeats` times, in the order
    A B C C B A ..., and the figures are means over all kept steps of all its runs.

Caveat
    This machine has 2 cores: 2 ranks x 1 thread and 1 rank x 2 threads both occupy all of it, so any
    other load (and the ranks' own gloo traffic and Python overhead) shows up as lost efficiency. The
    rollout runs on rank 0 alone while rank 1 waits, so the whole step scales less than the learn phase.

Output: a table on stdout and `benchmarks/results/learner_scaling.json`.

    .venv/bin/python benchmarks/learner_scaling.py
    .venv/bin/python benchmarks/learner_scaling.py --steps 3 --repeats 1 --prompts 4   # quick check
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
from typing import Any

import yaml
from harness import CLI, RESULTS, ROOT, WORK, environment, finish

DEFAULT_CONFIG = ROOT / "trainer/src/rlsd_trainer/configs/embedded.yaml"
SETTINGS = {"1x1": (1, 1), "2x1": (2, 1), "1x2": (1, 2)}  # name: (ranks, threads per rank)
LABELS = {"1x1": "1 rank x 1 thread", "2x1": "2 ranks x 1 thread", "1x2": "1 rank x 2 threads"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--steps", type=int, default=8, help="RL steps per run (step 1 is not counted)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting")
    parser.add_argument("--prompts", type=int, default=16, help="rollout.prompts_per_step (G = 8)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--micro-batch-tokens", type=int, default=2048)
    parser.add_argument("--work-dir", type=Path, default=WORK / "scaling")
    parser.add_argument("--out", type=Path, default=RESULTS / "learner_scaling.json")
    return parser


def write_config(args: argparse.Namespace, output_dir: Path) -> Path:
    raw = yaml.safe_load(args.config.read_text())
    raw["run"].update(output_dir=str(output_dir), total_steps=args.steps)
    raw["warmup"]["steps"] = 0
    raw["rollout"].update(backend="local", prompts_per_step=args.prompts)
    raw["rollout"]["sampling"]["max_new_tokens"] = args.max_new_tokens
    raw["learner"] = {"micro_batch_tokens": args.micro_batch_tokens}
    raw["checkpoint"] = {"every": 10_000, "keep_last": 1}
    raw["eval"] = {"every": 10_000, "max_examples": 1, "max_new_tokens": 1}
    raw["metrics"] = {"prometheus_port": None, "progress_bar": False}
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_setting(args: argparse.Namespace, name: str, index: int) -> dict[str, Any]:
    ranks, threads = SETTINGS[name]
    output_dir = args.work_dir / f"{name}-{index}"
    shutil.rmtree(output_dir, ignore_errors=True)
    config = write_config(args, output_dir)
    command = [CLI, "learner", "--config", str(config), "--nproc-per-node", str(ranks), "--standalone"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log = output_dir.with_suffix(".log")
    print(f"{LABELS[name]} (run {index + 1}) ...", flush=True)
    started = time.perf_counter()
    with log.open("w") as sink:
        code = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} exited {code}; see {log}")
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line]
    steps = sorted((r for r in records if "step_seconds" in r), key=lambda r: r["step"])
    kept = steps[1:]  # step 1 warms up allocators and caches
    result = {
        "setting": name,
        "ranks": ranks,
        "threads": threads,
        "wall_seconds": wall,
        "learn_seconds": [r["time_learn_seconds"] for r in kept],
        # The last step also writes the final checkpoint (blocking): left out of the step time.
        "step_seconds": [r["step_seconds"] for r in kept[:-1]],
        "phases": {
            phase: statistics.fmean(r.get(f"time_{phase}_seconds", 0.0) for r in kept[:-1])
            for phase in ("rollout", "reward", "teacher", "learn", "sync")
        },
        "response_length_mean": statistics.fmean(r["response_length_mean"] for r in kept),
    }
    print(
        f"  learn {statistics.fmean(result['learn_seconds']):.3f} s, "
        f"step {statistics.fmean(result['step_seconds']):.3f} s, wall {wall:.0f} s",
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 3:
        raise SystemExit("--steps must be >= 3 (step 1 and the last step's checkpoint are left out)")
    report: dict[str, Any] = {"environment": environment()}
    print(
        f"learner scaling: {args.prompts} prompts x 8, max {args.max_new_tokens} new tokens, micro-batch "
        f"{args.micro_batch_tokens} tokens, {args.steps} steps x {args.repeats} runs per setting; "
        f"load average {report['environment']['load_average_start']}",
        flush=True,
    )
    order = list(SETTINGS)
    sequence = [name for r in range(args.repeats) for name in (order if r % 2 == 0 else order[::-1])]
    runs = []
    counts: dict[str, int] = dict.fromkeys(SETTINGS, 0)
    for name in sequence:
        runs.append(run_setting(args, name, counts[name]))
        counts[name] += 1

    summary: dict[str, dict[str, Any]] = {}
    for name in SETTINGS:
        mine = [r for r in runs if r["setting"] == name]
        summary[name] = {
            "learn_seconds": statistics.fmean(s for r in mine for s in r["learn_seconds"]),
            "step_seconds": statistics.fmean(s for r in mine for s in r["step_seconds"]),
            "phases": {
                phase: statistics.fmean(r["phases"][phase] for r in mine) for phase in mine[0]["phases"]
            },
        }
    base = summary["1x1"]
    for name, values in summary.items():
        ranks, _ = SETTINGS[name]
        for key in ("learn", "step"):
            values[f"{key}_speedup"] = base[f"{key}_seconds"] / values[f"{key}_seconds"]
            if ranks == 2:
                values[f"{key}_efficiency"] = base[f"{key}_seconds"] / (2 * values[f"{key}_seconds"])

    print()
    header = f"{'setting':<22}{'learn s':>9}{'speedup':>9}{'step s':>9}{'speedup':>9}{'rollout s':>11}"
    print(header)
    print("-" * len(header))
    for name, values in summary.items():
        print(
            f"{LABELS[name]:<22}{values['learn_seconds']:>9.3f}{values['learn_speedup']:>9.2f}"
            f"{values['step_seconds']:>9.3f}{values['step_speedup']:>9.2f}{values['phases']['rollout']:>11.3f}"
        )
    two = summary["2x1"]
    print(
        f"scaling efficiency T(1x1) / (2 x T(2 ranks)): learn phase {two['learn_efficiency']:.2f}, "
        f"whole step {two['step_efficiency']:.2f} (1.0 = perfect; 2 cores, so this is largely a measure "
        "of contention)"
    )
    report.update(
        {
            "setting": {
                "config": str(args.config),
                "prompts_per_step": args.prompts,
                "group_size": 8,
                "max_new_tokens": args.max_new_tokens,
                "micro_batch_tokens": args.micro_batch_tokens,
                "steps": args.steps,
                "repeats": args.repeats,
                "kept": "learn: steps 2..N; step: steps 2..N-1",
            },
            "summary": summary,
            "runs": runs,
        }
    )
    finish(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

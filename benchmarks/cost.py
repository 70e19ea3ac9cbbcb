"""Cost benchmark: per-step wall time by phase, and the RLSD / GRPO step-time ratio at equal batch.

Two trainers (rlsd and grpo) start from the same warmed-up policy with the same batch shape
(prompts per step, group size, max new tokens) and the same seeds, and their steps alternate in
one process, so machine noise hits both alike. Every step also saves a checkpoint, to time that
phase. Prints mean seconds per phase, response lengths (the two policies drift apart slowly, so
lengths are shown to make the comparison checkable), and the step-time ratio.

    python benchmarks/cost.py --steps 12
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import yaml

from rlsd_contracts.config import parse_config
from rlsd_trainer.cli import quiet_libraries
from rlsd_trainer.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "trainer/src/rlsd_trainer/configs/embedded.yaml"
PHASES = ("rollout", "reward", "teacher", "learn", "sync", "checkpoint")


def trainer_for(raw: dict, algorithm: str, work_dir: Path, warmup_steps: int) -> Trainer:
    raw = json.loads(json.dumps(raw))
    raw["run"].update(output_dir=str(work_dir / algorithm), total_steps=10_000)
    raw["algorithm"]["name"] = algorithm
    raw["warmup"]["steps"] = warmup_steps
    raw["checkpoint"] = {"every": 1, "keep_last": 1}
    raw["metrics"] = {"prometheus_port": None, "progress_bar": False}
    return Trainer(parse_config(raw))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per algorithm")
    parser.add_argument("--skip", type=int, default=2, help="untimed steps first (allocator, caches)")
    parser.add_argument("--warmup-steps", type=int, default=150, help="SFT steps of the shared start")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs/bench-cost")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks/results")
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(2)

    raw = yaml.safe_load(args.config.read_text())
    grpo = trainer_for(raw, "grpo", args.work_dir, args.warmup_steps)
    # The rlsd trainer starts from grpo's warmed-up policy, so both begin with the same weights.
    (args.work_dir / "rlsd").mkdir(parents=True, exist_ok=True)
    for name in ("embedded-model", "initial-policy"):
        target = args.work_dir / "rlsd" / name
        if not target.exists():
            target.symlink_to(args.work_dir / "grpo" / name)
    rlsd = trainer_for(raw, "rlsd", args.work_dir, args.warmup_steps)
    trainers = {"grpo": grpo, "rlsd": rlsd}

    samples: dict[str, list[dict[str, float]]] = {name: [] for name in trainers}
    for step in range(args.skip + args.steps):
        for name, trainer in trainers.items():
            values = trainer.train_step()
            if step >= args.skip:
                samples[name].append(values)
    for trainer in trainers.values():
        trainer.close()

    def mean(name: str, key: str) -> float:
        return statistics.fmean(v.get(key, 0.0) for v in samples[name])

    print(
        f"Mean seconds per step over {args.steps} steps (batch: "
        f"{grpo.config.rollout.prompts_per_step} prompts x {grpo.config.algorithm.group_size} responses)"
    )
    print(f"{'phase':>12} {'grpo':>9} {'rlsd':>9}")
    report: dict[str, dict[str, float]] = {name: {} for name in trainers}
    for phase in PHASES:
        for name in trainers:
            report[name][phase] = mean(name, f"time_{phase}_seconds")
        print(f"{phase:>12} {report['grpo'][phase]:9.3f} {report['rlsd'][phase]:9.3f}")
    for name in trainers:
        report[name]["step"] = mean(name, "step_seconds")
        report[name]["response_length"] = mean(name, "response_length_mean")
    print(f"{'step total':>12} {report['grpo']['step']:9.3f} {report['rlsd']['step']:9.3f}")
    lengths = [report[name]["response_length"] for name in ("grpo", "rlsd")]
    print(f"{'resp. length':>12} {lengths[0]:9.1f} {lengths[1]:9.1f}")
    ratio = report["rlsd"]["step"] / report["grpo"]["step"]
    print(f"\nRLSD / GRPO step-time ratio: {ratio:.3f} (target <= 1.35)")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "cost.json").write_text(json.dumps({"seconds": report, "ratio": ratio}, indent=2))
    for trainer in trainers.values():
        trainer.metrics.close()


if __name__ == "__main__":
    main()

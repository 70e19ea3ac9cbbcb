"""Checkpoint benchmark: DCP save and load time versus model size, and the step-time overhead of
checkpointing every step with `checkpoint.async_save` off and on.

What is measured
    1. Save and load of `rlsd_trainer.training.checkpoint.CheckpointManager` (single process, no process
       group) for random-initialised Qwen3 models of about 5M, 25M, 100M and 400M parameters
       (`harness.SHAPES`, float32) with their AdamW state (one optimizer step taken, so both moments
       exist): the state is `get_state_dict(model, optimizer)` exactly as the trainer builds it. Save
       = `manager.save(..., blocking=True)`: DCP write, then the commit (fsync, SHA-256 of every file
       into the manifest, rename). Load = `manager.load_latest(...)` (which verifies every SHA-256)
       + `set_state_dict`, as `Trainer.restore` does. Median of `--repeats`; MB/s = bytes on disk / s.
       "hash s" is the time to SHA-256 the checkpoint once, part of both figures.
    2. Step-time overhead: a training-like loop on one model (`--loop-size`, default 25M) - the
       learner's real path: `PolicyScorer.response_logprobs` (chunked log-probs) on a batch of
       `--batch` sequences of `--prompt-tokens + --response-tokens`, the clipped policy loss, backward,
       gradient clipping and an AdamW step - with, after every step, exactly what `Trainer.train_step`
       does when `checkpoint.every` is 1: `manager.poll()` then `manager.save(step, ...)`. Modes,
       side by side in one run: no checkpoint, `async_save` off, `async_save` on, and the last two
       again with the checkpoints on tmpfs (`--tmpfs`, /dev/shm: the CPU side of a save - staging
       copy, serialisation, SHA-256, fsync of memory - without the disk); `--rounds` rounds of one
       block of `--steps` steps per mode, in alternating order (drift cancels), `os.sync()` before
       each block. An async block's time includes waiting for its last save, so nothing is hidden.
       Reported: mean seconds per step, the overhead relative to no checkpoint, and the median over
       rounds of the same ratio per round (robust to one slow round of disk I/O).

How
    One process, torch with `--threads` threads (default 2: the whole machine here). Checkpoints go
    to `--work-dir` (the repository's disk); `keep_last` 1.

Output: tables on stdout, `benchmarks/results/checkpoint_io.json` and `checkpoint_io.png`.

    .venv/bin/python benchmarks/checkpoint_io.py
    .venv/bin/python benchmarks/checkpoint_io.py --sizes 5M --loop-size 5M --steps 2 --repeats 1  # quick
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from harness import MB, RESULTS, SHAPES, WORK, environment, finish, median, qwen3_config
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from rlsd_trainer import algorithms
from rlsd_trainer.cli import quiet_libraries
from rlsd_trainer.model.logprobs import PolicyScorer, pack
from rlsd_trainer.training.checkpoint import CheckpointManager
from rlsd_trainer.training.distributed import DistContext

MODES = ("none", "sync", "async", "sync-tmpfs", "async-tmpfs")
MODE_LABELS = {
    "none": "no checkpoint",
    "sync": "async_save off",
    "async": "async_save on",
    "sync-tmpfs": "off, tmpfs",
    "async-tmpfs": "on, tmpfs",
}
PLOT_LABELS = {
    "none": "no\ncheckpoint",
    "sync": "async_save\noff",
    "async": "async_save\non",
    "sync-tmpfs": "off\n(tmpfs)",
    "async-tmpfs": "on\n(tmpfs)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=3, help="saves and loads per size")
    parser.add_argument("--loop-size", choices=list(SHAPES), default="25M", help="model of the step loop")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per block")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of one block per mode")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--response-tokens", type=int, default=192)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--tmpfs",
        type=Path,
        default=Path("/dev/shm/rlsd-bench-checkpoint"),
        help="also checkpoint the step loop here (memory-backed: the CPU side of a save without the disk)",
    )
    parser.add_argument("--skip-sizes", action="store_true", help="only the step-overhead part")
    parser.add_argument("--skip-loop", action="store_true", help="only the save/load part")
    parser.add_argument("--work-dir", type=Path, default=WORK / "checkpoint")
    parser.add_argument("--out", type=Path, default=RESULTS / "checkpoint_io.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "checkpoint_io.png", help="PNG ('' skips)")
    return parser


def new_model(label: str, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(qwen3_config(SHAPES[label])).float().train()


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)


def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def trainer_state(step: int) -> dict[str, Any]:
    return {"step": step}


def rank_state() -> dict[str, Any]:
    return {"torch_rng": torch.get_rng_state()}


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def hash_seconds(path: Path) -> float:
    started = time.perf_counter()
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        digest = hashlib.sha256()
        with file.open("rb") as handle:
            for block in iter(lambda handle=handle: handle.read(1 << 20), b""):
                digest.update(block)
    return time.perf_counter() - started


# ---- part 1: save / load versus size ------------------------------------------------------------


def save_load(args: argparse.Namespace, label: str) -> dict[str, Any]:
    model = new_model(label)
    optimizer = adamw(model)
    for param in model.parameters():
        param.grad = torch.full_like(param, 1e-3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    parameters = sum(p.numel() for p in model.parameters())
    directory = args.work_dir / f"size-{label}"
    shutil.rmtree(directory, ignore_errors=True)
    manager = CheckpointManager(directory, keep_last=1, ctx=DistContext())
    saves, loads = [], []
    for step in range(1, args.repeats + 1):
        started = time.perf_counter()
        manager.save(step, sharded_state(model, optimizer), trainer_state(step), rank_state(), blocking=True)
        saves.append(time.perf_counter() - started)
    path = manager.committed()[-1]
    size = directory_bytes(path)
    hashing = hash_seconds(path)
    for _ in range(args.repeats):
        started = time.perf_counter()
        state = sharded_state(model, optimizer)
        restored = manager.load_latest(state)
        assert restored is not None
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        loads.append(time.perf_counter() - started)
    shutil.rmtree(directory, ignore_errors=True)
    row = {
        "size": label,
        "parameters": parameters,
        "checkpoint_bytes": size,
        "save_seconds": saves,
        "load_seconds": loads,
        "save_median_seconds": median(saves),
        "load_median_seconds": median(loads),
        "hash_seconds": hashing,
        "save_mb_per_s": size / MB / median(saves),
        "load_mb_per_s": size / MB / median(loads),
    }
    print(
        f"  {label}: {size / MB:,.0f} MB, save {row['save_median_seconds']:.2f} s, "
        f"load {row['load_median_seconds']:.2f} s, hash {hashing:.2f} s",
        flush=True,
    )
    return row


# ---- part 2: step-time overhead -----------------------------------------------------------------


class Loop:
    """A learner-like step on one model: chunked log-probs, clipped loss, backward, clip, AdamW."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.model = new_model(args.loop_size)
        self.scorer = PolicyScorer(self.model)
        self.optimizer = adamw(self.model)
        self.parameters = sum(p.numel() for p in self.model.parameters())
        vocab = SHAPES[args.loop_size]["vocab"]
        generator = torch.Generator().manual_seed(1)
        prompts = torch.randint(2, vocab, (args.batch, args.prompt_tokens), generator=generator).tolist()
        responses = torch.randint(2, vocab, (args.batch, args.response_tokens), generator=generator).tolist()
        self.batch = pack(prompts, responses, pad_id=0)
        self.advantages = torch.randn(args.batch, generator=generator)
        self.step = 0

    def train_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        logprobs, _ = self.scorer.response_logprobs(self.batch, 256, with_entropy=False)
        old = logprobs.detach()
        mask = self.batch.response_mask
        advantages = self.advantages.unsqueeze(1).expand_as(mask)
        terms = algorithms.clipped_policy_loss(logprobs, old, advantages)
        loss = algorithms.token_mean(terms.loss, mask, float(mask.sum()))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.step += 1

    def block(self, manager: CheckpointManager | None, steps: int) -> list[float]:
        """Seconds of `steps` steps, each followed by the trainer's checkpoint calls (if any); an
        async block's last step also waits for its save, so the block holds all the work."""
        seconds = []
        for index in range(steps):
            started = time.perf_counter()
            self.train_step()
            if manager is not None:
                manager.poll()
                state = sharded_state(self.model, self.optimizer)
                manager.save(self.step, state, trainer_state(self.step), rank_state())
                if index == steps - 1:
                    manager.wait()
            seconds.append(time.perf_counter() - started)
        return seconds


def step_overhead(args: argparse.Namespace) -> dict[str, Any]:
    loop = Loop(args)
    managers: dict[str, CheckpointManager | None] = {"none": None}
    tmpfs = args.tmpfs if args.tmpfs is not None and args.tmpfs.parent.is_dir() else None
    for mode in MODES[1:]:
        if mode.endswith("-tmpfs") and tmpfs is None:
            continue
        directory = (tmpfs if mode.endswith("-tmpfs") else args.work_dir) / f"loop-{mode}"  # type: ignore[operator]
        shutil.rmtree(directory, ignore_errors=True)
        managers[mode] = CheckpointManager(
            directory, keep_last=1, ctx=DistContext(), async_save=mode.startswith("async")
        )
    modes = [mode for mode in MODES if mode in managers]
    print(
        f"step loop: {args.loop_size} model ({loop.parameters:,} parameters), {args.batch} x "
        f"({args.prompt_tokens} + {args.response_tokens}) tokens per step; modes {modes}; warm-up step ...",
        flush=True,
    )
    loop.block(None, 1)
    blocks: dict[str, list[list[float]]] = {mode: [] for mode in modes}
    for r in range(args.rounds):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            os.sync()  # no write-back of an earlier block inside this one
            seconds = loop.block(managers[mode], args.steps)
            blocks[mode].append(seconds)
            print(f"  round {r + 1} {mode:<12}: {' '.join(f'{s:.2f}' for s in seconds)} s", flush=True)
    checkpoint_bytes = 0
    for mode in modes[1:]:
        manager = managers[mode]
        assert manager is not None
        checkpoint_bytes = directory_bytes(manager.committed()[-1])
        shutil.rmtree(manager.directory, ignore_errors=True)
    if tmpfs is not None:
        shutil.rmtree(tmpfs, ignore_errors=True)
    base = statistics.fmean(s for block in blocks["none"] for s in block)
    results = {}
    for mode in modes:
        steps = [s for block in blocks[mode] for s in block]
        # Per round: this mode's block mean over the no-checkpoint block mean of the same round.
        ratios = [
            statistics.fmean(mine) / statistics.fmean(none)
            for mine, none in zip(blocks[mode], blocks["none"], strict=True)
        ]
        results[mode] = {
            "step_seconds": steps,
            "block_seconds": blocks[mode],
            "mean_step_seconds": statistics.fmean(steps),
            "overhead_percent": 100 * (statistics.fmean(steps) / base - 1),
            "median_round_overhead_percent": 100 * (statistics.median(ratios) - 1),
        }
    return {
        "model": args.loop_size,
        "parameters": loop.parameters,
        "checkpoint_bytes": checkpoint_bytes,
        "batch": args.batch,
        "prompt_tokens": args.prompt_tokens,
        "response_tokens": args.response_tokens,
        "steps_per_mode": args.rounds * args.steps,
        "tmpfs": str(tmpfs) if tmpfs is not None else None,
        "modes": results,
    }


def plot(sizes: list[dict[str, Any]], overhead: dict[str, Any] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (1 if sizes else 0) + (1 if overhead else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    column = 0
    if sizes:
        ax = axes[0][column]
        xs = [r["parameters"] for r in sizes]
        ax.plot(xs, [r["save_median_seconds"] for r in sizes], marker="o", label="save (blocking)")
        ax.plot(xs, [r["load_median_seconds"] for r in sizes], marker="s", label="load (+ verify)")
        ax.plot(xs, [r["hash_seconds"] for r in sizes], marker=".", linestyle=":", label="SHA-256 alone")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (float32, + AdamW state)")
        ax.set_ylabel("seconds")
        ax.set_title("DCP checkpoint, one process", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        column += 1
    if overhead:
        ax = axes[0][column]
        modes = list(overhead["modes"])
        means = [overhead["modes"][m]["mean_step_seconds"] for m in modes]
        colors = {"none": "grey", "sync": "#c44e52", "async": "#4c72b0"}
        bars = ax.bar(
            [PLOT_LABELS[m] for m in modes],
            means,
            color=[colors[m.removesuffix("-tmpfs")] for m in modes],
        )
        for bar, mode in zip(bars, modes, strict=True):
            ax.annotate(
                f"{overhead['modes'][mode]['overhead_percent']:+.0f}%",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_ylabel("mean seconds per step")
        ax.set_title(f"checkpoint every step, {overhead['model']} model", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"environment": environment()}
    print(
        f"checkpoint I/O: {args.threads} torch threads; "
        f"load average {report['environment']['load_average_start']}"
    )
    # The step loop first, on a quiet page cache; `os.sync()` flushes other writes before each part,
    # so one part's write-back does not land in the other's timings.
    os.sync()
    overhead = None if args.skip_loop else step_overhead(args)
    sizes: list[dict[str, Any]] = []
    if not args.skip_sizes:
        os.sync()
        print("save / load versus size (model + AdamW state):", flush=True)
        for label in args.sizes:
            sizes.append(save_load(args, label))
            gc.collect()

    if sizes:
        header = (
            f"{'size':>6}{'params':>13}{'ckpt MB':>10}{'save s':>9}{'load s':>9}{'hash s':>9}"
            f"{'save MB/s':>11}{'load MB/s':>11}"
        )
        print()
        print(header)
        print("-" * len(header))
        for r in sizes:
            print(
                f"{r['size']:>6}{r['parameters']:>13,}{r['checkpoint_bytes'] / MB:>10,.0f}"
                f"{r['save_median_seconds']:>9.2f}{r['load_median_seconds']:>9.2f}{r['hash_seconds']:>9.2f}"
                f"{r['save_mb_per_s']:>11.0f}{r['load_mb_per_s']:>11.0f}"
            )
        print(
            f"median of {args.repeats}; save = DCP write + commit (fsync, SHA-256 manifest, rename); "
            "load = verify SHA-256 + DCP read + set_state_dict; hash s = one SHA-256 pass over the files"
        )
    if overhead:
        print()
        print(
            f"checkpoint every step: {overhead['model']} model, {overhead['checkpoint_bytes'] / MB:,.0f} MB "
            f"per checkpoint, {overhead['steps_per_mode']} steps per mode"
        )
        print(f"{'mode':>16}{'mean step s':>13}{'overhead':>10}{'median of rounds':>18}")
        for mode, values in overhead["modes"].items():
            print(
                f"{MODE_LABELS[mode]:>16}{values['mean_step_seconds']:>13.3f}{values['overhead_percent']:>9.1f}%"
                f"{values['median_round_overhead_percent']:>17.1f}%"
            )
        print(
            "overhead = mean step time / mean step time without checkpoints - 1; median of rounds = the "
            f"median over the {args.rounds} rounds of the same ratio per round"
            + (f"; tmpfs = checkpoints in {overhead['tmpfs']} (memory, no disk)" if overhead["tmpfs"] else "")
        )
    report.update(
        {
            "setting": {
                "threads": args.threads,
                "repeats": args.repeats,
                "shapes": {label: SHAPES[label] for label in args.sizes},
                "dtype": "float32",
                "work_dir": str(args.work_dir),
            },
            "sizes": sizes,
            "step_overhead": overhead,
        }
    )
    finish(report, args.out)
    if (sizes or overhead) and str(args.plot) not in ("", "."):
        plot(sizes, overhead, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

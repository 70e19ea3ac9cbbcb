"""Rollout throughput benchmark: generated tokens per second of the CPU rollout server (1 and 2
replicas, through the real client) against the in-process `LocalEngine`, same model and sampling.

What is measured
    One rollout call of `--prompts` prompts x n=`--n` samples of up to `--max-new-tokens` tokens
    (temperature 1, top-p 1, fixed seed) - the embedded default's batch - on two random-initialised
    models: the embedded default's model (0.8M parameters, its own tokenizer and real task prompts)
    and a 25M Qwen3 (`harness.SHAPES["25M"]`, 12,288-token vocabulary, random prompt ids of the
    same lengths). Settings:

    * local 1 thread / 2 threads: `rlsd_trainer.rollout.engine.LocalEngine.generate` in this process with
      `torch.set_num_threads` 1 / 2;
    * server x1 / x2: `RemoteRolloutEngine.generate` against 1 / 2 `rlsd-trainer serve rollout`
      processes, each with OMP_NUM_THREADS=1 (so x2 uses the same 2-thread budget as local 2
      threads); with 2 servers the client cuts the prompts into 2 chunks served at once.

    Both sides run the same sampler (the server wraps `LocalEngine`, max batch 256 sequences); the
    server adds HTTP + JSON and, with 2 replicas, halves the batch each forward pass sees.
    Tokens/s = generated tokens (EOS included) / wall time of the call. A random model rarely samples
    EOS, so almost every response is `--max-new-tokens` long. Each setting gets one untimed call,
    then `--repeats` timed calls in rotating order; the median is reported.

Output: a table on stdout and `benchmarks/results/rollout_throughput.json`.

    .venv/bin/python benchmarks/rollout_throughput.py
    .venv/bin/python benchmarks/rollout_throughput.py --models embedded --prompts 4 --repeats 1  # quick
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from harness import RESULTS, SHAPES, WORK, environment, finish, median, random_model_dir, servers_running

from rlsd_contracts.config import EmbeddedTaskSection, ModelSection
from rlsd_trainer.cli import quiet_libraries
from rlsd_trainer.data.embedded import generate_examples
from rlsd_trainer.model.embedded import build_model_dir
from rlsd_trainer.model.loading import encode_prompt, load_model
from rlsd_trainer.remote.rollout_client import RemoteRolloutEngine
from rlsd_trainer.rollout.engine import Completion, LocalEngine, SamplingParams

NAME = "policy"
SETTINGS = ("local-1t", "local-2t", "server-x1", "server-x2")
LABELS = {
    "local-1t": "LocalEngine, 1 thread",
    "local-2t": "LocalEngine, 2 threads",
    "server-x1": "1 server x 1 thread",
    "server-x2": "2 servers x 1 thread",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=["embedded", "25M"], default=["embedded", "25M"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per setting")
    parser.add_argument("--work-dir", type=Path, default=WORK / "rollout")
    parser.add_argument("--out", type=Path, default=RESULTS / "rollout_throughput.json")
    return parser


def model_and_prompts(args: argparse.Namespace, name: str) -> tuple[Path, list[list[int]], int]:
    """The model directory, the prompts and the parameter count of one benchmarked model."""
    task = EmbeddedTaskSection()
    embedded_dir = args.work_dir / "models/embedded"
    if not (embedded_dir / "config.json").exists():
        build_model_dir(embedded_dir, task, seed=0)
    tokenizer = load_model(embedded_dir, ModelSection()).tokenizer
    questions = [e.question for e in generate_examples(task, "train", seed=0)[: args.prompts]]
    prompts = [encode_prompt(tokenizer, q) for q in questions]
    if name == "embedded":
        model_dir, parameters = embedded_dir, 0
    else:
        model_dir, parameters = random_model_dir(args.work_dir / "models" / name, SHAPES[name])
        # Random ids with the lengths of the task's prompts (id 0 is pad, 1 EOS).
        generator = torch.Generator().manual_seed(0)
        vocab = SHAPES[name]["vocab"]
        prompts = [torch.randint(2, vocab, (len(p),), generator=generator).tolist() for p in prompts]
    return model_dir, prompts, parameters


def generated(groups: Sequence[Sequence[Completion]]) -> int:
    return sum(len(c.token_ids) for group in groups for c in group)


def measure_model(args: argparse.Namespace, name: str) -> dict[str, Any]:
    model_dir, prompts, parameters = model_and_prompts(args, name)
    loaded = load_model(model_dir, ModelSection())
    parameters = parameters or sum(p.numel() for p in loaded.model.parameters())
    local = LocalEngine(loaded.model, loaded.stop_token_ids, 256)
    params = SamplingParams(n=args.n, temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens, seed=7)
    print(
        f"{name}: {parameters:,} parameters, {len(prompts)} prompts "
        f"(mean {sum(map(len, prompts)) / len(prompts):.0f} tokens) x {args.n}; starting 2 servers ...",
        flush=True,
    )
    with servers_running("rollout", model_dir, args.work_dir / "logs", 2, NAME, "gloo") as servers:
        remote = {
            count: RemoteRolloutEngine([s.url for s in servers[:count]], NAME, weight_transfer="gloo")
            for count in (1, 2)
        }

        def local_call(threads: int) -> Callable[[], int]:
            def call() -> int:
                torch.set_num_threads(threads)
                return generated(local.generate(prompts, params))

            return call

        calls: dict[str, Callable[[], int]] = {
            "local-1t": local_call(1),
            "local-2t": local_call(2),
            "server-x1": lambda: generated(remote[1].generate(prompts, params)),
            "server-x2": lambda: generated(remote[2].generate(prompts, params)),
        }
        samples: dict[str, list[tuple[float, int]]] = {setting: [] for setting in SETTINGS}
        try:
            for setting in SETTINGS:
                calls[setting]()  # untimed: allocator, caches, the servers' first request
            for repeat in range(args.repeats):
                order = SETTINGS if repeat % 2 == 0 else SETTINGS[::-1]
                for setting in order:
                    started = time.perf_counter()
                    tokens = calls[setting]()
                    samples[setting].append((time.perf_counter() - started, tokens))
        finally:
            for engine in remote.values():
                engine.close()
    torch.set_num_threads(1)
    rows = {}
    for setting, values in samples.items():
        rates = [tokens / seconds for seconds, tokens in values]
        rows[setting] = {
            "seconds": [seconds for seconds, _ in values],
            "tokens": [tokens for _, tokens in values],
            "tokens_per_second": rates,
            "median_tokens_per_second": median(rates),
        }
    base = rows["local-1t"]["median_tokens_per_second"]
    for row in rows.values():
        row["vs_local_1_thread"] = row["median_tokens_per_second"] / base
    return {"model": name, "parameters": parameters, "settings": rows}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    torch.set_num_threads(1)
    report: dict[str, Any] = {"environment": environment()}
    print(
        f"rollout throughput: {args.prompts} prompts x {args.n} samples x up to {args.max_new_tokens} "
        f"tokens, temperature 1; servers OMP_NUM_THREADS=1 each; load average "
        f"{report['environment']['load_average_start']}",
        flush=True,
    )
    models = [measure_model(args, name) for name in args.models]
    print()
    header = f"{'model':<10}{'setting':<24}{'tokens/s':>10}{'vs local 1t':>13}{'s/call':>9}{'tokens':>8}"
    print(header)
    print("-" * len(header))
    for result in models:
        for setting, row in result["settings"].items():
            print(
                f"{result['model']:<10}{LABELS[setting]:<24}{row['median_tokens_per_second']:>10.0f}"
                f"{row['vs_local_1_thread']:>13.2f}{median(row['seconds']):>9.2f}{median(row['tokens']):>8.0f}"
            )
    print(f"median of {args.repeats} calls; tokens = generated tokens per call (EOS included)")
    report.update(
        {
            "setting": {
                "prompts": args.prompts,
                "n": args.n,
                "max_new_tokens": args.max_new_tokens,
                "temperature": 1.0,
                "top_p": 1.0,
                "repeats": args.repeats,
                "server_threads": 1,
                "max_batch_size": 256,
            },
            "models": models,
        }
    )
    finish(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

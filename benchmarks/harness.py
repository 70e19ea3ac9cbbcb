"""What the distributed-trainer benchmarks share: random Qwen3 models on disk, the test suite's server
launcher (`tests/trainer/processes.py`), and the machine state every result records.

Import from a script in this folder (`from harness import ...`): running `python benchmarks/x.py`
puts this folder on `sys.path`.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results"
WORK = ROOT / "runs/bench"
MB = 1e6

# The multi-process tests' launcher: `rlsd-trainer serve ...` on a free loopback port, one thread.
sys.path.insert(0, str(ROOT / "tests/trainer"))
from processes import CLI, Server, one_thread_env, start_server, wait_healthy  # noqa: E402

__all__ = ["CLI", "Server", "one_thread_env", "start_server", "wait_healthy"]

# Qwen3-architecture shapes of about 5M, 25M, 100M and 400M parameters (tied embeddings, float32).
# The largest is Qwen3-0.6B's layer shape with 24 layers and a 32k vocabulary.
SHAPES: dict[str, dict[str, int]] = {
    "5M": dict(hidden=256, intermediate=768, layers=4, heads=4, kv_heads=2, head_dim=64, vocab=8192),
    "25M": dict(hidden=512, intermediate=1536, layers=6, heads=8, kv_heads=4, head_dim=64, vocab=12288),
    "100M": dict(hidden=768, intermediate=2304, layers=12, heads=12, kv_heads=4, head_dim=64, vocab=32000),
    "400M": dict(hidden=1024, intermediate=3072, layers=24, heads=16, kv_heads=8, head_dim=128, vocab=32000),
}


# Models for the embedded task (its tokenizer and chat template, vocabulary 384): the embedded model
# itself, and larger random-initialised Qwen3 shapes.
TASK_SHAPES: dict[str, dict[str, int] | None] = {
    "embedded": None,
    "qwen3-512x4": dict(hidden=512, intermediate=1536, layers=4, heads=8, kv_heads=4, head_dim=64),
}


def task_model_dir(work: Path, shape: str, seed: int, sft_steps: int, num_train: int) -> Path:
    """A start model for the embedded task in `work` (built once, then reused): `embedded` after
    `sft_steps` of its supervised warm-up (batch 64, lr 2e-3), or a random-initialised
    `TASK_SHAPES` model with the embedded tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlsd_contracts.config import (
        DEFAULT_TEACHER_TEMPLATE,
        EmbeddedTaskSection,
        ModelSection,
        WarmupSection,
    )
    from rlsd_trainer.data.embedded import generate_examples
    from rlsd_trainer.model.embedded import build_model_dir
    from rlsd_trainer.model.loading import load_model
    from rlsd_trainer.training.warmup import supervised_warmup

    task = EmbeddedTaskSection(num_train=num_train)
    base = work / f"base-model-seed{seed}"
    if not (base / "config.json").exists():
        build_model_dir(base, task, seed)
    dims = TASK_SHAPES[shape]
    if dims is not None:
        start = work / f"{shape}-seed{seed}"
        if not (start / "config.json").exists():
            tokenizer = load_model(base, ModelSection()).tokenizer
            config = qwen3_config(
                {**dims, "vocab": len(tokenizer)}, 1024, tokenizer.eos_token_id, tokenizer.pad_token_id
            )
            torch.manual_seed(seed)
            AutoModelForCausalLM.from_config(config).save_pretrained(start, safe_serialization=True)
            tokenizer.save_pretrained(start)
        return start
    start = work / f"start-model-sft{sft_steps}-seed{seed}"
    if not (start / "config.json").exists():
        loaded = load_model(base, ModelSection())
        started = time.perf_counter()
        losses = supervised_warmup(
            loaded.model,
            loaded.tokenizer,
            generate_examples(task, "train", seed),
            WarmupSection(steps=sft_steps, batch_size=64, lr=2e-3),
            DEFAULT_TEACHER_TEMPLATE,
            seed,
            512,
        )
        if losses:
            print(
                f"supervised warm-up: {sft_steps} steps in {time.perf_counter() - started:.0f} s, "
                f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"
            )
        loaded.model.save_pretrained(start, safe_serialization=True)
        loaded.tokenizer.save_pretrained(start)
    return start


def parameter_count(shape: dict[str, int]) -> int:
    """Parameters of a `SHAPES` entry, without building it (norms left out; tied embeddings)."""
    attention = 2 * shape["hidden"] * shape["head_dim"] * (shape["heads"] + shape["kv_heads"])
    mlp = 3 * shape["hidden"] * shape["intermediate"]
    return shape["vocab"] * shape["hidden"] + shape["layers"] * (attention + mlp)


def qwen3_config(
    shape: dict[str, int], max_positions: int = 4096, eos_token_id: int = 1, pad_token_id: int = 0
) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"],
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def word_tokenizer(vocab: int) -> Any:
    """A word-level tokenizer with one token per id (`t<id>`; pad t0, EOS t1), so every id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t2"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="t1", pad_token="t0", unk_token="t2")


def random_model_dir(directory: Path, shape: dict[str, int], seed: int = 0) -> tuple[Path, int]:
    """A random-initialised Qwen3 causal LM + tokenizer in Hugging Face format (reused when present);
    returns the directory and the parameter count."""
    import torch
    from transformers import AutoModelForCausalLM

    marker = directory / "shape.json"
    if marker.exists() and json.loads(marker.read_text()).get("shape") == shape:
        return directory, int(json.loads(marker.read_text())["parameters"])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(qwen3_config(shape)).float()
    parameters = sum(p.numel() for p in model.parameters())
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    word_tokenizer(shape["vocab"]).save_pretrained(directory)
    marker.write_text(json.dumps({"shape": shape, "parameters": parameters}))
    return directory, parameters


def model_flops(
    shape: dict[str, int], parameters: int, tokens: int, response_tokens: int, attention_pairs: int
) -> float:
    """Model FLOPs of one learner forward + backward over packed rows (no recomputation counted):
    `6 N_body tokens + 6 V h response_tokens + 12 L H d attention_pairs`, N_body = parameters without
    the (tied) embedding; the output projection runs on response tokens only; `attention_pairs` =
    the query-key pairs of the rows (length^2 for a row alone), not halved for causal masking (the
    usual MFU convention)."""
    body = parameters - shape["vocab"] * shape["hidden"]
    attention = 12 * shape["layers"] * shape["heads"] * shape["head_dim"] * attention_pairs
    return 6.0 * body * tokens + 6.0 * shape["vocab"] * shape["hidden"] * response_tokens + attention


def shape_of(config: Any) -> dict[str, int]:
    """A `SHAPES`-style entry from a transformers Qwen3-like config."""
    return dict(
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        layers=config.num_hidden_layers,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        vocab=config.vocab_size,
    )


def matmul_peak_gflops(threads: int, size: int = 2048, repeats: int = 7) -> float:
    """This machine's float32 matmul rate with `threads` threads (GFLOP/s): the best of `repeats`
    `[size, size] @ [size, size]` products, i.e. what a learner's large matmuls can reach here."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator) for _ in range(2))
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)  # warm-up: threads, kernel selection
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - started)
    torch.set_num_threads(previous)
    return 2 * size**3 / best / 1e9


@contextmanager
def busy_cores(count: int, cpus: set[int] | None = None) -> Iterator[None]:
    """`count` processes of `yes > /dev/null`: that many cores kept busy, as another job would (on
    `cpus` when given)."""
    load = [
        subprocess.Popen(
            ["yes"],
            stdout=subprocess.DEVNULL,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        for _ in range(count)
    ]
    try:
        yield
    finally:
        for process in load:
            process.kill()
            process.wait()


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def cpu_seconds() -> tuple[float, float, float]:
    """(wall clock, CPU seconds the whole machine was busy (/proc/stat), CPU seconds of this process
    and of its finished children)."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    own = sum(
        usage.ru_utime + usage.ru_stime
        for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )
    return time.monotonic(), busy, own


_START = cpu_seconds()


def environment() -> dict[str, Any]:
    import torch

    return {
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_start": load_average(),
    }


def foreign_cpu_cores() -> float:
    """Cores other processes kept busy on average since this script started (servers and learners
    it started and waited for count as its own); ~0 means the figures were taken on a quiet machine."""
    wall, busy, own = (end - start for end, start in zip(cpu_seconds(), _START, strict=True))
    return max(0.0, busy - own) / wall


def finish(report: dict[str, Any], path: Path) -> None:
    """Stamp the end-of-run load average and foreign CPU use into `report` and write it as JSON."""
    report.setdefault("environment", {})["load_average_end"] = load_average()
    report["environment"]["foreign_cpu_cores"] = round(foreign_cpu_cores(), 2)
    print(
        f"load average at start {report['environment'].get('load_average_start')}, at end "
        f"{report['environment']['load_average_end']}; other processes kept "
        f"{report['environment']['foreign_cpu_cores']:.2f} cores busy on average"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


def save_figure(figure: Any, path: Path) -> None:
    """Lay out a matplotlib figure, write it as a PNG to `path` and close it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"wrote {path}")


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@contextmanager
def servers_running(
    role: str,
    model_dir: Path,
    log_dir: Path,
    count: int,
    name: str,
    backend: str,
    cpus: set[int] | None = None,
) -> Iterator[list[Server]]:
    """`count` servers of `role` (each OMP_NUM_THREADS=1, pinned to `cpus` when given), healthy,
    stopped on exit."""
    log_dir.mkdir(parents=True, exist_ok=True)
    started = [start_server(role, model_dir, log_dir, name, backend, cpus) for _ in range(count)]
    try:
        wait_healthy(started)
        yield started
    finally:
        for server in started:
            server.stop()

"""Peak memory of our chunked log-prob + loss computation against the naive full-logits path.

What is measured
    One sequence of `--prompt-tokens + --response-tokens` tokens (default 512 + 3584 = 4096) through
    a Qwen3 causal LM with a 151,936-token vocabulary, hidden size 1024 and tied embeddings (the
    output projection of Qwen3-0.6B; one decoder layer, random init, float32). Each path computes
    the log-probs of the response tokens with gradient, the clipped policy-gradient loss
    (`rlsd_trainer.algorithms.clipped_policy_loss` reduced with `token_mean`, fixed seeded token
    advantages, `old = logprobs.detach()` as in a one-epoch on-policy step), and `.backward()`:

    * ours   `rlsd_trainer.model.logprobs.response_logprobs(model, pack(...), chunk_tokens=C)`: backbone
             once, output projection chunk by chunk under activation checkpointing, for each C in
             `--chunks` and the trainer's default `LearnerSection().logprob_chunk_tokens`
             (`--with-entropy` also asks for the token entropies and keeps them until after
             backward, exactly as the trainer's learner does for its entropy metric);
    * naive  `model(input_ids).logits` (the full `[1, L, V]` float32 tensor) -> `.float()
             .log_softmax(-1)` -> gather at the response positions -> same loss -> backward, written
             in one chained expression, so the raw logits are freed as soon as log_softmax has its output
             (autograd keeps that one for backward) - the kindest way to write the naive path.

How
    Every path runs in a fresh subprocess of this script (`--worker ...`), so allocator state and
    cached pages do not leak from one path into the next. The worker builds the model, the inputs
    and the advantages, zeroes nothing else, then takes the baseline: it resets the kernel's
    resident-set high-water mark (`/proc/self/clear_refs` = 5, which also resets `ru_maxrss`) and
    reads the current RSS from `/proc/self/statm`. It then runs the computation once and reads
    `resource.getrusage(RUSAGE_SELF).ru_maxrss`. Reported peak = ru_maxrss - baseline, i.e. the
    extra resident memory the log-prob + loss + backward needed on top of the model and inputs
    (the gradient of the tied embedding, 0.6 GB, is part of it on both paths). Where clear_refs is
    not writable the high-water mark cannot be reset; the worker then says so and the figure is an
    upper bound only if nothing before the baseline peaked higher (it reports both numbers).
    Wall time is that of the same single run (forward + loss + backward), so it includes the
    checkpointed recomputation of our path. torch uses `--threads` (default 2) threads. Each worker
    also records how many cores other processes kept busy meanwhile (/proc/stat minus its own CPU
    time); the parent warns when that is not ~0, as wall times are then not comparable.

    To check that both paths compute the same thing, each worker saves its loss, its response
    log-probs and the gradient of the output-projection weight; the parent prints the max abs
    difference of each against the naive path, and of the weight-gradient norm.

Output: a table on stdout, `benchmarks/results/logprob_memory.json` and `logprob_memory.png`.
Target: peak(ours at the default chunk) / peak(naive) <= 0.25.

    .venv/bin/python benchmarks/logprob_memory.py            # full size (naive needs ~10 GB)
    .venv/bin/python benchmarks/logprob_memory.py --vocab 32000 --response-tokens 1024  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 1024 * 1024


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=151_936, help="vocabulary size")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (Qwen3-0.6B: 1024)")
    parser.add_argument("--intermediate", type=int, default=3072, help="MLP width of the one layer")
    parser.add_argument("--layers", type=int, default=1, help="decoder layers")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--response-tokens", type=int, default=3584)
    parser.add_argument(
        "--chunks",
        type=int,
        nargs="+",
        default=[256, 512, 1024],
        help="chunk sizes of our path; the trainer default is always added",
    )
    parser.add_argument(
        "--with-entropy",
        action="store_true",
        help="our path also returns token entropies, as the trainer's learner calls it (naive unchanged)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-naive-gib",
        type=float,
        default=12.0,
        help="skip the naive path when its estimated need exceeds this or the available memory",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "logprob_memory.json", help="JSON results")
    parser.add_argument("--plot", type=Path, default=RESULTS / "logprob_memory.png", help="PNG ('' skips)")
    # Internal: run one path in this (fresh) process and write its result to --result.
    parser.add_argument("--worker", choices=["ours", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser


# ---- worker (one path, one fresh process) -------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _busy_and_own_seconds() -> tuple[float, float]:
    """System-wide busy CPU seconds (/proc/stat) and this process's CPU seconds."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), usage.ru_utime + usage.ru_stime


def run_worker(args: argparse.Namespace) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from rlsd_trainer import algorithms
    from rlsd_trainer.model.logprobs import pack, response_logprobs

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = Qwen3Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=args.hidden // 16,
        max_position_embeddings=args.prompt_tokens + args.response_tokens,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    model = Qwen3ForCausalLM(config).float().train()
    generator = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(1, args.vocab, (args.prompt_tokens,), generator=generator).tolist()
    response = torch.randint(1, args.vocab, (args.response_tokens,), generator=generator).tolist()
    batch = pack([prompt], [response], pad_id=0)
    advantages = torch.randn(batch.response_mask.shape, generator=generator)
    global_tokens = float(batch.response_mask.sum())
    weight = model.get_output_embeddings().weight

    def loss_from(logprobs: torch.Tensor) -> torch.Tensor:
        terms = algorithms.clipped_policy_loss(logprobs, logprobs.detach(), advantages)
        return algorithms.token_mean(terms.loss, batch.response_mask, global_tokens)

    def ours() -> tuple[torch.Tensor, torch.Tensor]:
        logprobs, entropy = response_logprobs(
            model, batch, chunk_tokens=args.chunk, with_entropy=args.with_entropy
        )
        loss = loss_from(logprobs)
        loss.backward()
        if entropy is not None:
            # Read after backward, as the trainer's learner does for its entropy metric: the tensor
            # (and the graph behind it) lives through backward there too.
            float(entropy.detach().mean())
        return loss.detach(), logprobs.detach()

    def naive() -> tuple[torch.Tensor, torch.Tensor]:
        # One chained expression: the raw logits are freed once log_softmax has its output (which
        # autograd keeps for backward), the most favourable way to write the naive path.
        full = (
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            .logits.float()
            .log_softmax(-1)
        )
        start = args.prompt_tokens - 1  # position t predicts token t + 1
        predicting = full[:, start : start + args.response_tokens]
        logprobs = predicting.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
        loss = loss_from(logprobs)
        loss.backward()
        return loss.detach(), logprobs.detach()

    compute = ours if args.worker == "ours" else naive
    reset = _reset_peak()
    baseline = _rss_bytes()
    high_water_before = _max_rss_bytes()
    busy0, own0 = _busy_and_own_seconds()
    started = time.perf_counter()
    loss, logprobs = compute()
    seconds = time.perf_counter() - started
    peak = _max_rss_bytes()
    busy1, own1 = _busy_and_own_seconds()

    grad = weight.grad
    assert grad is not None
    torch.save({"logprobs": logprobs, "grad": grad}, args.result.with_suffix(".pt"))
    result = {
        "path": args.worker,
        "chunk": args.chunk if args.worker == "ours" else None,
        "baseline_rss_mib": baseline / MiB,
        "peak_rss_mib": peak / MiB,
        "peak_increase_mib": (peak - baseline) / MiB,
        "high_water_reset": reset,
        "high_water_before_mib": high_water_before / MiB,
        "seconds": seconds,
        # Cores other processes kept busy meanwhile: the wall time is only comparable when ~0.
        "foreign_cpu_cores": max(0.0, (busy1 - busy0) - (own1 - own0)) / seconds,
        "loss": float(loss),
        "grad_norm": float(grad.norm()),
    }
    args.result.write_text(json.dumps(result))


# ---- parent -------------------------------------------------------------------------------------


def _available_bytes() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _worker_args(args: argparse.Namespace) -> list[str]:
    return [
        f"--vocab={args.vocab}",
        f"--hidden={args.hidden}",
        f"--intermediate={args.intermediate}",
        f"--layers={args.layers}",
        f"--prompt-tokens={args.prompt_tokens}",
        f"--response-tokens={args.response_tokens}",
        f"--threads={args.threads}",
        f"--seed={args.seed}",
        *(["--with-entropy"] if args.with_entropy else []),
    ]


def run_path(args: argparse.Namespace, path: str, chunk: int, scratch: Path) -> dict[str, Any]:
    name = f"{path}-{chunk}" if path == "ours" else path
    result = scratch / f"{name}.json"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        *_worker_args(args),
        f"--worker={path}",
        f"--chunk={chunk}",
        f"--result={result}",
    ]
    print(f"running {name} in a fresh process ...", flush=True)
    subprocess.run(command, check=True)
    return json.loads(result.read_text())


def compare(reference: Path, other: Path) -> dict[str, float]:
    import torch

    a, b = torch.load(reference), torch.load(other)
    return {
        "logprobs_max_abs_diff": float((a["logprobs"] - b["logprobs"]).abs().max()),
        "grad_max_abs_diff": float((a["grad"] - b["grad"]).abs().max()),
        "grad_max_abs": float(a["grad"].abs().max()),
    }


def plot(rows: list[dict[str, Any]], path: Path, length: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in rows]
    peaks = [r["peak_increase_mib"] / 1024 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(labels, peaks, color=["#c44e52" if r["path"] == "naive" else "#4c72b0" for r in rows])
    for bar, row in zip(bars, rows, strict=True):
        ax.annotate(
            f"{row['peak_increase_mib'] / 1024:.2f} GiB\n{row['seconds']:.0f} s",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    naive = next((r for r in rows if r["path"] == "naive"), None)
    if naive is not None:
        target = 0.25 * naive["peak_increase_mib"] / 1024
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="target: 0.25 x naive")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_ylabel("peak RSS increase (GiB)")
    ax.set_title(f"log-prob + clipped loss + backward, one {length}-token sequence", fontsize=10)
    ax.set_ylim(0, max(peaks) * 1.25)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0

    from rlsd_contracts.config import LearnerSection

    default_chunk = LearnerSection().logprob_chunk_tokens
    chunks = sorted({*args.chunks, default_chunk})
    length = args.prompt_tokens + args.response_tokens
    logits_gib = length * args.vocab * 4 / 2**30
    # The kept log-softmax, and in backward the gradient of the gathered slice, of the full
    # log-softmax and of the logits (not all at once, but close).
    naive_estimate_gib = 4 * logits_gib
    available_gib = _available_bytes() / 2**30
    print(
        f"setting: vocab {args.vocab}, hidden {args.hidden}, {args.layers} layer(s), sequence {length} "
        f"(prompt {args.prompt_tokens} + response {args.response_tokens}), float32, {args.threads} threads, "
        f"our path {'with' if args.with_entropy else 'without'} entropies; "
        f"full logits alone are {logits_gib:.2f} GiB; trainer default chunk {default_chunk}"
    )

    with tempfile.TemporaryDirectory(prefix="logprob-memory-") as tmp:
        scratch = Path(tmp)
        naive = None
        if naive_estimate_gib > min(args.max_naive_gib, available_gib * 0.9):
            print(
                f"naive path skipped: it needs about {naive_estimate_gib:.1f} GiB, over the limit "
                f"({args.max_naive_gib:.1f} GiB, --max-naive-gib) or the {available_gib:.1f} GiB available"
            )
        else:
            naive = run_path(args, "naive", 0, scratch)
        ours = [run_path(args, "ours", chunk, scratch) for chunk in chunks]

        rows = []
        if naive is not None:
            rows.append({**naive, "label": "naive", "ratio": 1.0})
        for result in ours:
            row = {**result, "label": f"ours C={result['chunk']}"}
            if naive is not None:
                row["ratio"] = result["peak_increase_mib"] / naive["peak_increase_mib"]
                row["loss_abs_diff"] = abs(result["loss"] - naive["loss"])
                row["grad_norm_abs_diff"] = abs(result["grad_norm"] - naive["grad_norm"])
                row.update(compare(scratch / "naive.pt", scratch / f"ours-{result['chunk']}.pt"))
            rows.append(row)

    if not all(r["high_water_reset"] for r in rows):
        print("warning: /proc/self/clear_refs not writable; peaks may include set-up high-water marks")
    header = (
        f"{'path':<14}{'peak-base MiB':>14}{'ratio':>8}{'seconds':>9}{'loss':>12}"
        f"{'|dloss|':>10}{'|dlogp|max':>12}{'|dgrad|max':>12}{'|dgradnorm|':>12}"
    )
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = f"{r['ratio']:.3f}" if "ratio" in r else "-"
        diffs = (
            f"{r['loss_abs_diff']:>10.2e}{r['logprobs_max_abs_diff']:>12.2e}"
            f"{r['grad_max_abs_diff']:>12.2e}{r['grad_norm_abs_diff']:>12.2e}"
            if "loss_abs_diff" in r
            else f"{'-':>10}{'-':>12}{'-':>12}{'-':>12}"
        )
        print(
            f"{r['label']:<14}{r['peak_increase_mib']:>14.0f}{ratio:>8}{r['seconds']:>9.1f}"
            f"{r['loss']:>12.6f}{diffs}"
        )
    print(
        "peak-base = ru_maxrss after one forward + loss + backward minus RSS just before it "
        "(fresh process per path); ratio = ours / naive."
    )
    busy = {r["label"]: r["foreign_cpu_cores"] for r in rows if r["foreign_cpu_cores"] > 0.2}
    if busy:
        print(
            "warning: other processes kept CPU cores busy during "
            + ", ".join(f"{label} ({cores:.1f} cores)" for label, cores in busy.items())
            + "; those wall times are not comparable (memory figures are per process and unaffected)"
        )
    verdict = None
    default_row = next((r for r in rows if r.get("chunk") == default_chunk), None)
    if naive is not None and default_row is not None:
        verdict = default_row["ratio"] <= 0.25
        print(
            f"target ratio <= 0.25 at the default chunk {default_chunk}: "
            f"{default_row['ratio']:.3f} -> {'met' if verdict else 'MISSED'}"
        )
        if naive["peak_increase_mib"] > 12 * 1024:
            print(f"note: the naive path needed {naive['peak_increase_mib'] / 1024:.1f} GiB (> 12 GiB)")
        passing = [r["chunk"] for r in rows if r["path"] == "ours" and r["ratio"] <= 0.25]
        print(f"chunk sizes meeting the target: {passing or 'none'}")

    report = {
        "setting": {
            "vocab": args.vocab,
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "layers": args.layers,
            "prompt_tokens": args.prompt_tokens,
            "response_tokens": args.response_tokens,
            "threads": args.threads,
            "dtype": "float32",
            "default_chunk": default_chunk,
            "ours_with_entropy": args.with_entropy,
        },
        "measure": "peak RSS increase (ru_maxrss - RSS before the computation), fresh process per path",
        "target_ratio": 0.25,
        "target_met": verdict,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    if str(args.plot) not in ("", "."):
        plot(rows, args.plot, length)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

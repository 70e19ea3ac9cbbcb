"""GPU learner benchmark: tokens/s, MFU and peak memory of the bf16 FSDP2 learner step on a
Qwen3-1.7B-shaped model, plus (with 2+ GPUs) NCCL weight-transfer bandwidth.

What is measured
    One learner step as `Trainer._learn` takes it, on our real code path: the model wrapped by
    `rlsd_trainer.training.distributed.prepare_policy` (FSDP2 per decoder layer + root, bf16 parameters,
    float32 gradient reduction), `PolicyScorer.response_logprobs` (the chunked log-prob projection,
    with entropies, as the learner asks), `algorithms.token_advantages_for` (RLSD) +
    `clipped_policy_loss` + `token_mean`, backward per micro-batch (gradients accumulate),
    `clip_grad_norm_` and `torch.optim.AdamW`. The model is a random-initialised Qwen3 of
    Qwen3-1.7B's shape (hidden 2048, 28 layers, 16 heads, 8 KV heads, head_dim 128, MLP 6144,
    vocabulary 151,936, tied embeddings; 1.72B parameters, float32 master weights). Each rank runs
    `--micro-batches` micro-batches of `--rows` rows: a `--prompt-len` prompt and a response whose
    log-probs are computed, `--seq-len - --prompt-len` tokens long (`--lengths fixed`) or long-tailed
    as RL responses are (`long-tailed`, the default: exponential with a quarter of that mean, cut
    there). The rows of a micro-batch are packed back to back without padding (`logprobs.pack`), so
    attention runs through torch's FlashAttention varlen kernel (`attention.PackedRows`). Launched with
    torchrun over all visible GPUs (this script starts it).

    tokens/s = all ranks' real tokens per step / median step time (after `--warmup` untimed steps).
    Model FLOPs per step = 6 x N_body x tokens + 6 x V x h x response tokens (the output projection
    runs on response tokens only) + 12 x L x H x sum over rows of length^2 (attention within each
    row, H = heads x head_dim; the usual formula, which does not halve for causal masking); N_body =
    parameters without the tied embedding. Recomputation (the chunked projection in backward;
    activation checkpointing if on) is not counted, as MFU conventions go. MFU = FLOPs / step time /
    (GPUs x peak), peak = 989 TFLOP/s bf16 dense for H100 and H200 (others: pass `--peak-tflops`).
    Peak memory = max over ranks of `torch.cuda.max_memory_allocated`. Target: MFU >= 35% on an H100.

    A single GPU: `prepare_policy` leaves a lone rank unsharded (and so without mixed precision: it
    would train in float32); this script then forces FSDP2 on a 1-rank mesh so the bf16 path is what
    is measured (`--no-force-fsdp` measures the unsharded float32 path instead).

    With 2+ GPUs, NCCL weight transfer: rank 1 plays a vLLM server (a small HTTP stand-in serving
    vLLM's weight-transfer routes, joining the NCCL group from `nccl_unique_id_b64` as vLLM's worker
    does), and rank 0 pushes the full policy (all-gathered float32 parameters) with the real client,
    `RemoteRolloutEngine.update_weights(weight_transfer="nccl")`, which stages the tensors on host
    memory, then with `BroadcastSender.push` straight from GPU tensors. GB/s = bytes / seconds.

    `--tiny` runs the same code on a tiny model on CPU (2 gloo ranks, float32, no MFU) as a smoke test.

Output: a table on stdout and `benchmarks/results/gpu_learner.json` (`--tiny`:
`runs/bench/gpu_learner_tiny.json`). Takes 2-4 minutes on an H100 (most of it start-up).

    .venv/bin/python benchmarks/gpu_learner.py               # all GPUs
    .venv/bin/python benchmarks/gpu_learner.py --tiny        # CPU smoke test
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from harness import model_flops, qwen3_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results"
QWEN3_1_7B = dict(hidden=2048, intermediate=6144, layers=28, heads=16, kv_heads=8, head_dim=128, vocab=151936)
TINY = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=1024)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (2 gloo ranks): smoke test")
    parser.add_argument("--ranks", type=int, default=0, help="ranks (default: all GPUs; 2 with --tiny)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--rows", type=int, default=4, help="rows per micro-batch")
    parser.add_argument("--lengths", choices=["long-tailed", "fixed"], default="long-tailed")
    parser.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step per rank")
    parser.add_argument("--chunk", type=int, default=256, help="learner.logprob_chunk_tokens")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 dense peak per GPU (0: detect)")
    parser.add_argument(
        "--no-force-fsdp", action="store_true", help="1 GPU: leave it unsharded, as the trainer"
    )
    parser.add_argument("--pushes", type=int, default=3, help="NCCL weight pushes after the first (2+ GPUs)")
    parser.add_argument("--no-transfer", action="store_true", help="skip the NCCL weight-transfer part")
    parser.add_argument("--out", type=Path, default=None, help="JSON results")
    return parser


# ---- launcher -----------------------------------------------------------------------------------


def launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Start this script under torchrun over all GPUs (or 2 CPU ranks with --tiny)."""
    import torch

    gpus = 0 if args.tiny else torch.cuda.device_count()
    if not args.tiny and gpus == 0:
        print("no CUDA device: run with --tiny for the CPU smoke test", file=sys.stderr)
        return 2
    nproc = args.ranks or (gpus if gpus else 2)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += [str(Path(__file__).resolve()), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, env=env).returncode


# ---- the learner step ---------------------------------------------------------------------------


def peak_tflops(args: argparse.Namespace, device_name: str) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in device_name), None)


def run_worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from rlsd_contracts.config import AlgorithmSection, LearnerSection
    from rlsd_trainer import algorithms
    from rlsd_trainer.cli import quiet_libraries
    from rlsd_trainer.model.logprobs import PackedBatch, pack
    from rlsd_trainer.training.distributed import DistContext, all_reduce, init_distributed, prepare_policy

    quiet_libraries()
    ctx = init_distributed(timeout_s=600.0)
    cuda = ctx.device.type == "cuda"
    shape = TINY if args.tiny else QWEN3_1_7B
    if args.tiny:
        args.seq_len, args.prompt_len, args.rows, args.micro_batches = 128, 32, 2, 2
    gloo = dist.new_group(backend="gloo")  # CPU-side barriers and objects, apart from NCCL

    torch.manual_seed(0)  # same initial weights on every rank (each builds the full model, then shards)
    with torch.device(ctx.device):
        model = AutoModelForCausalLM.from_config(qwen3_config(shape, max(args.seq_len, 4096))).float()
    parameters = sum(p.numel() for p in model.parameters())
    learner = LearnerSection(
        logprob_chunk_tokens=args.chunk, activation_checkpointing=args.activation_checkpointing
    )

    class ShardAlone(DistContext):
        """A 1-rank context that `prepare_policy` shards anyway (FSDP2 on a 1-GPU mesh, bf16 compute)."""

        @property
        def distributed(self) -> bool:
            return True

    forced = cuda and ctx.world_size == 1 and not args.no_force_fsdp
    shard_ctx = ShardAlone(ctx.rank, ctx.world_size, ctx.local_rank, ctx.device) if forced else ctx
    scorer = prepare_policy(model.train(), shard_ctx, learner)
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=1e-6, betas=(0.9, 0.999), weight_decay=0.01)
    algo = AlgorithmSection()

    generator = torch.Generator().manual_seed(1 + ctx.rank)
    longest = args.seq_len - args.prompt_len

    def response_length() -> int:
        if args.lengths == "fixed":
            return longest
        drawn = torch.empty(1).exponential_(4.0 / longest, generator=generator)
        return max(1, min(longest, int(drawn)))

    def micro_batch() -> tuple[PackedBatch, torch.Tensor, torch.Tensor]:
        prompts = [
            torch.randint(2, shape["vocab"], (args.prompt_len,), generator=generator).tolist()
            for _ in range(args.rows)
        ]
        responses = [
            torch.randint(2, shape["vocab"], (response_length(),), generator=generator).tolist()
            for _ in range(args.rows)
        ]
        batch = pack(prompts, responses).to(ctx.device)
        advantages = torch.randn(args.rows, generator=generator).to(ctx.device)
        noise = 0.1 * torch.randn(batch.response_mask.shape, generator=generator).to(ctx.device)
        return batch, advantages, noise

    batches = [micro_batch() for _ in range(args.micro_batches)]
    tokens_per_rank = sum(len(batch.input_ids) for batch, _, _ in batches)
    response_tokens_per_rank = int(sum(batch.response_mask.sum() for batch, _, _ in batches))
    squared_lengths = int(sum((batch.row_lengths**2).sum() for batch, _, _ in batches))
    global_tokens, global_response, global_squared = all_reduce(
        [float(tokens_per_rank), float(response_tokens_per_rank), float(squared_lengths)], ctx
    )

    def step(index: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        for batch, advantages, noise in batches:
            logprobs, entropy = scorer.response_logprobs(batch, args.chunk, with_entropy=True)
            old = logprobs.detach()
            teacher = old + noise  # stands in for the teacher's log-probs (scored apart, no grad)
            mask = batch.response_mask
            token_adv = algorithms.token_advantages_for(algo, index, advantages, teacher, old, mask)
            terms = algorithms.clipped_policy_loss(
                logprobs, old, token_adv, algo.clip_low, algo.clip_high, algo.dual_clip
            )
            loss = algorithms.token_mean(terms.loss, mask, global_response)
            loss.backward()
            float(algorithms.token_mean(entropy.detach(), mask, global_response))  # the learner's metric read
        torch.nn.utils.clip_grad_norm_(scorer.parameters(), 1.0)
        optimizer.step()

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize(ctx.device)

    times = []
    for index in range(args.warmup + args.steps):
        synchronize()
        dist.barrier(group=gloo)
        started = time.perf_counter()
        step(index)
        synchronize()
        elapsed = time.perf_counter() - started
        (elapsed,) = all_reduce([elapsed], ctx, op="max") if ctx.distributed else (elapsed,)
        if index >= args.warmup:
            times.append(elapsed)
        if ctx.is_main:
            print(
                f"step {index + 1}: {elapsed:.3f} s{' (warm-up)' if index < args.warmup else ''}", flush=True
            )

    if cuda:
        peak = torch.cuda.max_memory_allocated(ctx.device)
        device_name = torch.cuda.get_device_name(ctx.device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        device_name = "cpu"
    peaks = [0.0] * ctx.world_size
    peaks[ctx.rank] = float(peak)
    peaks = all_reduce(peaks, ctx, op="max") if ctx.distributed else peaks
    seconds = statistics.median(times)
    tokens = int(global_tokens)
    flops = model_flops(shape, parameters, tokens, int(global_response), int(global_squared))
    peak_per_gpu = peak_tflops(args, device_name) if cuda else None
    mfu = flops / seconds / (ctx.world_size * peak_per_gpu * 1e12) if peak_per_gpu else None
    result: dict[str, Any] = {
        "device": device_name,
        "ranks": ctx.world_size,
        "shape": shape,
        "parameters": parameters,
        "param_dtype": "bfloat16" if cuda and (ctx.distributed or forced) else "float32",
        "fsdp": ctx.distributed or forced,
        "forced_fsdp_single_rank": forced,
        "activation_checkpointing": args.activation_checkpointing,
        "seq_len": args.seq_len,
        "prompt_len": args.prompt_len,
        "rows": args.rows,
        "lengths": args.lengths,
        "micro_batches": args.micro_batches,
        "chunk_tokens": args.chunk,
        "tokens_per_step": tokens,
        "step_seconds": times,
        "median_step_seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "model_tflop_per_step": flops / 1e12,
        "peak_tflops_per_gpu": peak_per_gpu,
        "mfu": mfu,
        "peak_memory_bytes_per_rank": peaks,
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if cuda else "ru_maxrss (CPU)",
    }
    batches.clear()
    if cuda and ctx.world_size >= 2 and not args.no_transfer:
        try:
            result["nccl_transfer"] = nccl_transfer(args, ctx, scorer, gloo)
        except Exception as exc:  # the learner figures above stand on their own
            result["nccl_transfer"] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"rank {ctx.rank}: NCCL transfer failed: {exc}", file=sys.stderr, flush=True)
    if ctx.is_main:
        report(args, result)
    dist.barrier(group=gloo)
    dist.destroy_process_group()


# ---- NCCL weight transfer (2+ GPUs) -------------------------------------------------------------


class NcclStandIn:
    """Rank 1's stand-in for a vLLM server: vLLM's weight-transfer routes over its NCCL engine's
    protocol (join from `nccl_unique_id_b64`, one-element warm-up all_reduce, then one broadcast per
    tensor of `update_info`, rank 0 the source), plus /health and /weight_info (labelled "default"
    until an update names a version). Routes that move no weights (/pause, /resume,
    /shutdown_weight_transfer_engine) answer {}; closing a session that is not open is an error, as
    in vLLM."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.group: Any = None
        self.version = "default"
        self.updating = False
        self.received_bytes = 0
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._answer(stand_in.route(self.path, None))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                try:
                    self._answer(stand_in.route(self.path, body))
                except Exception as exc:
                    self._answer({"error": {"message": str(exc)}}, 500)

            def _answer(self, body: Any, status: int = 200) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def route(self, path: str, body: Any) -> Any:
        import torch
        import torch.distributed as dist

        from rlsd_trainer.weights.wire import parse_dtype

        if path == "/weight_info":
            return {"weight_version": self.version}
        if path == "/get_world_size":
            return {"world_size": 1}
        if path == "/init_weight_transfer_engine":
            info = body["init_info"]
            torch.cuda.set_device(self.device)  # the current device is per thread
            store = dist.HashStore()
            # ProcessGroupNCCL's first communicator reads its unique id under key "0" on ranks > 0.
            store.set("0", base64.b64decode(info["nccl_unique_id_b64"]))
            options = dist.ProcessGroupNCCL.Options()
            self.group = dist.ProcessGroupNCCL(store, info["rank_offset"], info["world_size"], options)
            self.group.allreduce([torch.zeros(1, device=self.device)]).wait()
            torch.cuda.synchronize(self.device)
        elif path == "/start_weight_update":
            self.updating = True
        elif path == "/update_weights":
            torch.cuda.set_device(self.device)
            info = body["update_info"]
            root = dist.BroadcastOptions()
            root.rootRank = 0
            for dtype, shape in zip(info["dtype_names"], info["shapes"], strict=True):
                tensor = torch.empty(shape, dtype=parse_dtype(dtype), device=self.device)
                self.group.broadcast([tensor], root).wait()
                self.received_bytes += tensor.numel() * tensor.element_size()
            torch.cuda.synchronize(self.device)
        elif path == "/finish_weight_update":
            if not self.updating:
                raise RuntimeError("finish_weight_update called without a matching start_weight_update.")
            self.updating = False
            if body and body.get("weight_version") is not None:
                self.version = str(body["weight_version"])
        elif path == "/update_weight_version":
            self.version = str(body["new_version"])
        return {}

    def close(self) -> None:
        self.server.shutdown()


def nccl_transfer(args: argparse.Namespace, ctx: Any, scorer: Any, gloo: Any) -> dict[str, Any] | None:
    """Rank 0 pushes to rank 1's stand-in; every rank runs the same collectives whatever happens on
    rank 0 (a failed push is recorded and later pushes are skipped, never the all-gathers)."""
    import torch
    import torch.distributed as dist

    from rlsd_trainer.remote.rollout_client import RemoteRolloutEngine
    from rlsd_trainer.training.distributed import drain, full_parameters

    stand_in = NcclStandIn(ctx.device) if ctx.rank == 1 else None
    box = [stand_in.url if stand_in is not None else None]
    dist.broadcast_object_list(box, src=1, group=gloo)
    url = box[0]
    engine = (
        RemoteRolloutEngine([url], "policy", weight_transfer="nccl", request_timeout_s=180.0)
        if ctx.is_main
        else None
    )
    failure: str | None = None

    def named() -> Any:
        return ((name.removeprefix("lm."), tensor) for name, tensor in full_parameters(scorer))

    def attempt(push: Any) -> float | None:
        nonlocal failure
        torch.cuda.synchronize(ctx.device)
        started = time.perf_counter()
        try:
            push()
        except Exception as exc:
            failure = failure or f"{type(exc).__name__}: {exc}"
            return None
        torch.cuda.synchronize(ctx.device)
        return time.perf_counter() - started

    client_seconds, raw_seconds = [], []
    nbytes = 0
    # 1) The real client: all ranks all-gather, rank 0 stages on host memory and broadcasts.
    for version in range(1, args.pushes + 2):
        if engine is not None and failure is None:
            client_seconds.append(attempt(lambda version=version: engine.update_weights(named(), version)))
        else:
            drain(named())
        dist.barrier(group=gloo)
    # 2) The broadcast alone, from GPU tensors already gathered (the group is reused).
    if engine is not None:
        gathered = [(name, tensor.clone()) for name, tensor in named()]
        nbytes = sum(t.numel() * t.element_size() for _, t in gathered)
        for version in range(args.pushes + 2, 2 * args.pushes + 2):
            if failure is None:
                raw_seconds.append(
                    attempt(lambda version=version: engine.replicas.sender.push([url], gathered, version))
                )
        engine.close()
    else:
        drain(named())
    dist.barrier(group=gloo)
    if stand_in is not None:
        stand_in.close()
    if not ctx.is_main:
        return None
    if failure is not None:
        return {"error": failure, "bytes": nbytes, "client_push_seconds": client_seconds}
    client = statistics.median(client_seconds[1:])  # type: ignore[type-var]
    raw = statistics.median(raw_seconds)  # type: ignore[type-var]
    return {
        "bytes": nbytes,
        "first_push_seconds": client_seconds[0],
        "client_push_seconds": client_seconds[1:],
        "client_median_seconds": client,
        "client_gb_per_s": nbytes / 1e9 / client,
        "broadcast_push_seconds": raw_seconds,
        "broadcast_median_seconds": raw,
        "broadcast_gb_per_s": nbytes / 1e9 / raw,
    }


# ---- report -------------------------------------------------------------------------------------


def report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    gib = 2**30
    print()
    print(f"device: {result['device']} x {result['ranks']}; {result['parameters']:,} parameters")
    print(
        f"FSDP2: {result['fsdp']} (forced on one rank: {result['forced_fsdp_single_rank']}), compute dtype "
        f"{result['param_dtype']}, activation checkpointing {result['activation_checkpointing']}"
    )
    print(
        f"per rank and step: {result['micro_batches']} micro-batches x {result['rows']} rows of up to "
        f"{result['seq_len']} tokens (prompt {result['prompt_len']}, {result['lengths']} responses), packed; "
        f"chunk {result['chunk_tokens']}"
    )
    header = f"{'step s':>9}{'tokens/s':>12}{'TFLOP/step':>12}{'MFU':>8}{'peak mem GiB':>14}"
    print(header)
    print("-" * len(header))
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a"
    peak = max(result["peak_memory_bytes_per_rank"]) / gib
    print(
        f"{result['median_step_seconds']:>9.3f}{result['tokens_per_second']:>12,.0f}"
        f"{result['model_tflop_per_step']:>12.1f}{mfu:>8}{peak:>14.2f}"
    )
    if result["mfu"] is not None:
        print(f"target MFU >= 35%: {'met' if result['mfu'] >= 0.35 else 'MISSED'}")
    transfer = result.get("nccl_transfer")
    if transfer and "error" not in transfer:
        print(
            f"NCCL weight push of {transfer['bytes'] / 1e9:.2f} GB: "
            f"client {transfer['client_median_seconds']:.3f} s "
            f"({transfer['client_gb_per_s']:.1f} GB/s, host-staged), broadcast alone "
            f"{transfer['broadcast_median_seconds']:.3f} s ({transfer['broadcast_gb_per_s']:.1f} GB/s)"
        )
    elif transfer:
        print(f"NCCL weight push failed: {transfer['error']}")
    # The CPU smoke test's figures mean nothing for GPUs: kept out of benchmarks/results.
    out = args.out or (
        ROOT / "runs/bench/gpu_learner_tiny.json" if args.tiny else RESULTS / "gpu_learner.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"load_average_end": list(os.getloadavg()), **result}, indent=2) + "\n")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if "RANK" not in os.environ:
        return launch(args, argv)
    from rlsd_trainer.lifecycle import end_process

    run_worker(args)
    end_process(0)  # as a learner rank ends: no interpreter finalization while torch's threads run


if __name__ == "__main__":
    sys.exit(main())

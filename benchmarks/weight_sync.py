"""Weight-sync benchmark: seconds to push new policy weights to rollout servers, versus model size.

What is measured
    The real client, `RemoteRolloutEngine.update_weights` (what learner rank 0 calls after every
    optimizer step), pushing a random-initialised Qwen3 model (float32; about 5M, 25M, 100M and 400M
    parameters, see `harness.SHAPES`) to real `rlsd-trainer serve rollout` processes on loopback:

    * gloo        vLLM's broadcast protocol on CPU: `/pause`, `/start_weight_update`,
                  `/update_weights` (names, dtypes, shapes) while this process broadcasts every
                  tensor over a gloo group with the servers, `/finish_weight_update`, `/resume`, after
                  which the server serves the new version;
    * filesystem  vLLM's in-place reload: the client writes `model.safetensors` into a shared
                  directory (no fsync, so on one machine the servers read it from the page cache),
                  and every server reloads it (`/pause`, `/collective_rpc` reload_weights,
                  `/update_weight_version`, `/resume`).

    to 1 and to 2 servers. The first push of a client builds its gloo group (rendezvous, one
    `/init_weight_transfer_engine` per server) and is reported apart ("first"); the following pushes
    reuse the group and their median is the figure ("s/push"). Effective MB/s = the model's float32
    bytes / s per push (with 2 servers every byte reaches two processes).

How
    Each server runs with OMP_NUM_THREADS=1; this process uses one torch thread. Servers of one
    backend are started once per model size and shared by the 1- and 2-server clients. Every push
    returns only after each server applied the weights (the `/finish_weight_update` answer).

Output: a table on stdout, `benchmarks/results/weight_sync.json` and `weight_sync.png`
(seconds per push against parameters).

    .venv/bin/python benchmarks/weight_sync.py                         # all sizes, ~5 minutes
    .venv/bin/python benchmarks/weight_sync.py --sizes 5M --pushes 2   # quick check
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from harness import (
    MB,
    RESULTS,
    SHAPES,
    WORK,
    environment,
    finish,
    median,
    parameter_count,
    random_model_dir,
    servers_running,
)

from rlsd_trainer.cli import quiet_libraries
from rlsd_trainer.remote.rollout_client import RemoteRolloutEngine

NAME = "policy"
# The --weight-transfer-config of the servers: filesystem reloads with whatever backend is configured.
SERVER_BACKEND = {"gloo": "gloo", "filesystem": "gloo"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--backends", nargs="+", choices=list(SERVER_BACKEND), default=list(SERVER_BACKEND))
    parser.add_argument("--servers", nargs="+", type=int, default=[1, 2], help="server counts")
    parser.add_argument("--pushes", type=int, default=5, help="timed pushes after the first, per setting")
    parser.add_argument("--work-dir", type=Path, default=WORK / "weight-sync")
    parser.add_argument("--out", type=Path, default=RESULTS / "weight_sync.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "weight_sync.png", help="PNG ('' skips)")
    return parser


def available_bytes() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def time_pushes(
    engine: RemoteRolloutEngine, named: list[tuple[str, torch.Tensor]], pushes: int
) -> list[float]:
    """Seconds of `pushes + 1` consecutive pushes (versions 1, 2, ...); the first builds the group."""
    seconds = []
    for version in range(1, pushes + 2):
        started = time.perf_counter()
        engine.update_weights(iter(named), version)
        seconds.append(time.perf_counter() - started)
    return seconds


def measure_size(args: argparse.Namespace, label: str) -> list[dict[str, Any]]:
    from transformers import AutoModelForCausalLM

    model_dir, parameters = random_model_dir(args.work_dir / "models" / label, SHAPES[label])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # Perturb the weights so every push carries values the servers do not hold yet.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1e-3)
    named = [(name, param.detach()) for name, param in model.named_parameters()]
    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    rows = []
    for backend in args.backends:
        shared = args.work_dir / "shared"
        shutil.rmtree(shared, ignore_errors=True)
        shared.mkdir(parents=True)
        log_dir = args.work_dir / "logs"
        print(f"{label}: starting {max(args.servers)} {SERVER_BACKEND[backend]} server(s) ...", flush=True)
        with servers_running(
            "rollout", model_dir, log_dir, max(args.servers), NAME, SERVER_BACKEND[backend]
        ) as servers:
            for count in args.servers:
                engine = RemoteRolloutEngine(
                    [server.url for server in servers[:count]],
                    NAME,
                    weight_transfer=backend,  # type: ignore[arg-type]
                    shared_dir=shared if backend == "filesystem" else None,
                )
                try:
                    seconds = time_pushes(engine, named, args.pushes)
                finally:
                    engine.close()
                steady = median(seconds[1:])
                row = {
                    "size": label,
                    "parameters": parameters,
                    "tensors": len(named),
                    "bytes": nbytes,
                    "backend": backend,
                    "servers": count,
                    "first_push_seconds": seconds[0],
                    "push_seconds": seconds[1:],
                    "median_seconds": steady,
                    "effective_mb_per_s": nbytes / MB / steady,
                }
                rows.append(row)
                print(
                    f"  {backend:<10} x{count}: first {seconds[0]:.3f} s, median {steady:.3f} s "
                    f"({row['effective_mb_per_s']:.0f} MB/s)",
                    flush=True,
                )
    shutil.rmtree(args.work_dir / "shared", ignore_errors=True)
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    settings = sorted({(r["backend"], r["servers"]) for r in rows})
    for backend, count in settings:
        points = sorted(
            (r["parameters"], r["median_seconds"])
            for r in rows
            if (r["backend"], r["servers"]) == (backend, count)
        )
        xs, ys = zip(*points, strict=True)
        ax.plot(
            xs,
            ys,
            marker="o",
            linestyle="-" if backend == "gloo" else "--",
            label=f"{backend}, {count} server{'s' if count > 1 else ''}",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (float32)")
    ax.set_ylabel("seconds per push (median)")
    ax.set_title("Weight push to CPU rollout servers (RemoteRolloutEngine.update_weights)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    torch.set_num_threads(1)
    report: dict[str, Any] = {"environment": environment()}
    print(
        f"weight sync: backends {args.backends}, servers {args.servers}, {args.pushes} timed pushes after "
        f"the first; servers OMP_NUM_THREADS=1, client 1 thread; load average "
        f"{report['environment']['load_average_start']}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    skipped = []
    for label in args.sizes:
        # The client's copy, and per server the served model plus one staged update.
        estimate = 4 * (1 + 2 * max(args.servers)) * parameter_count(SHAPES[label])
        if estimate > 0.8 * available_bytes():
            print(f"{label}: skipped (needs about {estimate / 2**30:.1f} GiB, more than is available)")
            skipped.append(label)
            continue
        rows += measure_size(args, label)

    header = f"{'size':>6}{'params':>12}{'backend':>12}{'servers':>9}{'first s':>10}{'s/push':>10}{'MB/s':>9}"
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['size']:>6}{r['parameters']:>12,}{r['backend']:>12}{r['servers']:>9}"
            f"{r['first_push_seconds']:>10.3f}{r['median_seconds']:>10.3f}{r['effective_mb_per_s']:>9.0f}"
        )
    print(
        "s/push = median of the pushes after the first (the first builds the gloo group); "
        "MB/s = float32 model bytes / s per push"
    )
    report.update(
        {
            "setting": {
                "backends": args.backends,
                "servers": args.servers,
                "pushes": args.pushes,
                "shapes": {label: SHAPES[label] for label in args.sizes},
                "dtype": "float32",
                "server_threads": 1,
                "client_threads": 1,
            },
            "skipped": skipped,
            "rows": rows,
        }
    )
    finish(report, args.out)
    if rows and str(args.plot) not in ("", "."):
        plot(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

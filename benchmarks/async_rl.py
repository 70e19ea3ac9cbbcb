"""Asynchronous RL benchmark: step time and tokens/s of a disaggregated run on 2 cores with
`rollout.max_staleness` k = 0 (on-policy), 1 and 2, and the RLSD / GRPO step-time ratio with the
teacher overlapped.

Setting (every run is the real CLI against real servers on loopback, as a user would start them)
    * Core 1: one CPU rollout server and one CPU teacher server (`rlsd-trainer serve rollout` /
      `serve teacher`, OMP_NUM_THREADS=1 each, pinned with sched_setaffinity, i.e. `taskset -c 1`),
      started once and shared by every run; each run pushes its starting weights to both (gloo
      weight transfer) before its first step. The two servers share the core: the planner asks the
      teacher only after the rollout of a batch is back, so they take turns rather than compete
      (with k >= 1 the teacher of batch s can overlap the rollout of batch s + 1: that contention is
      part of what is measured).
    * Core 0: the learner, `taskset -c 0 rlsd-trainer local` with OMP_NUM_THREADS=1 (its reward
      workers inherit the pinning), the packaged embedded config with `rollout.backend: remote`,
      `teacher.placement: remote`, eval off and one checkpoint (at the end). Each run starts from
      the policy the embedded default starts RL from: its 400-step supervised warm-up, run once by
      this script through the CLI, cached under `--work-dir` and copied into every run's output
      directory, where the trainer finds it and skips the warm-up (as `learning.py` does).
    * Batch: `--prompts` 48 x `--group` 8 responses of up to `--max-new-tokens` 64 (the embedded
      default's 16 prompts made 3x larger, so that a step takes a few seconds, with generation and
      learning of the same order: about 1.4 s each on one core).
    * Runs (`--runs`, `ALGORITHM:K` each; default grpo and rlsd at k = 0, 1, 2), same seed and
      config except `algorithm.name` and `rollout.max_staleness`, one after the other (`--rounds 2`
      repeats the list in reverse order and pools the steps of both rounds). grpo asks no teacher
      (its server idles), so its k sweep measures the overlap of generation and learning alone.

Figures (read from each run's metrics.jsonl; steps `--skip` + 1 .. total - 1 are timed, so the
first steps that fill the pipeline and the last one, which writes the final checkpoint, are not)
    * step time: the median interval between consecutive step records (what a user sees:
      wall time per optimizer step, whatever overlaps within it); `step_seconds` (the trainer's own
      measure) and every `time_<phase>_seconds` median are reported beside it;
    * tokens/s: prompt + response tokens of the timed steps' rollouts / the timed window's wall time;
    * busy share: CPU seconds over the timed window / the window (sampled from /proc every 0.2 s) of
      the learner's main thread (the learning), its other threads (planner, HTTP clients, weight
      pushes) and its reward workers, all on core 0, and of each server (core 1): where each core's
      time goes;
    * ratios: step time at k over k = 0 per algorithm (target: k = 1 <= 0.6), and RLSD over GRPO at
      each k (target at k = 1: <= 1.10).

Output: a table on stdout, `benchmarks/results/async_rl.json` and `async_rl.png`.

    python benchmarks/async_rl.py
    python benchmarks/async_rl.py --runs grpo:0 grpo:1 --steps 8    # quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from harness import (
    CLI,
    RESULTS,
    ROOT,
    WORK,
    Server,
    environment,
    finish,
    median,
    one_thread_env,
    save_figure,
    start_server,
    wait_healthy,
)

from rlsd_trainer.lifecycle import child_pids

CONFIG = ROOT / "trainer/src/rlsd_trainer/configs/embedded.yaml"
NAME = "policy"
SHARED_DIRS = ("embedded-model", "initial-policy")
LEARNER_CPU, SERVER_CPU = 0, 1
TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Setting:
    algorithm: str
    staleness: int

    @property
    def label(self) -> str:
        return f"{self.algorithm} k={self.staleness}"

    @classmethod
    def parse(cls, text: str) -> Setting:
        algorithm, _, k = text.partition(":")
        if not k.isdigit():
            raise argparse.ArgumentTypeError(f"{text!r}: expected ALGORITHM:K, e.g. rlsd:1")
        return cls(algorithm, int(k))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs",
        nargs="+",
        type=Setting.parse,
        default=[Setting(a, k) for a in ("grpo", "rlsd") for k in (0, 1, 2)],
        help="ALGORITHM:MAX_STALENESS, one run each",
    )
    parser.add_argument("--prompts", type=int, default=48, help="rollout.prompts_per_step")
    parser.add_argument("--group", type=int, default=8, help="algorithm.group_size")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="rollout.sampling.max_new_tokens")
    parser.add_argument("--steps", type=int, default=16, help="run.total_steps of each run")
    parser.add_argument("--skip", type=int, default=4, help="untimed first steps (pipeline filling)")
    parser.add_argument("--rounds", type=int, default=1, help="passes over --runs (alternating order)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=WORK / "async")
    parser.add_argument("--out", type=Path, default=RESULTS / "async_rl.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "async_rl.png")
    return parser


def starting_policy(work: Path, seed: int) -> Path:
    """The policy the embedded default starts RL from: its supervised warm-up, through the CLI (one RL
    step on both cores, no eval), run once and reused."""
    output = work / f"start-seed{seed}"
    policy = output / "initial-policy"
    if not (policy / "config.json").exists():
        shutil.rmtree(output, ignore_errors=True)
        output.mkdir(parents=True)
        print(
            f"starting policy: the embedded default's warm-up into {policy} (a few minutes) ...", flush=True
        )
        overrides = {
            "run.output_dir": output,
            "run.seed": seed,
            "run.total_steps": 1,
            "data.eval": "null",
            "metrics.progress_bar": "false",
            "metrics.prometheus_port": "null",
        }
        with (output / "cli.log").open("w") as log:
            subprocess.run(
                [CLI, "local", "--config", str(CONFIG), *set_flags(overrides)],
                check=True,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=one_thread_env(OMP_NUM_THREADS="2", MKL_NUM_THREADS="2"),
            )
    return policy


def set_flags(overrides: dict[str, Any]) -> list[str]:
    return [flag for key, value in overrides.items() for flag in ("--set", f"{key}={value}")]


def run_overrides(
    args: argparse.Namespace, setting: Setting, servers: dict[str, Server], output: Path
) -> dict[str, Any]:
    """The `--set` overrides of one run on top of the packaged embedded config."""
    overrides: dict[str, Any] = {
        "run.output_dir": output,
        "run.seed": args.seed,
        "run.total_steps": args.steps,
        "data.eval": "null",
        "algorithm.name": setting.algorithm,
        "algorithm.group_size": args.group,
        "rollout.prompts_per_step": args.prompts,
        "rollout.sampling.max_new_tokens": args.max_new_tokens,
        "rollout.max_staleness": setting.staleness,
        "checkpoint.every": args.steps,
        "metrics.progress_bar": "false",
        "metrics.prometheus_port": "null",
        "rollout.backend": "remote",
        "teacher.placement": "remote",
    }
    for role, section in (("rollout", "rollout.servers"), ("teacher", "teacher.servers")):
        overrides[f"{section}.urls"] = f"[{servers[role].url}]"
        overrides[f"{section}.model_name"] = NAME
        overrides[f"{section}.weight_transfer.backend"] = "gloo"
    return overrides


def cpu_seconds(stat: str) -> float:
    """User + system CPU seconds from a /proc `stat` file (a process's: all its threads)."""
    with open(stat) as handle:
        fields = handle.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


# Where the CPU goes, by core: the learner's main thread (the learning itself), its other threads
# (planner, HTTP clients, weight pushes) and its reward workers on core 0; the servers on core 1.
CPU_USERS = ("learner", "planner", "rewards", "rollout", "teacher")


class CpuSampler:
    """Samples the CPU seconds of the learner (split as `CPU_USERS`) and the servers every
    `interval` s, in a thread of its own."""

    def __init__(self, learner: int, servers: dict[str, int], interval: float = 0.2) -> None:
        self.learner = learner
        self.servers = servers
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._workers: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _read(self) -> dict[str, float]:
        process = cpu_seconds(f"/proc/{self.learner}/stat")
        main = cpu_seconds(f"/proc/{self.learner}/task/{self.learner}/stat")
        if len(self.samples) % 25 == 0:  # the reward pool starts with the run: look again now and then
            self._workers = child_pids(self.learner)
        workers = 0.0
        for pid in self._workers:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                workers += cpu_seconds(f"/proc/{pid}/stat")
        servers = {name: cpu_seconds(f"/proc/{pid}/stat") for name, pid in self.servers.items()}
        return {"learner": main, "planner": process - main, "rewards": workers, **servers}

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.samples.append((time.time(), self._read()))
            except (FileNotFoundError, ProcessLookupError):
                return  # the learner has exited

    def busy_share(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds per wall second of each process between the samples nearest `start` and `end`."""
        if len(self.samples) < 2:
            return {}
        first = min(self.samples, key=lambda s: abs(s[0] - start))
        last = min(self.samples, key=lambda s: abs(s[0] - end))
        wall = last[0] - first[0]
        if wall <= 0:
            return {}
        return {name: max(0.0, last[1][name] - first[1][name]) / wall for name in CPU_USERS}


def run_one(
    args: argparse.Namespace, setting: Setting, policy: Path, servers: dict[str, Server], output: Path
) -> dict[str, Any]:
    """One training run of `setting`, pinned to the learner core; its timed steps' figures."""
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    for name in SHARED_DIRS:  # the trainer finds its warmed-up start there and skips the warm-up
        shutil.copytree(policy.parent / name, output / name)
    overrides = run_overrides(args, setting, servers, output)
    command = [
        "taskset",
        "-c",
        str(LEARNER_CPU),
        CLI,
        "local",
        "--config",
        str(CONFIG),
        *set_flags(overrides),
    ]
    started = time.perf_counter()
    with (output / "cli.log").open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=one_thread_env())
        with CpuSampler(process.pid, {role: s.process.pid for role, s in servers.items()}) as sampler:
            code = process.wait()
    if code != 0:
        raise RuntimeError(f"{setting.label} exited {code}: {(output / 'cli.log').read_text()[-3000:]}")
    wall = time.perf_counter() - started
    records = {
        int(r["step"]): r
        for r in map(json.loads, (output / "metrics.jsonl").read_text().splitlines())
        if "step_seconds" in r
    }
    timed = [s for s in range(args.skip + 1, args.steps) if s in records and s - 1 in records]
    if not timed:
        raise RuntimeError(f"{setting.label}: no timed steps (--steps {args.steps}, --skip {args.skip})")
    intervals = [records[s]["time"] - records[s - 1]["time"] for s in timed]
    tokens = [records[s]["tokens_per_second"] * records[s]["step_seconds"] for s in timed]
    window = (records[timed[0] - 1]["time"], records[timed[-1]]["time"])
    phases = sorted(
        {k for s in timed for k in records[s] if k.startswith("time_") and k.endswith("_seconds")}
    )
    return {
        "algorithm": setting.algorithm,
        "max_staleness": setting.staleness,
        "command": command,
        "run_wall_seconds": wall,
        "timed_steps": timed,
        "step_intervals": intervals,
        "step_seconds": [records[s]["step_seconds"] for s in timed],
        "tokens": tokens,
        "window_seconds": window[1] - window[0],
        "phase_medians": {p: median([records[s].get(p, 0.0) for s in timed]) for p in phases},
        "rollout_staleness_mean": statistics.fmean(records[s].get("rollout_staleness", 0.0) for s in timed),
        "response_length_mean": statistics.fmean(records[s]["response_length_mean"] for s in timed),
        "busy_share": sampler.busy_share(*window),
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per setting: the pooled timed steps of all its runs."""
    summary: dict[str, dict[str, Any]] = {}
    for run in runs:
        label = Setting(run["algorithm"], run["max_staleness"]).label
        entry = summary.setdefault(
            label,
            {"algorithm": run["algorithm"], "max_staleness": run["max_staleness"], "runs": []},
        )
        entry["runs"].append(run)
    for entry in summary.values():
        pooled = entry["runs"]
        entry["step_time"] = median([x for r in pooled for x in r["step_intervals"]])
        entry["step_seconds_metric"] = median([x for r in pooled for x in r["step_seconds"]])
        entry["tokens_per_second"] = sum(sum(r["tokens"]) for r in pooled) / sum(
            r["window_seconds"] for r in pooled
        )
        phases = {p for r in pooled for p in r["phase_medians"]}
        entry["phases"] = {
            p: median([r["phase_medians"].get(p, 0.0) for r in pooled]) for p in sorted(phases)
        }
        entry["busy_share"] = {
            name: statistics.fmean(r["busy_share"][name] for r in pooled if name in r["busy_share"])
            for name in CPU_USERS
            if any(name in r["busy_share"] for r in pooled)
        }
        entry["rollout_staleness_mean"] = statistics.fmean(r["rollout_staleness_mean"] for r in pooled)
        entry["response_length_mean"] = statistics.fmean(r["response_length_mean"] for r in pooled)
        entry["runs"] = [{k: v for k, v in r.items()} for r in pooled]
    return summary


def ratios(summary: dict[str, dict[str, Any]]) -> dict[str, float]:
    found: dict[str, float] = {}
    for entry in summary.values():
        algorithm, k = entry["algorithm"], entry["max_staleness"]
        on_policy = summary.get(Setting(algorithm, 0).label)
        if k > 0 and on_policy is not None:
            found[f"{algorithm} k={k} / k=0"] = entry["step_time"] / on_policy["step_time"]
        grpo = summary.get(Setting("grpo", k).label)
        if algorithm == "rlsd" and grpo is not None:
            found[f"rlsd / grpo at k={k}"] = entry["step_time"] / grpo["step_time"]
    return found


TARGETS = {"k=1 / k=0": 0.6, "rlsd / grpo at k=1": 1.10}


def target_of(name: str) -> float | None:
    return next((value for key, value in TARGETS.items() if name.endswith(key)), None)


def print_table(summary: dict[str, dict[str, Any]], found: dict[str, float]) -> None:
    phases = sorted({p for e in summary.values() for p in e["phases"]})
    short = [p.removeprefix("time_").removesuffix("_seconds") for p in phases]
    header = (
        f"{'setting':<12}{'s/step':>8}{'metric':>8}{'tokens/s':>10}{'stale':>7}{'resp':>6}"
        + "".join(f"{n:>9}" for n in CPU_USERS)
        + "  "
        + " ".join(f"{s:>9}" for s in short)
    )
    print("\n" + header)
    print("-" * len(header))
    for label, e in summary.items():
        busy = e["busy_share"]
        print(
            f"{label:<12}{e['step_time']:>8.2f}{e['step_seconds_metric']:>8.2f}{e['tokens_per_second']:>10.0f}"
            f"{e['rollout_staleness_mean']:>7.2f}{e['response_length_mean']:>6.1f}"
            + "".join(f"{busy.get(n, float('nan')):>9.2f}" for n in CPU_USERS)
            + "  "
            + " ".join(f"{e['phases'].get(p, 0.0):>9.2f}" for p in phases)
        )
    print(
        "s/step: median interval between step records; metric: median step_seconds; tokens/s: rollout\n"
        "tokens / timed wall time; stale: mean rollout_staleness; resp: mean response length; then CPU\n"
        "seconds per wall second on core 0 (learner: main thread; planner: its other threads, i.e. planner,\n"
        "HTTP, weight push; rewards: its reward workers) and core 1 (rollout, teacher servers); then median\n"
        "seconds per phase"
    )
    print()
    for name, value in found.items():
        target = target_of(name)
        verdict = (
            "" if target is None else f" (target <= {target}: {'met' if value <= target else 'NOT met'})"
        )
        print(f"step-time ratio {name}: {value:.3f}{verdict}")


def plot(summary: dict[str, dict[str, Any]], found: dict[str, float], path: Path) -> None:
    figure, (bars, series) = plt.subplots(1, 2, figsize=(12, 4.2))
    labels = list(summary)
    times = [summary[label]["step_time"] for label in labels]
    drawn = bars.bar(labels, times, color=[f"C{summary[x]['max_staleness']}" for x in labels])
    bars.bar_label(
        drawn,
        [f"{summary[x]['step_time']:.2f} s\n{summary[x]['tokens_per_second']:.0f} tok/s" for x in labels],
        fontsize=8,
    )
    bars.set_ylabel("median seconds per step")
    bars.set_title("Step time, learner on core 0, servers on core 1")
    bars.set_ylim(0, max(times) * 2.0)  # room for the ratios above the bars
    bars.text(
        0.02,
        0.97,
        "\n".join(f"{name}: {value:.2f}" for name, value in found.items()),
        transform=bars.transAxes,
        va="top",
        fontsize=8,
    )
    for index, label in enumerate(labels):
        run = summary[label]["runs"][0]
        series.plot(run["timed_steps"], run["step_intervals"], marker="o", label=label, color=f"C{index}")
    series.set_xlabel("step")
    series.set_ylabel("seconds since the previous step")
    series.set_title("Timed steps (first round)")
    series.set_ylim(bottom=0)
    series.grid(alpha=0.3)
    series.legend(fontsize=8)
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs 2 cores: the learner on core 0, the servers on core 1")
    report: dict[str, Any] = {"environment": environment()}
    policy = starting_policy(args.work_dir, args.seed)
    print(
        f"async RL: {args.prompts} prompts x {args.group} x up to {args.max_new_tokens} tokens, "
        f"{args.steps} steps per run ({args.skip} untimed); load average "
        f"{report['environment']['load_average_start']}",
        flush=True,
    )
    logs = args.work_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    servers = {
        role: start_server(role, policy, logs, NAME, "gloo", {SERVER_CPU}) for role in ("rollout", "teacher")
    }
    runs = []
    try:
        wait_healthy(list(servers.values()))
        for round_index in range(args.rounds):
            order = args.runs if round_index % 2 == 0 else args.runs[::-1]
            for setting in order:
                output = args.work_dir / f"{setting.algorithm}-k{setting.staleness}-r{round_index}"
                run = run_one(args, setting, policy, servers, output)
                runs.append(run)
                print(
                    f"  {setting.label} (round {round_index + 1}): "
                    f"{median(run['step_intervals']):.2f} s/step, run {run['run_wall_seconds']:.0f} s",
                    flush=True,
                )
    finally:
        for server in servers.values():
            server.stop()
    summary = summarize(runs)
    found = ratios(summary)
    print_table(summary, found)
    report.update(
        {
            "setting": {
                "prompts_per_step": args.prompts,
                "group_size": args.group,
                "max_new_tokens": args.max_new_tokens,
                "steps": args.steps,
                "skip": args.skip,
                "rounds": args.rounds,
                "seed": args.seed,
                "learner": f"taskset -c {LEARNER_CPU}, OMP_NUM_THREADS=1",
                "servers": f"rollout + teacher, each pinned to core {SERVER_CPU}, OMP_NUM_THREADS=1",
                "starting_policy": str(policy),
            },
            "targets": TARGETS,
            "ratios": found,
            "settings": summary,
        }
    )
    plot(summary, found, args.plot)
    finish(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stress check of the multi-rank exit paths: the exit code of every rank of every run, under load.

What it runs
    The multi-rank jobs of the test suite, with the tests' own code (workers, configs, launchers), N
    rounds of each selected scenario:

    * `sharding`     tests/trainer/test_sharding.py's FSDP2 gradient worker, torchrun, 2 ranks (0)
    * `ckpt-save-2`  tests/trainer/test_checkpoint.py's sharded async save, torchrun, 2 ranks (0)
    * `ckpt-load-1`  ... its resume of that checkpoint on 1 rank (0)
    * `ckpt-load-3`  ... and on 3 ranks (0)
    * `learner-k0`   `rlsd-trainer learner --nproc-per-node 2 --standalone` (the product's entrypoint:
                     launcher, torchrun, 2 ranks, FSDP2 over gloo, async checkpoints, remote rollout
                     and teacher servers) with tests/trainer/test_distributed.py's config, to the end (0)
    * `learner-k1`   the same with `rollout.max_staleness: 1` (the planner's worker thread) (0)
    * `preempt-k0`   the same, SIGTERM once the ranks are past start-up: saved and stopped (75)
    * `preempt-k1`   ... with `rollout.max_staleness: 1` (75)
    * `lost-server`  `learner-k0` with one of its two rollout replicas killed once the run has a
                     checkpoint (tests/trainer/test_distributed.py's lost-server test) (0)
    * `bad-config`   2 ranks that find the config unusable (3)
    * `exit-race`    on demand (not in the default set): the abort at exit made likely. 2 gloo ranks
                     whose last collective's work (holding a tensor only C++ still refers to) is let
                     go of by gloo's worker thread while the rank exits; those threads run
                     SCHED_IDLE on a core shared with a `yes`, so they are delayed past the rank's
                     end. Ends as a learner rank does (`lifecycle.end_process`) (0)
    * `exit-race-plain`  the control: the same ending by returning from the script (interpreter
                     finalization, as every rank ended before the fix); aborts now and then

    While they run, `--load` processes (`yes > /dev/null`) keep that many cores busy.

What it counts
    Each run's exit code (torchrun's, or the learner launcher's) against the expected one, and each
    rank's: torchrun's failure report (`exitcode: -6`), the launcher's record of its workers' codes,
    and `terminate called` in the output. An abort is a rank that died of SIGABRT (-6, or 134 seen
    through a shell). With `--cores`, ranks may dump core (RLIMIT_CORE unlimited; the kernel's
    `core_pattern` decides where: with the default `core` it is the run's directory) and every core
    found is read with `gdb -batch -ex "thread apply all bt"` into `<run dir>/backtrace-*.txt`;
    PYTHONFAULTHANDLER=1 prints the Python stacks of an aborting rank in its output.

Output: a table of exit codes per scenario and in total, and `benchmarks/results/<--name>.json`.

    .venv/bin/python benchmarks/stress_multirank.py --rounds 6 --load 1
    .venv/bin/python benchmarks/stress_multirank.py --rounds 20 --scenarios sharding ckpt-load-3 --cores
    make stress-multirank ROUNDS=6 LOAD=1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import RESULTS, ROOT, busy_cores, environment, finish

import processes  # tests/trainer/processes.py (harness puts tests/trainer on sys.path)  # isort: skip

WORK = ROOT / "runs/stress-multirank"
ABORT = -signal.SIGABRT
EXIT_PREEMPTED, EXIT_BAD_CONFIG = 75, 3


@dataclass
class Run:
    scenario: str
    round: int
    expected: int
    code: int
    seconds: float
    rank_codes: dict[int, int] = field(default_factory=dict)  # what was learnt of each rank
    aborted_ranks: list[int] = field(default_factory=list)
    terminate_message: bool = False
    backtraces: list[str] = field(default_factory=list)
    directory: str = ""

    @property
    def aborted(self) -> bool:
        return bool(self.aborted_ranks) or self.terminate_message or self.code in (ABORT, 128 + 6)

    @property
    def ok(self) -> bool:
        return self.code == self.expected and not self.aborted


# ---- reading what the ranks did ------------------------------------------------------------------
_TORCHRUN_FAILURE = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")
_LAUNCHER_CODES = re.compile(r"torchrun exited (-?\d+), workers \[([-\d, ]*)\]: exit (-?\d+)")


def rank_codes(output: str) -> tuple[dict[int, int], list[int]]:
    """The exit codes torchrun reported for failed ranks, and the ranks that died of SIGABRT."""
    failed = {int(rank): int(code) for rank, code in _TORCHRUN_FAILURE.findall(output)}
    return failed, sorted(rank for rank, code in failed.items() if code in (ABORT, 128 + 6))


def examine(run: Run, output: str, directory: Path, keep_cores: bool) -> Run:
    failed, aborted = rank_codes(output)
    run.rank_codes.update(failed)
    launcher = _LAUNCHER_CODES.findall(output)
    if launcher:
        recorded = [int(c) for c in launcher[-1][1].split(",") if c.strip()]
        for rank, code in enumerate(recorded):
            run.rank_codes.setdefault(rank, code)
    run.aborted_ranks = aborted
    run.terminate_message = "terminate called" in output
    run.backtraces = backtraces(directory, keep_cores)
    run.directory = str(directory)
    return run


def backtraces(directory: Path, keep: bool) -> list[str]:
    """Every thread's stack of each core dumped under `directory` (by gdb), written beside it."""
    written = []
    for index, core in enumerate(sorted(p for p in directory.rglob("core*") if p.is_file())):
        out = directory / f"backtrace-{index}.txt"
        command = ["gdb", "-batch", "-ex", "info threads", "-ex", "thread apply all bt 40", sys.executable]
        with out.open("w") as sink:
            subprocess.run([*command, str(core)], stdout=sink, stderr=subprocess.STDOUT, timeout=600)
        written.append(str(out))
        if not keep:
            core.unlink()
    return written


def rank_env(cores: bool) -> dict[str, str]:
    extra = {"PYTHONFAULTHANDLER": "1"} if cores else {}
    return processes.one_thread_env(**extra)


def allow_cores() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def start_rank(cores: bool, cpus: set[int] | None) -> None:
    """In the child before exec: core dumps allowed, pinned to `cpus` (inherited by the ranks)."""
    if cores:
        allow_cores()
    if cpus:
        os.sched_setaffinity(0, cpus)


# ---- the scenarios ---------------------------------------------------------------------------------
EXIT_RACE = r"""
import os, sys
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from rlsd_trainer.lifecycle import end_process
from rlsd_trainer.training.distributed import barrier, init_distributed, shutdown_distributed

ctx = init_distributed(60)
mesh = init_device_mesh("cpu", (ctx.world_size,))  # keeps the group alive to the end, as FSDP2 does
for task in os.listdir("/proc/self/task"):  # gloo's workers run only when a core has nothing else
    with open(f"/proc/self/task/{task}/comm") as handle:
        if handle.read().strip() == "pt_gloo_runloop":
            os.sched_setscheduler(int(task), os.SCHED_IDLE, os.sched_param(0))
barrier(ctx)
tensor = torch.ones(1000)
work = dist.all_reduce(tensor, async_op=True)
del tensor  # only the work refers to it now: letting go of it takes the GIL
work.wait()
del work
if sys.argv[1] == "product":  # as rlsd_trainer.cli ends a learner rank
    shutdown_distributed()
    end_process(0)
"""


class Scenarios:
    """One method per scenario; each returns a `Run` (its directory is kept when the run failed)."""

    def __init__(self, work: Path, cores: bool, keep_cores: bool, steps: int) -> None:
        self.work, self.cores, self.keep_cores, self.steps = work, cores, keep_cores, steps
        self._servers: dict[str, list[processes.Server]] | None = None
        self._model_dir: Path | None = None
        self._stack = contextlib.ExitStack()
        self._checkpoint_dir: Path | None = None

    def close(self) -> None:
        self._stack.close()

    # -- torchrun of a test's worker script
    def _torchrun(
        self, name: str, round_: int, nproc: int, script: str, *args: str, cpus: set[int] | None = None
    ) -> Run:
        directory = self.work / f"{name}-{round_:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "worker.py"
        path.write_text(script)
        started = time.monotonic()
        done = processes.torchrun(
            nproc,
            path,
            *[a.replace("{dir}", str(directory)) for a in args],
            cwd=directory,
            env=rank_env(self.cores),
            preexec_fn=lambda: start_rank(self.cores, cpus),
        )
        run = Run(name, round_, 0, done.returncode, time.monotonic() - started)
        (directory / "output.txt").write_text(done.stdout + done.stderr)
        return examine(run, done.stdout + done.stderr, directory, self.keep_cores)

    def sharding(self, round_: int) -> Run:
        import test_sharding

        return self._torchrun(
            "sharding", round_, 2, test_sharding.WORKER, "{dir}/grads.pt", str(processes.TESTS_DIR)
        )

    def exit_race(self, round_: int, ending: str = "product") -> Run:
        # Ranks and a `yes` share one core: gloo's SCHED_IDLE workers get it only when both wait.
        core = {max(os.sched_getaffinity(0))}
        name = "exit-race" if ending == "product" else "exit-race-plain"
        with busy_cores(1, core):
            return self._torchrun(name, round_, 2, EXIT_RACE, ending, cpus=core)

    def exit_race_plain(self, round_: int) -> Run:
        return self.exit_race(round_, ending="plain")

    def _checkpoint(self, name: str, round_: int, nproc: int, mode: str) -> Run:
        import test_checkpoint

        if mode == "load" and self._checkpoint_dir is None:
            self.ckpt_save_2(round_)
        if mode == "save":
            self._checkpoint_dir = self.work / f"checkpoint-{round_:03d}"
            shutil.rmtree(self._checkpoint_dir, ignore_errors=True)
        assert self._checkpoint_dir is not None
        return self._torchrun(name, round_, nproc, test_checkpoint.WORKER, mode, str(self._checkpoint_dir))

    def ckpt_save_2(self, round_: int) -> Run:
        return self._checkpoint("ckpt-save-2", round_, 2, "save")

    def ckpt_load_1(self, round_: int) -> Run:
        return self._checkpoint("ckpt-load-1", round_, 1, "load")

    def ckpt_load_3(self, round_: int) -> Run:
        return self._checkpoint("ckpt-load-3", round_, 3, "load")

    # -- the learner's entrypoint, as tests/trainer/test_distributed.py runs it
    def _servers_up(self) -> tuple[dict[str, list[processes.Server]], Path]:
        if self._servers is None:
            import test_distributed as td

            from rlsd_contracts.config import EmbeddedTaskSection
            from rlsd_trainer.model.embedded import build_model_dir

            self._model_dir = self.work / "embedded-model"
            if not (self._model_dir / "config.json").exists():
                build_model_dir(self._model_dir, EmbeddedTaskSection(**td.TASK), td.SEED)
            logs = self.work / "server-logs"
            logs.mkdir(parents=True, exist_ok=True)
            started = {
                "rollout": [
                    processes.start_server("rollout", self._model_dir, logs, "policy") for _ in range(2)
                ],
                "teacher": [processes.start_server("teacher", self._model_dir, logs, "policy")],
            }
            for server in (s for group in started.values() for s in group):
                self._stack.callback(server.stop)
            processes.wait_healthy([s for group in started.values() for s in group])
            self._servers = started
        assert self._model_dir is not None
        return self._servers, self._model_dir

    def _learner(
        self,
        name: str,
        round_: int,
        expected: int,
        sigterm: bool = False,
        lose_server: bool = False,
        **changes: dict,
    ) -> Run:
        import test_distributed as td

        servers, model_dir = self._servers_up()
        directory = self.work / f"{name}-{round_:03d}"
        shutil.rmtree(directory, ignore_errors=True)
        td.prepare_output(directory, model_dir)
        lost = None
        if lose_server:  # a rollout replica of this run's own, killed once the run has a checkpoint
            lost = processes.start_server("rollout", model_dir, directory, "policy")
            processes.wait_healthy([lost])
            servers = {**servers, "rollout": [servers["rollout"][0], lost]}
        changes["run"] = {"total_steps": self.steps, **changes.get("run", {})}
        config = td.run_config(directory, servers, **changes)
        log = directory / "learner.log"
        started = time.monotonic()
        process = processes.start_learners(
            config, log, env=rank_env(self.cores), preexec_fn=allow_cores if self.cores else None
        )
        try:
            # As the chaos test does: once the ranks are past start-up, the pod is deleted.
            if sigterm and processes.wait_past_startup(process, log, since=0):
                process.send_signal(signal.SIGTERM)
            # As test_lost_rollout_server_is_routed_around does: the replica's node goes.
            if lost is not None and processes.wait_for(
                lambda: td.newest_checkpoint(directory) is not None,
                process,
                processes.RUN_TIMEOUT_S,
                "a checkpoint",
            ):
                lost.kill()
            code = process.wait(timeout=processes.RUN_TIMEOUT_S)
        finally:
            processes.kill_session(process)
            if lost is not None:
                lost.stop()
        run = Run(name, round_, expected, code, time.monotonic() - started)
        return examine(run, log.read_text(errors="replace"), directory, self.keep_cores)

    def learner_k0(self, round_: int) -> Run:
        return self._learner("learner-k0", round_, 0, rollout={"max_staleness": 0})

    def learner_k1(self, round_: int) -> Run:
        return self._learner("learner-k1", round_, 0, rollout={"max_staleness": 1})

    def preempt_k0(self, round_: int) -> Run:
        return self._learner("preempt-k0", round_, EXIT_PREEMPTED, sigterm=True, rollout={"max_staleness": 0})

    def preempt_k1(self, round_: int) -> Run:
        return self._learner("preempt-k1", round_, EXIT_PREEMPTED, sigterm=True, rollout={"max_staleness": 1})

    def lost_server(self, round_: int) -> Run:
        return self._learner("lost-server", round_, 0, lose_server=True, rollout={"max_staleness": 0})

    def bad_config(self, round_: int) -> Run:
        # tests/trainer/test_distributed.py::test_config_error_found_by_the_ranks_exits_3
        return self._learner(
            "bad-config",
            round_,
            EXIT_BAD_CONFIG,
            rollout={"backend": "local", "servers": {}, "prompts_per_step": 1},
            teacher={"placement": "colocated", "servers": {}},
        )


SCENARIOS: dict[str, Callable[[Scenarios, int], Run]] = {
    "sharding": Scenarios.sharding,
    "ckpt-save-2": Scenarios.ckpt_save_2,
    "ckpt-load-1": Scenarios.ckpt_load_1,
    "ckpt-load-3": Scenarios.ckpt_load_3,
    "learner-k0": Scenarios.learner_k0,
    "learner-k1": Scenarios.learner_k1,
    "preempt-k0": Scenarios.preempt_k0,
    "preempt-k1": Scenarios.preempt_k1,
    "lost-server": Scenarios.lost_server,
    "bad-config": Scenarios.bad_config,
    "exit-race": Scenarios.exit_race,
    "exit-race-plain": Scenarios.exit_race_plain,
}
# What `make stress-multirank` runs: the test suite's multi-rank jobs (the exit races are on demand).
DEFAULT_SCENARIOS = [name for name in SCENARIOS if not name.startswith("exit-race")]


# ---- report ----------------------------------------------------------------------------------------
def summarize(runs: list[Run]) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for name in [*dict.fromkeys(r.scenario for r in runs), "total"]:
        chosen = [r for r in runs if name in (r.scenario, "total")]
        table[name] = {
            "runs": len(chosen),
            "exit_codes": dict(sorted(Counter(r.code for r in chosen).items())),
            "rank_exit_codes": dict(
                sorted(Counter(c for r in chosen for c in r.rank_codes.values()).items())
            ),
            "aborts": sum(r.aborted for r in chosen),
            "unexpected": sum(not r.ok for r in chosen),
            "seconds_median": round(sorted(r.seconds for r in chosen)[len(chosen) // 2], 1),
        }
    return table


def print_table(table: dict[str, dict[str, Any]]) -> None:
    header = f"{'scenario':<16} {'runs':>5} {'aborts':>7} {'unexpected':>10}  "
    header += f"{'exit codes (code: runs)':<28} {'s/run':>6}"
    print(header)
    print("-" * len(header))
    for name, row in table.items():
        codes = ", ".join(f"{code}: {count}" for code, count in row["exit_codes"].items())
        print(
            f"{name:<16} {row['runs']:>5} {row['aborts']:>7} {row['unexpected']:>10}  {codes:<28} "
            f"{row['seconds_median']:>6}"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="runs of each scenario")
    parser.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), default=DEFAULT_SCENARIOS)
    parser.add_argument("--load", type=int, default=1, help="cores kept busy by `yes > /dev/null` (0: none)")
    parser.add_argument("--steps", type=int, default=4, help="run.total_steps of the learner scenarios")
    parser.add_argument("--cores", action="store_true", help="let ranks dump core; backtraces with gdb")
    parser.add_argument("--keep-cores", action="store_true", help="keep the core files next to them")
    parser.add_argument("--keep-runs", action="store_true", help="keep the directories of passing runs")
    parser.add_argument("--name", default="stress_multirank", help="results file name (without .json)")
    parser.add_argument("--work", type=Path, default=WORK)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.work = args.work.resolve()  # the ranks run in directories of their own
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "environment": {**environment(), "load_cores": args.load},
        "core_pattern": Path("/proc/sys/kernel/core_pattern").read_text().strip(),
    }
    runs: list[Run] = []
    scenarios = Scenarios(args.work, args.cores, args.keep_cores, args.steps)
    try:
        with busy_cores(args.load):
            for round_ in range(1, args.rounds + 1):
                for name in args.scenarios:
                    run = SCENARIOS[name](scenarios, round_)
                    runs.append(run)
                    mark = "ok" if run.ok else ("ABORT" if run.aborted else "UNEXPECTED")
                    ranks = f" ranks {run.rank_codes}" if run.rank_codes else ""
                    print(
                        f"[{round_}/{args.rounds}] {name:<16} exit {run.code:>4} (expected {run.expected})"
                        f"{ranks} {run.seconds:6.1f} s  {mark}",
                        flush=True,
                    )
                    if run.ok and not args.keep_runs and not run.backtraces:
                        shutil.rmtree(run.directory, ignore_errors=True)
    finally:
        scenarios.close()
    table = summarize(runs)
    print()
    print_table(table)
    report["summary"] = table
    report["failed_runs"] = [asdict(r) for r in runs if not r.ok]
    finish(report, RESULTS / f"{args.name}.json")
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())

"""Real processes on loopback for the multi-process tests: servers, learner launchers, free ports."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from rlsd_trainer.lifecycle import child_pids

CLI = str(Path(sys.executable).parent / "rlsd-trainer")
TESTS_DIR = Path(__file__).parent  # tiny_models, verifier_fixtures: imported by the workers
START_TIMEOUT_S = 180.0
# Bounds of waits on events that do come on a loaded machine (a run's steps, its exit); never used
# as a schedule.
RUN_TIMEOUT_S = 600.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """This process computes with one intra-op thread meanwhile, as the servers it compares with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_thread_env(**extra: str) -> dict[str, str]:
    """Child processes share 2 cores: one intra-op thread each, or they thrash."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def start_server(
    role: str,
    model_dir: Path,
    log_dir: Path,
    name: str,
    backend: str = "gloo",
    cpus: set[int] | None = None,
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    port: int | None = None,
) -> Server:
    """`rlsd-trainer serve <role>` on `port` or a free loopback port (not yet healthy: see
    `wait_healthy`), pinned to `cpus` when given (as `taskset -c` would), with `extra` arguments and
    `env` variables."""
    port = port or free_port()
    log = log_dir / f"{role}-{backend}-{port}.log"
    command = [CLI, "serve", role, "--model", str(model_dir), "--port", str(port)]
    command += ["--served-model-name", name, "--weight-transfer-config", f'{{"backend": "{backend}"}}']
    command += ["--transfer-timeout-s", "60", *extra]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=one_thread_env(**(env or {})),
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
    return Server(process, f"http://127.0.0.1:{port}", log)


def wait_healthy(servers: list[Server]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    for server in servers:
        while True:
            if server.process.poll() is not None:
                raise RuntimeError(f"{server.url} exited: {server.log.read_text()[-3000:]}")
            try:
                if httpx.get(server.url + "/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{server.url} not healthy: {server.log.read_text()[-3000:]}")
            time.sleep(0.1)


def torchrun(
    nproc: int,
    script: Path,
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
    timeout: float = RUN_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """`torchrun --nproc-per-node nproc --standalone script args...` to its end (the multi-rank tests'
    workers; `benchmarks/stress_multirank.py` runs the same)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    command += ["--standalone", str(script), *args]
    return subprocess.run(
        command,
        env=env if env is not None else one_thread_env(),
        cwd=cwd,
        preexec_fn=preexec_fn,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_learners(
    config: Path,
    log: Path,
    nproc: int = 2,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.Popen[bytes]:
    """`rlsd-trainer learner` launching `nproc` torchrun ranks, in a session of its own (like a pod).
    Its output is unbuffered, so the log shows each line as it is written (see `wait_past_startup`)."""
    command = [CLI, "learner", "--config", str(config), "--nproc-per-node", str(nproc), "--standalone"]
    env = dict(env if env is not None else one_thread_env())
    # The reward callables of verifier_fixtures.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    with log.open("ab") as sink:
        return subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            cwd=log.parent,
            preexec_fn=preexec_fn,
        )


# What rank 0 writes once the ranks are past start-up (model loaded, checkpoint restored, weights
# pushed to the servers), right before the first step of an attempt: a fresh run measures its
# starting policy, a resumed one says where it resumed from.
PAST_STARTUP = ("held-out accuracy of the starting policy", "resumed from")


def wait_past_startup(
    process: subprocess.Popen[bytes], log: Path, since: int, timeout: float = RUN_TIMEOUT_S
) -> bool:
    """Wait until this attempt of a learner run (its output appended to `log` after byte `since`) is
    past start-up; False if the process ended first. However slow the start-up, what comes after is
    the training loop."""

    def started() -> bool:
        with log.open("rb") as handle:
            handle.seek(since)
            text = handle.read().decode(errors="replace")
        return any(marker in text for marker in PAST_STARTUP)

    return wait_for(started, process, timeout, f"the learner past start-up ({log})")


def wait_for(
    condition: Callable[[], bool], process: subprocess.Popen[bytes] | None, timeout: float, what: str
) -> bool:
    """Poll `condition` until it holds (True), or `process` has exited (False); `timeout` only bounds
    a wait that would otherwise never end."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            return condition()
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.05)
    return True


def kill_session(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process and everything it started, as a container's end would (torchrun puts its
    ranks in sessions of their own, so killing the process group is not enough), and return once
    they are all gone (their ports and files released), not after a guessed pause."""
    started = descendants(process.pid)
    for pid in [*started, process.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)
    # Orphans are reaped by init, not by us: wait until none is running any more.
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not any(alive(pid) for pid in started), None, 10.0, "the killed processes")


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie has released everything but its exit status)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid`, collected before anything is killed."""
    found, frontier = [], [pid]
    while frontier:
        children = child_pids(frontier.pop())
        found += children
        frontier += children
    return found

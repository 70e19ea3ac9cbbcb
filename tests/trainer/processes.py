"""Real processes on loopback for the multi-process tests: servers, learner launchers, free ports."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from rlsd_trainer.lifecycle import child_pids

CLI = str(Path(sys.executable).parent / "rlsd-trainer")
START_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
    role: str, model_dir: Path, log_dir: Path, name: str, backend: str = "gloo", cpus: set[int] | None = None
) -> Server:
    """`rlsd-trainer serve <role>` on a free loopback port (not yet healthy: see `wait_healthy`),
    pinned to `cpus` when given (as `taskset -c` would)."""
    port = free_port()
    log = log_dir / f"{role}-{backend}-{port}.log"
    command = [CLI, "serve", role, "--model", str(model_dir), "--port", str(port)]
    command += ["--served-model-name", name, "--weight-transfer-config", f'{{"backend": "{backend}"}}']
    command += ["--transfer-timeout-s", "60"]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=one_thread_env(),
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


def start_learners(config: Path, log: Path, nproc: int = 2) -> subprocess.Popen[bytes]:
    """`rlsd-trainer learner` launching `nproc` torchrun ranks, in a session of its own (like a pod)."""
    command = [CLI, "learner", "--config", str(config), "--nproc-per-node", str(nproc), "--standalone"]
    tests_dir = str(Path(__file__).parent)  # the reward callables of verifier_fixtures
    env = one_thread_env(PYTHONPATH=os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
    with log.open("ab") as sink:
        return subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def kill_session(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process and everything it started, as a container's end would (torchrun puts its
    ranks in sessions of their own, so killing the process group is not enough)."""
    for pid in [*descendants(process.pid), process.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid`, collected before anything is killed."""
    found, frontier = [], [pid]
    while frontier:
        children = child_pids(frontier.pop())
        found += children
        frontier += children
    return found

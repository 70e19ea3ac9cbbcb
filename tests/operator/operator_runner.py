"""The operator in-process (kopf's KopfRunner), for the `operator` fixture and tests that restart it,
or as its console script in a subprocess (`OperatorProcess`, for the isolation test and the latency
benchmark).

A module of its own rather than conftest: a test importing from `conftest` gets whichever conftest
module is first on sys.path (tests/chart has one too)."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from controlplane import free_port, wait_until
from kopf.testing import KopfRunner

OPERATOR_ARGS = ["run", "--all-namespaces", "--standalone", "-m", "rlsd_operator.handlers"]


def start_operator() -> KopfRunner:
    return KopfRunner(OPERATOR_ARGS, timeout=60)


class OperatorProcess:
    """`rlsd-operator` (the console script) in a subprocess with `kubeconfig`, as the chart's
    Deployment runs it: its own Python process, metrics and /healthz on free ports."""

    def __init__(self, kubeconfig: Path, log_path: Path, namespaces: tuple[str, ...] = ()) -> None:
        self.metrics_port, self.liveness_port = free_port(), free_port()
        self.healthz = f"http://127.0.0.1:{self.liveness_port}/healthz"
        self.log_path = log_path
        self.log = log_path.open("wb")
        script = Path(sys.executable).with_name("rlsd-operator")
        self.proc = subprocess.Popen(
            [
                str(script),
                *("--metrics-port", str(self.metrics_port), "--liveness-port", str(self.liveness_port)),
                *(arg for namespace in namespaces for arg in ("--namespace", namespace)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        )

        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rlsd-operator exited with {self.proc.returncode}:\n{self.tail()}")
            with urllib.request.urlopen(self.healthz, timeout=2) as response:
                return response.status == 200

        wait_until(healthy, "rlsd-operator /healthz", retry_on=(OSError,))

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()

    def peak_rss_bytes(self) -> int:
        """The operator process's peak resident memory so far (Linux /proc: VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM")

    def lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.lines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self) -> OperatorProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

"""A network namespace of the test's own, for a real node and the control plane it joins (realnode.py).

The namespace has no link to the host: one bridge holds the node's address, and everything that
talks to the node (etcd, kube-apiserver, containerd, kubelet, kube-proxy, CoreDNS, the pods behind
the CNI bridge) runs inside. Processes start in it through `command()` (nsenter, which keeps the
host's mount namespace and so /sys/fs/cgroup); this process reaches into it through `call()` (a
thread pool whose threads entered the namespace: sockets belong to the namespace of the thread that
made them) and `forward()` (a loopback port of the host relayed to an address inside), which is how
kubectl, helm and the kubernetes client of the tests reach the API server.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
BRIDGE = "rlsd-node0"


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


class NetNs:
    """`ip netns add <name>`, with `address`/`prefix` on a bridge and the default route through it."""

    def __init__(self, name: str, address: str, prefix: int = 24) -> None:
        self.name, self.address = name, address
        self.path = Path("/run/netns") / name
        _ip("netns", "add", name)
        try:
            _ip("-n", name, "link", "set", "lo", "up")
            # The kernel here has no `dummy` links: a bridge without ports holds the address instead.
            _ip("-n", name, "link", "add", BRIDGE, "type", "bridge")
            _ip("-n", name, "addr", "add", f"{address}/{prefix}", "dev", BRIDGE)
            _ip("-n", name, "link", "set", BRIDGE, "up")
            # Service IPs are routed somewhere before kube-proxy's rules rewrite them.
            _ip("-n", name, "route", "add", "default", "dev", BRIDGE)
        except Exception:
            self.delete()
            raise
        self._pool = ThreadPoolExecutor(8, thread_name_prefix=f"netns-{name}", initializer=self._enter)
        self._forwarders: list[Forwarder] = []

    def _enter(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {self.path}")
        finally:
            os.close(fd)

    def call(self, function: Callable[..., T], *args: object) -> T:
        """`function(*args)` run by a thread inside the namespace."""
        return self._pool.submit(function, *args).result()

    def command(self, *args: str) -> list[str]:
        """`args` as a command that runs inside the namespace."""
        return ["nsenter", f"--net={self.path}", "--", *args]

    def forward(self, port: int, host: str | None = None) -> int:
        """A port on the host's 127.0.0.1 whose connections are relayed to `host`:`port` inside."""
        forwarder = Forwarder(self, (host or self.address, port))
        self._forwarders.append(forwarder)
        return forwarder.port

    def delete(self) -> None:
        for forwarder in getattr(self, "_forwarders", []):
            forwarder.close()
        if hasattr(self, "_pool"):
            self._pool.shutdown(wait=False, cancel_futures=True)
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True, check=False)


class Forwarder:
    """Accepts on 127.0.0.1 (host) and relays each connection to `target` inside `netns`."""

    def __init__(self, netns: NetNs, target: tuple[str, int]) -> None:
        self.netns, self.target = netns, target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name=f"forward :{self.port}", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = self.netns.call(socket.create_connection, self.target, 10)
            except OSError:
                downstream.close()
                continue
            _Relay(downstream, upstream)

    def close(self) -> None:
        self._closed.set()
        self.listener.close()


class _Relay:
    """Both directions of one relayed connection; an end of input is passed on as a half-close, and
    the sockets close once both directions ended (or either failed)."""

    def __init__(self, a: socket.socket, b: socket.socket) -> None:
        self.sockets = (a, b)
        self.lock = threading.Lock()
        self.open_directions = 2
        for source, sink in ((a, b), (b, a)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        failed = False
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            failed = True
        with self.lock:
            self.open_directions -= 1
            done = failed or self.open_directions == 0
        if done:
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

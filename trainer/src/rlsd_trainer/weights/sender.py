"""The learner side of a weight push: the backends' senders (see wire.py for the protocol)."""

from __future__ import annotations

import contextlib
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from rlsd_trainer.remote.http import HttpCallError, call_json, fan_out, run_together
from rlsd_trainer.weights.wire import (
    ABANDON_CALLS,
    INCOMPLETE_WEIGHTS,
    PAUSE,
    POLICY_DIR_PREFIX,
    TransferError,
    TransferKind,
    broadcast_update_info,
    nccl_init_info,
    reload_request,
    root_zero_options,
)


class WeightSender(Protocol):
    def push(self, urls: list[str], tensors: list[tuple[str, torch.Tensor]], version: int) -> None:
        """Make every server in `urls` serve `tensors` labelled `str(version)`, or raise."""
        ...

    def close(self) -> None: ...


class _Control:
    """The HTTP calls every sender makes to a set of servers. Within a push each is bounded by what is
    left of the push's deadline: a server that stops answering mid-push (its engine wedged in a
    collective, or its process stopped) fails the push in bounded time, named, instead of holding
    the learner. Clean-up calls get as long as a push each."""

    def __init__(self, http: httpx.Client, push_timeout_s: float) -> None:
        self.http = http
        self.push_timeout_s = push_timeout_s
        self._deadline: float | None = None  # time.monotonic() by which the push in progress must end

    @contextlib.contextmanager
    def push_deadline(self) -> Iterator[None]:
        self._deadline = time.monotonic() + self.push_timeout_s
        try:
            yield
        finally:
            self._deadline = None

    def remaining(self) -> float:
        """Seconds left to the push in progress (as long as a push outside one); never quite 0, so
        that a call made late fails as a timeout of its own."""
        if self._deadline is None:
            return self.push_timeout_s
        return max(self._deadline - time.monotonic(), 1e-3)

    def call(self, method: str, path: str, url: str, body: dict[str, Any] | None = None) -> Any:
        try:
            return call_json(self.http, method, url, path, body, timeout_s=self.remaining())
        except HttpCallError as exc:
            if isinstance(exc.__cause__, httpx.TimeoutException):
                raise TransferError(
                    f"{url}{path} did not answer within the push's weight_push_timeout_s "
                    f"({self.push_timeout_s:g} s): the server is stuck"
                ) from exc
            raise

    def get(self, path: str, url: str) -> Any:
        return self.call("GET", path, url)

    def post(self, path: str, body: dict[str, Any] | None, url: str) -> Any:
        return self.call("POST", path, url, body)

    def on_all(self, path: str, body: dict[str, Any] | None, urls: list[str]) -> None:
        fan_out(partial(self.post, path, body), urls)

    def _tidy(self, calls: list[tuple[str, dict[str, Any] | None]], url: str) -> None:
        """Best-effort clean-up calls, in order, each given as long as a push (closing a session can
        finalize a partial reload); an error (nothing to close) is expected and ignored, and a server
        that does not answer one is not asked the rest."""
        for path, body in calls:
            try:
                call_json(self.http, "POST", url, path, body, timeout_s=self.push_timeout_s)
            except HttpCallError as exc:
                if exc.status is None:  # gone or stuck
                    return

    def release(self, urls: list[str]) -> None:
        """Shut every server's transfer engine down, so a new group can form. vLLM refuses that
        during an update session, which a learner that died mid-push leaves open: that server is
        abandoned first (its weights may be half-updated). One that does not answer is left as it
        is (joining the new group will fail for it, by name)."""

        def one(url: str) -> None:
            try:
                call_json(
                    self.http, "POST", url, "/shutdown_weight_transfer_engine", timeout_s=self.push_timeout_s
                )
            except HttpCallError as exc:
                if exc.status is not None:  # refused: a session is open
                    self._tidy(ABANDON_CALLS, url)

        fan_out(one, urls)

    def abandon(self, urls: list[str]) -> None:
        """After a failed update: close the session (if the failure left one open), label the weights
        as no version and release the transfer engine. The servers stay paused until a push
        succeeds."""
        fan_out(partial(self._tidy, ABANDON_CALLS), urls)

    def label_incomplete(self, urls: list[str]) -> None:
        fan_out(partial(self._tidy, [("/update_weight_version", {"new_version": INCOMPLETE_WEIGHTS})]), urls)


class BroadcastSender:
    """Rank 0 of a gloo or nccl group with the servers; the group is rebuilt when the servers change."""

    def __init__(
        self,
        backend: Literal["nccl", "gloo"],
        http: httpx.Client,
        host: str,
        port: int,
        timeout_s: float,
        push_timeout_s: float,
    ) -> None:
        self.backend = backend
        self.control = _Control(http, push_timeout_s)
        self.host = host
        self.port = port
        self.timeout = timedelta(seconds=timeout_s)
        self.members: list[str] | None = None
        self.groups_built = 0
        self.groups_tried = 0
        self._group: dist.ProcessGroup | None = None
        self._store: dist.TCPStore | None = None
        self._device = torch.device("cpu")

    def push(self, urls: list[str], tensors: list[tuple[str, torch.Tensor]], version: int) -> None:
        control = self.control
        regroup = self.members != urls
        try:
            if regroup:  # released before the push's deadline starts: each release call has its own
                self._drop_group()
                control.release(urls)
            with control.push_deadline():
                if regroup:
                    self._connect(urls)
                control.on_all(PAUSE, None, urls)
                control.on_all("/start_weight_update", None, urls)
                update = {"update_info": broadcast_update_info(tensors)}
                run_together(
                    partial(self._broadcast, tensors),
                    [partial(control.post, "/update_weights", update, url) for url in urls],
                )
                control.on_all("/finish_weight_update", {"weight_version": str(version)}, urls)
                control.on_all("/resume", None, urls)
        except BaseException:
            # A failed collective leaves the group in an unknown state: abort it (so a broadcast
            # stuck on a peer that stopped answering returns), then clean every server up for the
            # next push.
            self._drop_group(abort=True)
            control.abandon(urls)
            raise

    def close(self) -> None:
        if self.members is not None:
            self.control.release(self.members)
        self._drop_group()

    def _drop_group(self, abort: bool = False) -> None:
        if abort and self._group is not None:
            with contextlib.suppress(RuntimeError):
                self._group.abort()
        self._group, self._store, self.members = None, None, None

    def _connect(self, urls: list[str]) -> None:
        sizes = fan_out(lambda url: int(self.control.get("/get_world_size", url)["world_size"]), urls)
        offsets = [1 + sum(sizes[:i]) for i in range(len(urls))]
        world_size = 1 + sum(sizes)
        if self.backend == "gloo":
            self._connect_gloo(urls, offsets, world_size)
        else:
            # Read here, on the caller's thread: the current CUDA device is per thread.
            self._device = torch.device("cuda", torch.cuda.current_device())
            self._connect_nccl(urls, offsets, world_size)
        self.members = list(urls)
        self.groups_built += 1

    def _init_calls(self, urls: list[str], infos: list[dict[str, Any]]) -> list[Callable[[], Any]]:
        return [
            partial(self.control.post, "/init_weight_transfer_engine", {"init_info": info}, url)
            for url, info in zip(urls, infos, strict=True)
        ]

    def _connect_gloo(self, urls: list[str], offsets: list[int], world_size: int) -> None:
        # A fresh port per try: a server still holding an old group can never join the new one, and
        # a try that failed (a server gone between two calls) may still hold its port, its group's
        # constructor waiting out the timeout for the servers that never came.
        port = 0 if self.port == 0 else self.port + self.groups_tried
        self.groups_tried += 1
        store = dist.TCPStore(self.host, port, None, True, self.timeout, wait_for_workers=False)
        infos = [
            {
                "master_address": self.host,
                "master_port": store.port,
                "rank_offset": o,
                "world_size": world_size,
            }
            for o in offsets
        ]
        self._group = run_together(
            lambda: dist.ProcessGroupGloo(store, 0, world_size, self.timeout), self._init_calls(urls, infos)
        )
        self._store = store

    def _connect_nccl(self, urls: list[str], offsets: list[int], world_size: int) -> None:
        device = self._device
        store = dist.TCPStore("127.0.0.1", 0, None, True, self.timeout, wait_for_workers=False)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = self.timeout
        group = dist.ProcessGroupNCCL(store, 0, world_size, options)

        def warm_up() -> None:
            # Creates the communicator (rank 0 publishes the unique id under store key "0"), then
            # matches the workers' one-element warm-up all_reduce.
            group.allreduce([torch.zeros(1, device=device)]).wait()
            torch.cuda.synchronize(device)

        def announce() -> None:
            unique_id = store.get("0")
            infos = [nccl_init_info(unique_id, offset, world_size) for offset in offsets]
            fan_out(lambda call: call(), self._init_calls(urls, infos))

        run_together(warm_up, [announce])
        self._group, self._store = group, store

    def _broadcast(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        assert self._group is not None
        try:
            for _, tensor in tensors:
                sent = tensor.detach().to(self._device).contiguous()
                work = self._group.broadcast([sent], root_zero_options())
                # With a timeout, wait blocks this thread until the broadcast is done or raises (for
                # NCCL too, whose plain wait only orders the stream and would hang on a dead peer).
                work.wait(timedelta(seconds=self.control.remaining()))
        except RuntimeError as exc:
            raise TransferError(f"{self.backend} broadcast to {self.members} failed: {exc}") from exc


def write_policy(shared_dir: Path, tensors: list[tuple[str, torch.Tensor]], version: int) -> Path:
    """Write `shared_dir/policy-v<version>/model.safetensors` atomically (temp name, then rename)."""
    final = shared_dir / f"{POLICY_DIR_PREFIX}{version:08d}"
    staging = shared_dir / f".{final.name}.tmp-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors}
    save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    return final.resolve()


class DiskSender:
    """Writes each version under a shared directory and has every server reload it from there (the
    directory must be mounted at the same path everywhere)."""

    def __init__(self, http: httpx.Client, shared_dir: Path, push_timeout_s: float) -> None:
        self.control = _Control(http, push_timeout_s)
        self.shared_dir = shared_dir

    def push(self, urls: list[str], tensors: list[tuple[str, torch.Tensor]], version: int) -> None:
        path = write_policy(self.shared_dir, tensors, version)
        control = self.control
        try:
            with control.push_deadline():
                control.on_all(PAUSE, None, urls)
                control.on_all("/collective_rpc", reload_request(path), urls)
                control.on_all("/update_weight_version", {"new_version": str(version)}, urls)
                control.on_all("/resume", None, urls)
        except BaseException:
            control.label_incomplete(urls)
            raise
        # Every live server now holds `version`; older directories (and dead writers' temp ones) go.
        for old in self.shared_dir.glob(f"*{POLICY_DIR_PREFIX}*"):
            if old.resolve() != path:
                shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        """Nothing is held between pushes."""


def make_sender(
    kind: TransferKind,
    http: httpx.Client,
    host: str,
    port: int,
    shared_dir: Path | None,
    timeout_s: float,
    push_timeout_s: float,
) -> WeightSender:
    """`timeout_s` bounds joining a transfer group; `push_timeout_s` each push, from its first call
    to its last."""
    if kind == "filesystem":
        if shared_dir is None:
            raise ValueError(
                "weight transfer 'filesystem' needs shared_dir (a directory every server can read)"
            )
        return DiskSender(http, shared_dir, push_timeout_s)
    return BroadcastSender(kind, http, host, port, timeout_s, push_timeout_s)


# --------------------------------------------------------------------------------------------------
# Server side (our CPU servers)
# --------------------------------------------------------------------------------------------------

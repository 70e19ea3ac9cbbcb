"""New policy weights from the learner to rollout/teacher servers, over vLLM's RL routes.

The routes are vLLM 0.33.0's (vllm/entrypoints/rl/online/api_router.py and the dev `/collective_rpc`,
served with `VLLM_SERVER_DEV_MODE=1`); our CPU servers answer the same ones. Every push is

    POST /pause?mode=wait         in-flight requests finish on the old weights, new ones wait; the
                                  KV and prefix caches are cleared (clear_cache defaults to true), so
                                  no request after the update reuses KV computed by the old weights
    ... the backend's transfer, which labels the weights with `str(version)` ...
    POST /resume

and `GET /weight_info` answers the label, `"default"` before any update (v1/engine/core.py).

Backends:
- `nccl`, vLLM's GPU backend (`--weight-transfer-config '{"backend": "nccl"}'`), joined the way vLLM's
  no-vLLM trainer example does: a plain `ProcessGroupNCCL` over a private TCPStore only the learner
  joins; its ncclUniqueId (store key "0", a torch implementation detail) goes to the servers
  base64-encoded as `init_info.nccl_unique_id_b64` with `rank_offset` and `world_size`
  (NCCLWeightTransferInitInfo; `packed` stays false). There is no store barrier, so every rank must
  be entering NCCL init at once, and the workers' one-element warm-up all_reduce must be matched
  before any broadcast.
- `gloo`, our CPU servers' own backend (vLLM has none): the TCP-rendezvous fields of the same init
  info (`master_address`, `master_port`, `rank_offset`, `world_size`), a TCPStore hosted by the
  learner and `ProcessGroupGloo` on every side.
  For both: `POST /init_weight_transfer_engine {"init_info"}` once per group, then per update
  `POST /start_weight_update`, `POST /update_weights {"update_info": {names, dtype_names, shapes}}`
  while rank 0 broadcasts the tensors one by one in that order (vLLM's unpacked mode), and
  `POST /finish_weight_update {"weight_version"}`. The learner is rank 0 and server i's workers
  follow at `rank_offset_i` (`GET /get_world_size` says how many a server brings). Groups are built
  directly on their own TCPStore, never through `init_process_group`, so the learner's default group
  is left alone; a new group (on a new port) is built whenever the set of live servers changes, after
  `POST /shutdown_weight_transfer_engine` released every server's old one.
- `filesystem`: safetensors written to a directory every server mounts at the same path, then
  `POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": dir}}` (vLLM's
  in-place reload, GPUModelRunner.reload_weights; no weight-transfer engine involved) and
  `POST /update_weight_version {"new_version"}`. For clusters where NCCL cannot cross pods.

An update that fails half-way leaves a server with a session open (vLLM refuses the next
`/start_weight_update` until one is finished) and weights that are no version: the sender closes
the session (`/finish_weight_update` without a version), labels the weights `"incomplete"` (so no
client takes them for a version), releases the transfer engine and leaves the server paused; the
next push starts from a clean server.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import uuid
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, field_validator, model_validator
from safetensors.torch import load_file, save_file

from rlsd_trainer.httpjson import HttpCallError, call_json, fan_out, run_together

TransferKind = Literal["nccl", "gloo", "filesystem"]
POLICY_DIR_PREFIX = "policy-v"
# The label of weights a server started with (vLLM's EngineCore: `_weight_version = "default"`).
STARTING_WEIGHTS = "default"
# The label a sender gives a server whose update failed part-way: its weights are no version.
INCOMPLETE_WEIGHTS = "incomplete"
# In-flight requests finish on the old weights (each completion has one version); new ones wait.
PAUSE = "/pause?mode=wait"
# Seconds a best-effort clean-up call may take (closing a session can finalize a partial reload).
CLEANUP_TIMEOUT_S = 60.0
# Leaving a server whose update failed: close its session, label its weights, release its engine.
ABANDON_CALLS: list[tuple[str, dict[str, Any] | None]] = [
    ("/finish_weight_update", None),
    ("/update_weight_version", {"new_version": INCOMPLETE_WEIGHTS}),
    ("/shutdown_weight_transfer_engine", None),
]


class TransferError(RuntimeError):
    """Joining a transfer group or moving tensors through it failed."""


class UpdateOrderError(RuntimeError):
    """A weight-transfer route was called out of order (vLLM's worker raises RuntimeError too)."""


def dtype_name(dtype: torch.dtype) -> str:
    """vLLM's spelling: the torch attribute name (`bfloat16`), which it resolves with getattr."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _root_zero() -> dist.BroadcastOptions:
    options = dist.BroadcastOptions()
    options.rootRank = 0
    return options


# --------------------------------------------------------------------------------------------------
# Wire formats (validated by the receiving server; a violation is answered 400 naming the field)
# --------------------------------------------------------------------------------------------------


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GlooInitInfo(_Wire):
    """The TCP-rendezvous fields of vLLM's NCCLWeightTransferInitInfo, which gloo uses as they are."""

    master_address: str = Field(min_length=1)
    master_port: int = Field(ge=1, le=65535)
    rank_offset: int = Field(ge=1)
    world_size: int = Field(ge=2)

    @model_validator(mode="after")
    def _rank_inside_world(self) -> GlooInitInfo:
        if self.rank_offset >= self.world_size:
            raise ValueError(f"rank_offset {self.rank_offset} must be below world_size {self.world_size}")
        return self


class BroadcastUpdateInfo(_Wire):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[NonNegativeInt]]

    @field_validator("dtype_names")
    @classmethod
    def _known_dtypes(cls, names: list[str]) -> list[str]:
        for name in names:
            parse_dtype(name)
        return names

    @model_validator(mode="after")
    def _same_lengths(self) -> BroadcastUpdateInfo:
        for field in ("dtype_names", "shapes"):
            if len(getattr(self, field)) != len(self.names):
                raise ValueError(
                    f"`{field}` should be of the same size as `names`: "
                    f"got {len(getattr(self, field))} and {len(self.names)}"
                )
        return self


class ReloadKwargs(_Wire):
    """`/collective_rpc` kwargs of `reload_weights` (vLLM passes only strings)."""

    weights_path: str

    @field_validator("weights_path")
    @classmethod
    def _safetensors_directory(cls, path: str) -> str:
        if not os.path.isabs(path):
            raise ValueError("must be an absolute local directory")
        if not os.path.isdir(path):
            raise ValueError(f"must be a local directory: {path}")
        if not any(name.endswith(".safetensors") for name in os.listdir(path)):
            raise ValueError(f"directory contains no safetensors files: {path}")
        return path


def broadcast_update_info(tensors: list[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    return {
        "names": [name for name, _ in tensors],
        "dtype_names": [dtype_name(tensor.dtype) for _, tensor in tensors],
        "shapes": [list(tensor.shape) for _, tensor in tensors],
    }


def nccl_init_info(unique_id: bytes, rank_offset: int, world_size: int) -> dict[str, Any]:
    """vLLM's NCCLWeightTransferInitInfo in its unique-id mode, unpacked (vLLM's default)."""
    return {
        "nccl_unique_id_b64": base64.b64encode(unique_id).decode("ascii"),
        "rank_offset": rank_offset,
        "world_size": world_size,
    }


def reload_request(path: Path) -> dict[str, Any]:
    return {"method": "reload_weights", "kwargs": {"weights_path": str(path)}}


# --------------------------------------------------------------------------------------------------
# Learner side
# --------------------------------------------------------------------------------------------------


class WeightSender(Protocol):
    def push(self, urls: list[str], tensors: list[tuple[str, torch.Tensor]], version: int) -> None:
        """Make every server in `urls` serve `tensors` labelled `str(version)`, or raise."""
        ...

    def close(self) -> None: ...


class _Control:
    """The HTTP calls every sender makes to a set of servers."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def post(self, path: str, body: dict[str, Any] | None, url: str) -> Any:
        return call_json(self.http, "POST", url, path, body)

    def on_all(self, path: str, body: dict[str, Any] | None, urls: list[str]) -> None:
        fan_out(partial(self.post, path, body), urls)

    def _tidy(self, calls: list[tuple[str, dict[str, Any] | None]], url: str) -> None:
        """Best-effort clean-up calls, in order; an error (nothing to close, or the server is gone)
        is expected and ignored."""
        for path, body in calls:
            with contextlib.suppress(HttpCallError):
                call_json(self.http, "POST", url, path, body, timeout_s=CLEANUP_TIMEOUT_S)

    def release(self, urls: list[str]) -> None:
        """Shut every server's transfer engine down, so a new group can form. vLLM refuses that
        during an update session, which a learner that died mid-push leaves open: that server is
        abandoned first (its weights may be half-updated)."""

        def one(url: str) -> None:
            try:
                call_json(
                    self.http, "POST", url, "/shutdown_weight_transfer_engine", timeout_s=CLEANUP_TIMEOUT_S
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
        self, backend: Literal["nccl", "gloo"], http: httpx.Client, host: str, port: int, timeout_s: float
    ) -> None:
        self.backend = backend
        self.control = _Control(http)
        self.host = host
        self.port = port
        self.timeout = timedelta(seconds=timeout_s)
        self.members: list[str] | None = None
        self.groups_built = 0
        self._group: dist.ProcessGroup | None = None
        self._store: dist.TCPStore | None = None
        self._device = torch.device("cpu")

    def push(self, urls: list[str], tensors: list[tuple[str, torch.Tensor]], version: int) -> None:
        control = self.control
        try:
            if self.members != urls:
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
            # A failed collective leaves the group in an unknown state: drop it (which also fails any
            # receive still waiting on it), then clean every server up for the next push.
            self._drop_group()
            control.abandon(urls)
            raise

    def close(self) -> None:
        if self.members is not None:
            self.control.release(self.members)
        self._drop_group()

    def _drop_group(self) -> None:
        self._group, self._store, self.members = None, None, None

    def _connect(self, urls: list[str]) -> None:
        self._drop_group()
        self.control.release(urls)
        sizes = fan_out(
            lambda url: int(call_json(self.control.http, "GET", url, "/get_world_size")["world_size"]), urls
        )
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
        # A fresh port per group, so a server still holding an old group can never join the new one.
        port = 0 if self.port == 0 else self.port + self.groups_built
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
                self._group.broadcast([tensor.detach().to(self._device).contiguous()], _root_zero()).wait()
            if self.backend == "nccl":
                torch.cuda.synchronize(self._device)
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

    def __init__(self, http: httpx.Client, shared_dir: Path) -> None:
        self.control = _Control(http)
        self.shared_dir = shared_dir

    def push(self, urls: list[str], tensors: list[tuple[str, torch.Tensor]], version: int) -> None:
        path = write_policy(self.shared_dir, tensors, version)
        control = self.control
        try:
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
    kind: TransferKind, http: httpx.Client, host: str, port: int, shared_dir: Path | None, timeout_s: float
) -> WeightSender:
    if kind == "filesystem":
        if shared_dir is None:
            raise ValueError(
                "weight transfer 'filesystem' needs shared_dir (a directory every server can read)"
            )
        return DiskSender(http, shared_dir)
    return BroadcastSender(kind, http, host, port, timeout_s)


# --------------------------------------------------------------------------------------------------
# Server side (our CPU servers)
# --------------------------------------------------------------------------------------------------


class WeightReceiver:
    """A CPU server's end of the gloo backend, with vLLM's session rules (v1/worker/gpu_worker.py):
    one update session at a time, opened by start and closed by finish or by a failed update. Each
    update is staged until finish, so the served model switches from one complete version to the
    next, never mid-way."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout = timedelta(seconds=timeout_s)
        self._group: dist.ProcessGroupGloo | None = None
        self._staged: dict[str, torch.Tensor] | None = None  # None: no session open

    def init(self, init_info: dict[str, Any]) -> None:
        info = GlooInitInfo.model_validate(init_info)
        self._group = None
        try:
            store = dist.TCPStore(info.master_address, info.master_port, None, False, self.timeout)
            self._group = dist.ProcessGroupGloo(store, info.rank_offset, info.world_size, self.timeout)
        except RuntimeError as exc:
            raise TransferError(
                f"could not join the learner's gloo group at {info.master_address}:{info.master_port}: {exc}"
            ) from exc

    def shutdown(self) -> None:
        if self._staged is not None:
            raise UpdateOrderError("Cannot release a trainer connection during a weight update")
        self._group = None

    def start(self) -> None:
        if self._staged is not None:
            raise UpdateOrderError(
                "start_weight_update called while a weight update is already active. "
                "Call finish_weight_update first."
            )
        self._staged = {}

    def receive(self, update_info: dict[str, Any]) -> None:
        if self._staged is None:
            raise UpdateOrderError("start_weight_update must be called before update_weights.")
        try:
            info = BroadcastUpdateInfo.model_validate(update_info)
            if self._group is None:
                raise UpdateOrderError("call /init_weight_transfer_engine before /update_weights")
            for name, dtype, shape in zip(info.names, info.dtype_names, info.shapes, strict=True):
                tensor = torch.empty(shape, dtype=parse_dtype(dtype))
                self._group.broadcast([tensor], _root_zero()).wait()
                self._staged[name] = tensor
        except RuntimeError as exc:
            self._staged, self._group = None, None
            raise TransferError(f"gloo broadcast from the learner failed: {exc}") from exc
        except BaseException:
            self._staged = None  # as vLLM: a failed update closes the session
            raise

    def finish(self) -> dict[str, torch.Tensor]:
        """The complete update received since `start`, to be applied at once."""
        if self._staged is None:
            raise UpdateOrderError("finish_weight_update called without a matching start_weight_update.")
        staged, self._staged = self._staged, None
        return staged


def read_policy(weights_path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in `weights_path` (validated by `ReloadKwargs`)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(ReloadKwargs(weights_path=weights_path).weights_path).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors

"""New policy weights from the learner to rollout/teacher servers, over vLLM's weight-transfer protocol.

Control plane (HTTP; vLLM serves these with `VLLM_SERVER_DEV_MODE=1`): `POST /init_weight_transfer_engine
{"init_info": {...}}` once per group, then per update `POST /start_weight_update`, `POST /update_weights
{"update_info": {...}}` and `POST /finish_weight_update {"weight_version": "<v>"}`; `GET
/get_world_size` says how many workers (ranks) a server brings to the group. Data plane, by backend:

- `nccl`, vLLM's GPU backend, joined the way vLLM's no-vLLM trainer example does: a plain
  `ProcessGroupNCCL` over a private TCPStore only the learner joins; its ncclUniqueId (store key "0", a
  torch implementation detail) goes to the servers base64-encoded as `init_info.nccl_unique_id_b64`
  with `rank_offset` and `world_size`. There is no store barrier, so every rank must be entering NCCL
  init at once, and the workers' one-element warm-up all_reduce must be matched before any broadcast.
- `gloo`, our CPU servers: the init_info fields of vLLM's TCP rendezvous (`master_address`,
  `master_port`, `rank_offset`, `world_size`), a TCPStore hosted by the learner and
  `ProcessGroupGloo` on every side.
- `filesystem`, vLLM's `disk` backend: safetensors written to a shared directory, `init_info` {} and
  `update_info` {"path": "<absolute dir>"}.

Broadcast `update_info` is {names, dtype_names, shapes}; rank 0 then broadcasts the tensors one by one
in that order (vLLM's unpacked mode), while the `/update_weights` calls are in flight. The learner is
rank 0 and server i's workers follow at `rank_offset_i`. Groups are built directly on their own
TCPStore, never through `init_process_group`, so the learner's default group is left alone; a new
group (on a new port) is built whenever the set of live servers changes.
"""

from __future__ import annotations

import base64
import os
import shutil
import uuid
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, field_validator, model_validator
from safetensors.torch import load_file, save_file

from rlsd_trainer.httpjson import call_json, fan_out, run_together

TransferKind = Literal["nccl", "gloo", "filesystem"]
ReceiverBackend = Literal["gloo", "disk"]
POLICY_DIR_PREFIX = "policy-v"


class TransferError(RuntimeError):
    """Joining a transfer group or moving tensors through it failed."""


class UpdateOrderError(RuntimeError):
    """A weight-transfer route was called out of order (e.g. an update before any init)."""


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
    master_address: str = Field(min_length=1)
    master_port: int = Field(ge=1, le=65535)
    rank_offset: int = Field(ge=1)
    world_size: int = Field(ge=2)

    @model_validator(mode="after")
    def _rank_inside_world(self) -> GlooInitInfo:
        if self.rank_offset >= self.world_size:
            raise ValueError(f"rank_offset {self.rank_offset} must be below world_size {self.world_size}")
        return self


class DiskInitInfo(_Wire):
    """The disk backend needs no rendezvous: its init_info is empty."""


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


class DiskUpdateInfo(_Wire):
    path: str

    @field_validator("path")
    @classmethod
    def _safetensors_directory(cls, path: str) -> str:
        if not os.path.isabs(path):
            raise ValueError("`path` must be an absolute local directory")
        if not os.path.isdir(path):
            raise ValueError(f"shared-disk checkpoint path must be a local directory: {path}")
        if not any(name.endswith(".safetensors") for name in os.listdir(path)):
            raise ValueError(f"shared-disk checkpoint directory contains no safetensors files: {path}")
        return path


def broadcast_update_info(tensors: list[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    return {
        "names": [name for name, _ in tensors],
        "dtype_names": [dtype_name(tensor.dtype) for _, tensor in tensors],
        "shapes": [list(tensor.shape) for _, tensor in tensors],
    }


# --------------------------------------------------------------------------------------------------
# Learner side
# --------------------------------------------------------------------------------------------------


class WeightSender(Protocol):
    def push(self, urls: list[str], tensors: list[tuple[str, torch.Tensor]], version: int) -> None:
        """Make every server in `urls` serve `tensors` as policy `version`, or raise."""
        ...

    def close(self) -> None: ...


class BroadcastSender:
    """Rank 0 of a gloo or nccl group with the servers; the group is rebuilt when the servers change."""

    def __init__(
        self, backend: Literal["nccl", "gloo"], http: httpx.Client, host: str, port: int, timeout_s: float
    ) -> None:
        self.backend = backend
        self.http = http
        self.host = host
        self.port = port
        self.timeout = timedelta(seconds=timeout_s)
        self.members: list[str] | None = None
        self.groups_built = 0
        self._group: dist.ProcessGroup | None = None
        self._store: dist.TCPStore | None = None
        self._device = torch.device("cpu")

    def push(self, urls: list[str], tensors: list[tuple[str, torch.Tensor]], version: int) -> None:
        try:
            if self.members != urls:
                self._connect(urls)
            fan_out(partial(self._post, "/start_weight_update", None), urls)
            update = {"update_info": broadcast_update_info(tensors)}
            run_together(
                partial(self._broadcast, tensors),
                [partial(self._post, "/update_weights", update, url) for url in urls],
            )
            fan_out(partial(self._post, "/finish_weight_update", {"weight_version": str(version)}), urls)
        except BaseException:
            # A failed collective leaves the group in an unknown state: the next push builds a new one.
            self.close()
            raise

    def close(self) -> None:
        self._group, self._store, self.members = None, None, None

    def _post(self, path: str, body: dict[str, Any] | None, url: str) -> Any:
        return call_json(self.http, "POST", url, path, body)

    def _connect(self, urls: list[str]) -> None:
        self.close()
        sizes = fan_out(
            lambda url: int(call_json(self.http, "GET", url, "/get_world_size")["world_size"]), urls
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

    def _init_calls(self, urls: list[str], offsets: list[int], world_size: int, **fields: Any) -> list[Any]:
        return [
            partial(
                self._post,
                "/init_weight_transfer_engine",
                {"init_info": {**fields, "rank_offset": offset, "world_size": world_size}},
                url,
            )
            for url, offset in zip(urls, offsets, strict=True)
        ]

    def _connect_gloo(self, urls: list[str], offsets: list[int], world_size: int) -> None:
        # A fresh port per group, so a server still holding an old group can never join the new one.
        port = 0 if self.port == 0 else self.port + self.groups_built
        store = dist.TCPStore(self.host, port, None, True, self.timeout, wait_for_workers=False)
        calls = self._init_calls(urls, offsets, world_size, master_address=self.host, master_port=store.port)
        self._group = run_together(lambda: dist.ProcessGroupGloo(store, 0, world_size, self.timeout), calls)
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
            unique_id = base64.b64encode(store.get("0")).decode("ascii")
            fan_out(
                lambda call: call(), self._init_calls(urls, offsets, world_size, nccl_unique_id_b64=unique_id)
            )

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
    directory must be mounted at the same path everywhere, as vLLM's disk backend requires)."""

    def __init__(self, http: httpx.Client, shared_dir: Path) -> None:
        self.http = http
        self.shared_dir = shared_dir

    def push(self, urls: list[str], tensors: list[tuple[str, torch.Tensor]], version: int) -> None:
        path = write_policy(self.shared_dir, tensors, version)
        fan_out(partial(self._reload, str(path), version), urls)
        # Every live server now holds `version`; older directories (and dead writers' temp ones) go.
        for old in self.shared_dir.glob(f"*{POLICY_DIR_PREFIX}*"):
            if old.resolve() != path:
                shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        """Nothing is held between pushes."""

    def _reload(self, path: str, version: int, url: str) -> None:
        for route, body in (
            ("/init_weight_transfer_engine", {"init_info": {}}),
            ("/start_weight_update", None),
            ("/update_weights", {"update_info": {"path": path}}),
            ("/finish_weight_update", {"weight_version": str(version)}),
        ):
            call_json(self.http, "POST", url, route, body)


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
# Server side
# --------------------------------------------------------------------------------------------------


class WeightReceiver:
    """A server's end of one backend: joins the learner's group and stages each update until finish,
    so the served model switches from one complete version to the next, never mid-way."""

    def __init__(self, backend: ReceiverBackend, timeout_s: float) -> None:
        self.backend = backend
        self.timeout = timedelta(seconds=timeout_s)
        self._group: dist.ProcessGroupGloo | None = None
        self._staged: dict[str, torch.Tensor] | None = None

    def init(self, init_info: dict[str, Any]) -> None:
        if self.backend == "disk":
            DiskInitInfo.model_validate(init_info)
            return
        info = GlooInitInfo.model_validate(init_info)
        self._group = None
        try:
            store = dist.TCPStore(info.master_address, info.master_port, None, False, self.timeout)
            self._group = dist.ProcessGroupGloo(store, info.rank_offset, info.world_size, self.timeout)
        except RuntimeError as exc:
            raise TransferError(
                f"could not join the learner's gloo group at {info.master_address}:{info.master_port}: {exc}"
            ) from exc

    def start(self) -> None:
        self._staged = {}

    def receive(self, update_info: dict[str, Any]) -> None:
        if self._staged is None:
            raise UpdateOrderError("call /start_weight_update before /update_weights")
        if self.backend == "disk":
            directory = Path(DiskUpdateInfo.model_validate(update_info).path)
            for file in sorted(directory.glob("*.safetensors")):
                self._staged.update(load_file(file))
            return
        info = BroadcastUpdateInfo.model_validate(update_info)
        if self._group is None:
            raise UpdateOrderError("call /init_weight_transfer_engine before /update_weights")
        try:
            for name, dtype, shape in zip(info.names, info.dtype_names, info.shapes, strict=True):
                tensor = torch.empty(shape, dtype=parse_dtype(dtype))
                self._group.broadcast([tensor], _root_zero()).wait()
                self._staged[name] = tensor
        except RuntimeError as exc:
            self._group = None
            raise TransferError(f"gloo broadcast from the learner failed: {exc}") from exc

    def finish(self) -> dict[str, torch.Tensor]:
        """The complete update received since `start`, to be applied at once."""
        if not self._staged:
            raise UpdateOrderError("no weights arrived since /start_weight_update")
        staged, self._staged = self._staged, None
        return staged

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
import os
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, field_validator, model_validator

TransferKind = Literal["nccl", "gloo", "filesystem"]
POLICY_DIR_PREFIX = "policy-v"
# The label of weights a server started with (vLLM's EngineCore: `_weight_version = "default"`).
STARTING_WEIGHTS = "default"
# The label a sender gives a server whose update failed part-way: its weights are no version.
INCOMPLETE_WEIGHTS = "incomplete"
# In-flight requests finish on the old weights (each completion has one version); new ones wait.
PAUSE = "/pause?mode=wait"
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


def root_zero_options() -> dist.BroadcastOptions:
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

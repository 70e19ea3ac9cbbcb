"""The server side of a weight push (our CPU servers): join the group, receive, load (see wire.py)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from rlsd_trainer.weights.wire import (
    BroadcastUpdateInfo,
    GlooInitInfo,
    ReloadKwargs,
    TransferError,
    UpdateOrderError,
    parse_dtype,
    root_zero_options,
)


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
                self._group.broadcast([tensor], root_zero_options()).wait()
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

"""Where rollouts and teacher scores come from: the in-process engine or remote servers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlsd_contracts.config import RunConfig, ServersSection
from rlsd_trainer.model.loading import load_model
from rlsd_trainer.rollout.engine import LocalEngine, RolloutEngine

if TYPE_CHECKING:
    from rlsd_trainer.remote.teacher_client import RemoteTeacherClient


def _client_args(servers: ServersSection) -> dict[str, Any]:
    transfer = servers.weight_transfer
    return {
        "urls": servers.urls,
        "model_name": servers.model_name,
        "weight_transfer": transfer.backend,
        "transfer_host": transfer.host,
        "transfer_port": transfer.port,
        "shared_dir": Path(transfer.shared_dir) if transfer.shared_dir else None,
        "request_timeout_s": servers.request_timeout_s,
        "weight_push_timeout_s": servers.weight_push_timeout_s,
        "max_retries": servers.max_retries,
    }


def build_rollout_engine(
    config: RunConfig,
    initial_policy: Path | str,
    stop_token_ids: Sequence[int],
    device: torch.device,
) -> RolloutEngine:
    """The in-process engine (its own copy of the policy, on the learner's device) or a client of the
    rollout servers."""
    if config.rollout.backend == "local":
        model = load_model(initial_policy, config.model).model.to(device)
        return LocalEngine(model, stop_token_ids, config.rollout.max_batch_size)
    from rlsd_trainer.remote.rollout_client import RemoteRolloutEngine

    return RemoteRolloutEngine(**_client_args(config.rollout.servers))


def build_teacher_client(config: RunConfig) -> RemoteTeacherClient:
    """A client of the teacher scoring servers (`teacher.placement: remote`)."""
    from rlsd_trainer.remote.teacher_client import RemoteTeacherClient

    return RemoteTeacherClient(
        **_client_args(config.teacher.servers), chunk_tokens=config.learner.logprob_chunk_tokens
    )

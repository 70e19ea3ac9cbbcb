"""The learners' process topology: one process alone, or one rank of a torchrun job.

On GPU every rank holds an FSDP2 shard of the policy (`fully_shard` per decoder layer, bf16
parameters, float32 gradient reduction); on CPU the same code runs over gloo. Rank 0 drives the
step (rollout, rewards, advantages) and hands every rank its share of the groups.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from rlsd_contracts.config import LearnerSection
from rlsd_trainer.model.logprobs import PolicyScorer

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(timeout_s: float) -> DistContext:
    """Join the torchrun job described by the environment, or run alone when there is none."""
    if "RANK" not in os.environ or dist.is_initialized():
        return DistContext()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timedelta(seconds=timeout_s), device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    return DistContext(rank, world_size, local_rank, device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_from_main(value: T | None, ctx: DistContext) -> T:
    """Rank 0's `value` on every rank (pickled; meant for step plans, not tensors of weights)."""
    if not ctx.distributed:
        assert value is not None
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def all_reduce(values: Sequence[float], ctx: DistContext, op: str = "sum") -> list[float]:
    """Element-wise sum or max of `values` over the ranks (float64, so counts stay exact)."""
    if not ctx.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.tolist()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def share_of(count: int, ctx: DistContext) -> range:
    """This rank's contiguous share of `count` items (the first ranks take one more when uneven)."""
    base, extra = divmod(count, ctx.world_size)
    start = ctx.rank * base + min(ctx.rank, extra)
    return range(start, start + base + (ctx.rank < extra))


def prepare_policy(
    model: nn.Module, ctx: DistContext, config: LearnerSection, trainable: bool = True
) -> PolicyScorer:
    """Wrap the policy for scoring and, across ranks, shard it with FSDP2.

    The log-prob methods of `PolicyScorer` are registered as FSDP forward methods, so the root
    parameters (embeddings, final norm, output projection) are gathered while they run and their
    gradients are reduce-scattered after backward, exactly as for `forward`. A frozen copy
    (`trainable=False`: teacher snapshot, KL reference) reshards its root after every forward too,
    since no backward will.
    """
    if trainable and config.activation_checkpointing:
        # Non-reentrant checkpointing composes with FSDP2; transformers >= 5.2x renamed the method.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    scorer = PolicyScorer(model).to(ctx.device)
    # Alone on CPU there is nothing to shard; on one GPU FSDP2 still applies the bf16 policy.
    if not dist.is_initialized() or (not ctx.distributed and ctx.device.type != "cuda"):
        return scorer
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    mixed = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if ctx.device.type == "cuda" and config.mixed_precision == "bfloat16"
        else MixedPrecisionPolicy()
    )
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mixed)
    fully_shard(scorer, mesh=mesh, mp_policy=mixed, reshard_after_forward=True if not trainable else None)
    for unit in [*decoder_layers(model), scorer]:
        # Each rank's loss is already divided by the global token count, so gradients are summed
        # over the ranks, not averaged.
        unit.set_gradient_divide_factor(1.0)  # type: ignore[operator]
        # A plain SUM collective (gloo has no pre-multiplied sum).
        unit.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]
    for method in ("response_logprobs", "shared_prompt_logprobs"):
        register_fsdp_forward_method(scorer, method)
    return scorer


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a Hugging Face causal LM (`model.model.layers` and kin)."""
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no `layers` list to shard; FSDP needs its blocks")
    return list(layers)


def full_parameters(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter as a full tensor, in `named_parameters` order.

    Sharded parameters are all-gathered, so every rank must run through the whole iterator.
    """
    for name, param in module.named_parameters():
        tensor = param.full_tensor() if isinstance(param, DTensor) else param
        yield name, tensor.detach()


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's full state dict on CPU (gathered from the shards; the same on every rank)."""
    return {name: tensor.cpu() for name, tensor in full_parameters(module)}


def drain(items: Iterator[Any]) -> None:
    """Consume an iterator of collectives on ranks that do not use the results."""
    for _ in items:
        pass

"""The learner, on every rank: the policy being trained, its optimizer and learning-rate schedule,
the frozen KL reference and the colocated teacher. It learns one step from a `StepPlan` (its
contiguous share of the groups) and owns the checkpoint state of all of them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor
from transformers import PreTrainedTokenizerBase

from rlsd_contracts.config import RunConfig
from rlsd_trainer import algorithms
from rlsd_trainer.model.loading import LoadedModel
from rlsd_trainer.model.logprobs import PackedBatch, pack
from rlsd_trainer.training.distributed import (
    DistContext,
    all_reduce,
    barrier,
    full_parameters,
    prepare_policy,
    share_of,
)
from rlsd_trainer.training.initial_policy import frozen_copy
from rlsd_trainer.training.loss import LearnBatch, StepMetrics, micro_batch_loss, micro_batches
from rlsd_trainer.training.plan import StepPlan
from rlsd_trainer.training.teacher import Teacher
from rlsd_trainer.training.timing import StepTimer


class Learner:
    def __init__(
        self, config: RunConfig, ctx: DistContext, initial: LoadedModel, initial_path: Path | str
    ) -> None:
        self.config = config
        self.ctx = ctx
        # algorithm.importance_correction: every response gets the truncated importance weight, or
        # only those of an older policy version (auto: all with rollout servers, whose numerics are
        # not the learner's; stale with the learner's own sampler).
        correction = config.algorithm.importance_correction
        if correction == "auto":
            correction = "stale" if config.rollout.backend == "local" else "all"
        self.weigh_every_response = correction == "all"
        self.policy = prepare_policy(initial.model.train(), ctx, config.learner)
        self.teacher: Teacher | None = None
        if algorithms.needs_teacher(config.algorithm):
            snapshot = frozen_copy(initial_path, config, ctx) if config.teacher.mode == "frozen" else None
            self.teacher = Teacher(config.teacher, self.policy, snapshot)
        self.reference = frozen_copy(initial_path, config, ctx) if config.algorithm.kl_coef > 0 else None
        self.optimizer = torch.optim.AdamW(
            self.policy.parameters(),
            lr=config.optim.lr,
            betas=config.optim.betas,
            weight_decay=config.optim.weight_decay,
        )
        warmup = config.optim.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )

    @property
    def remote_teacher(self) -> bool:
        return self.teacher is not None and self.config.teacher.placement == "remote"

    # ---- one step -------------------------------------------------------------------------------
    def learn(self, plan: StepPlan, step: int, timer: StepTimer) -> dict[str, float]:
        """Learn from this rank's share of `plan` as optimizer step `step` (0-based)."""
        group = self.config.algorithm.group_size
        groups = share_of(len(plan.prompts), self.ctx)
        rows = range(groups.start * group, groups.stop * group)
        responses = [plan.responses[i] for i in rows]
        device = self.ctx.device
        # Each group's prompt is packed once, for all its responses.
        packed = pack(
            plan.prompts[groups.start : groups.stop], responses, [i // group - groups.start for i in rows]
        ).to(device)
        teacher_lp = paired_lp = None
        teacher_values: dict[str, float] = {}
        if plan.teacher_logprobs is not None:
            teacher_lp = _padded([plan.teacher_logprobs[i] for i in rows], packed.response_mask)
            if plan.paired_student_logprobs is not None:
                paired_lp = _padded([plan.paired_student_logprobs[i] for i in rows], packed.response_mask)
            teacher_values = self._check_teacher_version(plan, step)
        elif self.teacher is not None and plan.teacher_prompts is not None:
            with timer.phase("teacher"):
                teacher_lp = self.teacher.score(
                    [plan.teacher_prompts[g] for g in groups],
                    responses,
                    group,
                    self.config.learner.logprob_chunk_tokens,
                )
        batch = LearnBatch(
            packed=packed,
            advantages=torch.tensor([plan.advantages[i] for i in rows], device=device),
            rollout_logprobs=_padded([plan.rollout_logprobs[i] for i in rows], packed.response_mask),
            teacher_logprobs=teacher_lp,
            weighted=torch.tensor(
                [self.weigh_every_response or plan.policy_versions[i] < step for i in rows], device=device
            ),
            paired_student_logprobs=paired_lp,
            first_error_tokens=(
                torch.tensor([plan.first_error_tokens[i] for i in rows], device=device)
                if plan.first_error_tokens is not None
                else None
            ),
        )
        with timer.phase("learn"):
            return {**self._optimize(batch, step), **teacher_values}

    def _check_teacher_version(self, plan: StepPlan, step: int) -> dict[str, float]:
        """The metrics of a batch a teacher server scored, after checking its Delta can be formed from
        one policy version: either it carries the same weights' student-prompt log-probs, or its
        teacher weights are this learner's teacher at `step` (StepPlan says why)."""
        assert self.teacher is not None
        if plan.teacher_version is None:  # from the checkpoint of a trainer that did not record it
            return {}
        lag = self.teacher.version(step) - plan.teacher_version
        paired = plan.paired_student_logprobs is not None
        if lag and not paired:
            raise RuntimeError(
                f"the batch of step {step} was scored by teacher version {plan.teacher_version}, "
                f"{lag} behind the learner's, without that version's student-prompt log-probs: its "
                "Delta would mix policy versions"
            )
        return {"delta_paired_fraction": float(paired), "teacher_version_lag": float(lag)}

    def _optimize(self, batch: LearnBatch, step: int) -> dict[str, float]:
        cfg = self.config
        algo = cfg.algorithm
        chunk = cfg.learner.logprob_chunk_tokens
        packed = batch.packed
        (global_tokens,) = all_reduce([float(packed.response_mask.sum())], self.ctx)
        global_tokens = max(global_tokens, 1.0)
        micro, real = micro_batches(packed, cfg.learner.micro_batch_tokens, self.ctx)
        proximal = self._proximal_logprobs(packed, micro) if algo.ppo_epochs > 1 else None
        metrics = StepMetrics()
        kl_sum = 0.0
        self.policy.train()
        for epoch in range(algo.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            for index, rows in enumerate(micro):
                counted = index < real  # repeats only keep the ranks' collectives in step
                micro_batch = packed.select(rows)
                width = micro_batch.response_mask.shape[1]
                logprobs, entropy = self.policy.response_logprobs(micro_batch, chunk, with_entropy=True)
                old = proximal[rows, :width] if proximal is not None else logprobs.detach()
                mask = micro_batch.response_mask if counted else torch.zeros_like(micro_batch.response_mask)
                reference_lp = None
                if self.reference is not None:
                    with torch.no_grad():
                        reference_lp, _ = self.reference.response_logprobs(micro_batch, chunk)
                terms = micro_batch_loss(
                    algo,
                    step,
                    logprobs,
                    entropy,
                    old,
                    batch,
                    rows,
                    mask,
                    global_tokens,
                    reference_lp,
                    metrics if epoch == 0 and counted else None,
                )
                terms.loss.backward()
                if epoch == 0 and terms.kl is not None:
                    kl_sum += terms.kl.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.optim.grad_clip)
            self.optimizer.step()
        self.scheduler.step()  # the schedule is one of steps (optim.warmup_steps), whatever the epochs
        if self.reference is not None:
            metrics.sums["kl"] += kl_sum
        totals = metrics.reduce(self.ctx)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        totals["grad_norm"] = float(grad_norm)
        if algo.name == "rlsd":
            totals["lambda"] = algorithms.lambda_at(step, algo.lam)
        return totals

    @torch.no_grad()
    def _proximal_logprobs(self, batch: PackedBatch, micro: list[torch.Tensor]) -> torch.Tensor:
        """Log-probs before any update of this step, for the ratio of epochs after the first."""
        old = torch.zeros_like(batch.response_mask)
        for rows in micro:
            selected = batch.select(rows)
            logprobs, _ = self.policy.response_logprobs(selected, self.config.learner.logprob_chunk_tokens)
            old[rows, : logprobs.shape[1]] = logprobs
        return old

    # ---- after a step ---------------------------------------------------------------------------
    def sync_teacher(self, step: int) -> bool:
        """The frozen teacher takes the policy's weights when due; True when the teacher changed
        (always for a live teacher, which is the policy)."""
        if self.teacher is None:
            return False
        return self.teacher.maybe_sync(step) or self.teacher.snapshot is None

    def full_policy(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The policy's parameters under the served model's names, gathered (every rank runs it)."""
        return ((name.removeprefix("lm."), t) for name, t in full_parameters(self.policy))

    def full_teacher(self) -> Iterator[tuple[str, torch.Tensor]]:
        assert self.teacher is not None
        return ((name.removeprefix("lm."), t) for name, t in full_parameters(self.teacher.scorer))

    def export(self, directory: Path, tokenizer: PreTrainedTokenizerBase) -> None:
        """The policy as Hugging Face safetensors, for serving (gathered, written by rank 0)."""
        state = {name: t.cpu() for name, t in self.full_policy()}
        if self.ctx.is_main:
            self.policy.lm.save_pretrained(directory, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(directory)
        barrier(self.ctx)

    # ---- checkpoint state -----------------------------------------------------------------------
    def sharded_state_dict(self) -> dict[str, Any]:
        """Model, optimizer and frozen-teacher snapshot, sharded (DCP saves every rank's shard)."""
        model_state, optim_state = get_state_dict(self.policy, self.optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        if self.teacher is not None and self.teacher.snapshot is not None:
            state["teacher"] = self.teacher.snapshot.state_dict()
        return state

    def load_sharded_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(
            self.policy, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )
        if "teacher" in state and self.teacher is not None and self.teacher.snapshot is not None:
            self.teacher.snapshot.load_state_dict(state["teacher"])

    def state_dict(self) -> dict[str, Any]:
        return {
            "scheduler": self.scheduler.state_dict(),
            "teacher_last_sync_step": self.teacher.last_sync_step if self.teacher else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        if self.teacher is not None:
            self.teacher.last_sync_step = int(state["teacher_last_sync_step"])


def _padded(rows: list[list[float]], mask: torch.Tensor) -> torch.Tensor:
    """Per-token values of each response, zero-padded to the response mask's shape."""
    out = torch.zeros_like(mask)
    for i, values in enumerate(rows):
        out[i, : len(values)] = torch.tensor(values, dtype=out.dtype)
    return out

"""The training loop, for one process (local mode) or any number of torchrun learner ranks.

One step, as ARCHITECTURE.md describes it (rank 0 coordinates):
1. sample prompts (resumable sampler) -> 2. G responses each from the rollout engine (in process,
or vLLM / our CPU servers) -> 3. verifier rewards -> 4. group advantages -> 5. teacher log-probs
under the privileged prompt (colocated on every rank for its groups, or a teacher server) ->
6. every rank: student log-probs, token advantages, clipped loss, backward, optimizer step ->
7. push the new weights to rollout (and teacher when due), tagged with a policy version ->
8. checkpoint every K steps, export metrics.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from rlsd_contracts.config import ConfigError, RunConfig, dump_config
from rlsd_trainer import algorithms
from rlsd_trainer.data.example import Example
from rlsd_trainer.data.sampler import ResumableSampler
from rlsd_trainer.data.sources import load_examples
from rlsd_trainer.lifecycle import Preempted, PreemptionWatch
from rlsd_trainer.model.loading import LoadedModel, encode_prompt, load_model
from rlsd_trainer.model.logprobs import PackedBatch, PolicyScorer, pack
from rlsd_trainer.monitoring.metrics import MetricsLogger, format_console
from rlsd_trainer.monitoring.trackers import build_trackers
from rlsd_trainer.rewards.verifiers import RewardPool
from rlsd_trainer.rollout.engine import Completion, RolloutEngine, SamplingParams
from rlsd_trainer.training.checkpoint import CheckpointManager
from rlsd_trainer.training.distributed import (
    DistContext,
    all_reduce,
    barrier,
    broadcast_from_main,
    drain,
    full_parameters,
    prepare_policy,
    share_of,
)
from rlsd_trainer.training.engines import build_rollout_engine, build_teacher_client
from rlsd_trainer.training.teacher import Teacher
from rlsd_trainer.training.warmup import supervised_warmup

log = logging.getLogger(__name__)
CONSOLE_KEYS = ("reward_mean", "eval_accuracy", "lambda", "delta_mean", "policy_loss", "step_seconds")


@dataclass
class RunSummary:
    steps: int
    start_accuracy: float | None
    final_accuracy: float | None
    metrics_path: Path
    plot_path: Path | None
    checkpoint: Path | None


@dataclass
class StepPlan:
    """What rank 0 hands every rank for one step: the groups' prompts, responses and advantages."""

    prompts: list[list[int]]  # one per group
    responses: list[list[int]]  # G per group, in group order
    rollout_logprobs: list[list[float]]
    advantages: list[float]  # one per response
    teacher_prompts: list[list[int]] | None  # one per group, when the teacher scores colocated
    teacher_logprobs: list[list[float]] | None  # one per response, when a teacher server scored


class StepTimer:
    """Wall time of the named phases of one step (rollout, reward, teacher, learn, sync, checkpoint).

    Each phase is also a `torch.profiler` range named `PHASE_PREFIX + name`, so a profile of a step
    splits by phase (nearly free when no profiler runs)."""

    PHASE_PREFIX = "rlsd/"

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(self.PHASE_PREFIX + name):
                yield
        finally:
            self.seconds[name] += time.perf_counter() - start


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def resolve_model_path(config: RunConfig) -> Path | str:
    """The starting policy: the embedded tiny model (built on first use) or the configured path."""
    if config.model.path != "embedded":
        return config.model.path
    from rlsd_trainer.model.embedded import build_model_dir

    directory = config.output_dir / "embedded-model"
    if not (directory / "config.json").exists():
        build_model_dir(directory, config.data.embedded, config.run.seed)
    return directory


class Trainer:
    def __init__(
        self, config: RunConfig, ctx: DistContext | None = None, preemption: PreemptionWatch | None = None
    ) -> None:
        self.config = config
        self.ctx = ctx = ctx or DistContext()
        self.preemption = preemption
        if config.rollout.prompts_per_step < ctx.world_size:
            raise ConfigError(
                f"rollout.prompts_per_step={config.rollout.prompts_per_step} is below the "
                f"{ctx.world_size} learner ranks; every rank needs at least one group"
            )
        seed_everything(config.run.seed)
        self.train_set: list[Example] = []
        self.eval_set: list[Example] = []
        initial_policy = None
        if ctx.is_main:
            config.output_dir.mkdir(parents=True, exist_ok=True)
            (config.output_dir / "config.yaml").write_text(dump_config(config))
            self.train_set = load_examples(config.data.train, config.data.embedded, config.run.seed)
            if config.data.eval is not None:
                self.eval_set = load_examples(
                    config.data.eval, config.data.embedded, config.run.seed, config_key="data.eval"
                )[: config.eval.max_examples]
            initial_policy = self._initial_policy_path()
        self.initial_policy = broadcast_from_main(initial_policy, ctx)
        loaded = load_model(self.initial_policy, config.model)
        self.tokenizer = loaded.tokenizer
        self.policy = prepare_policy(loaded.model.train(), ctx, config.learner)
        self.teacher = self._build_teacher() if algorithms.needs_teacher(config.algorithm) else None
        self.reference = self._frozen_copy() if config.algorithm.kl_coef > 0 else None
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
        # Rank 0 samples the prompts for everyone.
        self.sampler = ResumableSampler(len(self.train_set), config.run.seed) if ctx.is_main else None
        self.checkpoints = CheckpointManager(
            config.output_dir / "checkpoints", config.checkpoint.keep_last, ctx, config.checkpoint.async_save
        )
        # Only rank 0 talks to the rollout engine, the teacher servers, the verifiers and Prometheus.
        self.engine: RolloutEngine | None = None
        self.teacher_client = None
        self.metrics: MetricsLogger | None = None
        if ctx.is_main:
            self.engine = build_rollout_engine(config, self.initial_policy, loaded.stop_token_ids, ctx.device)
            if self.teacher is not None and config.teacher.placement == "remote":
                self.teacher_client = build_teacher_client(config)
            self.metrics = MetricsLogger(
                config.output_dir / "metrics.jsonl",
                config.metrics.prometheus_port,
                config.metrics.prometheus_host,
                build_trackers(config),
            )
        self.step = 0
        self.last_checkpoint_step = 0
        self.start_accuracy: float | None = None
        self._prompt_cache: dict[str, list[int]] = {}

    # ---- set-up ---------------------------------------------------------------------------------
    def _initial_policy_path(self) -> Path | str:
        """The policy RL starts from (built by rank 0); with a warm-up, its result is saved once and
        reused on resume."""
        base = resolve_model_path(self.config)
        if self.config.warmup.steps == 0:
            return base
        target = self.config.output_dir / "initial-policy"
        if (target / "config.json").exists():
            return target
        loaded: LoadedModel = load_model(base, self.config.model)
        progress = tqdm(
            total=self.config.warmup.steps, desc="warm-up (SFT)", disable=not self.config.metrics.progress_bar
        )

        def on_step(step: int, loss: float) -> None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.3f}")

        with progress:
            supervised_warmup(
                loaded.model,
                loaded.tokenizer,
                self.train_set,
                self.config.warmup,
                self.config.teacher.template,
                self.config.run.seed,
                self.config.learner.logprob_chunk_tokens,
                on_step,
            )
        staging = target.with_name(target.name + ".tmp")
        loaded.model.save_pretrained(staging, safe_serialization=True)
        loaded.tokenizer.save_pretrained(staging)
        staging.rename(target)
        return target

    def _frozen_copy(self) -> PolicyScorer:
        """The initial policy again, sharded like the learner's, without gradients."""
        model = load_model(self.initial_policy, self.config.model).model.eval().requires_grad_(False)
        return prepare_policy(model, self.ctx, self.config.learner, trainable=False)

    def _build_teacher(self) -> Teacher:
        snapshot = self._frozen_copy() if self.config.teacher.mode == "frozen" else None
        return Teacher(self.config.teacher, self.policy, self.tokenizer, snapshot)

    def prompt_ids(self, text: str) -> list[int]:
        if text not in self._prompt_cache:
            ids = encode_prompt(self.tokenizer, text)
            if len(ids) > self.config.data.max_prompt_tokens:
                raise ValueError(
                    f"a prompt has {len(ids)} tokens, over data.max_prompt_tokens="
                    f"{self.config.data.max_prompt_tokens}; raise it or shorten the question"
                )
            self._prompt_cache[text] = ids
        return self._prompt_cache[text]

    # ---- weights to the servers -----------------------------------------------------------------
    def push_weights(self, teacher_too: bool) -> None:
        """Send the policy to the rollout engine (and the teacher server) as version `self.step`.

        Every rank runs the all-gathers; rank 0 sends."""
        named = ((name.removeprefix("lm."), t) for name, t in full_parameters(self.policy))
        if self.engine is not None:
            self.engine.update_weights(named, version=self.step)
        else:
            drain(named)
        if teacher_too and self.teacher is not None and self.config.teacher.placement == "remote":
            source = self.teacher.scorer
            named = ((name.removeprefix("lm."), t) for name, t in full_parameters(source))
            if self.teacher_client is not None:
                self.teacher_client.update_weights(named, version=self.teacher.last_sync_step)
            else:
                drain(named)

    # ---- checkpoint -----------------------------------------------------------------------------
    def sharded_state(self) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(self.policy, self.optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        if self.teacher is not None and self.teacher.snapshot is not None:
            state["teacher"] = self.teacher.snapshot.state_dict()
        return state

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict() if self.sampler is not None else None,
            "teacher_last_sync_step": self.teacher.last_sync_step if self.teacher else None,
            "start_accuracy": self.start_accuracy,
            "python_rng": random.getstate(),
        }

    def save_checkpoint(self, blocking: bool = False) -> None:
        rank_state = {"torch_rng": torch.get_rng_state()}
        self.checkpoints.save(self.step, self.sharded_state(), self.trainer_state(), rank_state, blocking)
        self.last_checkpoint_step = self.step

    def restore(self) -> bool:
        sharded = self.sharded_state()
        restored = self.checkpoints.load_latest(sharded)
        if restored is None:
            return False
        set_state_dict(
            self.policy,
            self.optimizer,
            model_state_dict=sharded["model"],
            optim_state_dict=sharded["optimizer"],
        )
        if "teacher" in sharded and self.teacher is not None and self.teacher.snapshot is not None:
            self.teacher.snapshot.load_state_dict(sharded["teacher"])
        state = restored.trainer_state
        self.step = self.last_checkpoint_step = restored.step
        self.scheduler.load_state_dict(state["scheduler"])
        if self.sampler is not None:
            self.sampler.load_state_dict(state["sampler"])
        if self.teacher is not None:
            self.teacher.last_sync_step = int(state["teacher_last_sync_step"])
        self.start_accuracy = state["start_accuracy"]
        random.setstate(state["python_rng"])
        if restored.rank_state is not None:
            torch.set_rng_state(restored.rank_state["torch_rng"])
        log.info("resumed from %s (step %d)", restored.path, self.step)
        return True

    # ---- evaluation (rank 0) --------------------------------------------------------------------
    def evaluate(self, rewards: RewardPool | None) -> float:
        if self.engine is None or rewards is None or not self.eval_set:
            return float("nan")
        params = SamplingParams(
            n=1,
            temperature=self.config.eval.temperature,
            max_new_tokens=self.config.eval.max_new_tokens,
            seed=self.config.run.seed,
        )
        prompts = [self.prompt_ids(e.question) for e in self.eval_set]
        completions = [group[0] for group in self.engine.generate(prompts, params)]
        texts = self.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
        scored = rewards.score(texts, [e.answer for e in self.eval_set])
        return sum(r >= 1.0 for r in scored.rewards) / len(self.eval_set)

    # ---- one RL step ----------------------------------------------------------------------------
    def _plan_step(self, rewards: RewardPool, timer: StepTimer) -> tuple[StepPlan, dict[str, float]]:
        """Rank 0: prompts -> rollouts -> rewards -> advantages (-> remote teacher log-probs)."""
        assert self.engine is not None and self.sampler is not None
        cfg = self.config
        group = cfg.algorithm.group_size
        examples = [self.train_set[i] for i in self.sampler.next_indices(cfg.rollout.prompts_per_step)]
        with timer.phase("rollout"):
            sampling = cfg.rollout.sampling
            params = SamplingParams(
                n=group,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_new_tokens=sampling.max_new_tokens,
                seed=cfg.run.seed * 1_000_003 + self.step,
            )
            prompts = [self.prompt_ids(e.question) for e in examples]
            completions: list[Completion] = [c for g in self.engine.generate(prompts, params) for c in g]
        responses = [c.token_ids for c in completions]
        rows = [e for e in examples for _ in range(group)]
        with timer.phase("reward"):
            texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
            scored = rewards.score(texts, [e.answer for e in rows])
        reward = torch.tensor(scored.rewards)
        advantages = algorithms.group_advantages(reward, group, cfg.algorithm.advantage_eps)
        teacher_prompts = teacher_logprobs = None
        if self.teacher is not None:
            teacher_prompts = [self.teacher.prompt_ids(e.question, e.reference or e.answer) for e in examples]
            if self.teacher_client is not None:
                with timer.phase("teacher"):
                    scored_lp = self.teacher_client.score(teacher_prompts, responses, group)
                teacher_logprobs = [scored_lp[i, : len(r)].tolist() for i, r in enumerate(responses)]
                teacher_prompts = None
        plan = StepPlan(
            prompts=prompts,
            responses=responses,
            rollout_logprobs=[c.logprobs for c in completions],
            advantages=advantages.tolist(),
            teacher_prompts=teacher_prompts,
            teacher_logprobs=teacher_logprobs,
        )
        lengths = [len(r) for r in responses]
        values = {
            "reward_mean": float(reward.mean()),
            "reward_std": float(reward.std()),
            "groups_with_signal": float((advantages.view(-1, group).abs().sum(1) > 0).float().mean()),
            "response_length_mean": sum(lengths) / len(lengths),
            "truncated_fraction": sum(c.finish_reason != "stop" for c in completions) / len(completions),
            "verifier_errors": float(scored.errors),
            "verifier_timeouts": float(scored.timeouts),
            "stale_rollouts": float(sum(c.policy_version != self.step for c in completions)),
            # Prompt + response tokens of the step's rollouts.
            "rollout_tokens": float(sum(lengths) + group * sum(len(p) for p in prompts)),
        }
        if self.metrics is not None:
            self.metrics.increment("verifier_errors", scored.errors)
            self.metrics.increment("verifier_timeouts", scored.timeouts)
        return plan, values

    def train_step(self, rewards: RewardPool | None) -> dict[str, float]:
        cfg = self.config
        group = cfg.algorithm.group_size
        timer = StepTimer()
        started = time.perf_counter()
        plan, values = self._plan_step(rewards, timer) if rewards is not None else (None, {})
        plan = broadcast_from_main(plan, self.ctx)

        # This rank's share of the groups.
        groups = share_of(len(plan.prompts), self.ctx)
        rows = range(groups.start * group, groups.stop * group)
        responses = [plan.responses[i] for i in rows]
        device = self.ctx.device
        # Each group's prompt is packed once, for all its responses.
        batch = pack(
            plan.prompts[groups.start : groups.stop], responses, [i // group - groups.start for i in rows]
        )
        batch = batch.to(device)
        advantages = torch.tensor([plan.advantages[i] for i in rows], device=device)
        rollout_lp = _padded([plan.rollout_logprobs[i] for i in rows], batch.response_mask)
        teacher_lp = None
        if plan.teacher_logprobs is not None:
            teacher_lp = _padded([plan.teacher_logprobs[i] for i in rows], batch.response_mask)
        elif self.teacher is not None and plan.teacher_prompts is not None:
            with timer.phase("teacher"):
                teacher_lp = self.teacher.score(
                    [plan.teacher_prompts[g] for g in groups],
                    responses,
                    group,
                    cfg.learner.logprob_chunk_tokens,
                )

        with timer.phase("learn"):
            learn = self._learn(batch, advantages, teacher_lp, rollout_lp)

        with timer.phase("sync"):
            self.step += 1
            teacher_synced = self.teacher is not None and self.teacher.maybe_sync(self.step)
            live_teacher = self.teacher is not None and self.teacher.snapshot is None
            self.push_weights(teacher_too=teacher_synced or live_teacher)

        with timer.phase("checkpoint"):
            self.checkpoints.poll()
            if self.step % cfg.checkpoint.every == 0 or self.step == cfg.run.total_steps:
                self.save_checkpoint(blocking=self.step == cfg.run.total_steps)

        elapsed = time.perf_counter() - started
        values.update(learn)
        values["policy_version"] = float(self.step)
        values["checkpoint_step"] = float(self.checkpoints.committed_step)
        values["step_seconds"] = elapsed
        values["tokens_per_second"] = values.pop("rollout_tokens", 0.0) / elapsed
        values["lr"] = self.scheduler.get_last_lr()[0]
        values.update({f"time_{name}_seconds": seconds for name, seconds in timer.seconds.items()})
        return values

    def _micro_batches(self, batch: PackedBatch) -> tuple[list[torch.Tensor], int]:
        """Response indices of micro-batches of at most `learner.micro_batch_tokens` real tokens
        (a prompt counted once per micro-batch that holds its responses; a longer response alone),
        and how many of them are real.

        Responses are taken in group order, so a group's prompt is packed once unless the budget
        cuts the group. Every rank runs as many micro-batches as the busiest one (the extra ones
        repeat a row and contribute zero), because each sharded forward and backward is a collective."""
        response_lengths = batch.response_lengths.tolist()
        prompt_lengths = batch.prompt_lengths.tolist()
        budget = self.config.learner.micro_batch_tokens
        micro: list[list[int]] = [[]]
        filled, prompts = 0, set()
        for index, prompt in enumerate(batch.groups.tolist()):
            cost = response_lengths[index] + (0 if prompt in prompts else prompt_lengths[prompt])
            if micro[-1] and filled + cost > budget:
                micro.append([])
                filled, prompts = 0, set()
                cost = response_lengths[index] + prompt_lengths[prompt]
            micro[-1].append(index)
            filled += cost
            prompts.add(prompt)
        (most,) = all_reduce([float(len(micro))], self.ctx, op="max")
        padding = [torch.tensor(micro[-1][:1])] * (int(most) - len(micro))
        return [torch.tensor(g) for g in micro] + padding, len(micro)

    def _learn(
        self,
        batch: PackedBatch,
        advantages: torch.Tensor,
        teacher_logprobs: torch.Tensor | None,
        rollout_lp: torch.Tensor,
    ) -> dict[str, float]:
        cfg = self.config
        algo = cfg.algorithm
        (global_tokens,) = all_reduce([float(batch.response_mask.sum())], self.ctx)
        global_tokens = max(global_tokens, 1.0)
        micro_batches, real = self._micro_batches(batch)
        old_logprobs = self._old_logprobs(batch, micro_batches) if algo.ppo_epochs > 1 else None
        totals: dict[str, float] = defaultdict(float)
        self.policy.train()
        for epoch in range(algo.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            for index, rows in enumerate(micro_batches):
                counted = index < real  # repeats only keep the ranks' collectives in step
                micro = batch.select(rows)
                width = micro.response_mask.shape[1]
                logprobs, entropy = self.policy.response_logprobs(
                    micro, cfg.learner.logprob_chunk_tokens, with_entropy=True
                )
                old = old_logprobs[rows, :width] if old_logprobs is not None else logprobs.detach()
                teacher = teacher_logprobs[rows, :width] if teacher_logprobs is not None else None
                token_adv = algorithms.token_advantages_for(
                    algo, self.step, advantages[rows], teacher, old, micro.response_mask
                )
                terms = algorithms.clipped_policy_loss(
                    logprobs, old, token_adv, algo.clip_low, algo.clip_high, algo.dual_clip
                )
                m = micro.response_mask if counted else torch.zeros_like(micro.response_mask)
                loss = algorithms.token_mean(terms.loss, m, global_tokens)
                if self.reference is not None:
                    with torch.no_grad():
                        ref_lp, _ = self.reference.response_logprobs(micro, cfg.learner.logprob_chunk_tokens)
                    kl = algorithms.token_mean(algorithms.kl_penalty(logprobs, ref_lp), m, global_tokens)
                    loss = loss + algo.kl_coef * kl
                    if epoch == 0:
                        totals["kl"] += kl.item()
                if algo.entropy_coef > 0:
                    loss = loss - algo.entropy_coef * algorithms.token_mean(entropy, m, global_tokens)
                loss.backward()
                if epoch == 0 and counted:
                    totals["policy_loss"] += float(
                        algorithms.token_mean(terms.loss.detach(), m, global_tokens)
                    )
                    totals["clip_ratio"] += float(algorithms.token_mean(terms.clipped, m, global_tokens))
                    totals["entropy"] += float(algorithms.token_mean(entropy.detach(), m, global_tokens))
                    # A log-prob the rollout server could not report (NaN) counts as no mismatch.
                    mismatch = (old - rollout_lp[rows, :width]).abs().nan_to_num(nan=0.0)
                    totals["logprob_mismatch"] += float(algorithms.token_mean(mismatch, m, global_tokens))
                    if teacher is not None:
                        self._weight_stats(totals, advantages[rows], teacher, old, m, global_tokens)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.optim.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
        # Each rank's sums are already shares of the global token mean: add them up.
        keys = sorted(totals)
        totals = dict(zip(keys, all_reduce([totals[k] for k in keys], self.ctx), strict=True))
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        totals["grad_norm"] = float(grad_norm)
        if algo.name == "rlsd":
            totals["lambda"] = algorithms.lambda_at(self.step, algo.lam)
        return totals

    def _weight_stats(
        self,
        totals: dict[str, float],
        advantages: torch.Tensor,
        teacher: torch.Tensor,
        student: torch.Tensor,
        mask: torch.Tensor,
        global_tokens: float,
    ) -> None:
        """Accumulate token-weighted RLSD weight statistics across micro-batches and ranks."""
        stats = algorithms.rlsd_weight_stats(advantages, teacher, student, self.config.algorithm.eps_w, mask)
        share = float(mask.sum()) / global_tokens
        totals["delta_mean"] += stats.mean_delta * share
        totals["weight_mean"] += stats.mean_weight * share
        totals["weight_clipped_fraction"] += stats.clipped_fraction * share

    @torch.no_grad()
    def _old_logprobs(self, batch: PackedBatch, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """Log-probs before any update of this step, for the ratio of epochs after the first."""
        old = torch.zeros_like(batch.response_mask)
        for rows in micro_batches:
            micro = batch.select(rows)
            logprobs, _ = self.policy.response_logprobs(micro, self.config.learner.logprob_chunk_tokens)
            old[rows, : logprobs.shape[1]] = logprobs
        return old

    # ---- the run --------------------------------------------------------------------------------
    def _stop_requested(self) -> bool:
        flag = 1.0 if self.preemption is not None and self.preemption.requested.is_set() else 0.0
        (anyone,) = all_reduce([flag], self.ctx, op="max")
        return anyone > 0

    def run(self) -> RunSummary:
        cfg, ctx = self.config, self.ctx
        resumed = self.restore()
        self.push_weights(teacher_too=True)
        if self.metrics is not None and self.metrics.port is not None:
            tqdm.write(f"Prometheus metrics: http://127.0.0.1:{self.metrics.port}/metrics")
        with RewardPool(cfg.reward) if ctx.is_main else _no_pool() as rewards:
            if not resumed and ctx.is_main:
                self.start_accuracy = self.evaluate(rewards)
                self._log(0, {"eval_accuracy": self.start_accuracy})
                tqdm.write(f"held-out accuracy of the starting policy: {self.start_accuracy:.3f}")
            progress = tqdm(
                total=cfg.run.total_steps,
                initial=self.step,
                desc=f"{cfg.algorithm.name} training",
                disable=not (cfg.metrics.progress_bar and ctx.is_main),
            )
            final_accuracy = None
            with progress:
                while self.step < cfg.run.total_steps:
                    values = self.train_step(rewards)
                    if ctx.is_main and (self.step % cfg.eval.every == 0 or self.step == cfg.run.total_steps):
                        values["eval_accuracy"] = final_accuracy = self.evaluate(rewards)
                    values["step"] = self.step
                    self._log(self.step, values)
                    progress.update(1)
                    if ctx.is_main:
                        progress.set_postfix(reward=f"{values['reward_mean']:.3f}")
                        if self.step % cfg.metrics.console_every == 0:
                            tqdm.write(format_console(self.step, values, CONSOLE_KEYS))
                    if self.step < cfg.run.total_steps and self._stop_requested():
                        self._save_for_preemption()
            if final_accuracy is None and ctx.is_main:
                final_accuracy = self.evaluate(rewards)
        self.checkpoints.wait()
        self._export(cfg.output_dir / "final-policy")
        self.close()
        plot_path = None
        if self.metrics is not None:
            self.metrics.close()
            plot_path = self._plot()
        latest = self.checkpoints.committed()
        return RunSummary(
            steps=self.step,
            start_accuracy=self.start_accuracy,
            final_accuracy=final_accuracy,
            metrics_path=cfg.output_dir / "metrics.jsonl",
            plot_path=plot_path,
            checkpoint=latest[-1] if latest else None,
        )

    def close(self) -> None:
        for client in (self.engine, self.teacher_client):
            if client is not None:
                client.close()

    def _save_for_preemption(self) -> None:
        self.checkpoints.wait()
        if self.last_checkpoint_step != self.step:
            self.save_checkpoint(blocking=True)
        log.warning("preempted: checkpoint of step %d committed; exiting", self.step)
        self.close()
        raise Preempted(self.step)

    def _log(self, step: int, values: dict[str, float]) -> None:
        if self.metrics is not None:
            self.metrics.log(step, values)

    def _export(self, directory: Path) -> None:
        """The final policy as Hugging Face safetensors, for serving (gathered, written by rank 0)."""
        state = {name.removeprefix("lm."): t.cpu() for name, t in full_parameters(self.policy)}
        if self.ctx.is_main:
            self.policy.lm.save_pretrained(directory, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(directory)
        barrier(self.ctx)

    def _plot(self) -> Path | None:
        from rlsd_trainer.monitoring.plot import plot_run

        return plot_run(self.config.output_dir / "metrics.jsonl", self.config.output_dir / "training.png")


@contextmanager
def _no_pool() -> Iterator[None]:
    yield None


def _padded(rows: list[list[float]], mask: torch.Tensor) -> torch.Tensor:
    """Per-token values of each response, zero-padded to the response mask's shape."""
    out = torch.zeros_like(mask)
    for i, values in enumerate(rows):
        out[i, : len(values)] = torch.tensor(values, dtype=out.dtype)
    return out


def run_training(
    config: RunConfig, ctx: DistContext | None = None, preemption: PreemptionWatch | None = None
) -> RunSummary:
    return Trainer(config, ctx, preemption).run()

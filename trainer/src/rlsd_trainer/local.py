"""The local (no-Kubernetes) mode: one process runs rollout, rewards, teacher and learner.

One step, as ARCHITECTURE.md describes it: sample prompts -> G responses each -> verifier rewards
-> group advantages -> teacher log-probs under the privileged prompt -> student log-probs, token
advantages, clipped loss, backward, optimizer step -> push weights to the rollout engine (tagged
with a policy version) -> checkpoint every K steps and export metrics.
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
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from rlsd_trainer import algorithms
from rlsd_trainer.checkpoint import CheckpointManager
from rlsd_trainer.config import RunConfig, dump_config
from rlsd_trainer.data import ResumableSampler, load_examples
from rlsd_trainer.logprobs import PackedBatch, pack, response_logprobs
from rlsd_trainer.metrics import MetricsLogger, format_console
from rlsd_trainer.models import LoadedModel, encode_prompt, load_model
from rlsd_trainer.rollout import Completion, LocalEngine, SamplingParams
from rlsd_trainer.teacher import Teacher
from rlsd_trainer.verifiers import RewardPool
from rlsd_trainer.warmup import supervised_warmup

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


class StepTimer:
    """Wall time of the named phases of one step (rollout, reward, teacher, learn, sync, checkpoint)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
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
    from rlsd_trainer.task import build_model_dir

    directory = config.output_dir / "embedded-model"
    if not (directory / "config.json").exists():
        build_model_dir(directory, config.data.embedded, config.run.seed)
    return directory


class LocalTrainer:
    def __init__(self, config: RunConfig) -> None:
        self.config = config
        seed_everything(config.run.seed)
        config.output_dir.mkdir(parents=True, exist_ok=True)
        (config.output_dir / "config.yaml").write_text(dump_config(config))
        self.train_set = load_examples(config.data.train, config.data.embedded, config.run.seed)
        self.eval_set = (
            load_examples(config.data.eval, config.data.embedded, config.run.seed, config_key="data.eval")
            if config.data.eval is not None
            else []
        )[: config.eval.max_examples]
        self.initial_policy = self._initial_policy_path()
        loaded = load_model(self.initial_policy, config.model)
        self.policy: PreTrainedModel = loaded.model.train()
        self.tokenizer = loaded.tokenizer
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.engine = LocalEngine(
            load_model(self.initial_policy, config.model).model,
            self.pad_id,
            loaded.stop_token_ids,
            config.rollout.max_batch_size,
        )
        self.teacher = (
            Teacher(config.teacher, self.policy, self.tokenizer)
            if algorithms.needs_teacher(config.algorithm)
            else None
        )
        self.reference = (
            load_model(self.initial_policy, config.model).model.eval().requires_grad_(False)
            if config.algorithm.kl_coef > 0
            else None
        )
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
        self.sampler = ResumableSampler(len(self.train_set), config.run.seed)
        self.checkpoints = CheckpointManager(config.output_dir / "checkpoints", config.checkpoint.keep_last)
        self.metrics = MetricsLogger(config.output_dir / "metrics.jsonl", config.metrics.prometheus_port)
        self.step = 0
        self.start_accuracy: float | None = None
        self._prompt_cache: dict[str, list[int]] = {}

    # ---- set-up ---------------------------------------------------------------------------------
    def _initial_policy_path(self) -> Path | str:
        """The policy RL starts from; with a warm-up, its result is saved once and reused on resume."""
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

    # ---- checkpoint -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "teacher": self.teacher.state_dict() if self.teacher else None,
            "start_accuracy": self.start_accuracy,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }

    def restore(self) -> bool:
        latest = self.checkpoints.load_latest()
        if latest is None:
            return False
        self.step, state = latest
        self.policy.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        if self.teacher is not None and state["teacher"] is not None:
            self.teacher.load_state_dict(state["teacher"])
        self.start_accuracy = state["start_accuracy"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.engine.update_weights(self.policy.named_parameters(), version=self.step)
        log.info("resumed from checkpoint at step %d", self.step)
        return True

    # ---- evaluation -----------------------------------------------------------------------------
    def evaluate(self, rewards: RewardPool) -> float:
        if not self.eval_set:
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
    def train_step(self, rewards: RewardPool) -> dict[str, float]:
        cfg = self.config
        group = cfg.algorithm.group_size
        timer = StepTimer()
        started = time.perf_counter()

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

        student_prompts = [p for p in prompts for _ in range(group)]
        batch = pack(student_prompts, responses, self.pad_id)
        teacher_logprobs = None
        if self.teacher is not None:
            with timer.phase("teacher"):
                teacher_prompts = [
                    self.teacher.prompt_ids(e.question, e.reference or e.answer) for e in examples
                ]
                teacher_logprobs = self.teacher.score(
                    teacher_prompts, responses, group, self.pad_id, cfg.learner.logprob_chunk_tokens
                )

        with timer.phase("learn"):
            learn = self._learn(batch, advantages, teacher_logprobs, completions)

        with timer.phase("sync"):
            self.step += 1
            self.engine.update_weights(self.policy.named_parameters(), version=self.step)
            if self.teacher is not None:
                self.teacher.maybe_sync(self.step)

        if self.step % cfg.checkpoint.every == 0 or self.step == cfg.run.total_steps:
            with timer.phase("checkpoint"):
                self.checkpoints.save(self.step, self.state_dict())

        mask = batch.response_mask
        elapsed = time.perf_counter() - started
        response_tokens = float(mask.sum())
        values = {
            "reward_mean": float(reward.mean()),
            "reward_std": float(reward.std()),
            "groups_with_signal": float((advantages.view(-1, group).abs().sum(1) > 0).float().mean()),
            "response_length_mean": response_tokens / len(responses),
            "truncated_fraction": sum(c.finish_reason == "length" for c in completions) / len(completions),
            "verifier_errors": float(scored.errors),
            "verifier_timeouts": float(scored.timeouts),
            "policy_version": float(self.step),
            "step_seconds": elapsed,
            # Prompt + response tokens of the step's rollouts (the packed rows hold both).
            "tokens_per_second": float(batch.attention_mask.sum()) / elapsed,
            "lr": self.scheduler.get_last_lr()[0],
            **learn,
            **{f"time_{name}_seconds": seconds for name, seconds in timer.seconds.items()},
        }
        self.metrics.increment("verifier_errors", scored.errors)
        self.metrics.increment("verifier_timeouts", scored.timeouts)
        return values

    def _micro_batches(self, batch: PackedBatch) -> list[torch.Tensor]:
        """Row indices of micro-batches whose padded size fits `learner.micro_batch_tokens`."""
        lengths = batch.attention_mask.sum(1)
        order = torch.argsort(lengths, descending=True).tolist()
        budget = self.config.learner.micro_batch_tokens
        groups: list[list[int]] = [[]]
        for index in order:
            widest = int(lengths[groups[-1][0]]) if groups[-1] else int(lengths[index])
            if groups[-1] and widest * (len(groups[-1]) + 1) > budget:
                groups.append([])
            groups[-1].append(index)
        return [torch.tensor(g) for g in groups]

    def _learn(
        self,
        batch: PackedBatch,
        advantages: torch.Tensor,
        teacher_logprobs: torch.Tensor | None,
        completions: list[Completion],
    ) -> dict[str, float]:
        cfg = self.config
        algo = cfg.algorithm
        mask = batch.response_mask
        global_tokens = float(mask.sum().clamp(min=1))
        rollout_lp = torch.zeros_like(mask)
        for i, completion in enumerate(completions):
            rollout_lp[i, : len(completion.logprobs)] = torch.tensor(completion.logprobs)

        old_logprobs = self._old_logprobs(batch) if algo.ppo_epochs > 1 else None
        totals: dict[str, float] = defaultdict(float)
        self.policy.train()
        for epoch in range(algo.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            for rows in self._micro_batches(batch):
                micro = _select(batch, rows)
                width = micro.response_mask.shape[1]
                logprobs, entropy = response_logprobs(
                    self.policy, micro, cfg.learner.logprob_chunk_tokens, with_entropy=True
                )
                old = old_logprobs[rows, :width] if old_logprobs is not None else logprobs.detach()
                teacher = teacher_logprobs[rows, :width] if teacher_logprobs is not None else None
                token_adv = algorithms.token_advantages_for(
                    algo, self.step, advantages[rows], teacher, old, micro.response_mask
                )
                terms = algorithms.clipped_policy_loss(
                    logprobs, old, token_adv, algo.clip_low, algo.clip_high, algo.dual_clip
                )
                m = micro.response_mask
                loss = algorithms.token_mean(terms.loss, m, global_tokens)
                if self.reference is not None:
                    with torch.no_grad():
                        ref_lp, _ = response_logprobs(self.reference, micro, cfg.learner.logprob_chunk_tokens)
                    kl = algorithms.token_mean(algorithms.kl_penalty(logprobs, ref_lp), m, global_tokens)
                    loss = loss + algo.kl_coef * kl
                    if epoch == 0:
                        totals["kl"] += kl.item()
                if algo.entropy_coef > 0:
                    loss = loss - algo.entropy_coef * algorithms.token_mean(entropy, m, global_tokens)
                loss.backward()
                if epoch == 0:
                    totals["policy_loss"] += float(
                        algorithms.token_mean(terms.loss.detach(), m, global_tokens)
                    )
                    totals["clip_ratio"] += float(algorithms.token_mean(terms.clipped, m, global_tokens))
                    totals["entropy"] += float(algorithms.token_mean(entropy.detach(), m, global_tokens))
                    totals["logprob_mismatch"] += float(
                        algorithms.token_mean((old - rollout_lp[rows, :width]).abs(), m, global_tokens)
                    )
                    if teacher is not None:
                        self._weight_stats(totals, advantages[rows], teacher, old, m, global_tokens)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.optim.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
        totals["grad_norm"] = float(grad_norm)
        if algo.name == "rlsd":
            totals["lambda"] = algorithms.lambda_at(self.step, algo.lam)
        return dict(totals)

    def _weight_stats(
        self,
        totals: dict[str, float],
        advantages: torch.Tensor,
        teacher: torch.Tensor,
        student: torch.Tensor,
        mask: torch.Tensor,
        global_tokens: float,
    ) -> None:
        """Accumulate token-weighted RLSD weight statistics across micro-batches."""
        stats = algorithms.rlsd_weight_stats(advantages, teacher, student, self.config.algorithm.eps_w, mask)
        share = float(mask.sum()) / global_tokens
        totals["delta_mean"] += stats.mean_delta * share
        totals["weight_mean"] += stats.mean_weight * share
        totals["weight_clipped_fraction"] += stats.clipped_fraction * share

    @torch.no_grad()
    def _old_logprobs(self, batch: PackedBatch) -> torch.Tensor:
        """Log-probs before any update of this step, for the ratio of epochs after the first."""
        old = torch.zeros_like(batch.response_mask)
        for rows in self._micro_batches(batch):
            micro = _select(batch, rows)
            logprobs, _ = response_logprobs(self.policy, micro, self.config.learner.logprob_chunk_tokens)
            old[rows, : logprobs.shape[1]] = logprobs
        return old

    # ---- the run --------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        cfg = self.config
        resumed = self.restore()
        if self.metrics.port is not None:
            tqdm.write(f"Prometheus metrics: http://127.0.0.1:{self.metrics.port}/metrics")
        with RewardPool(cfg.reward) as rewards:
            if not resumed:
                self.start_accuracy = self.evaluate(rewards)
                self.metrics.log(0, {"eval_accuracy": self.start_accuracy})
                tqdm.write(f"held-out accuracy of the starting policy: {self.start_accuracy:.3f}")
            progress = tqdm(
                total=cfg.run.total_steps,
                initial=self.step,
                desc=f"{cfg.algorithm.name} training",
                disable=not cfg.metrics.progress_bar,
            )
            final_accuracy = None
            with progress:
                while self.step < cfg.run.total_steps:
                    values = self.train_step(rewards)
                    if self.step % cfg.eval.every == 0 or self.step == cfg.run.total_steps:
                        values["eval_accuracy"] = final_accuracy = self.evaluate(rewards)
                    values["step"] = self.step
                    self.metrics.log(self.step, values)
                    progress.update(1)
                    progress.set_postfix(reward=f"{values['reward_mean']:.3f}")
                    if self.step % cfg.metrics.console_every == 0:
                        tqdm.write(format_console(self.step, values, CONSOLE_KEYS))
            if final_accuracy is None:
                final_accuracy = self.evaluate(rewards)
        export = cfg.output_dir / "final-policy"
        self.policy.save_pretrained(export, safe_serialization=True)
        self.tokenizer.save_pretrained(export)
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

    def _plot(self) -> Path | None:
        from rlsd_trainer.plot import plot_run

        return plot_run(self.config.output_dir / "metrics.jsonl", self.config.output_dir / "training.png")


def _select(batch: PackedBatch, rows: torch.Tensor) -> PackedBatch:
    """Rows of a packed batch, trimmed to the longest row so padding is not computed."""
    width = int(batch.attention_mask[rows].sum(1).max())
    response_width = max(1, int(batch.response_mask[rows].sum(1).max()))
    return PackedBatch(
        input_ids=batch.input_ids[rows, :width],
        attention_mask=batch.attention_mask[rows, :width],
        prompt_lengths=batch.prompt_lengths[rows],
        response_ids=batch.response_ids[rows, :response_width],
        response_mask=batch.response_mask[rows, :response_width],
    )


def run_local(config: RunConfig) -> RunSummary:
    return LocalTrainer(config).run()

"""The planner, on learner rank 0: where each step's rollout batch is made.

prompts (the resumable sampler) -> G responses each from the rollout engine (in process, or vLLM /
our CPU servers) -> verifier rewards -> group advantages (with dynamic sampling, groups whose rewards
are all equal are replaced by new ones) -> the teacher's privileged prompts, or the teacher servers'
log-probs -> a `StepPlan`. It also evaluates on the held-out set and forwards new weights to the
engine and the teacher servers. `PlanQueue` decides when each of these runs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from rlsd_contracts.config import RunConfig
from rlsd_trainer import algorithms
from rlsd_trainer.data.example import Example
from rlsd_trainer.data.sampler import ResumableSampler
from rlsd_trainer.model.loading import encode_prompt
from rlsd_trainer.monitoring.metrics import MetricsLogger
from rlsd_trainer.remote.teacher_client import RemoteTeacherClient
from rlsd_trainer.rewards.verifiers import RewardPool
from rlsd_trainer.rollout.engine import Completion, RolloutEngine, SamplingParams
from rlsd_trainer.training.plan import StepPlan
from rlsd_trainer.training.teacher import teacher_prompt_ids, teacher_version_at
from rlsd_trainer.training.timing import StepTimer
from rlsd_trainer.training.warmup import target_ids

# Extra generation rounds of dynamic sampling draw their seeds from here on (round 0 keeps the
# step's seed, so a run without dynamic sampling samples exactly as before).
_ROUND_SEED_SHIFT = 52


@dataclass
class _Group:
    example: Example
    prompt: list[int]
    completions: list[Completion]
    rewards: list[float]

    @property
    def has_signal(self) -> bool:
        return len(set(self.rewards)) > 1


class Planner:
    def __init__(
        self,
        config: RunConfig,
        tokenizer: PreTrainedTokenizerBase,
        train_set: list[Example],
        eval_set: list[Example],
        engine: RolloutEngine,
        teacher_client: RemoteTeacherClient | None,
        metrics: MetricsLogger | None,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.train_set = train_set
        self.eval_set = eval_set
        self.engine = engine
        self.teacher_client = teacher_client
        self.metrics = metrics
        self.needs_teacher = algorithms.needs_teacher(config.algorithm)
        self.pairs_delta = config.algorithm.name == "rlsd"  # OPSD's Delta needs the current student
        # Only the embedded task's reference is the one solution the policy learned to write, so
        # only there does leaving it mark a wrong token; the teacher's diagnostics are its only use.
        self.locates_errors = self.needs_teacher and config.data.train.kind == "embedded"
        self.sampler = ResumableSampler(len(train_set), config.run.seed)
        self.rewards = RewardPool(config.reward).__enter__()
        self._prompt_cache: dict[str, list[int]] = {}

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

    # ---- one step's batch -----------------------------------------------------------------------
    def plan(self, step: int) -> StepPlan:
        """The batch of learner step `step`, generated with the weights the engine holds now."""
        cfg = self.config
        group = cfg.algorithm.group_size
        wanted = cfg.rollout.prompts_per_step
        timer = StepTimer()
        verifier: Counter[str] = Counter()  # errors and timeouts of every generation round
        generated = self._sample_groups(step, wanted, 0, timer, verifier)
        dynamic = cfg.rollout.dynamic_sampling
        chosen, dropped, rounds = generated, [], 0
        if dynamic.enabled:
            chosen = [g for g in generated if g.has_signal]
            dropped = [g for g in generated if not g.has_signal]
            while len(chosen) < wanted and rounds < dynamic.max_rounds:
                rounds += 1
                more = self._sample_groups(step, wanted - len(chosen), rounds, timer, verifier)
                generated += more
                chosen += [g for g in more if g.has_signal]
                dropped += [g for g in more if not g.has_signal]
            # Out of rounds: the step stays full with groups that carry no signal.
            chosen += dropped[: wanted - len(chosen)]
        completions = [c for g in chosen for c in g.completions]
        responses = [c.token_ids for c in completions]
        advantages = algorithms.group_advantages(
            torch.tensor([r for g in chosen for r in g.rewards]), group, cfg.algorithm.advantage_eps
        )
        prompts = [g.prompt for g in chosen]
        teacher_prompts = teacher_logprobs = paired_logprobs = teacher_version = None
        if self.needs_teacher:
            teacher_prompts = [
                teacher_prompt_ids(
                    self.tokenizer, cfg.teacher, g.example.question, g.example.reference or g.example.answer
                )
                for g in chosen
            ]
            if self.teacher_client is not None:
                # RLSD's Delta needs the same weights' student-prompt log-probs when the learner's
                # teacher at `step` will no longer be the weights the servers hold now (StepPlan).
                served = self.teacher_client.policy_version
                paired = self.pairs_delta and teacher_version_at(cfg.teacher, step, served) != served
                with timer.phase("teacher"):
                    scored = self.teacher_client.score(
                        teacher_prompts, responses, group, prompts if paired else None
                    )
                teacher_logprobs = _rows(scored.teacher, responses)
                paired_logprobs = _rows(scored.student, responses) if scored.student is not None else None
                teacher_version = scored.version
                teacher_prompts = None
        all_rewards = torch.tensor([r for g in generated for r in g.rewards])
        lengths = [len(r) for r in responses]
        staleness = [step - c.policy_version for c in completions]
        values = {
            "reward_mean": float(all_rewards.mean()),
            "reward_std": float(all_rewards.std()),
            "groups_with_signal": float((advantages.view(-1, group).abs().sum(1) > 0).float().mean()),
            "response_length_mean": sum(lengths) / len(lengths),
            "truncated_fraction": sum(c.finish_reason != "stop" for c in completions) / len(completions),
            "stale_rollouts": float(sum(s != 0 for s in staleness)),
            "rollout_staleness": sum(staleness) / len(staleness),
            "rollout_staleness_max": float(max(staleness)),
            "verifier_errors": float(verifier["errors"]),
            "verifier_timeouts": float(verifier["timeouts"]),
            "dynamic_sampling_dropped_groups": float(len(generated) - len(chosen)),
            "dynamic_sampling_rounds": float(rounds),
            # Prompt + response tokens of every rollout generated for the step.
            "rollout_tokens": float(
                sum(len(c.token_ids) for g in generated for c in g.completions)
                + group * sum(len(g.prompt) for g in generated)
            ),
            **timer.values(),
        }
        return StepPlan(
            step=step,
            prompts=prompts,
            responses=responses,
            rollout_logprobs=[c.logprobs for c in completions],
            policy_versions=[c.policy_version for c in completions],
            advantages=advantages.tolist(),
            teacher_prompts=teacher_prompts,
            teacher_logprobs=teacher_logprobs,
            values=values,
            teacher_version=teacher_version,
            paired_student_logprobs=paired_logprobs,
            first_error_tokens=self._first_error_tokens(chosen) if self.locates_errors else None,
        )

    def _first_error_tokens(self, groups: list[_Group]) -> list[int]:
        """Each response's first wrong token, in the plan's order of responses: -1 for a correct
        one (reward >= 1), else where it leaves its reference solution's tokens followed by EOS,
        tokenized as the warm-up teaches them (`algorithms.first_divergence`)."""
        first_errors = []
        for group in groups:
            solution = target_ids(self.tokenizer, group.example.reference or group.example.answer)
            first_errors += [
                -1 if reward >= 1.0 else algorithms.first_divergence(completion.token_ids, solution)
                for completion, reward in zip(group.completions, group.rewards, strict=True)
            ]
        return first_errors

    def _sample_groups(
        self, step: int, count: int, round_: int, timer: StepTimer, verifier: Counter[str]
    ) -> list[_Group]:
        """`count` new prompts, G responses each, scored (the verifier's failures added to `verifier`)."""
        cfg = self.config
        group = cfg.algorithm.group_size
        examples = [self.train_set[i] for i in self.sampler.next_indices(count)]
        with timer.phase("rollout"):
            sampling = cfg.rollout.sampling
            params = SamplingParams(
                n=group,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_new_tokens=sampling.max_new_tokens,
                seed=cfg.run.seed * 1_000_003 + step + (round_ << _ROUND_SEED_SHIFT),
            )
            prompts = [self.prompt_ids(e.question) for e in examples]
            generated = self.engine.generate(prompts, params)
        with timer.phase("reward"):
            responses = [c.token_ids for g in generated for c in g]
            texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
            scored = self.rewards.score(texts, [e.answer for e in examples for _ in range(group)])
        verifier.update(errors=scored.errors, timeouts=scored.timeouts)
        if self.metrics is not None:
            self.metrics.increment("verifier_errors", scored.errors)
            self.metrics.increment("verifier_timeouts", scored.timeouts)
        return [
            _Group(e, p, g, scored.rewards[i * group : (i + 1) * group])
            for i, (e, p, g) in enumerate(zip(examples, prompts, generated, strict=True))
        ]

    # ---- evaluation -----------------------------------------------------------------------------
    def evaluate(self) -> float:
        """Held-out accuracy of the weights the engine holds now (NaN without a held-out set)."""
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
        scored = self.rewards.score(texts, [e.answer for e in self.eval_set])
        return sum(r >= 1.0 for r in scored.rewards) / len(self.eval_set)

    # ---- weights --------------------------------------------------------------------------------
    def update_policy(self, named: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        self.engine.update_weights(named, version=version)

    def update_teacher(self, named: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        assert self.teacher_client is not None
        self.teacher_client.update_weights(named, version=version)

    # ---- checkpoint state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def close(self) -> None:
        self.rewards.__exit__(None, None, None)
        for client in (self.engine, self.teacher_client):
            if client is not None:
                client.close()


def _rows(logprobs: torch.Tensor, responses: list[list[int]]) -> list[list[float]]:
    """Each response's log-probs from a zero-padded `[B, T]` tensor."""
    return [logprobs[i, : len(r)].tolist() for i, r in enumerate(responses)]

"""The self-distillation teacher: the same model family, prompted with privileged information.

The teacher sees the question plus the reference solution (through a configurable template) and
scores the student's sampled response tokens; no gradient flows through it. Modes:
- `live`: the current policy weights score (one extra no-grad forward).
- `frozen`: a snapshot of the initial policy, overwritten with the current policy every
  `sync_interval` steps (the reference code's default, interval 20).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from rlsd_contracts.config import TeacherSection
from rlsd_trainer.model.loading import encode_prompt
from rlsd_trainer.model.logprobs import PolicyScorer


def render_teacher_prompt(template: str, question: str, reference: str) -> str:
    """Fill `{question}` and `{reference}` (plain substitution, so braces in math text are safe)."""
    return template.replace("{question}", question).replace("{reference}", reference)


def truncate_reference(tokenizer: PreTrainedTokenizerBase, reference: str, max_tokens: int) -> str:
    ids = tokenizer(reference, add_special_tokens=False)["input_ids"]
    return reference if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def teacher_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, config: TeacherSection, question: str, reference: str
) -> list[int]:
    """The privileged prompt: the question and the (truncated) reference solution in the template."""
    reference = truncate_reference(tokenizer, reference, config.max_reference_tokens)
    return encode_prompt(tokenizer, render_teacher_prompt(config.template, question, reference))


def teacher_version_at(config: TeacherSection, step: int, version: int) -> int:
    """The policy version the learner's teacher holds at learner step `step`, given that it held
    `version` at a step in [version, step]: a live teacher is the policy (`step`); a frozen one
    takes the policy's weights each time `sync_interval` steps have passed since it last did
    (`Teacher.maybe_sync` runs every step), so `version + floor((step - version) / interval) *
    interval`."""
    if config.mode == "live":
        return step
    return version + (step - version) // config.sync_interval * config.sync_interval


class Teacher:
    """Scores colocated and keeps the frozen snapshot in sync (on every learner rank).

    `policy` and `snapshot` are `PolicyScorer`s (sharded alike across learner ranks); `snapshot`
    is given in `frozen` mode. A remote teacher (`serving.teacher_server`) scores instead when
    configured; this object still owns the weights it is sent and the sync schedule.
    """

    def __init__(self, config: TeacherSection, policy: PolicyScorer, snapshot: PolicyScorer | None) -> None:
        if (config.mode == "frozen") != (snapshot is not None):
            raise ValueError("a snapshot is needed exactly in frozen mode")
        self.config = config
        self.policy = policy
        self.snapshot = snapshot.eval().requires_grad_(False) if snapshot is not None else None
        self.last_sync_step = 0

    @property
    def scorer(self) -> PolicyScorer:
        return self.snapshot if self.snapshot is not None else self.policy

    def version(self, step: int) -> int:
        """The policy version of the weights it scores with at learner step `step`: the step of its
        last sync (frozen), or `step` (live: the policy itself). Teacher servers are labelled with it."""
        return self.last_sync_step if self.snapshot is not None else step

    def maybe_sync(self, step: int) -> bool:
        """Overwrite the frozen snapshot with the policy when `sync_interval` steps have passed."""
        if self.snapshot is None or step - self.last_sync_step < self.config.sync_interval:
            return False
        with torch.no_grad():
            for target, source in zip(self.snapshot.parameters(), self.policy.parameters(), strict=True):
                target.copy_(source)
        self.last_sync_step = step
        return True

    @torch.no_grad()
    def score(
        self,
        prompts: list[list[int]],
        responses: list[list[int]],
        group_size: int,
        chunk_tokens: int,
    ) -> torch.Tensor:
        """Teacher log-probs `[B, T]` of each response token after its group's privileged prompt.

        `prompts` holds one privileged prompt per group; `responses` the groups' responses in order.
        """
        was_training = self.scorer.training
        self.scorer.eval()
        try:
            return self.scorer.shared_prompt_logprobs(prompts, responses, group_size, chunk_tokens)
        finally:
            self.scorer.train(was_training)

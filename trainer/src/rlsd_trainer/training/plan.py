"""What the planner hands every learner rank for one step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepPlan:
    """One step's groups: prompts, responses, what generated them, advantages and teacher inputs.

    RLSD's `Delta_t = log P_T(y_t) - log P_S(y_t)` is meant to hold the effect of the privileged
    context only. A teacher server scores when the batch is made, with the weights it holds then
    (`teacher_version`); with `rollout.max_staleness` k >= 1 that is up to k steps before step s is
    learned, and those weights need not be the ones the learner's teacher holds at step s (a live
    teacher is policy s - k, not pi_s; a frozen one may have synced since). Taking Delta against the
    learner's pi_s would then add the policy's change over those steps to every evidence weight. So
    for exactly those batches the server also scores each response under the student's own prompt
    with the same weights, in the same request (`paired_student_logprobs`), and Delta is taken
    within that pair: teacher and student of one policy version, leaving the reference's effect
    alone. A batch whose teacher weights are the learner's teacher at step s (every batch at k = 0,
    a live teacher's first batch, a frozen teacher's batches that no sync separates from their step)
    keeps Delta against pi_s, exactly as a colocated teacher forms it (the frozen teacher's own gap
    to pi_s included, as RLSD's frozen mode defines it), so those runs are unchanged. Only RLSD
    gets the pair: OPSD's Delta is the reverse-KL gradient of the current student, which needs pi_s.
    """

    step: int  # the learner step (0-based) it is for
    prompts: list[list[int]]  # one per group
    responses: list[list[int]]  # G per group, in group order
    rollout_logprobs: list[list[float]]  # the behaviour policy's, per response token (NaN: unknown)
    policy_versions: list[int]  # per response: the policy version (learner step) that generated it
    advantages: list[float]  # one per response
    teacher_prompts: list[list[int]] | None  # one per group, when the teacher scores colocated
    teacher_logprobs: list[list[float]] | None  # one per response, when a teacher server scored
    values: dict[str, float] = field(default_factory=dict)  # the batch's metrics (rewards, lengths, ...)
    # When a teacher server scored: the policy version of its weights (learner step of their sync).
    teacher_version: int | None = None
    # One per response: the same weights' log-probs under the student's prompt, when those weights
    # are not the learner's teacher at `step` (see above).
    paired_student_logprobs: list[list[float]] | None = None
    # One per response, where the task allows it (the embedded task, whose reference is the one
    # solution the model was warmed up on): the index of its first wrong token, -1 for a correct
    # response (`algorithms.first_divergence`). For the teacher's diagnostics only. A plan pickled
    # into a checkpoint before this field existed reads it from this class default.
    first_error_tokens: list[int] | None = None

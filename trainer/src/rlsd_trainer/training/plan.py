"""What the planner hands every learner rank for one step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepPlan:
    """One step's groups: prompts, responses, what generated them, advantages and teacher inputs."""

    step: int  # the learner step (0-based) it is for
    prompts: list[list[int]]  # one per group
    responses: list[list[int]]  # G per group, in group order
    rollout_logprobs: list[list[float]]  # the behaviour policy's, per response token (NaN: unknown)
    policy_versions: list[int]  # per response: the policy version (learner step) that generated it
    advantages: list[float]  # one per response
    teacher_prompts: list[list[int]] | None  # one per group, when the teacher scores colocated
    teacher_logprobs: list[list[float]] | None  # one per response, when a teacher server scored
    values: dict[str, float] = field(default_factory=dict)  # the batch's metrics (rewards, lengths, ...)

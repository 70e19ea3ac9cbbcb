"""The learner's loss composition (`training.loss`): the importance ratio's percentiles, the
importance weight in the loss, RLSD's Delta within a same-version teacher pair, and the teacher's
diagnostics (Delta by the sign of A and by the place of a response's first error)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from tiny_models import tiny_model

from rlsd_contracts.config import AlgorithmSection, LambdaSchedule, TeacherSection
from rlsd_trainer.algorithms import truncated_importance_weights
from rlsd_trainer.model.logprobs import pack, shared_prompt_logprobs
from rlsd_trainer.training.distributed import DistContext
from rlsd_trainer.training.loss import (
    RATIO_BINS,
    RATIO_LOG_BOUND,
    LearnBatch,
    StepMetrics,
    micro_batch_loss,
    ratio_quantile,
)
from rlsd_trainer.training.teacher import Teacher, teacher_version_at

BIN_WIDTH = 2 * RATIO_LOG_BOUND / RATIO_BINS


def test_ratio_quantiles_from_the_histogram_within_a_bin() -> None:
    # 100 tokens: 98 with ratio 1, one with 2, one with 8. p50 = 1, p99 = 2 (the 99th of 100 sorted).
    ratios = torch.tensor([1.0] * 98 + [2.0, 8.0])
    metrics = StepMetrics()
    proximal = ratios.log().unsqueeze(0)
    weights = truncated_importance_weights(
        proximal, torch.zeros(1, 100), cap=4.0, weighted=torch.tensor([True])
    )
    mask = torch.ones(1, 100)
    metrics.add_importance(weights, torch.zeros(1, 100), proximal, mask, global_tokens=100.0)
    totals = metrics.reduce(DistContext())
    assert totals["importance_ratio_p50"] == pytest.approx(1.0, rel=BIN_WIDTH)
    assert totals["importance_ratio_p99"] == pytest.approx(2.0, rel=BIN_WIDTH)
    assert totals["importance_ratio_max"] == pytest.approx(8.0)
    assert totals["importance_capped_fraction"] == pytest.approx(0.01)  # 8 > cap 4
    # mean |log pi_prox - log pi_behav| = (ln 2 + ln 8) / 100
    assert totals["logprob_mismatch"] == pytest.approx((math.log(2) + math.log(8)) / 100, rel=1e-5)


def test_ratio_of_exactly_one_is_reported_as_one() -> None:
    counts = torch.zeros(RATIO_BINS, dtype=torch.float64)
    counts[RATIO_BINS // 2] = 5
    assert ratio_quantile(counts, 0.5) == 1.0


def test_no_known_ratio_is_nan() -> None:
    assert math.isnan(ratio_quantile(torch.zeros(RATIO_BINS, dtype=torch.float64), 0.5))


def test_masked_and_unknown_tokens_are_left_out_of_the_percentiles() -> None:
    proximal = torch.tensor([[math.log(3.0), math.log(3.0), 0.0]])
    behaviour = torch.tensor([[0.0, float("nan"), 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding
    metrics = StepMetrics()
    weights = truncated_importance_weights(proximal, behaviour, cap=2.0, weighted=torch.tensor([True]))
    metrics.add_importance(weights, behaviour, proximal, mask, global_tokens=2.0)
    totals = metrics.reduce(DistContext())
    assert totals["importance_ratio_p50"] == pytest.approx(3.0, rel=BIN_WIDTH)
    assert totals["importance_ratio_max"] == pytest.approx(3.0)


def test_a_weighted_responses_loss_is_scaled_by_its_importance_weight() -> None:
    """L = mean_t(w_t * L_t^clip): a response sampled with log-probs ln 2 below the learner's weighs
    twice its unweighted loss, and at most the cap (4) times it; an unweighted one keeps its loss.
    Leaving w_t out of the loss fails this."""
    algo = AlgorithmSection(name="grpo", importance_cap=4.0)
    packed = pack([[1, 2]], [[3, 4, 5]])
    mask = packed.response_mask
    learner = torch.full(mask.shape, -1.0, requires_grad=True)
    proximal = learner.detach()

    def loss(weighted: bool, behaviour_gap: float) -> float:
        batch = LearnBatch(
            packed=packed,
            advantages=torch.tensor([1.0]),
            rollout_logprobs=proximal - behaviour_gap,
            teacher_logprobs=None,
            weighted=torch.tensor([weighted]),
        )
        rows = torch.tensor([0])
        terms = micro_batch_loss(
            algo, 0, learner, torch.zeros(mask.shape), proximal, batch, rows, mask, 3.0, None, None
        )
        return float(terms.loss)

    plain = loss(False, math.log(2))
    assert plain == pytest.approx(-1.0)  # ratio 1, advantage 1: -mean_t(1)
    assert loss(True, math.log(2)) == pytest.approx(2 * plain)
    assert loss(True, math.log(8)) == pytest.approx(4 * plain)  # truncated at the cap
    assert loss(True, -math.log(2)) == pytest.approx(0.5 * plain)


# The question, and the question with a reference solution (the teacher's privileged prompt).
STUDENT_PROMPT, TEACHER_PROMPT = [5, 6, 7], [5, 6, 7, 40, 41, 42, 8]
RESPONSES = [[10, 11, 12, 13], [14, 15, 16], [17, 18, 19, 20], [21, 22]]


@torch.no_grad()
def _logprobs(model: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    return shared_prompt_logprobs(model.eval(), [prompt], RESPONSES, len(RESPONSES))


def test_a_same_version_pair_keeps_the_policy_lag_out_of_delta() -> None:
    """A teacher server scored with the weights of policy s - k (`lagged`), the learner is at pi_s.
    Against pi_s, Delta = log P_lagged(y | x, r) - log P_s(y | x) moves with pi_s: the policy's change
    over k steps lands in the evidence weights. Within the pair (the lagged weights' own
    log P(y | x) from the same request) Delta is the reference's effect whatever pi_s is, and equals
    the old Delta exactly when pi_s is those weights."""
    algo = AlgorithmSection(name="rlsd", eps_w=0.99, lam=LambdaSchedule(kind="constant", initial=1.0))
    lagged, current = tiny_model(seed=1), tiny_model(seed=1)
    with torch.no_grad():  # pi_s: k steps of learning later, made large enough to see
        for parameter in current.parameters():
            parameter.mul_(3.0)
    teacher = _logprobs(lagged, TEACHER_PROMPT)
    paired = _logprobs(lagged, STUDENT_PROMPT)
    packed = pack([STUDENT_PROMPT], RESPONSES, [0] * len(RESPONSES))
    mask = packed.response_mask
    tokens = float(mask.sum())

    def learned(policy: torch.nn.Module, pair: torch.Tensor | None) -> tuple[float, float]:
        """(delta_mean, loss) of the batch learned by `policy` (ratio 1: the loss is -mean_t A_t)."""
        proximal = _logprobs(policy, STUDENT_PROMPT)
        batch = LearnBatch(
            packed=packed,
            advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]),
            rollout_logprobs=proximal,
            teacher_logprobs=teacher,
            weighted=torch.zeros(4, dtype=torch.bool),
            paired_student_logprobs=pair,
        )
        metrics = StepMetrics()
        rows = torch.arange(4)
        terms = micro_batch_loss(
            algo, 0, proximal, torch.zeros(mask.shape), proximal, batch, rows, mask, tokens, None, metrics
        )
        return metrics.reduce(DistContext())["delta_mean"], float(terms.loss)

    reference_effect = float(((teacher - paired) * mask).sum() / tokens)
    assert reference_effect != 0.0
    # pi_s == the teacher's weights: both ways give the reference's effect alone, bit for bit.
    assert learned(lagged, None) == learned(lagged, paired) == learned(current, paired)
    assert learned(current, paired)[0] == pytest.approx(reference_effect, rel=1e-6)
    # pi_s moved on: the old Delta moves with it (by the policy's change), the pair's does not.
    policy_change = float(((paired - _logprobs(current, STUDENT_PROMPT)) * mask).sum() / tokens)
    assert abs(policy_change) > 0.01
    lagged_delta, lagged_loss = learned(current, None)
    assert lagged_delta == pytest.approx(reference_effect + policy_change, rel=1e-5)
    assert lagged_loss != pytest.approx(learned(current, paired)[1], rel=1e-3)


def _learn_in_micro_batches(
    batch: LearnBatch, student: torch.Tensor, micro: list[list[int]]
) -> dict[str, float]:
    """The step's metrics of `batch` learned in the micro-batches `micro` (response indices), with
    `student` (`[B, T]`) as the learner's log-probs."""
    algo = AlgorithmSection(name="rlsd")
    metrics = StepMetrics()
    tokens = float(batch.packed.response_mask.sum())
    for indices in micro:
        rows = torch.tensor(indices)
        mask = batch.packed.select(rows).response_mask
        logprobs = student[rows, : mask.shape[1]]
        micro_batch_loss(
            algo, 0, logprobs, torch.zeros(mask.shape), logprobs, batch, rows, mask, tokens, None, metrics
        )
    return metrics.reduce(DistContext())


def test_teacher_diagnostics_over_micro_batches_are_means_over_all_tokens() -> None:
    """Each subgroup's mean from two micro-batches (their sums and token counts added, then divided)
    is its mean over all its tokens, counted here token by token."""
    packed = pack([STUDENT_PROMPT], RESPONSES, [0] * len(RESPONSES))
    student = -0.1 * torch.arange(1.0, 17.0).view(4, 4)
    gain = [[0.3, -0.2, 0.1, 0.4], [0.5, -0.6, 0.2, 0.0], [-0.1, 0.7, -0.8, 0.9], [0.25, -0.35, 0.0, 0.0]]
    teacher = student + torch.tensor(gain)
    advantages = [1.0, -0.5, 0.0, -1.0]
    # Correct; wrong from its first token; wrong at token 2; cut off before its error (length 2).
    first_errors = [-1, 0, 2, 2]
    batch = LearnBatch(
        packed=packed,
        advantages=torch.tensor(advantages),
        rollout_logprobs=student,
        teacher_logprobs=teacher,
        weighted=torch.zeros(4, dtype=torch.bool),
        first_error_tokens=torch.tensor(first_errors),
    )
    totals = _learn_in_micro_batches(batch, student, [[0, 3], [1, 2]])

    delta = (teacher - student).tolist()
    real = [(i, t) for i, response in enumerate(RESPONSES) for t in range(len(response))]

    def mean(values: list[list[float]], chosen: Callable[[int, int], bool]) -> float:
        picked = [values[i][t] for i, t in real if chosen(i, t)]
        return sum(picked) / len(picked)

    sign = [math.copysign(1.0, a) if a else 0.0 for a in advantages]
    weights = [[math.exp(sign[i] * d) for d in row] for i, row in enumerate(delta)]
    expected = {
        "delta_mean_positive": mean(delta, lambda i, t: advantages[i] > 0),
        "delta_mean_negative": mean(delta, lambda i, t: advantages[i] < 0),
        "weight_mean_positive": mean(weights, lambda i, t: advantages[i] > 0),
        "weight_mean_negative": mean(weights, lambda i, t: advantages[i] < 0),
        "delta_correct": mean(delta, lambda i, t: first_errors[i] < 0),
        "delta_before_error": mean(delta, lambda i, t: 0 <= t < first_errors[i]),
        "delta_first_error": mean(delta, lambda i, t: t == first_errors[i]),
        "delta_after_error": mean(delta, lambda i, t: 0 <= first_errors[i] < t),
    }
    assert {key: totals[key] for key in expected} == pytest.approx(expected, rel=1e-6)
    assert totals["delta_mean"] == pytest.approx(mean(delta, lambda i, t: True), rel=1e-6)


def test_a_subgroup_without_tokens_is_nan_and_no_first_errors_log_no_error_split() -> None:
    packed = pack([STUDENT_PROMPT], RESPONSES, [0] * len(RESPONSES))
    student = torch.full((4, 4), -1.0)
    batch = LearnBatch(
        packed=packed,
        advantages=torch.tensor([0.0, -1.0, 0.0, -1.0]),  # no response with A > 0
        rollout_logprobs=student,
        teacher_logprobs=student + 0.5,
        weighted=torch.zeros(4, dtype=torch.bool),
    )
    totals = _learn_in_micro_batches(batch, student, [[0, 1], [2, 3]])
    assert math.isnan(totals["delta_mean_positive"]) and math.isnan(totals["weight_mean_positive"])
    assert totals["delta_mean_negative"] == pytest.approx(0.5)
    assert totals["weight_mean_negative"] == pytest.approx(math.exp(-0.5))
    assert not {"delta_correct", "delta_before_error", "delta_first_error", "delta_after_error"} & set(totals)


@pytest.mark.parametrize(("mode", "interval"), [("live", 20), ("frozen", 1), ("frozen", 3)])
def test_teacher_version_at_follows_the_sync_schedule(mode: str, interval: int) -> None:
    """The planner predicts the learner's teacher version at a later step from the version it sees
    now (to ask for the same-version pair only when they will differ); `Teacher.maybe_sync`, run
    every step, must agree with it from every starting point."""
    config = TeacherSection(mode=mode, sync_interval=interval)
    policy = torch.nn.Linear(2, 2)
    teacher = Teacher(config, policy, torch.nn.Linear(2, 2) if mode == "frozen" else None)  # type: ignore[arg-type]
    held = [teacher.version(0)]
    for step in range(1, 12):
        teacher.maybe_sync(step)
        held.append(teacher.version(step))
    assert held[-1] == (11 if mode == "live" else 11 // interval * interval)
    for start in range(12):
        for step in range(start, 12):
            assert teacher_version_at(config, step, held[start]) == held[step], (start, step)

"""The learner's loss composition (`training.loss`): the importance ratio's percentiles, and the
importance weight in the loss."""

from __future__ import annotations

import math

import pytest
import torch

from rlsd_contracts.config import AlgorithmSection
from rlsd_trainer.algorithms import truncated_importance_weights
from rlsd_trainer.model.logprobs import pack
from rlsd_trainer.training.distributed import DistContext
from rlsd_trainer.training.loss import (
    RATIO_BINS,
    RATIO_LOG_BOUND,
    LearnBatch,
    StepMetrics,
    micro_batch_loss,
    ratio_quantile,
)

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

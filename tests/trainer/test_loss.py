"""The learner's loss composition (`training.loss`): the importance ratio's percentiles."""

from __future__ import annotations

import math

import pytest
import torch

from rlsd_trainer.algorithms import truncated_importance_weights
from rlsd_trainer.training.distributed import DistContext
from rlsd_trainer.training.loss import RATIO_BINS, RATIO_LOG_BOUND, StepMetrics, ratio_quantile

BIN_WIDTH = 2 * RATIO_LOG_BOUND / RATIO_BINS


def test_ratio_quantiles_from_the_histogram_within_a_bin() -> None:
    # 100 tokens: 98 with ratio 1, one with 2, one with 8. p50 = 1, p99 = 2 (the 99th of 100 sorted).
    ratios = torch.tensor([1.0] * 98 + [2.0, 8.0])
    metrics = StepMetrics()
    proximal = ratios.log().unsqueeze(0)
    weights = truncated_importance_weights(proximal, torch.zeros(1, 100), cap=4.0, stale=torch.tensor([True]))
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
    weights = truncated_importance_weights(proximal, behaviour, cap=2.0, stale=torch.tensor([True]))
    metrics.add_importance(weights, behaviour, proximal, mask, global_tokens=2.0)
    totals = metrics.reduce(DistContext())
    assert totals["importance_ratio_p50"] == pytest.approx(3.0, rel=BIN_WIDTH)
    assert totals["importance_ratio_max"] == pytest.approx(3.0)

"""The RLSD / GRPO / OPSD tensor functions against hand-computed numbers (RLSD.md formulas).

Every expected value below is worked out by hand in the comments; the code under test computes in
float32, so comparisons use a small absolute tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlsd_contracts.config import AlgorithmSection, LambdaSchedule
from rlsd_trainer.algorithms import (
    advantage_sign_masks,
    clipped_policy_loss,
    error_position_masks,
    first_divergence,
    group_advantages,
    kl_penalty,
    lambda_at,
    masked_sum_and_count,
    needs_teacher,
    opsd_token_advantages,
    privileged_gain,
    relative_advantage_shift,
    rlsd_token_advantages,
    rlsd_weight_stats,
    rlsd_weights,
    token_advantages_for,
    token_mean,
    truncated_importance_weights,
)

ATOL = 2e-6


def _close(actual: torch.Tensor, expected: list | float, atol: float = ATOL) -> None:
    expected_tensor = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected_tensor, atol=atol, rtol=0.0)


# --------------------------------------------------------------------------------------------------
# group_advantages
# --------------------------------------------------------------------------------------------------


def test_group_advantages_binary_group_uses_unbiased_std() -> None:
    # rewards [1, 0, 0, 1]: mean 0.5, centred [+0.5, -0.5, -0.5, +0.5]
    # unbiased variance = (4 * 0.25) / (4 - 1) = 1/3, std = sqrt(1/3) = 0.577350
    # A = +-0.5 / (0.577350 + 1e-6) = +-0.866024 (the biased std 0.5 would give +-1.0)
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=4, eps=1e-6)
    magnitude = 0.5 / (math.sqrt(1.0 / 3.0) + 1e-6)
    assert magnitude == pytest.approx(0.866024, abs=1e-6)
    _close(adv, [magnitude, -magnitude, -magnitude, magnitude])


def test_group_advantages_equal_rewards_give_exactly_zero() -> None:
    # All-equal group: centred = 0 exactly, std = 0 -> 0 / (0 + eps) = 0 (no signal, no NaN).
    for value in (0.0, 1.0, 0.37):
        adv = group_advantages(torch.full((8,), value), group_size=8)
        assert torch.equal(adv, torch.zeros(8))


def test_group_advantages_groups_are_independent() -> None:
    # Group 1 = [1, 0] -> mean 0.5, unbiased std = sqrt(0.5) = 0.707107 -> A = +-0.5/0.707107 = +-0.707107
    # Group 2 = [3, 3] -> 0, 0
    # Group 3 = [0, 2] -> mean 1, unbiased std = sqrt(2) = 1.414214 -> A = -+1/1.414214 = -+0.707107
    # (eps = 1e-6 shifts these by < 1e-6)
    rewards = torch.tensor([1.0, 0.0, 3.0, 3.0, 0.0, 2.0])
    adv = group_advantages(rewards, group_size=2, eps=1e-6)
    s = 1.0 / math.sqrt(2.0)
    _close(adv, [s, -s, 0.0, 0.0, -s, s])
    # Changing one group's rewards must not change another group's advantages.
    other = group_advantages(torch.tensor([1.0, 0.0, 3.0, 3.0, 10.0, -5.0]), group_size=2, eps=1e-6)
    assert torch.equal(other[:4], adv[:4])


def test_group_advantages_bigger_group_by_hand() -> None:
    # [2, 0, 0, 0]: mean 0.5, centred [1.5, -0.5, -0.5, -0.5]
    # unbiased var = (2.25 + 3 * 0.25) / 3 = 1.0 -> std 1.0 -> A = [1.5, -0.5, -0.5, -0.5]
    adv = group_advantages(torch.tensor([2.0, 0.0, 0.0, 0.0]), group_size=4, eps=1e-9)
    _close(adv, [1.5, -0.5, -0.5, -0.5])


@pytest.mark.parametrize(
    ("rewards", "group_size"),
    [(torch.zeros(7), 4), (torch.zeros(2, 4), 4), (torch.zeros(5), 2)],
)
def test_group_advantages_bad_shape_raises(rewards: torch.Tensor, group_size: int) -> None:
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(rewards, group_size)


# --------------------------------------------------------------------------------------------------
# lambda_at
# --------------------------------------------------------------------------------------------------


def test_lambda_constant() -> None:
    schedule = LambdaSchedule(kind="constant", initial=0.3, decay_steps=5)
    assert [lambda_at(step, schedule) for step in (0, 1, 5, 60, 10_000)] == [0.3] * 5


def test_lambda_linear_with_warmup() -> None:
    schedule = LambdaSchedule(kind="linear", initial=0.5, final=0.0, warmup_steps=10, decay_steps=60)
    # steps 0..10: warm-up (step 10 is progress 0/60) -> 0.5
    for step in range(11):
        assert lambda_at(step, schedule) == pytest.approx(0.5, abs=1e-12)
    # step 25: progress (25 - 10)/60 = 0.25 -> 0.5 - 0.5 * 0.25 = 0.375
    assert lambda_at(25, schedule) == pytest.approx(0.375, abs=1e-12)
    # step 40: progress 30/60 = 0.5 -> 0.25
    assert lambda_at(40, schedule) == pytest.approx(0.25, abs=1e-12)
    # step 70: progress 60/60 = 1 -> 0.0; step 1000: progress capped at 1 -> 0.0
    assert lambda_at(70, schedule) == pytest.approx(0.0, abs=1e-12)
    assert lambda_at(1000, schedule) == pytest.approx(0.0, abs=1e-12)


def test_lambda_default_schedule_is_paper_default() -> None:
    schedule = LambdaSchedule()
    # 0.5 at step 0, linear to 0 over 60 steps: step 30 -> 0.25, step 60 -> 0.
    assert lambda_at(0, schedule) == pytest.approx(0.5)
    assert lambda_at(30, schedule) == pytest.approx(0.25)
    assert lambda_at(60, schedule) == pytest.approx(0.0, abs=1e-12)


def test_lambda_linear_nonzero_final() -> None:
    schedule = LambdaSchedule(kind="linear", initial=0.8, final=0.2, warmup_steps=0, decay_steps=10)
    # step 5: 0.8 + (0.2 - 0.8) * 5/10 = 0.8 - 0.3 = 0.5; step 10 and later: final 0.2
    assert lambda_at(0, schedule) == pytest.approx(0.8)
    assert lambda_at(5, schedule) == pytest.approx(0.5)
    assert lambda_at(10, schedule) == pytest.approx(0.2)
    assert lambda_at(500, schedule) == pytest.approx(0.2)


# --------------------------------------------------------------------------------------------------
# rlsd_token_advantages
# --------------------------------------------------------------------------------------------------

STUDENT = [-1.0, -2.0, -0.5, -3.0]
DELTAS = [0.3, 0.1, -0.5, -0.05]


def _teacher_student(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    student = torch.tensor([STUDENT] * rows)
    teacher = student + torch.tensor([DELTAS] * rows)
    return teacher, student


def test_rlsd_token_advantages_hand_values() -> None:
    teacher, student = _teacher_student(2)
    advantages = torch.tensor([1.0, -2.0])
    mask = torch.ones(2, 4)
    out = rlsd_token_advantages(advantages, teacher, student, lam=0.5, eps_w=0.2, mask=mask)
    # lam = 0.5, eps_w = 0.2: A_t = A * (0.5 + 0.5 * clip(w, 0.8, 1.2))
    # Row A = +1, w = exp(+Delta):
    #   Delta  0.3 : exp(0.3)  = 1.349859 -> clipped to 1.2  -> 0.5 + 0.6      = 1.1
    #   Delta  0.1 : exp(0.1)  = 1.105171 -> inside          -> 0.5 + 0.552585 = 1.052585
    #   Delta -0.5 : exp(-0.5) = 0.606531 -> clipped to 0.8  -> 0.5 + 0.4      = 0.9
    #   Delta -0.05: exp(-0.05)= 0.951229 -> inside          -> 0.5 + 0.475615 = 0.975615
    # Row A = -2, w = exp(-Delta):
    #   Delta  0.3 : exp(-0.3) = 0.740818 -> 0.8 -> -2 * 0.9                       = -1.8
    #   Delta  0.1 : exp(-0.1) = 0.904837 -> inside -> -2 * (0.5 + 0.452419)       = -1.904837
    #   Delta -0.5 : exp(0.5)  = 1.648721 -> 1.2 -> -2 * 1.1                       = -2.2
    #   Delta -0.05: exp(0.05) = 1.051271 -> inside -> -2 * (0.5 + 0.525636)       = -2.051271
    expected = [
        [1.1, 0.5 + 0.5 * math.exp(0.1), 0.9, 0.5 + 0.5 * math.exp(-0.05)],
        [-1.8, -2.0 * (0.5 + 0.5 * math.exp(-0.1)), -2.2, -2.0 * (0.5 + 0.5 * math.exp(0.05))],
    ]
    assert expected[0][1] == pytest.approx(1.052585, abs=1e-6)
    assert expected[1][3] == pytest.approx(-2.051271, abs=1e-6)
    _close(out, expected)


def test_rlsd_token_advantages_lam_one_eps_small() -> None:
    # lam = 1, eps_w = 0.05 -> A_t = A * clip(w, 0.95, 1.05)
    # A = 0.5, Delta = [0.3, 0.02, -0.5, -0.05]
    #   exp(0.3) -> 1.05 -> 0.525 ; exp(0.02) = 1.020201 -> 0.510101 ; exp(-0.5) -> 0.95 -> 0.475
    #   exp(-0.05) = 0.951229 -> inside -> 0.475615
    student = torch.tensor([STUDENT])
    teacher = student + torch.tensor([[0.3, 0.02, -0.5, -0.05]])
    out = rlsd_token_advantages(
        torch.tensor([0.5]), teacher, student, lam=1.0, eps_w=0.05, mask=torch.ones(1, 4)
    )
    _close(out, [[0.525, 0.5 * math.exp(0.02), 0.475, 0.5 * math.exp(-0.05)]])


def _random_case(seed: int, rows: int = 32, cols: int = 16) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    advantages = torch.randn(rows, generator=generator) * 2.0
    advantages[::5] = 0.0  # some groups without signal
    student = -torch.rand(rows, cols, generator=generator) * 10.0
    # Large Deltas (std 5) push most weights far outside the clip range.
    teacher = student + torch.randn(rows, cols, generator=generator) * 5.0
    lengths = torch.randint(1, cols + 1, (rows,), generator=generator)
    mask = (torch.arange(cols).unsqueeze(0) < lengths.unsqueeze(1)).float()
    return advantages, teacher, student, mask


@pytest.mark.parametrize("lam", [0.1, 0.5, 1.0])
def test_rlsd_token_advantages_preserve_sign(lam: float) -> None:
    advantages, teacher, student, mask = _random_case(seed=1234)
    assert mask.sum() > 200  # several hundred real tokens
    out = rlsd_token_advantages(advantages, teacher, student, lam=lam, eps_w=0.2, mask=mask)
    sign = torch.sign(advantages).unsqueeze(1).expand_as(out)
    real = mask.bool()
    # Every real token of a row with A != 0 is non-zero with the sign of A; A = 0 rows are 0.
    assert torch.equal(torch.sign(out[real]), sign[real])
    nonzero = out != 0
    assert torch.equal(torch.sign(out[nonzero]), sign[nonzero])


@pytest.mark.parametrize("lam", [0.25, 0.5, 1.0])
def test_rlsd_token_advantages_clip_bounds(lam: float) -> None:
    eps_w = 0.2
    advantages, teacher, student, mask = _random_case(seed=99)
    out = rlsd_token_advantages(advantages, teacher, student, lam=lam, eps_w=eps_w, mask=mask)
    informative = mask.bool() & (advantages != 0).unsqueeze(1)
    scale = (out.abs() / advantages.abs().unsqueeze(1))[informative]
    low = (1 - lam) + lam * (1 - eps_w)  # e.g. lam 0.5 -> 0.9
    high = (1 - lam) + lam * (1 + eps_w)  # e.g. lam 0.5 -> 1.1
    assert bool((scale >= low - 1e-6).all())
    assert bool((scale <= high + 1e-6).all())
    # With Deltas of std 5 both bounds are actually reached (the clip is active on both sides).
    assert float(scale.min()) == pytest.approx(low, abs=1e-6)
    assert float(scale.max()) == pytest.approx(high, abs=1e-6)


def test_rlsd_lam_zero_is_exactly_grpo() -> None:
    advantages, teacher, student, mask = _random_case(seed=7)
    out = rlsd_token_advantages(advantages, teacher, student, lam=0.0, eps_w=0.2, mask=mask)
    assert torch.equal(out, advantages.unsqueeze(1) * mask)
    grpo = token_advantages_for(AlgorithmSection(name="grpo"), 0, advantages, None, student, mask)
    assert torch.equal(out, grpo)


def test_rlsd_masked_tokens_are_zero_even_with_garbage() -> None:
    student = torch.tensor([[-1.0, -2.0, 5.0e30, -7.0], [-1.0, -0.5, -3.0, 1.0e6]])
    teacher = torch.tensor([[-1.2, -1.0, float("inf"), -1.0e30], [-0.5, float("inf"), -1.0e30, -4.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    advantages = torch.tensor([1.5, -1.0])
    out = rlsd_token_advantages(advantages, teacher, student, lam=0.5, eps_w=0.2, mask=mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[mask == 0], torch.zeros(5))
    # Real tokens still right: row 0 Delta = -0.2 -> exp(-0.2) = 0.818731 (inside) ->
    #   1.5 * (0.5 + 0.409365) = 1.364048 ; Delta = 1.0 -> exp(1) -> 1.2 -> 1.5 * 1.1 = 1.65
    # row 1 (A = -1) Delta = 0.5 -> exp(-0.5) -> 0.8 -> -1 * 0.9 = -0.9
    _close(out[0, :2], [1.5 * (0.5 + 0.5 * math.exp(-0.2)), 1.65])
    _close(out[1, 0], -0.9)


def test_rlsd_zero_advantage_rows_are_zero() -> None:
    teacher, student = _teacher_student(3)
    advantages = torch.tensor([0.0, 1.0, 0.0])
    out = rlsd_token_advantages(advantages, teacher, student, lam=0.5, eps_w=0.2, mask=torch.ones(3, 4))
    assert torch.equal(out[0], torch.zeros(4))
    assert torch.equal(out[2], torch.zeros(4))
    assert bool((out[1] > 0).all())


def test_rlsd_output_is_detached() -> None:
    teacher, student = _teacher_student(2)
    teacher.requires_grad_(True)
    student.requires_grad_(True)
    advantages = torch.tensor([1.0, -1.0], requires_grad=True)
    out = rlsd_token_advantages(advantages, teacher, student, lam=0.5, eps_w=0.2, mask=torch.ones(2, 4))
    assert out.requires_grad is False
    assert out.grad_fn is None
    assert opsd_token_advantages(teacher, student, torch.ones(2, 4)).requires_grad is False


# --------------------------------------------------------------------------------------------------
# OPSD and the algorithm dispatch
# --------------------------------------------------------------------------------------------------


def test_opsd_token_advantages_is_delta_times_mask() -> None:
    teacher, student = _teacher_student(1)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # Delta = [0.3, 0.1, -0.5, -0.05] -> masked: [0.3, 0.1, -0.5, 0]
    _close(opsd_token_advantages(teacher, student, mask), [[0.3, 0.1, -0.5, 0.0]])


def _dispatch_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    teacher, student = _teacher_student(2)
    advantages = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    return advantages, teacher, student, mask


def test_token_advantages_for_grpo_ignores_teacher() -> None:
    advantages, teacher, student, mask = _dispatch_inputs()
    config = AlgorithmSection(name="grpo")
    expected = [[1.0, 1.0, 1.0, 1.0], [-2.0, -2.0, 0.0, 0.0]]
    _close(token_advantages_for(config, 0, advantages, None, student, mask), expected)
    _close(token_advantages_for(config, 0, advantages, teacher * 100, student, mask), expected)
    assert not needs_teacher(config)


def test_token_advantages_for_rlsd_uses_lambda_at_step() -> None:
    advantages, teacher, student, mask = _dispatch_inputs()
    config = AlgorithmSection(name="rlsd")  # lam: 0.5 -> 0 over 60 steps, eps_w 0.2
    assert needs_teacher(config)
    at_0 = token_advantages_for(config, 0, advantages, teacher, student, mask)
    at_30 = token_advantages_for(config, 30, advantages, teacher, student, mask)
    at_60 = token_advantages_for(config, 60, advantages, teacher, student, mask)
    # step 30 -> lam 0.25. Row A = 1, Delta 0.3 -> w clipped 1.2 -> 0.75 + 0.25 * 1.2 = 1.05
    # Row A = -2, Delta 0.3 -> w = exp(-0.3) clipped 0.8 -> -2 * (0.75 + 0.2) = -1.9
    assert float(at_30[0, 0]) == pytest.approx(1.05, abs=ATOL)
    assert float(at_30[1, 0]) == pytest.approx(-1.9, abs=ATOL)
    # step 0 -> lam 0.5: 1.1 and -1.8 (see the hand values above)
    assert float(at_0[0, 0]) == pytest.approx(1.1, abs=ATOL)
    assert float(at_0[1, 0]) == pytest.approx(-1.8, abs=ATOL)
    torch.testing.assert_close(at_30, rlsd_token_advantages(advantages, teacher, student, 0.25, 0.2, mask))
    # step 60 -> lam 0: plain GRPO
    assert torch.equal(at_60, advantages.unsqueeze(1) * mask)


def test_token_advantages_for_rlsd_constant_lambda_and_eps() -> None:
    advantages, teacher, student, mask = _dispatch_inputs()
    config = AlgorithmSection(name="rlsd", eps_w=0.1, lam=LambdaSchedule(kind="constant", initial=1.0))
    out = token_advantages_for(config, 500, advantages, teacher, student, mask)
    # lam 1, eps_w 0.1: row A = 1, Delta 0.3 -> 1.1 ; Delta -0.05 -> exp(-0.05) = 0.951229 (inside)
    _close(out[0], [1.1, 1.1, 0.9, math.exp(-0.05)])


def test_token_advantages_for_opsd() -> None:
    advantages, teacher, student, mask = _dispatch_inputs()
    out = token_advantages_for(AlgorithmSection(name="opsd"), 3, advantages, teacher, student, mask)
    # Reward plays no role: Delta * mask
    _close(out, [[0.3, 0.1, -0.5, -0.05], [0.3, 0.1, 0.0, 0.0]])


def test_token_advantages_for_grpo_plus_opsd() -> None:
    advantages, teacher, student, mask = _dispatch_inputs()
    config = AlgorithmSection(name="grpo+opsd", opsd_coef=0.5)
    out = token_advantages_for(config, 0, advantages, teacher, student, mask)
    # A + 0.5 * Delta: row 0 = 1 + [0.15, 0.05, -0.25, -0.025]; row 1 = -2 + [0.15, 0.05], then 0
    _close(out, [[1.15, 1.05, 0.75, 0.975], [-1.85, -1.95, 0.0, 0.0]])


@pytest.mark.parametrize("name", ["rlsd", "opsd", "grpo+opsd"])
def test_token_advantages_for_needs_teacher(name: str) -> None:
    advantages, _, student, mask = _dispatch_inputs()
    with pytest.raises(ValueError, match="teacher"):
        token_advantages_for(AlgorithmSection(name=name), 0, advantages, None, student, mask)


# --------------------------------------------------------------------------------------------------
# clipped_policy_loss
# --------------------------------------------------------------------------------------------------


def _loss(log_ratio: float, advantage: float, **kwargs: float | None):
    logprobs = torch.tensor([[log_ratio - 1.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.0]], dtype=torch.float64)
    terms = clipped_policy_loss(logprobs, old, torch.tensor([[advantage]], dtype=torch.float64), **kwargs)
    (grad,) = torch.autograd.grad(terms.loss.sum(), logprobs)
    return float(terms.loss.detach()), float(terms.clipped), float(terms.ratio), float(grad)


def test_clipped_loss_inside_clip_range() -> None:
    # log ratio 0.1 -> rho = exp(0.1) = 1.105171, A = 2 -> L = -2 * 1.105171 = -2.210342
    # d L / d logp = -A * rho = -2.210342 (unclipped surrogate)
    loss, clipped, ratio, grad = _loss(0.1, 2.0)
    assert ratio == pytest.approx(1.105171, abs=1e-6)
    assert loss == pytest.approx(-2.210342, abs=1e-6)
    assert clipped == 0.0
    assert grad == pytest.approx(-2.210342, abs=1e-6)


def test_clipped_loss_above_clip_high_positive_advantage() -> None:
    # log ratio 0.3 -> rho = 1.349859 > 1 + 0.28; A = 1 -> L = -min(1.349859, 1.28) * 1 = -1.28
    loss, clipped, ratio, grad = _loss(0.3, 1.0)
    assert ratio == pytest.approx(1.349859, abs=1e-6)
    assert loss == pytest.approx(-1.28, abs=1e-12)
    assert clipped == 1.0
    assert grad == 0.0


def test_clipped_loss_below_clip_low_negative_advantage() -> None:
    # log ratio -0.5 -> rho = 0.606531 < 1 - 0.2; A = -1 ->
    # L = -min(0.606531 * -1, 0.8 * -1) = -min(-0.606531, -0.8) = 0.8
    loss, clipped, _, grad = _loss(-0.5, -1.0)
    assert loss == pytest.approx(0.8, abs=1e-12)
    assert clipped == 1.0
    assert grad == 0.0


def test_clipped_loss_pessimistic_sides_are_not_clipped() -> None:
    # A = -1, rho = exp(0.3) = 1.349859 (above 1.28 but below the dual clip 3):
    # L = -min(-1.349859, -1.28) = 1.349859, not clipped, gradient -A * rho = 1.349859
    loss, clipped, _, grad = _loss(0.3, -1.0)
    assert loss == pytest.approx(math.exp(0.3), abs=1e-9)
    assert clipped == 0.0
    assert grad == pytest.approx(math.exp(0.3), abs=1e-9)
    # A = +1, rho = exp(-0.5) = 0.606531 (below 0.8): L = -min(0.606531, 0.8) = -0.606531, not clipped
    loss, clipped, _, grad = _loss(-0.5, 1.0)
    assert loss == pytest.approx(-math.exp(-0.5), abs=1e-9)
    assert clipped == 0.0
    assert grad == pytest.approx(-math.exp(-0.5), abs=1e-9)


def test_clipped_loss_dual_clip() -> None:
    # log ratio 2 -> rho = exp(2) = 7.389056; A = -0.5
    # PPO part: L = -min(-0.5 * 7.389056, -0.5 * 1.28) = 3.694528
    # dual clip c = 3: L = min(3.694528, -3 * -0.5 = 1.5) = 1.5 = c * |A|; gradient 0, flagged clipped
    loss, clipped, ratio, grad = _loss(2.0, -0.5, dual_clip=3.0)
    assert ratio == pytest.approx(7.389056, abs=1e-6)
    assert loss == pytest.approx(1.5, abs=1e-12)
    assert clipped == 1.0
    assert grad == 0.0
    # Dual clip does not touch positive advantages: A = +0.5 -> L = -0.5 * 1.28 = -0.64 (normal clip)
    loss, clipped, _, _ = _loss(2.0, 0.5, dual_clip=3.0)
    assert loss == pytest.approx(-0.64, abs=1e-12)
    assert clipped == 1.0


def test_clipped_loss_without_dual_clip() -> None:
    # Same token, dual_clip=None: L = 0.5 * 7.389056 = 3.694528, unclipped, gradient -A * rho = 3.694528
    loss, clipped, _, grad = _loss(2.0, -0.5, dual_clip=None)
    assert loss == pytest.approx(0.5 * math.exp(2.0), abs=1e-9)
    assert clipped == 0.0
    assert grad == pytest.approx(0.5 * math.exp(2.0), abs=1e-9)


def test_clipped_loss_asymmetric_clip() -> None:
    # rho = 1.25 with A = +1: 1.25 < 1 + clip_high (1.28) -> not clipped, L = -1.25
    # (a symmetric 0.2 clip would have clipped it at 1.2)
    loss, clipped, _, grad = _loss(math.log(1.25), 1.0, clip_low=0.2, clip_high=0.28)
    assert loss == pytest.approx(-1.25, abs=1e-12)
    assert clipped == 0.0
    assert grad == pytest.approx(-1.25, abs=1e-12)
    # rho = 0.79 with A = -1: 0.79 < 1 - clip_low (0.8) -> clipped, L = 0.8 * 1 = 0.8
    loss, clipped, _, grad = _loss(math.log(0.79), -1.0, clip_low=0.2, clip_high=0.28)
    assert loss == pytest.approx(0.8, abs=1e-12)
    assert clipped == 1.0
    assert grad == 0.0
    # rho = 1.25 with A = +1 but clip_high = 0.2 (symmetric): clipped to 1.2
    loss, clipped, _, _ = _loss(math.log(1.25), 1.0, clip_low=0.2, clip_high=0.2)
    assert loss == pytest.approx(-1.2, abs=1e-12)
    assert clipped == 1.0


def test_clipped_loss_batched_matches_scalar_cases() -> None:
    log_ratio = torch.tensor([[0.1, 0.3, -0.5], [2.0, 0.0, math.log(1.25)]], dtype=torch.float64)
    adv = torch.tensor([[2.0, 1.0, -1.0], [-0.5, -3.0, 1.0]], dtype=torch.float64)
    terms = clipped_policy_loss(log_ratio, torch.zeros_like(log_ratio), adv)
    # [-2 * 1.105171, -1.28, 0.8], [1.5, -(-3) * 1 = 3, -1.25]
    expected = torch.tensor([[-2.0 * math.exp(0.1), -1.28, 0.8], [1.5, 3.0, -1.25]], dtype=torch.float64)
    torch.testing.assert_close(terms.loss, expected, atol=1e-9, rtol=0)
    assert torch.equal(terms.clipped, torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(terms.ratio, log_ratio.exp())


# --------------------------------------------------------------------------------------------------
# token_mean, kl_penalty, rlsd_weight_stats
# --------------------------------------------------------------------------------------------------


def test_token_mean_by_hand() -> None:
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # (1 + 2 + 3 + 4 + 5) / 10 = 1.5 (divides by the given global count, not by the 5 local tokens)
    assert float(token_mean(values, mask, 10.0)) == pytest.approx(1.5)


def test_token_mean_micro_batches_sum_to_global_mean() -> None:
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(6, 5, generator=generator)
    lengths = torch.tensor([5, 1, 3, 2, 4, 5])
    mask = (torch.arange(5).unsqueeze(0) < lengths.unsqueeze(1)).float()
    total = float(mask.sum())  # 20 tokens in the global batch
    first = token_mean(values[:2], mask[:2], total)
    second = token_mean(values[2:], mask[2:], total)
    whole = token_mean(values, mask, total)
    torch.testing.assert_close(first + second, whole)
    torch.testing.assert_close(whole, (values * mask).sum() / 20.0)
    # Averaging per-micro-batch means (the wrong aggregation) differs here.
    wrong = (token_mean(values[:2], mask[:2], 6.0) + token_mean(values[2:], mask[2:], 14.0)) / 2
    assert not torch.allclose(wrong, whole)


def test_kl_penalty() -> None:
    logprobs = torch.tensor([-1.0, -2.0, -0.3, -1.0])
    ref = torch.tensor([-1.0, -1.5, -0.8, -1.0])
    kl = kl_penalty(logprobs, ref)
    # r = ref - logp = [0, 0.5, -0.5, 0]
    # k3(0) = 0; k3(0.5) = exp(0.5) - 0.5 - 1 = 0.148721; k3(-0.5) = exp(-0.5) + 0.5 - 1 = 0.106531
    _close(kl, [0.0, math.exp(0.5) - 1.5, math.exp(-0.5) - 0.5, 0.0])
    assert float(kl[1]) == pytest.approx(0.148721, abs=1e-6)
    assert torch.equal(kl_penalty(logprobs, logprobs), torch.zeros(4))
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(100, generator=generator), torch.randn(100, generator=generator)
    assert bool((kl_penalty(a, b) > 0).all())


def test_rlsd_weight_stats_by_hand() -> None:
    student = torch.full((3, 3), -1.0)
    deltas = torch.tensor([[0.3, 0.1, -0.5], [-0.1, 0.15, 0.0], [1.0, 0.0, 0.0]])
    teacher = student + deltas
    advantages = torch.tensor([1.0, -1.0, 0.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    stats = rlsd_weight_stats(advantages, teacher, student, eps_w=0.2, mask=mask)
    # mean Delta over the 5 real tokens: (0.3 + 0.1 - 0.1 + 0.15 + 1.0) / 5 = 1.45 / 5 = 0.29
    assert stats.mean_delta == pytest.approx(0.29, abs=1e-6)
    # weights: row A=+1: exp(0.3) = 1.349859, exp(0.1) = 1.105171
    #          row A=-1: exp(0.1) = 1.105171, exp(-0.15) = 0.860708 ; row A=0: 1
    # mean = (1.349859 + 1.105171 + 1.105171 + 0.860708 + 1) / 5 = 5.420909 / 5 = 1.084182
    expected_weight = (math.exp(0.3) + 2 * math.exp(0.1) + math.exp(-0.15) + 1.0) / 5
    assert expected_weight == pytest.approx(1.084182, abs=1e-6)
    assert stats.mean_weight == pytest.approx(expected_weight, abs=1e-6)
    # Clipped share over informative tokens (A != 0, real): only exp(0.3) is outside [0.8, 1.2];
    # the masked Delta = -0.5 and the A = 0 row's Delta = 1.0 do not count -> 1 / 4 = 0.25
    assert stats.clipped_fraction == pytest.approx(0.25, abs=1e-9)


# ---- truncated importance weights (decoupled PPO with TIS) ------------------------------------------
def test_truncated_importance_weights_by_hand() -> None:
    # Row 0 is stale: log-ratios 0, ln 1.5, ln 3 -> ratios 1, 1.5, 3; cap 2 -> weights 1, 1.5, 2.
    # Row 1 is fresh: weights are exactly 1 whatever the ratio (ln 0.5 -> 0.5, ln 4 -> 4).
    proximal = torch.tensor([[0.0, math.log(1.5), math.log(3.0)], [math.log(0.5), math.log(4.0), 0.0]])
    behaviour = torch.zeros(2, 3)
    out = truncated_importance_weights(proximal, behaviour, cap=2.0, weighted=torch.tensor([True, False]))
    assert torch.allclose(out.weight, torch.tensor([[1.0, 1.5, 2.0], [1.0, 1.0, 1.0]]), atol=ATOL)
    assert torch.allclose(out.ratio, torch.tensor([[1.0, 1.5, 3.0], [0.5, 4.0, 1.0]]), atol=ATOL)
    # Only a stale token above the cap counts as capped.
    assert out.capped.tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]


def test_truncated_importance_weights_unknown_behaviour_logprob_is_weight_one() -> None:
    # The engine could not report the log-prob (NaN): no correction for that token.
    proximal = torch.tensor([[-1.0, -2.0]])
    behaviour = torch.tensor([[float("nan"), -2.5]])  # second: ratio e^0.5 = 1.6487
    out = truncated_importance_weights(proximal, behaviour, cap=2.0, weighted=torch.tensor([True]))
    assert out.weight[0, 0] == 1.0
    assert out.weight[0, 1] == pytest.approx(math.exp(0.5), abs=ATOL)


def test_truncated_importance_weights_carry_no_gradient() -> None:
    proximal = torch.tensor([[0.3, -0.2]], requires_grad=True)
    out = truncated_importance_weights(proximal, torch.zeros(1, 2), cap=2.0, weighted=torch.tensor([True]))
    assert not out.weight.requires_grad


def test_truncated_importance_weight_scales_the_clipped_surrogate() -> None:
    # A stale token with A = 1, pi/pi_prox = 1 (first epoch), pi_prox/pi_behav = 1.5: L = -1.5.
    logprobs = torch.tensor([[-1.0]], requires_grad=True)
    terms = clipped_policy_loss(logprobs, logprobs.detach(), torch.tensor([[1.0]]))
    weights = truncated_importance_weights(
        logprobs, torch.tensor([[-1.0 - math.log(1.5)]]), cap=2.0, weighted=torch.tensor([True])
    )
    loss = (terms.loss * weights.weight).sum()
    loss.backward()
    assert float(loss.detach()) == pytest.approx(-1.5, abs=ATOL)
    # d/dlogp of -w * exp(logp - logp_old) * A at logp = logp_old: -w * A = -1.5.
    assert float(logprobs.grad) == pytest.approx(-1.5, abs=ATOL)


# --------------------------------------------------------------------------------------------------
# the teacher's diagnostics: first divergence, token subgroups and their sums
# --------------------------------------------------------------------------------------------------

REFERENCE = [5, 6, 7, 2]  # a solution's tokens, then EOS (2)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ([5, 6, 9, 2], 2),  # a wrong token
        ([9, 6, 7, 2], 0),  # wrong from the first token
        ([5, 6, 2], 2),  # stops early: EOS where the reference goes on
        ([5, 6, 7, 8], 3),  # runs long: another token where the reference has EOS
        ([5, 6, 7, 2, 4], 4),  # past the reference's end
        ([5, 6], 2),  # cut off before leaving it: no wrong token, e = len(response)
        ([5, 6, 7, 2], 4),  # the reference itself
        ([], 0),
    ],
)
def test_first_divergence(response: list[int], expected: int) -> None:
    assert first_divergence(response, REFERENCE) == expected


def test_masked_sum_and_count_leaves_padding_out() -> None:
    values = torch.tensor([[0.5, -1.5, float("inf")], [2.0, float("nan"), float("-inf")]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # 0.5 - 1.5 + 2.0 = 1.0 over 3 tokens; the inf/nan padding never enters.
    assert masked_sum_and_count(values, mask) == (1.0, 3.0)
    assert masked_sum_and_count(values, torch.zeros(2, 3)) == (0.0, 0.0)


def test_advantage_sign_masks_and_their_means_by_hand() -> None:
    advantages = torch.tensor([0.5, -1.0, 0.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    masks = advantage_sign_masks(advantages, mask)
    _close(masks["positive"], [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    _close(masks["negative"], [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # A = 0: neither
    student = torch.full((3, 3), -1.0)
    # Padding holds garbage: an infinite teacher log-prob and a NaN one.
    deltas = torch.tensor([[0.2, -0.4, float("inf")], [1.0, float("nan"), 0.0], [0.3, 0.3, 0.3]])
    teacher = student + deltas
    delta = privileged_gain(teacher, student)
    weights = rlsd_weights(advantages, teacher, student)
    # A > 0: Delta (0.2 - 0.4) / 2 = -0.1; w = exp(+Delta): (exp(0.2) + exp(-0.4)) / 2
    #        = (1.221403 + 0.670320) / 2 = 0.945861
    total, tokens = masked_sum_and_count(delta, masks["positive"])
    assert (tokens, total / tokens) == (2.0, pytest.approx(-0.1, abs=ATOL))
    total, tokens = masked_sum_and_count(weights, masks["positive"])
    assert total / tokens == pytest.approx(0.945861, abs=1e-6)
    # A < 0: one token, Delta 1.0; w = exp(-Delta) = exp(-1) = 0.367879
    total, tokens = masked_sum_and_count(delta, masks["negative"])
    assert (tokens, total) == (1.0, pytest.approx(1.0, abs=ATOL))
    total, tokens = masked_sum_and_count(weights, masks["negative"])
    assert total == pytest.approx(0.367879, abs=1e-6)


def test_error_position_masks_and_their_means_by_hand() -> None:
    # A correct response (-1), one wrong from its first token (0), one wrong at token 2, and one cut
    # off before its error (e = 3 = its length: every token is before the error).
    first_errors = torch.tensor([-1, 0, 2, 3])
    mask = torch.tensor(
        [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]]
    )
    masks = error_position_masks(first_errors, mask)
    zeros = [0.0] * 4
    _close(masks["correct"], [[1.0, 1.0, 1.0, 0.0], zeros, zeros, zeros])
    _close(masks["before_error"], [zeros, zeros, [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    _close(masks["first_error"], [zeros, [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], zeros])
    _close(masks["after_error"], [zeros, [0.0, 1.0, 1.0, 1.0], zeros, zeros])  # row 2's t = 3 is padding
    delta = torch.tensor(
        [[0.1, 0.2, 0.3, 9.0], [-2.0, 0.5, 0.5, 0.5], [0.4, 0.2, -1.0, 9.0], [0.6, 0.0, 0.3, 9.0]]
    )
    means = {}
    for place, tokens in masks.items():
        total, count = masked_sum_and_count(delta, tokens)
        means[place] = total / count
    # correct: (0.1 + 0.2 + 0.3) / 3 = 0.2; before: (0.4 + 0.2 + 0.6 + 0.0 + 0.3) / 5 = 0.3;
    # first: (-2.0 - 1.0) / 2 = -1.5; after: (0.5 + 0.5 + 0.5) / 3 = 0.5
    assert means == pytest.approx(
        {"correct": 0.2, "before_error": 0.3, "first_error": -1.5, "after_error": 0.5}, abs=ATOL
    )


def test_relative_advantage_shift_is_lambda_times_the_clipped_weights_distance_from_one() -> None:
    advantages = torch.tensor([2.0, -1.0, 0.0])
    # Delta 0.5 (clipped to 1.2 for A > 0), -0.05 (w = e^0.05 for A < 0, inside the clip), anything for A = 0
    teacher = torch.tensor([[0.5, 0.0], [-0.05, 0.0], [3.0, 0.0]])
    student = torch.zeros(3, 2)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    token_adv = rlsd_token_advantages(advantages, teacher, student, 0.5, 0.2, mask)
    shift, tokens = relative_advantage_shift(token_adv, advantages, mask)
    assert tokens.tolist() == [[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]
    assert shift[0, 0].item() == pytest.approx(0.5 * 0.2)
    assert shift[1, 0].item() == pytest.approx(0.5 * (math.exp(0.05) - 1), rel=1e-5)
    assert shift[1, 1].item() == pytest.approx(0.0)
    grpo = token_advantages_for(AlgorithmSection(name="grpo"), 0, advantages, None, student, mask)
    assert float((relative_advantage_shift(grpo, advantages, mask)[0] * tokens).sum()) == 0.0

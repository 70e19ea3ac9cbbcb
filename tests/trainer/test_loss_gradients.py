"""Gradients of the surrogate loss, the KL penalty and the chunked log-prob computation."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import padded_logprobs, tiny_model

from rlsd_trainer.algorithms import clipped_policy_loss, kl_penalty, rlsd_token_advantages, token_mean
from rlsd_trainer.model.logprobs import _ChunkedTokenLogprobs, pack, response_logprobs

F64 = torch.float64

# Log-ratios chosen well away from every kink of the surrogate: 1 - 0.2 = 0.8 (log -0.2231),
# 1 + 0.28 = 1.28 (log 0.2469), the dual clip at ratio 3 (log 1.0986), and sign changes of A.
SAFE_LOG_RATIOS = [-0.6, -0.35, -0.1, 0.0, 0.05, 0.15, 0.4, 0.8, 1.5]


def _rlsd_setup(seed: int = 0, rows: int = 6, cols: int = 7) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    advantages = torch.randn(rows, generator=generator, dtype=F64)
    advantages[2] = 0.0
    student = -torch.rand(rows, cols, generator=generator, dtype=F64) * 4.0
    teacher = student + torch.randn(rows, cols, generator=generator, dtype=F64)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])[:rows]
    mask = (torch.arange(cols).unsqueeze(0) < lengths.unsqueeze(1)).to(F64)
    picks = torch.randint(0, len(SAFE_LOG_RATIOS), (rows, cols), generator=generator)
    log_ratio = torch.tensor(SAFE_LOG_RATIOS, dtype=F64)[picks]
    old = -torch.rand(rows, cols, generator=generator, dtype=F64) * 3.0
    token_adv = rlsd_token_advantages(advantages, teacher, student, lam=0.5, eps_w=0.2, mask=mask).to(F64)
    return {
        "advantages": advantages,
        "teacher": teacher,
        "student": student,
        "mask": mask,
        "old": old,
        "logprobs": old + log_ratio,
        "token_adv": token_adv,
    }


def test_gradcheck_clipped_loss_with_rlsd_advantages() -> None:
    case = _rlsd_setup()
    mask, old, token_adv = case["mask"], case["old"], case["token_adv"]
    total = float(mask.sum())
    # The chosen points exercise every branch: inside, clipped high / low, and the dual clip.
    terms = clipped_policy_loss(case["logprobs"], old, token_adv)
    real = mask.bool() & (token_adv != 0)
    assert 0 < int(terms.clipped[real].sum()) < int(real.sum())

    def loss_fn(logprobs: torch.Tensor) -> torch.Tensor:
        return token_mean(clipped_policy_loss(logprobs, old, token_adv).loss, mask, total)

    inputs = case["logprobs"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss_fn, (inputs,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dual_clip", [3.0, None])
def test_gradcheck_clipped_loss_asymmetric_and_dual_none(dual_clip: float | None) -> None:
    case = _rlsd_setup(seed=5)
    mask, old, token_adv = case["mask"], case["old"], case["token_adv"]

    def loss_fn(logprobs: torch.Tensor) -> torch.Tensor:
        terms = clipped_policy_loss(
            logprobs, old, token_adv, clip_low=0.2, clip_high=0.28, dual_clip=dual_clip
        )
        return token_mean(terms.loss, mask, 17.0)

    inputs = case["logprobs"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss_fn, (inputs,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_on_policy_gradient_is_minus_advantage_over_tokens() -> None:
    case = _rlsd_setup(seed=1)
    mask, token_adv = case["mask"], case["token_adv"]
    total = 40.0  # a global token count larger than this micro-batch's
    logprobs = case["logprobs"].clone().requires_grad_(True)
    # old = logprobs.detach(): rho = 1 everywhere (inside the clip range), so
    # d/d logp_t [ -A_t * exp(logp_t - old_t) * mask_t / N ] = -A_t * mask_t / N
    loss = token_mean(clipped_policy_loss(logprobs, logprobs.detach(), token_adv).loss, mask, total)
    loss.backward()
    expected = -token_adv * mask / total
    torch.testing.assert_close(logprobs.grad, expected, atol=1e-12, rtol=1e-12)
    assert bool((logprobs.grad[mask == 0] == 0).all())
    assert bool((logprobs.grad[(mask == 1) & (token_adv != 0)] != 0).all())


def test_clipped_tokens_get_exactly_zero_gradient() -> None:
    # Columns: A>0 & rho 1.5 (clip high) | A<0 & rho 0.5 (clip low) | A<0 & rho 5 (dual clip) |
    #          A<0 & rho 1.5 (pessimistic side, not clipped) | A>0 & rho 1.1 (inside) | masked token
    log_ratio = torch.tensor(
        [[math.log(1.5), math.log(0.5), math.log(5.0), math.log(1.5), math.log(1.1), 3.0]], dtype=F64
    )
    adv = torch.tensor([[1.0, -1.0, -2.0, -1.0, 0.5, 1.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]], dtype=F64)
    old = torch.full((1, 6), -2.0, dtype=F64)
    logprobs = (old + log_ratio).requires_grad_(True)
    terms = clipped_policy_loss(logprobs, old, adv)
    token_mean(terms.loss, mask, 5.0).backward()
    grad = logprobs.grad[0]
    assert terms.clipped[0, :3].tolist() == [1.0, 1.0, 1.0]
    assert terms.clipped[0, 3:5].tolist() == [0.0, 0.0]
    assert grad[0].item() == 0.0 and grad[1].item() == 0.0 and grad[2].item() == 0.0
    # Unclipped tokens: d/dlogp(-A * rho)/N = -A * rho / N: -(-1) * 1.5 / 5 = 0.3; -0.5 * 1.1 / 5 = -0.11
    assert grad[3].item() == pytest.approx(0.3, abs=1e-12)
    assert grad[4].item() == pytest.approx(-0.11, abs=1e-12)
    assert grad[5].item() == 0.0


def test_no_gradient_into_teacher_or_student_logprobs() -> None:
    case = _rlsd_setup(seed=2)
    mask = case["mask"]
    teacher = case["teacher"].clone().requires_grad_(True)
    student = case["student"].clone().requires_grad_(True)
    advantages = case["advantages"].clone().requires_grad_(True)
    token_adv = rlsd_token_advantages(advantages, teacher, student, lam=0.5, eps_w=0.2, mask=mask)
    logprobs = case["logprobs"].clone().requires_grad_(True)
    token_mean(clipped_policy_loss(logprobs, case["old"], token_adv).loss, mask, 30.0).backward()
    assert teacher.grad is None
    assert student.grad is None
    assert advantages.grad is None
    assert logprobs.grad is not None and bool(logprobs.grad.abs().sum() > 0)


def test_student_logprobs_that_are_the_policy_logprobs_add_no_gradient() -> None:
    # In the learner the student log-probs are the policy's own log-probs; the advantage must act as
    # a constant, so the gradient is still exactly -A_t * mask / N (on-policy, rho = 1).
    case = _rlsd_setup(seed=3)
    mask = case["mask"]
    logprobs = case["student"].clone().requires_grad_(True)
    token_adv = rlsd_token_advantages(case["advantages"], case["teacher"], logprobs, 1.0, 0.2, mask)
    loss = token_mean(clipped_policy_loss(logprobs, logprobs.detach(), token_adv).loss, mask, 25.0)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, -token_adv.to(F64) * mask / 25.0, atol=1e-12, rtol=1e-12)


def test_kl_penalty_gradcheck() -> None:
    generator = torch.Generator().manual_seed(4)
    ref = torch.randn(3, 5, generator=generator, dtype=F64)
    logprobs = (ref + torch.randn(3, 5, generator=generator, dtype=F64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda lp: kl_penalty(lp, ref), (logprobs,), eps=1e-6, atol=1e-7)
    # Analytic: d/dlogp [exp(r) - r - 1] with r = ref - logp is 1 - exp(r).
    (grad,) = torch.autograd.grad(kl_penalty(logprobs, ref).sum(), logprobs)
    torch.testing.assert_close(grad, 1.0 - torch.exp(ref - logprobs.detach()))
    # No gradient into the reference.
    ref_leaf = ref.clone().requires_grad_(True)
    kl_penalty(logprobs, ref_leaf).sum().backward()
    assert ref_leaf.grad is None


# --------------------------------------------------------------------------------------------------
# Packed, chunked response log-probs against the padded full-logits computation
# --------------------------------------------------------------------------------------------------


def _tiny_model(tie: bool, seed: int = 0) -> torch.nn.Module:
    return tiny_model(seed, tie).double()


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [20], [30, 31]]
RESPONSES = [[40, 41, 42, 43], [50], [60, 61, 62, 63, 64, 65], [70, 71]]


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunk_tokens", [3, 1000])
def test_chunked_logprobs_match_naive_values_and_gradients(tie: bool, chunk_tokens: int) -> None:
    model = _tiny_model(tie)
    assert next(model.parameters()).dtype == F64
    weights = torch.linspace(0.5, 1.5, 6, dtype=F64)  # a weighted sum makes the check position-aware

    batch = pack(PROMPTS, RESPONSES)
    naive_lp, naive_ent = padded_logprobs(model, PROMPTS, RESPONSES)
    (naive_lp * batch.response_mask * weights).sum().backward()
    naive_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    logprobs, entropy = response_logprobs(model, batch, chunk_tokens=chunk_tokens, with_entropy=True)
    assert logprobs.shape == (4, 6) and entropy is not None
    # The projection runs in float32 inside response_logprobs, hence float32-level tolerances.
    torch.testing.assert_close(logprobs.double(), naive_lp.detach(), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), naive_ent.detach(), atol=2e-5, rtol=1e-5)
    # Padding positions are exactly 0 (row 1 has one real token, row 3 two, row 0 four).
    padding = batch.response_mask == 0
    assert int(padding.sum()) == 4 * 6 - 13
    assert bool((logprobs[padding] == 0).all()) and bool((entropy[padding] == 0).all())
    assert bool((logprobs[~padding] < 0).all())

    (logprobs.double() * batch.response_mask * weights).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, naive_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert any(float(g.abs().sum()) > 0 for g in naive_grads.values())


def test_chunked_logprobs_without_grad_match_with_grad() -> None:
    model = _tiny_model(tie=False)
    batch = pack(PROMPTS, RESPONSES)
    with torch.no_grad():
        plain, entropy = response_logprobs(model, batch, chunk_tokens=4)
    assert entropy is None
    chunked, _ = response_logprobs(model, batch, chunk_tokens=5)
    torch.testing.assert_close(plain, chunked.detach(), atol=1e-6, rtol=1e-6)
    naive_lp, _ = padded_logprobs(model, PROMPTS, RESPONSES)
    torch.testing.assert_close(plain.double(), naive_lp.detach(), atol=2e-5, rtol=1e-5)


def test_packed_micro_batches_equal_the_padded_path() -> None:
    """Long-tailed rows, packed back to back (all at once, or cut into micro-batches with
    `PackedBatch.select` as the learner does): the padded path's log-probs, entropies and gradients."""
    model = _tiny_model(tie=True, seed=4)
    generator = torch.Generator().manual_seed(5)
    prompt_lengths = torch.randint(1, 9, (12,), generator=generator).tolist()
    response_lengths = [1, 2, 3, 3, 4, 5, 7, 9, 12, 17, 25, 31]
    prompts = [torch.randint(2, 97, (n,), generator=generator).tolist() for n in prompt_lengths]
    responses = [torch.randint(2, 97, (n,), generator=generator).tolist() for n in response_lengths]
    batch = pack(prompts, responses)
    assert len(batch.input_ids) == sum(prompt_lengths) + sum(response_lengths)  # no padding
    weights = torch.randn(batch.response_mask.shape, generator=generator, dtype=F64)

    def objective(logprobs: torch.Tensor, entropy: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        width = logprobs.shape[1]
        return ((logprobs.double() - 0.3 * entropy.double()) * weights[rows, :width]).sum()

    every = torch.arange(12)
    padded_lp, padded_ent = padded_logprobs(model, prompts, responses)
    objective(padded_lp, padded_ent, every).backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    for micro_batches in (
        [every],
        [torch.tensor([11, 10]), torch.tensor([9, 3, 0, 7]), torch.tensor([1, 2, 4, 5, 6, 8])],
    ):
        model.zero_grad(set_to_none=True)
        for rows in micro_batches:
            micro = batch.select(rows)
            logprobs, entropy = response_logprobs(model, micro, chunk_tokens=8, with_entropy=True)
            width = logprobs.shape[1]
            torch.testing.assert_close(
                logprobs.double(), padded_lp[rows, :width].detach(), atol=2e-5, rtol=1e-5
            )
            torch.testing.assert_close(
                entropy.double(), padded_ent[rows, :width].detach(), atol=2e-5, rtol=1e-5
            )
            objective(logprobs, entropy, rows).backward()
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_prompt_packed_once_for_its_group_gives_the_padded_gradients() -> None:
    """Groups of responses continuing one prompt, the prompt packed (and differentiated) once per
    group: the padded path's log-probs and gradients, where every row repeats its prompt; also when
    a micro-batch cuts a group, whose prompt it then packs again."""
    model = _tiny_model(tie=False, seed=6)
    generator = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, 97, (n,), generator=generator).tolist() for n in (5, 1, 8)]
    responses = [
        torch.randint(2, 97, (n,), generator=generator).tolist() for n in (3, 1, 6, 2, 9, 4, 1, 5, 2)
    ]
    groups = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    batch = pack(prompts, responses, groups)
    assert len(batch.input_ids) == 5 + 1 + 8 + sum(map(len, responses))
    weights = torch.randn(batch.response_mask.shape, generator=generator, dtype=F64)

    padded, _ = padded_logprobs(model, [prompts[g] for g in groups], responses)
    (padded * weights).sum().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    for micro_batches in ([torch.arange(9)], [torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7, 8])]):
        model.zero_grad(set_to_none=True)
        for rows in micro_batches:
            micro = batch.select(rows)
            logprobs, _ = response_logprobs(model, micro, chunk_tokens=4)
            width = logprobs.shape[1]
            torch.testing.assert_close(logprobs.double(), padded[rows, :width].detach(), atol=2e-5, rtol=1e-5)
            (logprobs.double() * weights[rows, :width]).sum().backward()
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_chunked_projection_gradients_match_finite_differences(softcap: float | None) -> None:
    """The hand-written backward of the chunked projection (log-probs and entropies, with and
    without logit soft-capping) against numerical gradients, with chunks that split the tokens."""
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(5, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.tensor([0, 3, 6, 3, 1])

    def both(h: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _ChunkedTokenLogprobs.apply(h, w, targets, 2, softcap, True)

    assert torch.autograd.gradcheck(both, (hidden, weight))

"""The algorithms, as pure tensor functions (no model, no I/O).

Shapes: `B` sequences (responses), `T` response tokens per sequence (right-padded), `mask` is 1 on
real response tokens and 0 on padding. Per-sequence tensors are `[B]`, per-token tensors `[B, T]`.
All formulas follow RLSD.md; defaults are the paper's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlsd_contracts.config import AlgorithmSection, LambdaSchedule


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO group-normalised advantages.

    `A_i = (R_i - mean_G(R)) / (std_G(R) + eps)` over the `group_size` consecutive responses of one
    prompt (`rewards` is `[num_prompts * group_size]`, grouped contiguously). The standard deviation
    is the unbiased sample std, as in the reference code. A group whose rewards are all equal gets
    A = 0: it carries no signal.
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries")
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    return (centred / (groups.std(dim=1, keepdim=True) + eps)).view(-1)


def lambda_at(step: int, schedule: LambdaSchedule) -> float:
    """RLSD mixing coefficient at a (0-based) training step.

    constant: `lam = initial`. linear: `lam = initial` for `step < warmup_steps`, then
    `lam = initial + (final - initial) * min(1, (step - warmup_steps) / decay_steps)`.
    """
    if schedule.kind == "constant":
        return schedule.initial
    progress = min(1.0, max(0, step - schedule.warmup_steps) / schedule.decay_steps)
    return schedule.initial + (schedule.final - schedule.initial) * progress


def privileged_gain(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """`Delta_t = stopgrad(log P_T(y_t) - log P_S(y_t))`, the privileged-information gain of token t
    (float32)."""
    return (teacher_logprobs - student_logprobs).detach().float()


def rlsd_weights(
    advantages: torch.Tensor, teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor
) -> torch.Tensor:
    """Direction-aware evidence weights `w_t = exp(sign(A) * Delta_t)`.

    `Delta_t = stopgrad(log P_T(y_t) - log P_S(y_t))` is the privileged-information gain of token t.
    `w_t = (P_T / P_S)^sign(A)` is always positive, so it scales but never flips an update. Rows with
    A = 0 get w = 1.
    """
    delta = privileged_gain(teacher_logprobs, student_logprobs)
    return torch.exp(torch.sign(advantages).unsqueeze(1) * delta)


def rlsd_token_advantages(
    advantages: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor,
    lam: float,
    eps_w: float,
    mask: torch.Tensor,
) -> torch.Tensor:
    """RLSD per-token advantages (detached).

    `A_t = A * ((1 - lam) + lam * clip(w_t, 1 - eps_w, 1 + eps_w))` with
    `w_t = exp(sign(A) * (log P_T(y_t) - log P_S(y_t)))`, and `A_t = 0` where `mask == 0`.
    `advantages` is `[B]`; the log-prob tensors and `mask` are `[B, T]`. With `lam = 0` this is
    exactly the GRPO advantage broadcast over tokens; every `A_t` has the sign of its `A`.
    `student_logprobs` is `log P_S`: the learner's policy, or, for a batch a teacher server scored with
    weights other than the learner's teacher at this step, those same weights under the student's
    prompt (so `Delta_t` compares one policy version with and without the privileged context).
    """
    weights = rlsd_weights(advantages, teacher_logprobs, student_logprobs).clamp(1.0 - eps_w, 1.0 + eps_w)
    mixed = (1.0 - lam) + lam * weights
    token_adv = advantages.detach().float().unsqueeze(1) * mixed
    # where(), not a product: padding may hold -inf log-probs, and 0 * nan is nan.
    return torch.where(mask.bool(), token_adv, 0.0).detach()


def opsd_token_advantages(
    teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """On-policy self-distillation as a policy gradient (sampled-token reverse KL).

    The reverse KL `KL(pi_S || pi_T)` estimated on the sampled token has gradient
    `E[(log P_S - log P_T) * grad log P_S]`, so minimising it is a policy gradient with token
    advantage `A_t = stopgrad(log P_T(y_t) - log P_S(y_t)) = Delta_t` (no reward involved).
    """
    return torch.where(mask.bool(), privileged_gain(teacher_logprobs, student_logprobs), 0.0)


def token_mean(values: torch.Tensor, mask: torch.Tensor, global_tokens: float) -> torch.Tensor:
    """Token-mean aggregation over the global batch: `sum(values * mask) / global_tokens`.

    `global_tokens` is the number of response tokens in the whole global batch (summed over
    micro-batches and ranks), so per-micro-batch losses add up to the global token mean.
    """
    return (values * mask).sum() / global_tokens


@dataclass(frozen=True)
class PolicyLossTerms:
    """Per-token pieces of the surrogate, kept for metrics (all `[B, T]`)."""

    loss: torch.Tensor
    clipped: torch.Tensor
    ratio: torch.Tensor


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    token_advantages: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = 3.0,
) -> PolicyLossTerms:
    """Per-token clipped policy-gradient surrogate with clip-higher and dual clip.

    `rho_t = exp(log pi(y_t) - log pi_old(y_t))`,
    `L_t = -min(rho_t * A_t, clip(rho_t, 1 - clip_low, 1 + clip_high) * A_t)`, and for `A_t < 0`
    the dual clip bounds the loss: `L_t = min(L_t, -dual_clip * A_t)`. Returns unreduced terms;
    reduce with `token_mean`. `clipped` marks tokens whose gradient the clipping removed.
    """
    ratio = torch.exp(logprobs - old_logprobs.detach())
    unclipped = -token_advantages * ratio
    clipped_ratio = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, -token_advantages * clipped_ratio)
    clipped = (loss > unclipped).float()
    if dual_clip is not None:
        dual_bound = -token_advantages * dual_clip
        dual = (token_advantages < 0) & (loss > dual_bound)
        loss = torch.where(dual, dual_bound, loss)
        clipped = torch.maximum(clipped, dual.float())
    return PolicyLossTerms(loss=loss, clipped=clipped.detach(), ratio=ratio.detach())


@dataclass(frozen=True)
class ImportanceWeights:
    weight: torch.Tensor  # [B, T] the truncated weight, detached (1 on padding and unknown log-probs)
    ratio: torch.Tensor  # [B, T] the untruncated ratio pi_prox / pi_behav (1 where unknown)
    capped: torch.Tensor  # [B, T] 1.0 where the cap applied


def truncated_importance_weights(
    proximal_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    cap: float,
    weighted: torch.Tensor,
) -> ImportanceWeights:
    """Truncated importance weights of tokens sampled by another policy than the learner's (decoupled
    PPO with TIS).

    A batch was sampled by the behaviour policy `pi_behav` (the rollout engine: some steps behind, or
    the same weights under other numerics, vLLM's bf16 kernels), while the PPO ratio is taken against
    the proximal policy `pi_prox` (the learner's weights at the start of this step). Decoupled PPO
    (Hilton et al. 2022, "Batch size-invariance for policy optimization"; AReaL, Fu et al. 2025)
    corrects the mismatch by weighting each token's surrogate with `w_t = pi_prox(y_t) / pi_behav(y_t)`;
    truncated importance sampling (TIS, Yao et al. 2025, "Your efficient RL framework secretly brings
    you off-policy RL training") caps it:

        w_t = min(exp(log pi_prox(y_t) - log pi_behav(y_t)), cap),   L_t = w_t * L_t^clip

    `weighted` is `[B]` (True for the responses that get it: those of an older policy version, or
    all, see algorithm.importance_correction); the others get w = 1, so an on-policy batch of the
    learner's own sampler is left exactly as it was. A behaviour log-prob the engine could not report
    (NaN) also gets w = 1. No gradient flows through `w`.
    """
    log_ratio = (proximal_logprobs.detach() - behaviour_logprobs).nan_to_num(nan=0.0)
    ratio = torch.exp(log_ratio)
    capped = (ratio > cap) & weighted.unsqueeze(-1)
    weight = torch.where(weighted.unsqueeze(-1), ratio.clamp(max=cap), torch.ones_like(ratio))
    return ImportanceWeights(weight=weight, ratio=ratio, capped=capped.float())


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) with the low-variance k3 estimator.

    `k3_t = exp(r_t) - r_t - 1`, `r_t = log pi_ref(y_t) - log pi(y_t)`; non-negative, unbiased.
    """
    log_ratio = ref_logprobs.detach() - logprobs
    return torch.exp(log_ratio) - log_ratio - 1.0


def token_advantages_for(
    config: AlgorithmSection,
    step: int,
    advantages: torch.Tensor,
    teacher_logprobs: torch.Tensor | None,
    student_logprobs: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Token advantages of the configured algorithm, for the clipped surrogate.

    rlsd: `rlsd_token_advantages` with `lam = lambda_at(step)`; grpo: `A` broadcast to tokens;
    opsd: `Delta_t` alone; grpo+opsd: `A + opsd_coef * Delta_t` (the policy gradient of the GRPO
    surrogate plus `opsd_coef` times the sampled-token reverse-KL loss).
    """
    broadcast = advantages.float().unsqueeze(1) * mask
    if config.name == "grpo":
        return broadcast
    if teacher_logprobs is None:
        raise ValueError(f"algorithm {config.name!r} needs teacher log-probs")
    if config.name == "rlsd":
        lam = lambda_at(step, config.lam)
        return rlsd_token_advantages(advantages, teacher_logprobs, student_logprobs, lam, config.eps_w, mask)
    distill = opsd_token_advantages(teacher_logprobs, student_logprobs, mask)
    if config.name == "opsd":
        return distill
    return broadcast + config.opsd_coef * distill


def needs_teacher(config: AlgorithmSection) -> bool:
    return config.name != "grpo"


@dataclass(frozen=True)
class WeightStats:
    mean_delta: float
    mean_weight: float
    clipped_fraction: float


def rlsd_weight_stats(
    advantages: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor,
    eps_w: float,
    mask: torch.Tensor,
) -> WeightStats:
    """Diagnostics of the evidence weights over real tokens: mean Delta_t, mean w_t and the share
    of tokens (of sequences with A != 0) whose weight was clipped to [1 - eps_w, 1 + eps_w]."""
    delta = privileged_gain(teacher_logprobs, student_logprobs)
    weights = rlsd_weights(advantages, teacher_logprobs, student_logprobs)
    informative = mask * (advantages != 0).float().unsqueeze(1)
    tokens = mask.sum().clamp(min=1)
    out_of_range = ((weights < 1.0 - eps_w) | (weights > 1.0 + eps_w)).float()
    return WeightStats(
        mean_delta=float((delta * mask).sum() / tokens),
        mean_weight=float((weights * mask).sum() / tokens),
        clipped_fraction=float((out_of_range * informative).sum() / informative.sum().clamp(min=1)),
    )


def first_divergence(response: Sequence[int], reference: Sequence[int]) -> int:
    """Index of the first token where `response` leaves `reference`:
    `e = min{t < len(response) : t >= len(reference) or response[t] != reference[t]}`.

    With `reference` a solution's tokens followed by EOS, a response that stops early (its EOS where
    the reference goes on) or runs long (another token where the reference has EOS) leaves it at
    that token. A response that never leaves it (a prefix of `reference`: cut off by the token
    limit, or the reference itself) has no wrong token: `e = len(response)`.
    """
    for index, token in enumerate(response):
        if index >= len(reference) or token != reference[index]:
            return index
    return len(response)


def masked_sum_and_count(values: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """`(sum_t values_t * m_t, sum_t m_t)` over the tokens of a 0/1 `mask`; a subgroup's mean is
    the ratio of the sums over all its micro-batches and ranks. Values outside the mask (padding
    may hold inf or NaN) never enter."""
    return float(torch.where(mask.bool(), values, 0.0).sum()), float(mask.sum())


def advantage_sign_masks(advantages: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The response tokens (`mask`, `[B, T]`) split by the sign of their response's advantage `A`
    (`[B]`): `positive` where `A > 0`, `negative` where `A < 0`; rows with `A = 0` are in neither."""
    return {
        "positive": mask * (advantages > 0).unsqueeze(1),
        "negative": mask * (advantages < 0).unsqueeze(1),
    }


def relative_advantage_shift(
    token_advantages: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """How far token advantages are from GRPO's uniform ones: `|A_t - A| / |A|` (`[B, T]`), and the
    tokens it is defined on (those of responses with `A != 0`). For RLSD it is
    `lam * |clip(w_t, 1 - eps_w, 1 + eps_w) - 1|`, at most `lam * eps_w`."""
    informative = mask * (advantages != 0).unsqueeze(1)
    scale = advantages.abs().float().clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1)
    return (token_advantages - advantages.float().unsqueeze(1)).abs() / scale, informative


def error_position_masks(first_errors: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The response tokens (`mask`, `[B, T]`) split by their place relative to their response's
    first wrong token `e` (`first_errors`, `[B]`, `first_divergence`; -1 for a correct response):
    `correct` where `e < 0`; for `e >= 0`, `before_error` where `t < e`, `first_error` where
    `t = e`, `after_error` where `t > e` (a response with `e` at or past its end has only
    tokens before its error)."""
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    error = first_errors.to(mask.device).unsqueeze(1)
    wrong = error >= 0
    return {
        "correct": mask * ~wrong,
        "before_error": mask * (wrong & (positions < error)),
        "first_error": mask * (wrong & (positions == error)),
        "after_error": mask * (wrong & (positions > error)),
    }

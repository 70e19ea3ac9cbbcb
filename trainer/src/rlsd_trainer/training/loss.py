"""The learner's loss over its share of one step: micro-batches by token budget, and for each the
clipped surrogate with its token advantages (GRPO, RLSD or OPSD), the truncated importance weight of
stale responses, and the KL and entropy terms, with the metrics of every term.

Every sum is a share of the global token mean (`algorithms.token_mean` over the response tokens of
all ranks), so the ranks' losses and metrics add up to the step's. The formulas are in `algorithms`;
this module composes them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from rlsd_contracts.config import AlgorithmSection
from rlsd_trainer import algorithms
from rlsd_trainer.model.logprobs import PackedBatch
from rlsd_trainer.training.distributed import DistContext, all_reduce

# Histogram of the token importance ratios' logs, for their percentiles across micro-batches and
# ranks: bins 1% wide over [e^-4, e^4] (a ratio outside lands in the first or last bin).
RATIO_LOG_BOUND = 4.0
RATIO_BINS = 801  # odd: a ratio of exactly 1 is the centre of a bin


@dataclass
class LearnBatch:
    """The responses one rank learns from in one step, on its device."""

    packed: PackedBatch
    advantages: torch.Tensor  # [B] sequence advantages
    rollout_logprobs: torch.Tensor  # [B, T] the behaviour policy's (the rollout engine's); NaN unknown
    teacher_logprobs: torch.Tensor | None  # [B, T] when the algorithm has a teacher
    # [B] bool: responses whose loss gets the truncated importance weight (those of an older policy
    # version, or all of them: algorithm.importance_correction)
    weighted: torch.Tensor
    # [B, T] the teacher weights' log-probs under the student's prompt, when RLSD's Delta is taken
    # within that same-version pair instead of against the learner (StepPlan.paired_student_logprobs)
    paired_student_logprobs: torch.Tensor | None = None
    # [B] long: each response's first wrong token, -1 for a correct one, where the task allows it
    # (StepPlan.first_error_tokens); for metrics only
    first_error_tokens: torch.Tensor | None = None


def micro_batches(batch: PackedBatch, budget: int, ctx: DistContext) -> tuple[list[torch.Tensor], int]:
    """Response indices of micro-batches of at most `budget` real tokens (a prompt counted once per
    micro-batch that holds its responses; a longer response alone), and how many of them are real.

    Responses are taken in group order, so a group's prompt is packed once unless the budget cuts
    the group. Every rank runs as many micro-batches as the busiest one (the extra ones repeat a row
    and contribute zero), because each sharded forward and backward is a collective."""
    response_lengths = batch.response_lengths.tolist()
    prompt_lengths = batch.prompt_lengths.tolist()
    micro: list[list[int]] = [[]]
    filled, prompts = 0, set()
    for index, prompt in enumerate(batch.groups.tolist()):
        cost = response_lengths[index] + (0 if prompt in prompts else prompt_lengths[prompt])
        if micro[-1] and filled + cost > budget:
            micro.append([])
            filled, prompts = 0, set()
            cost = response_lengths[index] + prompt_lengths[prompt]
        micro[-1].append(index)
        filled += cost
        prompts.add(prompt)
    (most,) = all_reduce([float(len(micro))], ctx, op="max")
    padding = [torch.tensor(micro[-1][:1])] * (int(most) - len(micro))
    return [torch.tensor(g) for g in micro] + padding, len(micro)


@dataclass
class MicroBatchLoss:
    loss: torch.Tensor  # to backpropagate: this micro-batch's share of the step's loss
    kl: torch.Tensor | None


def micro_batch_loss(
    algo: AlgorithmSection,
    step: int,
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    proximal: torch.Tensor,
    batch: LearnBatch,
    rows: torch.Tensor,
    mask: torch.Tensor,
    global_tokens: float,
    reference_logprobs: torch.Tensor | None,
    metrics: StepMetrics | None,
) -> MicroBatchLoss:
    """The loss of the micro-batch `rows` of `batch`, as its share of the global token mean.

    `logprobs`/`entropy` are the learner's (with gradient), `proximal` the learner's before any
    update of this step (the PPO ratio's denominator), `mask` the response mask (all zero for a
    repeat that only keeps the ranks' collectives in step). With `metrics`, its statistics are added.

        L = mean_t(w_t * L_t^clip) + kl_coef * mean_t(KL_t) - entropy_coef * mean_t(H_t)

    with `w_t` the truncated importance weight of the weighted responses (1 for the others). The
    teacher's token advantages use `Delta_t = log P_T(y_t) - log P_S(y_t)` with `log P_S` the
    proximal log-probs, or the batch's `paired_student_logprobs` where it has them (the teacher's
    own weights under the student's prompt: Delta within one policy version)."""
    width = mask.shape[1]
    teacher = batch.teacher_logprobs[rows, :width] if batch.teacher_logprobs is not None else None
    paired = batch.paired_student_logprobs
    student = paired[rows, :width] if paired is not None else proximal
    advantages = batch.advantages[rows]
    token_adv = algorithms.token_advantages_for(algo, step, advantages, teacher, student, mask)
    terms = algorithms.clipped_policy_loss(
        logprobs, proximal, token_adv, algo.clip_low, algo.clip_high, algo.dual_clip
    )
    weighted = batch.weighted[rows]
    rollout = batch.rollout_logprobs[rows, :width]
    importance = algorithms.truncated_importance_weights(proximal, rollout, algo.importance_cap, weighted)
    # A micro-batch without weighted rows keeps the on-policy arithmetic exactly (no multiplication by ones).
    policy_terms = terms.loss * importance.weight if bool(weighted.any()) else terms.loss
    loss = algorithms.token_mean(policy_terms, mask, global_tokens)
    kl = None
    if reference_logprobs is not None:
        kl = algorithms.token_mean(algorithms.kl_penalty(logprobs, reference_logprobs), mask, global_tokens)
        loss = loss + algo.kl_coef * kl
    if algo.entropy_coef > 0:
        loss = loss - algo.entropy_coef * algorithms.token_mean(entropy, mask, global_tokens)
    if metrics is not None:
        metrics.add_terms(terms, entropy, mask, global_tokens)
        metrics.add_importance(importance, rollout, proximal, mask, global_tokens)
        if teacher is not None:
            stats = algorithms.rlsd_weight_stats(advantages, teacher, student, algo.eps_w, mask)
            metrics.add_weight_stats(stats, float(mask.sum()) / global_tokens)
            first_errors = batch.first_error_tokens
            metrics.add_teacher_diagnostics(
                advantages, teacher, student, mask, first_errors[rows] if first_errors is not None else None
            )
        if algo.name == "rlsd":
            metrics.add_advantage_shift(token_adv, advantages, mask)
    return MicroBatchLoss(loss, kl)


class StepMetrics:
    """Token-weighted sums of one step's loss terms over micro-batches, then over ranks; and the means
    over subgroups of tokens, from their own sums and token counts."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        # A subgroup's share of the global token count is unknown until every rank has counted, so
        # its mean is its sum over its token count, divided after the all-reduce.
        self.subgroup_sums: dict[str, float] = defaultdict(float)
        self.subgroup_tokens: dict[str, float] = defaultdict(float)
        self.ratio_counts = torch.zeros(RATIO_BINS, dtype=torch.float64)
        self.ratio_max = 0.0

    def add_terms(
        self,
        terms: algorithms.PolicyLossTerms,
        entropy: torch.Tensor,
        mask: torch.Tensor,
        global_tokens: float,
    ) -> None:
        self.sums["policy_loss"] += float(algorithms.token_mean(terms.loss.detach(), mask, global_tokens))
        self.sums["clip_ratio"] += float(algorithms.token_mean(terms.clipped, mask, global_tokens))
        self.sums["entropy"] += float(algorithms.token_mean(entropy.detach(), mask, global_tokens))

    def add_weight_stats(self, stats: algorithms.WeightStats, share: float) -> None:
        """RLSD's evidence-weight statistics of a micro-batch holding `share` of the step's tokens."""
        self.sums["delta_mean"] += stats.mean_delta * share
        self.sums["weight_mean"] += stats.mean_weight * share
        self.sums["weight_clipped_fraction"] += stats.clipped_fraction * share

    def add_teacher_diagnostics(
        self,
        advantages: torch.Tensor,
        teacher: torch.Tensor,
        student: torch.Tensor,
        mask: torch.Tensor,
        first_errors: torch.Tensor | None,
    ) -> None:
        """Whether the teacher is informative: `Delta_t` and the unclipped `w_t` over the tokens of
        responses with `A > 0` and with `A < 0` (`delta_mean_positive`, ...), and, with the
        responses' first wrong tokens, `Delta_t` over correct responses' tokens and over incorrect
        ones' tokens before, at and after their first error (`delta_correct`, `delta_before_error`,
        `delta_first_error`, `delta_after_error`)."""
        delta = algorithms.privileged_gain(teacher, student)
        weights = algorithms.rlsd_weights(advantages, teacher, student)
        for sign, tokens in algorithms.advantage_sign_masks(advantages, mask).items():
            self._add_to_mean(f"delta_mean_{sign}", delta, tokens)
            self._add_to_mean(f"weight_mean_{sign}", weights, tokens)
        if first_errors is not None:
            for place, tokens in algorithms.error_position_masks(first_errors, mask).items():
                self._add_to_mean(f"delta_{place}", delta, tokens)

    def add_advantage_shift(
        self, token_adv: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor
    ) -> None:
        """`advantage_shift`: the mean `|A_t - A| / |A|`, how much RLSD's evidence weights changed the
        token advantages from GRPO's (at most `lam * eps_w`)."""
        shift, tokens = algorithms.relative_advantage_shift(token_adv, advantages, mask)
        self._add_to_mean("advantage_shift", shift, tokens)

    def _add_to_mean(self, key: str, values: torch.Tensor, tokens: torch.Tensor) -> None:
        total, count = algorithms.masked_sum_and_count(values, tokens)
        self.subgroup_sums[key] += total
        self.subgroup_tokens[key] += count

    def add_importance(
        self,
        importance: algorithms.ImportanceWeights,
        rollout: torch.Tensor,
        proximal: torch.Tensor,
        mask: torch.Tensor,
        global_tokens: float,
    ) -> None:
        # A log-prob the rollout server could not report (NaN) counts as no mismatch.
        mismatch = (proximal.detach() - rollout).abs().nan_to_num(nan=0.0)
        self.sums["logprob_mismatch"] += float(algorithms.token_mean(mismatch, mask, global_tokens))
        self.sums["importance_capped_fraction"] += float(
            algorithms.token_mean(importance.capped, mask, global_tokens)
        )
        known = (mask > 0) & rollout.isfinite()
        ratios = importance.ratio[known].double()
        if ratios.numel():
            self.ratio_max = max(self.ratio_max, float(ratios.max()))
            logs = ratios.log().clamp(-RATIO_LOG_BOUND, RATIO_LOG_BOUND)
            self.ratio_counts += torch.histc(logs, RATIO_BINS, -RATIO_LOG_BOUND, RATIO_LOG_BOUND).cpu()

    def reduce(self, ctx: DistContext) -> dict[str, float]:
        """Add up the ranks' sums; the importance ratio's percentiles from the summed histogram; each
        subgroup's mean from its summed sum and token count (NaN for a subgroup without tokens)."""
        keys = sorted(self.sums)
        totals = dict(zip(keys, all_reduce([self.sums[k] for k in keys], ctx), strict=True))
        groups = sorted(self.subgroup_sums)  # the same on every rank: they depend on the plan only
        if groups:
            reduced = all_reduce(
                [self.subgroup_sums[k] for k in groups] + [self.subgroup_tokens[k] for k in groups], ctx
            )
            for key, total, count in zip(groups, reduced[: len(groups)], reduced[len(groups) :], strict=True):
                totals[key] = total / count if count else math.nan
        counts = torch.tensor(all_reduce(self.ratio_counts.tolist(), ctx), dtype=torch.float64)
        (totals["importance_ratio_max"],) = all_reduce([self.ratio_max], ctx, op="max")
        for name, quantile in (("importance_ratio_p50", 0.5), ("importance_ratio_p99", 0.99)):
            totals[name] = ratio_quantile(counts, quantile)
        return totals


def ratio_quantile(counts: torch.Tensor, quantile: float) -> float:
    """The `quantile` of the ratios whose log-histogram is `counts` (the centre of its bin); NaN when
    there are none."""
    total = float(counts.sum())
    if total == 0:
        return math.nan
    index = int(torch.searchsorted(counts.cumsum(0), torch.tensor(quantile * total, dtype=counts.dtype)))
    width = 2 * RATIO_LOG_BOUND / RATIO_BINS
    return math.exp(-RATIO_LOG_BOUND + (min(index, RATIO_BINS - 1) + 0.5) * width)

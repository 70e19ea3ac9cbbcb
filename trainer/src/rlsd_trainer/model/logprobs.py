"""Per-token log-probabilities of response tokens, padding-free, without materialising the full logits.

Prompts and responses are packed back to back into one sequence whose attention never crosses
rows (`attention.PackedRows`), so the backbone computes real tokens only, and a prompt shared by
the G responses of a group runs (and is differentiated) once.

The output projection of a 151,936-token vocabulary at 4,096 tokens is 2.5 GB of float32 logits
per sequence, plus as much again for its gradient. We run the backbone once, gather the hidden
states that predict response tokens, and project them chunk by chunk with a custom autograd
function that also recomputes and differentiates them chunk by chunk in backward, so only a chunk's
float32 logits (and one weight-sized gradient) exist at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from rlsd_trainer.model.attention import PackedRows, forward_packed, spans


@dataclass
class PackedBatch:
    """Prompts and their responses packed back to back, without padding; each prompt packed once.

    `input_ids` is `[N]`: every prompt's tokens in turn, then every response's. Response r continues
    prompt `groups[r]` (the G responses of a group share one prompt); `prompt_lengths` is `[P]`.
    `response_ids` and `response_mask` are `[R, T]`, right-padded: the per-token layout the
    algorithms work in.
    """

    input_ids: torch.Tensor
    prompt_lengths: torch.Tensor
    groups: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(*(getattr(self, f.name).to(device) for f in fields(self)))

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1).long()

    def rows(self) -> PackedRows:
        """The attention layout: the prompts, then the responses, each continuing its prompt."""
        no_context = torch.full_like(self.prompt_lengths, -1)
        return PackedRows(
            torch.cat([self.prompt_lengths, self.response_lengths]), torch.cat([no_context, self.groups])
        )

    def select(self, rows: torch.Tensor) -> PackedBatch:
        """The responses `rows` (`[K]` indices) and their prompts, packed anew; responses trimmed to
        the longest of them."""
        prompts, groups = torch.unique(self.groups[rows], return_inverse=True)
        prompt_offsets = F.pad(self.prompt_lengths.cumsum(0), (1, 0))
        response_lengths = self.response_lengths
        response_offsets = prompt_offsets[-1] + F.pad(response_lengths.cumsum(0), (1, 0))
        width = max(1, int(response_lengths[rows].max()))
        return PackedBatch(
            input_ids=torch.cat(
                [
                    self.input_ids[spans(prompt_offsets[prompts], self.prompt_lengths[prompts])],
                    self.input_ids[spans(response_offsets[rows], response_lengths[rows])],
                ]
            ),
            prompt_lengths=self.prompt_lengths[prompts],
            groups=groups,
            response_ids=self.response_ids[rows, :width],
            response_mask=self.response_mask[rows, :width],
        )


def pack(
    prompts: list[list[int]], responses: list[list[int]], groups: list[int] | None = None
) -> PackedBatch:
    """Pack `responses`, response r continuing prompt `groups[r]` (default: prompt r)."""
    if groups is None:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(responses)} responses for {len(prompts)} prompts; pass their groups")
        groups = list(range(len(responses)))
    if any(not prompt for prompt in prompts):
        raise ValueError("every prompt needs a token: the first response token is predicted from it")
    tokens = [token for row in (*prompts, *responses) for token in row]
    response_ids, response_mask = _right_padded(responses)
    return PackedBatch(
        input_ids=torch.tensor(tokens, dtype=torch.long),
        prompt_lengths=torch.tensor([len(p) for p in prompts], dtype=torch.long),
        groups=torch.tensor(groups, dtype=torch.long),
        response_ids=response_ids,
        response_mask=response_mask,
    )


def _right_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids `[R, T]` (0 on padding) and their float mask, T the longest row (at least 1)."""
    ids = torch.zeros((len(rows), max(1, max(map(len, rows), default=0))), dtype=torch.long)
    mask = torch.zeros(ids.shape, dtype=torch.float32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1.0
    return ids, mask


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for bf16/fp16/fp32 inputs (log-softmax needs it), float64 stays float64."""
    return torch.promote_types(tensor.dtype, torch.float32)


def output_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of the final states `hidden` `[..., H]` in the compute dtype, soft-capped as the model's own."""
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return _chunk_logits(hidden, model.get_output_embeddings().weight, softcap)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Logits `z = softcap(h W^T)` of one chunk in the compute dtype (`softcap(x) = c tanh(x / c)`)."""
    logits = (hidden @ weight.t()).to(_compute_dtype(hidden))
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """`log p(y_i) = z_{i,y_i} - logsumexp(z_i)` and entropies `H_i = logsumexp(z_i) - sum_v p_v z_v`
    for N tokens, with `z = softcap(h W^T)`, one chunk of tokens at a time in forward and backward.

    Backward recomputes each chunk's logits and writes `dL/dz = g_lp (onehot(y) - p)
    - g_H p (z - sum_v p_v z_v)` into the same buffer, then accumulates `dL/dW` into one float32
    buffer: peak memory is about two chunks of logits plus one weight gradient, where autograd (or
    activation checkpointing) would keep the full logits or a weight-sized gradient per chunk.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_tokens: int,
        softcap: float | None,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logprobs = torch.empty(targets.shape[0], dtype=_compute_dtype(hidden), device=hidden.device)
        # Entropies cost one more vocabulary-sized softmax per chunk: only when asked (else zeros).
        entropy = torch.zeros_like(logprobs)
        for start in range(0, targets.shape[0], chunk_tokens):
            chunk = slice(start, start + chunk_tokens)
            logits = _chunk_logits(hidden[chunk], weight, softcap)
            normaliser = logits.logsumexp(dim=-1)
            logprobs[chunk] = logits.gather(-1, targets[chunk].unsqueeze(-1)).squeeze(-1) - normaliser
            if with_entropy:
                entropy[chunk] = normaliser - torch.linalg.vecdot(torch.softmax(logits, dim=-1), logits)
        ctx.save_for_backward(hidden, weight, targets)
        # An output nobody differentiates gets None in backward, not a zero tensor to multiply.
        ctx.set_materialize_grads(False)
        ctx.chunk_tokens, ctx.softcap = chunk_tokens, softcap
        return logprobs, entropy

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None, None]:
        hidden, weight, targets = ctx.saved_tensors
        softcap = ctx.softcap
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        dtype = _compute_dtype(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
        for start in range(0, targets.shape[0], ctx.chunk_tokens):
            chunk = slice(start, start + ctx.chunk_tokens)
            logits = _chunk_logits(hidden[chunk], weight, softcap)
            # Every step below works in place on the two chunk-sized buffers (logits, probs).
            probs = torch.softmax(logits, dim=-1)
            entropy_part = None
            if grad_entropy is not None:
                entropy_part = logits - torch.linalg.vecdot(probs, logits).unsqueeze(-1)
                entropy_part.mul_(probs).mul_(-grad_entropy[chunk].unsqueeze(-1))
            grad = probs
            if grad_logprobs is not None:
                g = grad_logprobs[chunk].unsqueeze(-1)
                grad.mul_(-g).scatter_add_(-1, targets[chunk].unsqueeze(-1), g)
            else:
                grad.zero_()
            if entropy_part is not None:
                grad.add_(entropy_part)
                del entropy_part
            if softcap is not None:
                grad.mul_(logits.div_(softcap).square_().neg_().add_(1.0))
            del logits
            if grad_hidden is not None:
                grad_hidden[chunk] = (grad @ weight.to(dtype)).to(hidden.dtype)
            grad_weight.addmm_(grad.t(), hidden[chunk].to(dtype))
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None


def response_logprobs(
    model: PreTrainedModel, batch: PackedBatch, chunk_tokens: int = 256, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs `[R, T]` of every response token (0 on padding), and their entropies if asked.

    `log pi(y_t) = log_softmax(W h_{t-1})[y_t]`: one forward over the packed batch (a response
    attends to its prompt and causally to itself, never to other rows; a prompt shared by a group
    runs once), then the output projection over chunks of `chunk_tokens` response tokens.
    Differentiable when grad is enabled; the chunks are recomputed in backward.
    """
    rows = batch.rows()
    hidden = forward_packed(model, batch.input_ids, rows)
    row, column = torch.nonzero(batch.response_mask, as_tuple=True)
    starts = rows.offsets.long()
    # Token t is predicted by the state before it: its prompt's last one for t = 0.
    predicting = torch.where(
        column == 0, starts[batch.groups[row] + 1] - 1, starts[len(batch.prompt_lengths) + row] + column - 1
    )
    return _project_tokens(
        model,
        hidden[predicting],
        batch.response_ids[row, column],
        (row, column),
        batch.response_mask.shape,
        chunk_tokens,
        with_entropy,
    )


@torch.no_grad()
def shared_prompt_logprobs(
    model: PreTrainedModel,
    prompts: list[list[int]],
    responses: list[list[int]],
    group_size: int,
    chunk_tokens: int = 256,
) -> torch.Tensor:
    """Log-probs `[R, T]` of responses that come in groups of `group_size` after one shared prompt
    (a teacher's privileged prompt): `response_logprobs` with each prompt packed once for its group."""
    if len(responses) != len(prompts) * group_size:
        raise ValueError(f"{len(responses)} responses for {len(prompts)} prompts x group {group_size}")
    groups = [index // group_size for index in range(len(responses))]
    batch = pack(prompts, responses, groups).to(model.device)
    logprobs, _ = response_logprobs(model, batch, chunk_tokens)
    return logprobs


def _project_tokens(
    model: PreTrainedModel,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    where: tuple[torch.Tensor, torch.Tensor],
    shape: torch.Size,
    chunk_tokens: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Project the states `[M, H]` that predict the `targets` `[M]`, chunk by chunk, and scatter
    log-probs (and entropies) to their `where = (rows, columns)` in a zero `[R, T]` of `shape`."""
    weight = model.get_output_embeddings().weight
    softcap = getattr(model.config, "final_logit_softcapping", None)
    token_logprobs, token_entropy = _ChunkedTokenLogprobs.apply(
        hidden, weight, targets, chunk_tokens, softcap, with_entropy
    )
    logprobs = token_logprobs.new_zeros(shape).index_put(where, token_logprobs)
    entropy = token_entropy.new_zeros(shape).index_put(where, token_entropy) if with_entropy else None
    return logprobs, entropy


class PolicyScorer(torch.nn.Module):
    """A causal LM with the two log-prob paths above as methods.

    Wrapping the model gives FSDP2 one root module whose log-prob methods it can hook (see
    `distributed.prepare_policy`); unsharded, the methods simply call the functions above.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.lm = model

    def response_logprobs(
        self, batch: PackedBatch, chunk_tokens: int = 256, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return response_logprobs(self.lm, batch, chunk_tokens, with_entropy)

    def shared_prompt_logprobs(
        self,
        prompts: list[list[int]],
        responses: list[list[int]],
        group_size: int,
        chunk_tokens: int = 256,
    ) -> torch.Tensor:
        return shared_prompt_logprobs(self.lm, prompts, responses, group_size, chunk_tokens)

"""Per-token log-probabilities of response tokens without materialising the full logits.

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
from transformers import PreTrainedModel


@dataclass
class PackedBatch:
    """Right-padded `prompt + response` rows and where each response sits.

    `input_ids`/`attention_mask` are `[B, L]`; `response_ids`/`response_mask` are `[B, T]`;
    `prompt_lengths` is `[B]` (response token t of row b is at position prompt_lengths[b] + t).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_lengths: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(*(getattr(self, f.name).to(device) for f in fields(self)))


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> PackedBatch:
    rows = [p + r for p, r in zip(prompts, responses, strict=True)]
    length = max(len(row) for row in rows)
    width = max(1, max(len(r) for r in responses))
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    response_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (row, response) in enumerate(zip(rows, responses, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        response_ids[i, : len(response)] = torch.tensor(response, dtype=torch.long)
        response_mask[i, : len(response)] = 1.0
    prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return PackedBatch(input_ids, attention_mask, prompt_lengths, response_ids, response_mask)


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for bf16/fp16/fp32 inputs (log-softmax needs it), float64 stays float64."""
    return torch.promote_types(tensor.dtype, torch.float32)


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
    """Log-probs `[B, T]` of every response token (0 on padding), and their entropies if asked.

    `log pi(y_t) = log_softmax(W h_{t-1})[y_t]`, computed over chunks of `chunk_tokens` tokens.
    Differentiable when grad is enabled; the chunks are recomputed in backward.
    """
    # Rows are right-padded, so under causal attention a real token only ever sees real tokens: no
    # padding mask is needed, which lets attention use its fused causal kernel instead of
    # materialising a [heads, L, L] masked score matrix. Padded positions are never read below.
    hidden = model.base_model(input_ids=batch.input_ids).last_hidden_state
    offsets = torch.arange(batch.response_ids.shape[1], device=hidden.device)
    positions = (batch.prompt_lengths.unsqueeze(1) + offsets - 1).clamp(max=hidden.shape[1] - 1)
    predicting = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return _project_tokens(
        model, predicting, batch.response_ids, batch.response_mask, chunk_tokens, with_entropy
    )


@torch.no_grad()
def shared_prompt_logprobs(
    model: PreTrainedModel,
    prompts: list[list[int]],
    responses: list[list[int]],
    group_size: int,
    pad_id: int,
    chunk_tokens: int = 256,
) -> torch.Tensor:
    """Log-probs `[B, T]` of responses that come in groups of `group_size` after one shared prompt.

    Each prompt is run once and its KV cache repeated for its group, instead of recomputing the
    prompt for every response: for a teacher whose privileged prompt is long, this is most of the
    cost. Same values as `response_logprobs` on the concatenated rows (up to float rounding).
    """
    if len(responses) != len(prompts) * group_size:
        raise ValueError(f"{len(responses)} responses for {len(prompts)} prompts x group {group_size}")
    device = model.device
    width = max(len(p) for p in prompts)
    # Left-padded prompts end at the same column, so every response continues at the cache's end.
    prompt_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    prompt_mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):
        prompt_ids[i, width - len(prompt) :] = torch.tensor(prompt, device=device)
        prompt_mask[i, width - len(prompt) :] = 1
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    prefill = model.base_model(
        input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True
    )
    cache = prefill.past_key_values
    cache.batch_repeat_interleave(group_size)
    packed = pack([[]] * len(responses), responses, pad_id)
    response_ids = packed.response_ids.to(device)
    response_mask = packed.response_mask.to(device)
    steps = torch.arange(response_ids.shape[1], device=device)
    response_positions = positions[:, -1:].repeat_interleave(group_size, 0) + 1 + steps
    attention = torch.cat([prompt_mask.repeat_interleave(group_size, 0), response_mask.long()], dim=1)
    continued = model.base_model(
        input_ids=response_ids,
        attention_mask=attention,
        position_ids=response_positions,
        past_key_values=cache,
    ).last_hidden_state
    # Token t is predicted by the state before it: the prompt's last one for t = 0.
    last_prompt_state = prefill.last_hidden_state[:, -1:].repeat_interleave(group_size, 0)
    predicting = torch.cat([last_prompt_state, continued[:, :-1]], dim=1)
    logprobs, _ = _project_tokens(model, predicting, response_ids, response_mask, chunk_tokens, False)
    return logprobs


def _project_tokens(
    model: PreTrainedModel,
    predicting: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    chunk_tokens: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Project the states `[B, T, H]` that predict each response token, chunk by chunk over the real
    (unmasked) tokens, and scatter log-probs (and entropies) back to `[B, T]`."""
    rows, cols = torch.nonzero(response_mask, as_tuple=True)
    selected_hidden = predicting[rows, cols]
    targets = response_ids[rows, cols]
    weight = model.get_output_embeddings().weight
    softcap = getattr(model.config, "final_logit_softcapping", None)
    token_logprobs, token_entropy = _ChunkedTokenLogprobs.apply(
        selected_hidden, weight, targets, chunk_tokens, softcap, with_entropy
    )
    shape = response_mask.shape
    logprobs = token_logprobs.new_zeros(shape).index_put((rows, cols), token_logprobs)
    entropy = token_entropy.new_zeros(shape).index_put((rows, cols), token_entropy) if with_entropy else None
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
        pad_id: int,
        chunk_tokens: int = 256,
    ) -> torch.Tensor:
        return shared_prompt_logprobs(self.lm, prompts, responses, group_size, pad_id, chunk_tokens)

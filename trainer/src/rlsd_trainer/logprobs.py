"""Per-token log-probabilities of response tokens without materialising the full logits.

The output projection of a 151,936-token vocabulary at 4,096 tokens is 2.5 GB of float32 logits
per sequence, plus as much again for its gradient. We run the backbone once, gather the hidden
states that predict response tokens, and project them chunk by chunk; each chunk is wrapped in
activation checkpointing, so only one chunk's float32 logits exist at a time, in forward and in
backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint
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


def _project(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    softcap: float | None,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = (hidden @ weight.t()).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    # log p(y) = z_y - logsumexp(z): no second vocabulary-sized tensor for log_softmax.
    normaliser = logits.logsumexp(dim=-1)
    selected = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - normaliser
    if not with_entropy:
        return selected, torch.zeros_like(selected)
    # H = logsumexp(z) - sum_v p_v z_v
    entropy = normaliser - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)
    return selected, entropy


def response_logprobs(
    model: PreTrainedModel, batch: PackedBatch, chunk_tokens: int = 512, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs `[B, T]` of every response token (0 on padding), and their entropies if asked.

    `log pi(y_t) = log_softmax(W h_{t-1})[y_t]`, computed over chunks of `chunk_tokens` tokens.
    Differentiable when grad is enabled; the chunks are recomputed in backward.
    """
    backbone = model.base_model
    hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    offsets = torch.arange(batch.response_ids.shape[1], device=hidden.device)
    positions = (batch.prompt_lengths.unsqueeze(1) + offsets - 1).clamp(max=hidden.shape[1] - 1)
    rows, cols = torch.nonzero(batch.response_mask, as_tuple=True)
    selected_hidden = hidden[rows, positions[rows, cols]]
    targets = batch.response_ids[rows, cols]
    weight = model.get_output_embeddings().weight
    softcap = getattr(model.config, "final_logit_softcapping", None)
    pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
    for start in range(0, targets.numel(), chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        args = (selected_hidden[chunk], targets[chunk], weight, softcap, with_entropy)
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_project, *args, use_reentrant=False))
        else:
            pieces.append(_project(*args))
    logprobs = torch.zeros(batch.response_mask.shape, dtype=torch.float32, device=hidden.device)
    entropy = (
        torch.zeros(batch.response_mask.shape, dtype=torch.float32, device=hidden.device)
        if with_entropy
        else None
    )
    if pieces:
        logprobs = logprobs.index_put((rows, cols), torch.cat([p[0] for p in pieces]))
        if entropy is not None:
            entropy = entropy.index_put((rows, cols), torch.cat([p[1] for p in pieces]))
    return logprobs, entropy

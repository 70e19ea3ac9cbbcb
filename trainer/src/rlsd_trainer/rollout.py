"""Rollout engines: turn prompt ids into sampled responses with their log-probs.

`RolloutEngine` is what the training loop talks to. `LocalEngine` runs a transformers model in
process (batched sampling with a KV cache); a vLLM client or our CPU rollout server implement the
same protocol. Returned log-probs are those of the raw model distribution (before temperature and
top-p), as vLLM reports them by default, so they compare directly with the learner's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from transformers import PreTrainedModel


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    # Of the raw model distribution; NaN where a server could not report one.
    logprobs: list[float]
    # "repetition": vLLM's repetition detection cut the response short (only if a request asks).
    finish_reason: Literal["stop", "length", "repetition"]
    policy_version: int


class RolloutEngine(Protocol):
    policy_version: int

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """`params.n` completions for each prompt, in prompt order."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load new policy weights; later completions carry `version`."""
        ...

    def close(self) -> None:
        """Release connections and transfer groups."""
        ...


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> torch.Tensor:
    """Next token ids `[B]`: greedy at temperature 0, else nucleus sampling of softmax(logits / T)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class LocalEngine:
    """In-process sampler over a transformers causal LM (its own copy of the policy weights)."""

    def __init__(
        self, model: PreTrainedModel, pad_id: int, stop_ids: Iterable[int], max_batch_size: int = 256
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.pad_id = pad_id
        self.stop_set = frozenset(stop_ids)
        self.stop_ids = torch.tensor(sorted(self.stop_set))
        self.max_batch_size = max_batch_size
        self.policy_version = 0

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named_tensors:
                params[name].copy_(tensor)
        self.policy_version = version

    def close(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[list[Completion]]:
        generator = torch.Generator().manual_seed(params.seed)
        rows = [prompt for prompt in prompts for _ in range(params.n)]
        completions: list[Completion] = []
        for start in range(0, len(rows), self.max_batch_size):
            completions += self._generate_batch(rows[start : start + self.max_batch_size], params, generator)
        return [completions[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def _generate_batch(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator
    ) -> list[Completion]:
        device = self.model.device
        width = max(len(p) for p in prompts)
        # Left padding keeps every row's next position at the end, so one KV cache serves all rows.
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            input_ids[i, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[i, width - len(prompt) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        stop_ids = self.stop_ids.to(device)

        tokens: list[torch.Tensor] = []
        logprobs: list[torch.Tensor] = []
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        cache = None
        step_ids, step_positions = input_ids, positions
        for _ in range(params.max_new_tokens):
            out = self.model(
                input_ids=step_ids,
                attention_mask=attention_mask,
                position_ids=step_positions,
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            logits = out.logits[:, -1].float()
            next_ids = sample_next(logits, params.temperature, params.top_p, generator)
            next_ids = torch.where(finished, torch.full_like(next_ids, self.pad_id), next_ids)
            tokens.append(next_ids)
            logprobs.append(logits.log_softmax(-1).gather(-1, next_ids.unsqueeze(-1)).squeeze(-1))
            finished = finished | torch.isin(next_ids, stop_ids)
            if bool(finished.all()):
                break
            step_ids = next_ids.unsqueeze(-1)
            step_positions = step_positions[:, -1:] + 1
            attention_mask = torch.cat([attention_mask, (~finished).long().unsqueeze(-1)], dim=-1)
        return self._to_completions(torch.stack(tokens, 1), torch.stack(logprobs, 1))

    def _to_completions(self, tokens: torch.Tensor, logprobs: torch.Tensor) -> list[Completion]:
        completions = []
        for row_tokens, row_logprobs in zip(tokens.tolist(), logprobs.tolist(), strict=True):
            length, reason = len(row_tokens), "length"
            for index, token in enumerate(row_tokens):
                if token in self.stop_set:
                    length, reason = index + 1, "stop"
                    break
            completions.append(
                Completion(row_tokens[:length], row_logprobs[:length], reason, self.policy_version)
            )
        return completions

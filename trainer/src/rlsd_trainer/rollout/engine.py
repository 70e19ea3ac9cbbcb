"""Rollout engines: turn prompt ids into sampled responses with their log-probs.

`RolloutEngine` is what the training loop talks to. `LocalEngine` runs a transformers model in
process (batched sampling over a preallocated KV cache that finished rows leave); a vLLM client or
our CPU rollout server (which wraps `LocalEngine`) implement the same protocol. Returned log-probs
are those of the raw model distribution (before temperature and top-p), as vLLM reports them by
default, so they compare directly with the learner's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from transformers import PreTrainedModel

from rlsd_trainer.model.attention import DecodeCache
from rlsd_trainer.model.logprobs import output_logits


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
    return torch.multinomial(sampling_probs(logits, temperature, top_p), 1, generator=generator).squeeze(-1)


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution `[B, V]` nucleus sampling draws from: softmax(logits / T), cut to top-p."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return probs


class LocalEngine:
    """In-process sampler over a transformers causal LM (its own copy of the policy weights)."""

    def __init__(self, model: PreTrainedModel, stop_ids: Iterable[int], max_batch_size: int = 256) -> None:
        self.model = model.eval().requires_grad_(False)
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
        generator = torch.Generator(self.model.device).manual_seed(params.seed)
        rows = [prompt for prompt in prompts for _ in range(params.n)]
        completions: list[Completion] = []
        for start in range(0, len(rows), self.max_batch_size):
            completions += self._generate_batch(rows[start : start + self.max_batch_size], params, generator)
        return [completions[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def _generate_batch(
        self, rows: list[list[int]], params: SamplingParams, generator: torch.Generator
    ) -> list[Completion]:
        """Sample the rows (prompts) of one batch: each distinct prompt runs once, packed (the n
        samples of a prompt share it), then one token per unfinished row and step; a row that stops
        leaves the batch and the cache.

        The random stream is drawn as if every row stayed: `torch.multinomial` over all rows of the
        batch each step (a finished row keeps its last distribution), so a row's tokens depend on the
        seed and its place in the batch only, as when finished rows were decoded on to the end."""
        stop_ids = self.stop_ids.to(self.model.device)
        prompts: list[list[int]] = []
        sources: list[int] = []  # the prompt of each row (repeats of a prompt come in a run)
        for row in rows:
            if not prompts or row != prompts[-1]:
                prompts.append(row)
            sources.append(len(prompts) - 1)
        cache, hidden = DecodeCache.prefill(self.model, prompts, sources, params.max_new_tokens)
        tokens: list[list[int]] = [[] for _ in rows]
        logprobs: list[list[float]] = [[] for _ in rows]
        sampling = torch.empty(0)
        live = torch.arange(len(rows), device=hidden.device)  # the batch row of each cache slot
        for step in range(params.max_new_tokens):
            logits = output_logits(self.model, hidden)
            if params.temperature == 0.0:
                next_ids = logits.argmax(dim=-1)
            else:
                if step == 0:
                    sampling = torch.zeros_like(logits)
                sampling[live] = sampling_probs(logits, params.temperature, params.top_p)
                next_ids = torch.multinomial(sampling, 1, generator=generator).squeeze(-1)[live]
            chosen = logits.log_softmax(-1).gather(-1, next_ids.unsqueeze(-1)).squeeze(-1)
            for row, token, logprob in zip(live.tolist(), next_ids.tolist(), chosen.tolist(), strict=True):
                tokens[row].append(token)
                logprobs[row].append(logprob)
            stopped = torch.isin(next_ids, stop_ids)
            if step + 1 == params.max_new_tokens or bool(stopped.all()):
                break
            if bool(stopped.any()):
                order = cache.drop(stopped)
                live, next_ids = live[order], next_ids[order]
            hidden = cache.step(self.model, next_ids)
        return [
            Completion(
                row_tokens,
                row_logprobs,
                "stop" if row_tokens[-1] in self.stop_set else "length",
                self.policy_version,
            )
            for row_tokens, row_logprobs in zip(tokens, logprobs, strict=True)
        ]

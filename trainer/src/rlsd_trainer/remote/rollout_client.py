"""`RemoteRolloutEngine`: the `RolloutEngine` protocol over HTTP, against vLLM or our CPU server.

The protocol is vLLM 0.33.0's (the pin of trainer/requirements-vllm.txt; tests/conformance runs
vLLM's own request and response models, routers and CLI parser against this module):
- Completions (vllm/entrypoints/openai/completion/protocol.py): `POST /v1/completions` with `prompt`
  as token ids (a list of lists), `n`, `max_tokens`, `seed`, `logprobs: 0` (the sampled token's
  log-prob), `return_token_ids` and `return_weight_versions`, and every sampling field vLLM would
  otherwise fill from the model's generation_config (Qwen3 ships top_k 20): `temperature` and
  `top_p` as configured, `top_k` 0, `min_p` 0 and neutral repetition / presence / frequency
  penalties, so samples come from the full distribution the learner assumes. Choices come
  prompt-major (index = prompt * n + sample), each with `token_ids` (EOS included),
  `logprobs.token_logprobs` (of the raw model distribution, vLLM's default `logprobs_mode`),
  `finish_reason` and `weight_versions` (the labelled weights that sampled each span of tokens).
- What a choice becomes: `stop` and `length` as they are; `repetition` (vLLM's repetition detection,
  which we never ask for) is kept as a response the policy cut short, like `length`; `abort` (a
  server that paused or shut down mid-request) and `error` (vLLM answers 500 for it) fail the
  request, which is then retried on another replica, since the response is not the policy's.
  A log-prob vLLM reports as `None` or clamps to -9999.0 (a -inf) is unknown: NaN here, left out of
  `rlsd_logprob_mismatch`. A completion's policy version is that of its weight label
  (`ReplicaSet.version_of`; the oldest if a span of it was sampled by older weights); a label that is
  none of ours (a replica that restarted between probe and request) fails the request, retried.
- Weight pushes: see `weights/wire.py`; `GET /health`, `GET /weight_info` (`replicas.py`).

Prompts are cut into one contiguous chunk per configured replica, each a single request with `n`;
its seed comes from the step's seed and the chunk's first prompt index, so a chunk yields the same
tokens whichever replica serves it (our server is deterministic per request; vLLM is only as
deterministic as its batch invariance).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any

from rlsd_trainer.remote.http import HttpCallError, call_json
from rlsd_trainer.remote.replicas import RemoteRole, ReplicaError, chunk_bounds
from rlsd_trainer.rollout.engine import Completion, SamplingParams


class RolloutError(ReplicaError):
    """No rollout server could serve a request or take new weights."""


def chunk_seed(seed: int, first_index: int) -> int:
    """The sampling seed of the chunk starting at prompt `first_index` of a request seeded `seed`."""
    digest = hashlib.blake2b(f"{seed}:{first_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # a non-negative signed 64-bit seed


# Sent with every request, so vLLM fills none of them from the model's generation_config: the
# full distribution at the configured temperature and top_p is what the learner assumes.
FULL_DISTRIBUTION = {
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}
# Finish reasons of a response the policy produced (the learner trains on it).
POLICY_FINISH_REASONS = ("stop", "length", "repetition")
# vLLM's floor for a -inf log-prob (`max(logprob, -9999.0)` in its completions serving).
CLAMPED_LOGPROB = -9999.0


def completion_request(
    model_name: str, prompts: Sequence[list[int]], params: SamplingParams, seed: int
) -> dict[str, Any]:
    return {
        "model": model_name,
        "prompt": [list(prompt) for prompt in prompts],
        "n": params.n,
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        **FULL_DISTRIBUTION,
        "seed": seed,
        "logprobs": 0,
        "return_token_ids": True,
        "return_weight_versions": True,
    }


def _logprob(value: Any) -> float:
    """A reported log-prob, NaN when vLLM could not give one (None, or clamped from -inf)."""
    if value is None or float(value) <= CLAMPED_LOGPROB:
        return math.nan
    return float(value)


def _version(choice: dict[str, Any], length: int, version_of: Callable[[str], int]) -> int:
    spans = choice["weight_versions"]
    if not spans or spans[0]["start"] != 0 or spans[-1]["end"] != length:
        raise ValueError(f"weight_versions {spans!r} do not cover the {length} tokens")
    return min(version_of(str(span["version"])) for span in spans)


def parse_completions(
    answer: Any, prompts: int, n: int, version_of: Callable[[str], int]
) -> list[list[Completion]]:
    """`n` completions per prompt from a completions answer; ValueError when it is malformed or a
    choice is not the policy's (aborted, failed, or sampled by weights that are none of ours)."""
    try:
        choices = sorted(answer["choices"], key=lambda choice: choice["index"])
        if len(choices) != prompts * n:
            raise ValueError(f"{len(choices)} choices for {prompts} prompts x n={n}")
        completions = []
        for choice in choices:
            if choice["finish_reason"] not in POLICY_FINISH_REASONS:
                raise ValueError(f"choice {choice['index']} finished with {choice['finish_reason']!r}")
            token_ids = [int(token) for token in choice["token_ids"]]
            logprobs = [_logprob(value) for value in choice["logprobs"]["token_logprobs"]]
            if len(logprobs) != len(token_ids):
                raise ValueError(f"{len(token_ids)} token ids but {len(logprobs)} log-probs")
            version = _version(choice, len(token_ids), version_of)
            completions.append(Completion(token_ids, logprobs, choice["finish_reason"], version))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed completions answer: {exc!r}") from exc
    return [completions[i * n : (i + 1) * n] for i in range(prompts)]


class RemoteRolloutEngine(RemoteRole):
    """Rollouts from vLLM or `rlsd-trainer serve rollout` replicas; see the module docstring."""

    role = "rollout"
    error = RolloutError

    def generate(self, prompts: Sequence[list[int]], params: SamplingParams) -> list[list[Completion]]:
        if not prompts:
            return []
        requests = [
            completion_request(self.model_name, prompts[start:stop], params, chunk_seed(params.seed, start))
            for start, stop in chunk_bounds(len(prompts), len(self.replicas.urls))
        ]
        chunks = self.replicas.map(requests, self._complete)
        return [group for chunk in chunks for group in chunk]

    def _complete(self, url: str, request: dict[str, Any]) -> list[list[Completion]]:
        answer = call_json(self.replicas.http, "POST", url, "/v1/completions", request)
        try:
            return parse_completions(answer, len(request["prompt"]), request["n"], self.replicas.version_of)
        except ValueError as exc:
            raise HttpCallError(url + "/v1/completions", str(exc)) from exc

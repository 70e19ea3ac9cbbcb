"""`rlsd-trainer serve rollout`: the part of vLLM's HTTP surface the trainer uses, on CPU.

Same routes and JSON as vLLM (see `rollout_client.py` for the protocol): `POST /v1/completions` with
token-id prompts, plus the weight-transfer routes, `/health`, `/v1/models` and `/metrics` from
`serving.py`. Sampling is `LocalEngine`'s, seeded by the request's `seed`; one request runs at a
time, so a request (prompts, sampling fields, seed) gives identical tokens on every replica holding
the same weights, started with the same `--max-batch-size` and thread settings. Answers carry an
extra `policy_version` field (vLLM has none).
"""

from __future__ import annotations

import secrets
import time
import uuid
from typing import Any

from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, ConfigDict, Field, field_validator
from transformers import PreTrainedTokenizerBase

from rlsd_trainer.rollout import Completion, LocalEngine, SamplingParams
from rlsd_trainer.serving import ModelHost, create_app, load_host
from rlsd_trainer.weight_transfer import ReceiverBackend


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class CompletionRequest(BaseModel):
    """The `/v1/completions` fields the trainer sends; vLLM ignores unknown fields, and so do we."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: list[list[int]]
    max_tokens: int = Field(16, ge=1)
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    logprobs: int | None = Field(None, ge=0)
    return_token_ids: bool | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _token_id_prompts(cls, value: object) -> object:
        """One prompt (a list of ids) or several (a list of lists), as vLLM; never text here."""
        if isinstance(value, str) or (isinstance(value, list) and any(isinstance(v, str) for v in value)):
            raise ValueError("text prompts are not supported by this server; send token ids")
        if not isinstance(value, list) or not value:
            raise ValueError("must be a non-empty list of token ids, or a list of such lists")
        prompts = [value] if all(_is_token_id(v) for v in value) else value
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, list) or not all(_is_token_id(token) for token in prompt):
                raise ValueError(f"prompt {index} is not a list of integer token ids")
            if not prompt:
                raise ValueError(f"prompt {index} is empty")
        return prompts

    @field_validator("logprobs")
    @classmethod
    def _sampled_token_only(cls, value: int | None) -> int | None:
        if value is not None and value > 0:
            raise ValueError("only 0 (the sampled token's log-prob) is supported by this server")
        return value


def _choice(
    index: int,
    prompt: list[int],
    completion: Completion,
    request: CompletionRequest,
    tokenizer: PreTrainedTokenizerBase,
) -> dict[str, Any]:
    logprobs = None
    if request.logprobs is not None:
        tokens = tokenizer.convert_ids_to_tokens(completion.token_ids)
        logprobs = {
            "token_logprobs": completion.logprobs,
            "tokens": tokens,
            "top_logprobs": [
                {token: value} for token, value in zip(tokens, completion.logprobs, strict=True)
            ],
        }
    return {
        "index": index,
        "text": tokenizer.decode(completion.token_ids, skip_special_tokens=True),
        "logprobs": logprobs,
        "finish_reason": completion.finish_reason,
        "stop_reason": None,
        "token_ids": completion.token_ids if request.return_token_ids else None,
        "prompt_token_ids": prompt if request.return_token_ids else None,
    }


def _router(host: ModelHost, engine: LocalEngine, tokenizer: PreTrainedTokenizerBase) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/completions")
    def completions(request: CompletionRequest) -> dict[str, Any]:
        host.check_model(request.model)
        for index, prompt in enumerate(request.prompt):
            host.check_token_ids(f"prompt[{index}]", prompt)
        params = SamplingParams(
            n=request.n,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            max_new_tokens=request.max_tokens,
            seed=secrets.randbits(63) if request.seed is None else request.seed % 2**64,
        )
        with host.metrics.track(), host.lock:
            groups = engine.generate(request.prompt, params)
            version = host.version
        choices = [
            _choice(i * request.n + j, prompt, completion, request, tokenizer)
            for i, (prompt, group) in enumerate(zip(request.prompt, groups, strict=True))
            for j, completion in enumerate(group)
        ]
        generated = sum(len(completion.token_ids) for group in groups for completion in group)
        host.metrics.tokens.inc(generated)
        prompt_tokens = sum(len(prompt) for prompt in request.prompt)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": host.served_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": generated,
                "total_tokens": prompt_tokens + generated,
            },
            "policy_version": version,
        }

    return router


def build_app(
    model_path: str,
    served_name: str | None,
    max_batch_size: int,
    dtype: str,
    backend: ReceiverBackend,
    transfer_timeout_s: float,
) -> FastAPI:
    host, loaded = load_host(
        "rollout",
        "generated_tokens",
        "Tokens generated (stop tokens included)",
        model_path,
        served_name,
        dtype,
        backend,
        transfer_timeout_s,
    )
    engine = LocalEngine(host.model, loaded.stop_token_ids, max_batch_size)
    return create_app("rollout", host, _router(host, engine, loaded.tokenizer))

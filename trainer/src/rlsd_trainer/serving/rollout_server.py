"""`rlsd-trainer serve rollout`: the part of vLLM 0.33.0's HTTP surface the trainer uses, on CPU.

Same routes and JSON as vLLM (see `remote/rollout_client.py` for the protocol): `POST /v1/completions` with
token-id prompts, plus the RL routes, `/health`, `/v1/models` and `/metrics` from `common.py`.

Sampling fields a request omits are filled as vLLM fills them: from the model's generation_config
(`GenerationConfig.to_diff_dict()`, the fields of ModelConfig.get_diff_sampling_param), else vLLM's
neutral defaults (CompletionRequest._DEFAULT_SAMPLING_PARAMS); tests/conformance checks both copies
against vLLM's code. This server samples the full distribution at temperature / top_p only: a request
that resolves to top_k, min_p or a penalty (sent, or filled from generation_config) is refused with
a 400 naming the field and where its value came from. Log-probs are clamped at -9999.0 as vLLM
clamps them. Sampling is `LocalEngine`'s, seeded by the request's `seed`; one request runs at a
time, so a request (prompts, sampling fields, seed) gives identical tokens on every replica holding
the same weights, started with the same `--max-batch-size` and thread settings.
"""

from __future__ import annotations

import secrets
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, ConfigDict, Field, field_validator
from transformers import AutoConfig, GenerationConfig, PreTrainedTokenizerBase

from rlsd_trainer.rollout.engine import Completion, LocalEngine, SamplingParams
from rlsd_trainer.serving.common import ModelHost, RequestError, create_app, load_host

# vLLM's CompletionRequest._DEFAULT_SAMPLING_PARAMS: a field neither the request nor the model's
# generation_config sets takes this value. Their neutral values are the only ones LocalEngine samples.
VLLM_SAMPLING_DEFAULTS: dict[str, float | int] = {
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
}
# The generation_config fields vLLM reads as sampling defaults (ModelConfig.get_diff_sampling_param).
GENERATION_CONFIG_FIELDS = (
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "max_new_tokens",
    "skip_special_tokens",
)
# What LocalEngine cannot do: any value but the neutral one is refused.
UNSUPPORTED_UNLESS_NEUTRAL = ("top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
# vLLM clamps -inf log-probs to this (the OpenAI completions floor).
LOGPROB_FLOOR = -9999.0


def generation_defaults(model_path: str | Path) -> dict[str, Any]:
    """The sampling defaults vLLM (`--generation-config auto`) takes from a model directory."""
    try:
        config = GenerationConfig.from_pretrained(str(model_path))
    except OSError:  # no generation_config.json: vLLM derives one from config.json
        config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(model_path)))
    diff = config.to_diff_dict()
    defaults = {name: diff[name] for name in GENERATION_CONFIG_FIELDS if diff.get(name) is not None}
    if "max_new_tokens" in defaults:
        defaults["max_tokens"] = defaults.pop("max_new_tokens")
    return defaults


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class CompletionRequest(BaseModel):
    """The `/v1/completions` fields the trainer sends; vLLM ignores unknown fields, and so do we."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: list[list[int]]
    max_tokens: int = Field(16, ge=1)
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    logprobs: int | None = Field(None, ge=0)
    return_token_ids: bool | None = None
    return_weight_versions: bool = False

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


def resolve_sampling(request: CompletionRequest, defaults: dict[str, Any]) -> dict[str, Any]:
    """Each sampling field as vLLM resolves it (CompletionRequest.to_sampling_params): the request's
    value, else the model's generation_config, else vLLM's default; greedy (temperature 0) turns
    top_p, top_k and min_p off, as vLLM's SamplingParams does."""
    resolved = {
        name: value if (value := getattr(request, name)) is not None else defaults.get(name, default)
        for name, default in VLLM_SAMPLING_DEFAULTS.items()
    }
    if resolved["temperature"] < 1e-5:
        resolved.update(top_p=1.0, top_k=0, min_p=0.0)
    return resolved


def _sampling_params(request: CompletionRequest, defaults: dict[str, Any]) -> SamplingParams:
    resolved = resolve_sampling(request, defaults)
    for name in UNSUPPORTED_UNLESS_NEUTRAL:
        neutral = VLLM_SAMPLING_DEFAULTS[name]
        if resolved[name] != neutral and not (name == "top_k" and resolved[name] == -1):
            source = (
                "the request" if getattr(request, name) is not None else "the model's generation_config.json"
            )
            raise RequestError(
                name,
                f"{name}={resolved[name]} (from {source}) is not supported: this CPU server samples the "
                f"full distribution at temperature/top_p; send {name}={neutral}",
            )
    return SamplingParams(
        n=request.n,
        temperature=resolved["temperature"],
        top_p=resolved["top_p"],
        max_new_tokens=request.max_tokens,
        seed=secrets.randbits(63) if request.seed is None else request.seed % 2**64,
    )


def _choice(
    index: int,
    prompt: list[int],
    completion: Completion,
    request: CompletionRequest,
    tokenizer: PreTrainedTokenizerBase,
    label: str,
) -> dict[str, Any]:
    logprobs = None
    if request.logprobs is not None:
        tokens = tokenizer.convert_ids_to_tokens(completion.token_ids)
        values = [max(value, LOGPROB_FLOOR) for value in completion.logprobs]
        logprobs = {
            "text_offset": [],
            "token_logprobs": values,
            "tokens": tokens,
            "top_logprobs": [{token: value} for token, value in zip(tokens, values, strict=True)],
        }
    spans = [{"version": label, "start": 0, "end": len(completion.token_ids)}]
    return {
        "index": index,
        "text": tokenizer.decode(completion.token_ids, skip_special_tokens=True),
        "logprobs": logprobs,
        "finish_reason": completion.finish_reason,
        "stop_reason": None,
        "token_ids": completion.token_ids if request.return_token_ids else None,
        "prompt_token_ids": prompt if request.return_token_ids else None,
        "weight_versions": spans if request.return_weight_versions else None,
    }


def _router(
    host: ModelHost, engine: LocalEngine, tokenizer: PreTrainedTokenizerBase, defaults: dict[str, Any]
) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/completions")
    def completions(request: CompletionRequest) -> dict[str, Any]:
        host.check_model(request.model)
        for index, prompt in enumerate(request.prompt):
            host.check_token_ids(f"prompt[{index}]", prompt)
        params = _sampling_params(request, defaults)
        with host.metrics.track(), host.serving() as label:
            groups = engine.generate(request.prompt, params)
        choices = [
            _choice(i * request.n + j, prompt, completion, request, tokenizer, label)
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
        }

    return router


def build_app(
    model_path: str, served_name: str | None, max_batch_size: int, dtype: str, transfer_timeout_s: float
) -> FastAPI:
    host, loaded = load_host(
        "rollout",
        "generated_tokens",
        "Tokens generated (stop tokens included)",
        model_path,
        served_name,
        dtype,
        transfer_timeout_s,
    )
    engine = LocalEngine(host.model, loaded.stop_token_ids, max_batch_size)
    router = _router(host, engine, loaded.tokenizer, generation_defaults(model_path))
    return create_app("rollout", host, router)

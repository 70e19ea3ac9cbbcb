"""`rlsd-trainer serve teacher`: teacher log-probs of given response tokens, over HTTP.

`POST /v1/score` (see `remote/teacher_client.py` for the JSON) runs `shared_prompt_logprobs`, the function
the learner's colocated `Teacher.score` runs, on the request's groups as one batch (split into
consecutive batches of whole groups only beyond `--max-batch-size` responses), so a request's values
equal `Teacher.score` on the same groups bit for bit. Weight-transfer routes, `/health`,
`/v1/models` and `/metrics` (`rlsd_teacher_*`) come from `common.py`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, Field, StrictInt

from rlsd_trainer.model.logprobs import shared_prompt_logprobs
from rlsd_trainer.serving.common import ModelHost, RequestError, create_app, load_host


class ScoreGroup(BaseModel):
    prompt_ids: list[StrictInt] = Field(min_length=1)
    response_ids: list[list[StrictInt]] = Field(min_length=1)


class ScoreRequest(BaseModel):
    model: str | None = None
    groups: list[ScoreGroup] = Field(min_length=1)
    # Tokens projected onto the vocabulary at a time; the learner's `logprob_chunk_tokens`.
    chunk_tokens: int = Field(256, ge=1)


def _check(host: ModelHost, request: ScoreRequest) -> int:
    """The common group size, after checking every group has it and every id is in the vocabulary."""
    group_size = len(request.groups[0].response_ids)
    for g, group in enumerate(request.groups):
        if len(group.response_ids) != group_size:
            raise RequestError(
                f"groups[{g}].response_ids",
                f"has {len(group.response_ids)} responses; every group needs {group_size} (as groups[0])",
            )
        host.check_token_ids(f"groups[{g}].prompt_ids", group.prompt_ids)
        for r, response in enumerate(group.response_ids):
            host.check_token_ids(f"groups[{g}].response_ids[{r}]", response)
    return group_size


def _router(host: ModelHost, max_batch_size: int) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/score")
    def score(request: ScoreRequest) -> dict[str, Any]:
        host.check_model(request.model)
        group_size = _check(host, request)
        groups_per_batch = max(1, max_batch_size // group_size)
        rows: list[list[float]] = []
        with host.metrics.track(), host.serving() as label:
            for start in range(0, len(request.groups), groups_per_batch):
                batch = request.groups[start : start + groups_per_batch]
                responses = [response for group in batch for response in group.response_ids]
                logprobs = shared_prompt_logprobs(
                    host.model,
                    [group.prompt_ids for group in batch],
                    responses,
                    group_size,
                    request.chunk_tokens,
                )
                rows += [logprobs[i, : len(response)].tolist() for i, response in enumerate(responses)]
        host.metrics.tokens.inc(sum(len(row) for row in rows))
        return {
            "model": host.served_name,
            "weight_version": label,
            "groups": [
                {"logprobs": rows[g * group_size : (g + 1) * group_size]} for g in range(len(request.groups))
            ],
        }

    return router


def build_app(
    model_path: str,
    served_name: str | None,
    max_batch_size: int,
    dtype: str,
    transfer_timeout_s: float,
) -> FastAPI:
    host, _ = load_host(
        "teacher",
        "scored_tokens",
        "Response tokens scored",
        model_path,
        served_name,
        dtype,
        transfer_timeout_s,
    )
    return create_app("teacher", host, _router(host, max_batch_size))

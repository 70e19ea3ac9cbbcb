"""`rlsd-trainer serve teacher`: teacher log-probs of given response tokens, over HTTP.

`POST /v1/score` (see `remote/teacher_client.py` for the JSON) runs `shared_prompt_logprobs`, the function
the learner's colocated `Teacher.score` runs, on the request's groups as one batch (split into
consecutive batches of whole groups only beyond `--max-batch-size` responses), so a request's values
equal `Teacher.score` on the same groups bit for bit. Groups that carry `student_prompt_ids` are
scored under that prompt too, by the same weights within the same hold of the model (a weight update
waits for the request), and the answer's `weight_version` labels both. Weight-transfer routes,
`/health`, `/v1/models` and `/metrics` (`rlsd_teacher_*`) come from `common.py`.
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
    # The student's own prompt (without the privileged context): the responses are scored under it
    # too, with the same weights, when given (in every group of the request, or in none).
    student_prompt_ids: list[StrictInt] | None = Field(None, min_length=1)


class ScoreRequest(BaseModel):
    model: str | None = None
    groups: list[ScoreGroup] = Field(min_length=1)
    # Tokens projected onto the vocabulary at a time; the learner's `logprob_chunk_tokens`.
    chunk_tokens: int = Field(256, ge=1)


def _check(host: ModelHost, request: ScoreRequest) -> int:
    """The common group size, after checking every group has it (and a student prompt exactly when
    groups[0] has one) and every id is in the vocabulary."""
    group_size = len(request.groups[0].response_ids)
    paired = request.groups[0].student_prompt_ids is not None
    for g, group in enumerate(request.groups):
        if len(group.response_ids) != group_size:
            raise RequestError(
                f"groups[{g}].response_ids",
                f"has {len(group.response_ids)} responses; every group needs {group_size} (as groups[0])",
            )
        if (group.student_prompt_ids is not None) != paired:
            raise RequestError(
                f"groups[{g}].student_prompt_ids",
                "must be given in every group or in none (as in groups[0])",
            )
        host.check_token_ids(f"groups[{g}].prompt_ids", group.prompt_ids)
        if group.student_prompt_ids is not None:
            host.check_token_ids(f"groups[{g}].student_prompt_ids", group.student_prompt_ids)
        for r, response in enumerate(group.response_ids):
            host.check_token_ids(f"groups[{g}].response_ids[{r}]", response)
    return group_size


def _router(host: ModelHost, max_batch_size: int) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/score")
    def score(request: ScoreRequest) -> dict[str, Any]:
        host.check_model(request.model)
        group_size = _check(host, request)
        paired = request.groups[0].student_prompt_ids is not None
        groups_per_batch = max(1, max_batch_size // group_size)
        scored: dict[str, list[list[float]]] = {"logprobs": [], "student_logprobs": []}

        def run(key: str, prompts: list[list[int]], responses: list[list[int]]) -> None:
            logprobs = shared_prompt_logprobs(
                host.model, prompts, responses, group_size, request.chunk_tokens
            )
            scored[key] += [logprobs[i, : len(response)].tolist() for i, response in enumerate(responses)]

        # Both prompts inside one hold of the model: one set of weights, the one `label` names.
        with host.metrics.track(), host.serving() as label:
            for start in range(0, len(request.groups), groups_per_batch):
                batch = request.groups[start : start + groups_per_batch]
                responses = [response for group in batch for response in group.response_ids]
                run("logprobs", [group.prompt_ids for group in batch], responses)
                student_prompts = [g.student_prompt_ids for g in batch if g.student_prompt_ids is not None]
                if student_prompts:
                    run("student_logprobs", student_prompts, responses)
        host.metrics.tokens.inc(sum(len(row) for rows in scored.values() for row in rows))
        keys = ("logprobs", "student_logprobs") if paired else ("logprobs",)
        return {
            "model": host.served_name,
            "weight_version": label,
            "groups": [
                {key: scored[key][g * group_size : (g + 1) * group_size] for key in keys}
                for g in range(len(request.groups))
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

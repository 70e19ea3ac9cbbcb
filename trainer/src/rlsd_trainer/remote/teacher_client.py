"""`RemoteTeacherClient`: teacher log-probs from `rlsd-trainer serve teacher` replicas.

The scoring route is ours (vLLM has no equivalent that takes response ids under a different
prompt): `POST /v1/score {"model", "groups": [{"prompt_ids": [...], "response_ids": [[...], ...],
"student_prompt_ids"?: [...]}], "chunk_tokens"}` answers `{"weight_version", "groups": [{"logprobs":
[[...], ...], "student_logprobs"?: [[...], ...]}]}`, one float per response token. The server runs
`shared_prompt_logprobs`, the learner's own function; float32 values survive JSON exactly, so a
request scores bit for bit what the colocated `Teacher.score` gives on the same groups in one batch.
With `student_prompt_ids` the same weights also score each response under the student's prompt, in
the same request (a same-version pair for RLSD's Delta, see `StepPlan.paired_student_logprobs`).
Groups are cut into one contiguous chunk per configured replica.

Every answer must come from the weights of our last push: its `weight_version` is checked against
that label (as the rollout client checks each completion's), so a replica that missed a push, or
restarted or was updated between the readiness probe and the request, never scores; the request is
retried on another replica, and the call fails naming every replica and label when none has them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlsd_trainer.remote.http import HttpCallError, call_json
from rlsd_trainer.remote.replicas import RemoteRole, ReplicaError, chunk_bounds


class TeacherError(ReplicaError):
    """No teacher server could score a request or take new weights."""


@dataclass(frozen=True)
class TeacherScores:
    """What the teacher servers scored, all with one set of weights."""

    teacher: torch.Tensor  # [B, T] log-probs under the privileged prompt (0 on padding), as Teacher.score
    student: torch.Tensor | None  # [B, T] the same weights' under the student's prompt, when asked
    version: int  # the policy version of those weights (the last one pushed)


class RemoteTeacherClient(RemoteRole):
    role = "teacher"
    error = TeacherError

    def __init__(self, *args: Any, chunk_tokens: int = 256, **kwargs: Any) -> None:
        """`RemoteRole`'s arguments, plus the tokens projected onto the vocabulary at a time (the
        learner's `logprob_chunk_tokens`)."""
        super().__init__(*args, **kwargs)
        self.chunk_tokens = chunk_tokens

    def score(
        self,
        prompts: list[list[int]],
        responses: list[list[int]],
        group_size: int,
        student_prompts: list[list[int]] | None = None,
    ) -> TeacherScores:
        """Log-probs of each response token after its group's privileged prompt in `prompts` (and,
        with `student_prompts`, one per group too, after that prompt), by the weights last pushed."""
        if len(responses) != len(prompts) * group_size:
            raise ValueError(f"{len(responses)} responses for {len(prompts)} prompts x group {group_size}")
        if student_prompts is not None and len(student_prompts) != len(prompts):
            raise ValueError(f"{len(student_prompts)} student prompts for {len(prompts)} groups")
        requests = [
            {
                "model": self.model_name,
                "groups": [
                    {
                        "prompt_ids": prompts[g],
                        "response_ids": responses[g * group_size : (g + 1) * group_size],
                        **({"student_prompt_ids": student_prompts[g]} if student_prompts is not None else {}),
                    }
                    for g in range(start, stop)
                ],
                "chunk_tokens": self.chunk_tokens,
            }
            for start, stop in chunk_bounds(len(prompts), len(self.replicas.urls))
        ]
        # The label our answers must carry, read before any request: pushes and scoring run in turn.
        label, version = self.replicas.current, self.replicas.policy_version
        chunks = self.replicas.map(requests, lambda url, request: self._score(url, request, label))

        def rows(key: str) -> list[list[float]]:
            return [row for chunk in chunks for row in chunk[key]]

        student = _padded(rows("student_logprobs"), responses) if student_prompts is not None else None
        return TeacherScores(_padded(rows("logprobs"), responses), student, version)

    def _score(self, url: str, request: dict[str, Any], label: str) -> dict[str, list[list[float]]]:
        """The rows of one request by answer key (`logprobs`, and `student_logprobs` when asked); a
        malformed answer, or one from other weights than `label`, fails it (retryable: another
        replica may hold them)."""
        answer = call_json(self.replicas.http, "POST", url, "/v1/score", request)
        keys = ["logprobs"] + (["student_logprobs"] if "student_prompt_ids" in request["groups"][0] else [])
        try:
            served = answer["weight_version"]
            groups = answer["groups"]
            rows = {key: [list(map(float, row)) for group in groups for row in group[key]] for key in keys}
        except (KeyError, TypeError, ValueError) as exc:
            raise HttpCallError(url + "/v1/score", f"malformed score answer: {exc!r}") from exc
        if served != label:
            raise HttpCallError(
                url + "/v1/score", f"scored with weights labelled {served!r}, not the pushed {label!r}"
            )
        return rows


def _padded(rows: list[list[float]], responses: list[list[int]]) -> torch.Tensor:
    """`[B, T]` float32 log-probs, zero-padded; every row must have its response's length."""
    width = max(1, max((len(response) for response in responses), default=0))
    logprobs = torch.zeros((len(responses), width), dtype=torch.float32)
    for index, (row, response) in enumerate(zip(rows, responses, strict=True)):
        if len(row) != len(response):
            raise TeacherError(f"teacher scored {len(row)} tokens of a {len(response)}-token response")
        logprobs[index, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return logprobs

"""`RemoteTeacherClient`: teacher log-probs from `rlsd-trainer serve teacher` replicas.

The scoring route is ours (vLLM has no equivalent that takes response ids under a different
prompt): `POST /v1/score {"model", "groups": [{"prompt_ids": [...], "response_ids": [[...], ...]}],
"chunk_tokens"}` answers `{"weight_version", "groups": [{"logprobs": [[...], ...]}]}`, one float per
response token. The server runs `shared_prompt_logprobs`, the learner's own function; float32 values
survive JSON exactly, so a request scores bit for bit what the colocated `Teacher.score` gives on the
same groups in one batch. Groups are cut into one contiguous chunk per configured replica.
"""

from __future__ import annotations

from typing import Any

import torch

from rlsd_trainer.remote.http import HttpCallError, call_json
from rlsd_trainer.remote.replicas import RemoteRole, ReplicaError, chunk_bounds


class TeacherError(ReplicaError):
    """No teacher server could score a request or take new weights."""


class RemoteTeacherClient(RemoteRole):
    role = "teacher"
    error = TeacherError

    def __init__(self, *args: Any, chunk_tokens: int = 256, **kwargs: Any) -> None:
        """`RemoteRole`'s arguments, plus the tokens projected onto the vocabulary at a time (the
        learner's `logprob_chunk_tokens`)."""
        super().__init__(*args, **kwargs)
        self.chunk_tokens = chunk_tokens

    def score(self, prompts: list[list[int]], responses: list[list[int]], group_size: int) -> torch.Tensor:
        """Teacher log-probs `[B, T]` of each response token (0 on padding), as `Teacher.score`."""
        if len(responses) != len(prompts) * group_size:
            raise ValueError(f"{len(responses)} responses for {len(prompts)} prompts x group {group_size}")
        requests = [
            {
                "model": self.model_name,
                "groups": [
                    {
                        "prompt_ids": prompts[g],
                        "response_ids": responses[g * group_size : (g + 1) * group_size],
                    }
                    for g in range(start, stop)
                ],
                "chunk_tokens": self.chunk_tokens,
            }
            for start, stop in chunk_bounds(len(prompts), len(self.replicas.urls))
        ]
        rows = [row for chunk in self.replicas.map(requests, self._score) for row in chunk]
        width = max(1, max((len(response) for response in responses), default=0))
        logprobs = torch.zeros((len(responses), width), dtype=torch.float32)
        for index, (row, response) in enumerate(zip(rows, responses, strict=True)):
            if len(row) != len(response):
                raise TeacherError(f"teacher scored {len(row)} tokens of a {len(response)}-token response")
            logprobs[index, : len(row)] = torch.tensor(row, dtype=torch.float32)
        return logprobs

    def _score(self, url: str, request: dict[str, Any]) -> list[list[float]]:
        answer = call_json(self.replicas.http, "POST", url, "/v1/score", request)
        try:
            return [list(map(float, row)) for group in answer["groups"] for row in group["logprobs"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise HttpCallError(url + "/v1/score", f"malformed score answer: {exc!r}") from exc

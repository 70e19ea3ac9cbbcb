"""`RemoteRolloutEngine`: the `RolloutEngine` protocol over HTTP, against vLLM or our CPU server.

The vLLM protocol we speak (vLLM main with the `disk` backend and the no-vLLM NCCL example; older
releases may lack `nccl_unique_id_b64`, `/weight_info` or the disk backend):
- Weight transfer (https://docs.vllm.ai/en/latest/training/weight_transfer/; routes in
  vllm/entrypoints/serve/dev/rlhf/api_router.py, served with `VLLM_SERVER_DEV_MODE=1` and
  `--weight-transfer-config '{"backend": "nccl"|"disk"}'`): `POST /init_weight_transfer_engine
  {"init_info"}`, `POST /start_weight_update` (no body), `POST /update_weights {"update_info"}`, `POST
  /finish_weight_update {"weight_version": str}` (optional), `GET /weight_info` -> {"weight_version"},
  `GET /get_world_size` -> {"world_size"}. NCCL init_info (nccl_common.py NCCLWeightTransferInitInfo):
  rank_offset, world_size, and either master_address + master_port (vLLM's StatelessProcessGroup,
  which needs vLLM on the trainer) or nccl_unique_id_b64 (the torch-only path of
  https://docs.vllm.ai/en/latest/examples/rl/rlhf_http_nccl_no_vllm/); optional packed,
  packed_buffer_size_bytes, packed_num_buffers (we leave packing off). NCCL update_info
  (nccl_engine.py): names, dtype_names (torch attribute names), shapes; unpacked tensors are
  broadcast from rank 0 one by one in that order, concurrently with the `/update_weights` calls.
  Disk backend (docs/training/weight_transfer/disk.md, disk_engine.py): init_info {}, update_info
  {"path": absolute directory of safetensors}: vLLM's route for reloading from a shared filesystem.
  `weight_transfer.py` implements all of this.
- Completions (vllm/entrypoints/openai/completion/protocol.py): `POST /v1/completions` with `prompt`
  as token ids (one list, or a list of lists), `n`, `max_tokens`, `temperature`, `top_p`, `seed`,
  `logprobs: 0` (the sampled token's log-prob only) and vLLM's `return_token_ids: true`. Choices come
  prompt-major (index = prompt * n + sample), each with `token_ids` (generated ids, EOS included),
  `prompt_token_ids`, `logprobs.token_logprobs`, `finish_reason` ("stop" | "length"). Log-probs are of
  the raw model distribution (vLLM's default `logprobs_mode`). vLLM fills sampling fields a request
  omits from the model's generation_config, so we always send them. `GET /health` answers 200;
  `GET /v1/models` lists the served name. vLLM reports no policy version with completions: we track
  it ourselves (and read our CPU server's extra `policy_version` field when present).

Prompts are cut into one contiguous chunk per configured replica, each a single request with `n`;
its seed comes from the step's seed and the chunk's first prompt index, so a chunk yields the same
tokens whichever replica serves it (our server is deterministic per request; vLLM is only as
deterministic as its batch invariance).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from rlsd_trainer.httpjson import HttpCallError, call_json
from rlsd_trainer.replicas import RemoteRole, ReplicaError, chunk_bounds
from rlsd_trainer.rollout import Completion, SamplingParams


class RolloutError(ReplicaError):
    """No rollout server could serve a request or take new weights."""


def chunk_seed(seed: int, first_index: int) -> int:
    """The sampling seed of the chunk starting at prompt `first_index` of a request seeded `seed`."""
    digest = hashlib.blake2b(f"{seed}:{first_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # a non-negative signed 64-bit seed


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
        "seed": seed,
        "logprobs": 0,
        "return_token_ids": True,
    }


def parse_completions(answer: Any, prompts: int, n: int, version: int) -> list[list[Completion]]:
    """`n` completions per prompt from a completions answer; ValueError when it is malformed."""
    try:
        choices = sorted(answer["choices"], key=lambda choice: choice["index"])
        if len(choices) != prompts * n:
            raise ValueError(f"{len(choices)} choices for {prompts} prompts x n={n}")
        version = int(answer.get("policy_version", version))
        completions = []
        for choice in choices:
            token_ids = [int(token) for token in choice["token_ids"]]
            logprobs = [float(value) for value in choice["logprobs"]["token_logprobs"]]
            if len(logprobs) != len(token_ids):
                raise ValueError(f"{len(token_ids)} token ids but {len(logprobs)} log-probs")
            if choice["finish_reason"] not in ("stop", "length"):
                raise ValueError(f"finish_reason {choice['finish_reason']!r}")
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
            return parse_completions(answer, len(request["prompt"]), request["n"], self.policy_version)
        except ValueError as exc:
            raise HttpCallError(url + "/v1/completions", str(exc)) from exc

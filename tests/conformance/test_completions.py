"""Our `/v1/completions` requests and answers against vLLM's own request and response code.

Requests: every request our client sends is parsed by vLLM's CompletionRequest and turned into
SamplingParams with the defaults vLLM's ModelConfig reads from the model's generation_config.json
(which sets top_k, min_p and penalties here); the result must be what the run configured. Our CPU
server must resolve the same fields to the same values. Answers: vLLM's own response builder
(OpenAIServingCompletion.request_output_to_completion_response) turns engine outputs with every
finish reason, clamped and missing log-probs and weight-version spans into the JSON our client
parses; our CPU server's answers must validate as vLLM's CompletionResponse.
"""

from __future__ import annotations

import ast
import inspect
import math
import textwrap
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from vllm.config import ModelConfig
from vllm.entrypoints.generate.base.protocol import RequestResponseMetadata
from vllm.entrypoints.openai.completion.protocol import CompletionRequest as VllmRequest
from vllm.entrypoints.openai.completion.protocol import CompletionResponse
from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.exceptions import GenerationError
from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput, RequestError, RequestOutput, WeightVersionSpan
from vllm.v1.engine.core import EngineCoreProc

from rlsd_trainer.remote.rollout_client import completion_request, parse_completions
from rlsd_trainer.rollout.engine import SamplingParams
from rlsd_trainer.serving import rollout_server

NAME = "policy"
PROMPTS = [[5, 6, 7], [8, 9]]
# What the loop sends: rollouts (configured temperature / top_p), and greedy held-out evaluation.
RUN_SAMPLING = [
    SamplingParams(n=4, temperature=1.0, top_p=1.0, max_new_tokens=64, seed=7),
    SamplingParams(n=2, temperature=0.7, top_p=0.9, max_new_tokens=32, seed=11),
    SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=16, seed=0),
]
SAMPLING_FIELDS = list(rollout_server.VLLM_SAMPLING_DEFAULTS)


@pytest.fixture(scope="module")
def vllm_defaults(model_dir: Path) -> dict[str, Any]:
    """What `vllm serve <model_dir>` fills omitted sampling fields from (--generation-config auto)."""
    return ModelConfig(model=str(model_dir)).get_diff_sampling_param()


def test_the_model_makes_vllm_truncate_the_distribution(vllm_defaults: dict[str, Any]) -> None:
    """The premise: this model's generation_config.json would change every field we leave out."""
    assert vllm_defaults["top_k"] == 20 and vllm_defaults["min_p"] == 0.05
    assert vllm_defaults["repetition_penalty"] == 1.1 and vllm_defaults["presence_penalty"] == 0.5


def test_our_cpu_server_falls_back_exactly_as_vllm(model_dir: Path, vllm_defaults: dict[str, Any]) -> None:
    assert rollout_server.VLLM_SAMPLING_DEFAULTS == VllmRequest(prompt=[1])._DEFAULT_SAMPLING_PARAMS
    assert rollout_server.generation_defaults(model_dir) == vllm_defaults


@pytest.mark.parametrize("params", RUN_SAMPLING, ids=["rollout", "nucleus", "greedy-eval"])
def test_vllm_samples_what_the_run_configured_from_our_requests(
    params: SamplingParams, vllm_defaults: dict[str, Any], model_dir: Path
) -> None:
    """Problem 3: vLLM fills every sampling field a request leaves out from generation_config; our
    requests leave none out, so vLLM samples the full distribution at the configured temperature
    and top_p, as the learner assumes."""
    body = completion_request(NAME, PROMPTS, params, seed=12345)
    request = VllmRequest.model_validate(body)
    sampling = request.to_sampling_params(body["max_tokens"], vllm_defaults)
    greedy = params.temperature == 0.0
    assert (sampling.temperature, sampling.top_p) == (params.temperature, 1.0 if greedy else params.top_p)
    assert (sampling.top_k, sampling.min_p) == (0, 0.0)
    assert (sampling.repetition_penalty, sampling.presence_penalty, sampling.frequency_penalty) == (
        1.0,
        0.0,
        0.0,
    )
    assert (sampling.n, sampling.seed, sampling.max_tokens, sampling.logprobs) == (
        params.n,
        12345,
        params.max_new_tokens,
        0,
    )
    assert request.return_token_ids and request.return_weight_versions and request.prompt == PROMPTS
    # Our CPU server resolves the same request to the same values.
    ours = rollout_server.resolve_sampling(
        rollout_server.CompletionRequest.model_validate(body), rollout_server.generation_defaults(model_dir)
    )
    assert ours == {name: getattr(sampling, name) for name in SAMPLING_FIELDS}


def test_a_request_that_leaves_fields_out_is_filled_alike_and_refused_by_our_server(
    vllm_defaults: dict[str, Any], model_dir: Path
) -> None:
    """The old request (temperature and top_p only): vLLM would sample with top_k 20, min_p and
    penalties from generation_config; our server resolves the same and refuses to pretend."""
    body = {
        "model": NAME,
        "prompt": PROMPTS,
        "n": 2,
        "max_tokens": 8,
        "temperature": 1.0,
        "top_p": 1.0,
        "seed": 1,
    }
    sampling = VllmRequest.model_validate(body).to_sampling_params(8, vllm_defaults)
    resolved = rollout_server.resolve_sampling(
        rollout_server.CompletionRequest.model_validate(body), vllm_defaults
    )
    assert resolved == {name: getattr(sampling, name) for name in SAMPLING_FIELDS}
    assert sampling.top_k == 20
    app = rollout_server.build_app(str(model_dir), NAME, 64, "float32", 60.0)
    answer = TestClient(app).post("/v1/completions", json=body)
    assert answer.status_code == 400
    assert (
        answer.json()["error"]["param"] == "top_k"
        and "generation_config" in answer.json()["error"]["message"]
    )


# --------------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------------


def vllm_answer(outputs: list[list[CompletionOutput]], body: dict[str, Any]) -> dict[str, Any]:
    """vLLM's own response builder on engine outputs (one RequestOutput per prompt), as JSON."""
    serving = object.__new__(OpenAIServingCompletion)
    serving.return_tokens_as_token_ids = True  # no tokenizer needed to name the tokens
    serving.enable_prompt_tokens_details = False
    serving.enable_per_request_metrics = False
    serving.system_fingerprint = None
    request = VllmRequest.model_validate(body)
    batch = [
        RequestOutput(f"r{i}", None, prompt, None, group, finished=True)
        for i, (prompt, group) in enumerate(zip(body["prompt"], outputs, strict=True))
    ]
    response = serving.request_output_to_completion_response(
        batch, request, "cmpl-1", 0, NAME, None, RequestResponseMetadata(request_id="cmpl-1")
    )
    return response.model_dump(mode="json")


def output(
    index: int,
    tokens: list[int],
    logprobs: list[float | None],
    reason: str,
    spans: list[tuple[str, int, int]],
) -> CompletionOutput:
    return CompletionOutput(
        index=index,
        text="",
        token_ids=tokens,
        cumulative_logprob=None,
        logprobs=[None if lp is None else {t: Logprob(lp)} for t, lp in zip(tokens, logprobs, strict=True)],
        finish_reason=reason,
        weight_versions=[WeightVersionSpan(v, start, end) for v, start, end in spans],
    )


def body_for(n: int) -> dict[str, Any]:
    return completion_request(NAME, PROMPTS, SamplingParams(n=n, max_new_tokens=8), seed=3)


def labels(policy_version: int) -> Any:
    """`ReplicaSet.version_of` of a client that has pushed `policy_version`."""

    def version_of(label: str) -> int:
        if label.isdigit() and int(label) <= policy_version:
            return int(label)
        raise ValueError(f"weights labelled {label!r} are none of ours")

    return version_of


def test_stop_length_and_repetition_answers_are_parsed_with_unknown_logprobs_as_nan() -> None:
    """Problem 6: vLLM reports a -inf log-prob as -9999.0 and a missing one as None; both are unknown
    (NaN) to the learner. `repetition` is a response the policy produced, cut short like `length`."""
    outputs = [
        [
            output(0, [11, 12, 1], [-0.5, float("-inf"), -0.25], "stop", [("4", 0, 3)]),
            output(1, [13, 14], [None, -1.5], "length", [("4", 0, 2)]),
        ],
        [
            output(0, [15, 15, 15], [-0.1, -0.2, -0.3], "repetition", [("3", 0, 1), ("4", 1, 3)]),
            output(1, [1], [-2.0], "stop", [("4", 0, 1)]),
        ],
    ]
    answer = vllm_answer(outputs, body_for(2))
    assert answer["choices"][0]["logprobs"]["token_logprobs"][1] == -9999.0  # vLLM's clamp
    assert answer["choices"][1]["logprobs"]["token_logprobs"][0] is None
    groups = parse_completions(answer, len(PROMPTS), 2, labels(4))
    first, second = groups
    assert first[0].token_ids == [11, 12, 1] and first[0].logprobs[0] == -0.5
    assert math.isnan(first[0].logprobs[1]) and math.isnan(first[1].logprobs[0])
    assert [c.finish_reason for c in first + second] == ["stop", "length", "repetition", "stop"]
    # A completion partly sampled by older weights counts as the oldest of them.
    assert [c.policy_version for c in first + second] == [4, 4, 3, 4]


@pytest.mark.parametrize("reason", ["abort", None])
def test_an_aborted_choice_is_not_the_policys_and_fails_the_request(reason: str | None) -> None:
    outputs = [
        [output(0, [11], [-0.5], "stop", [("1", 0, 1)])],
        [output(0, [12], [-0.5], reason, [("1", 0, 1)])],
    ]  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finished with"):
        parse_completions(vllm_answer(outputs, body_for(1)), len(PROMPTS), 1, labels(1))


def test_an_error_finish_is_a_500_from_vllm_itself() -> None:
    """`error` never reaches a choice: vLLM answers 500 (GenerationError), which our client retries
    on another replica like any server failure."""
    outputs = [
        [output(0, [11], [-0.5], "error", [("1", 0, 1)])],
        [output(0, [12], [-0.5], "stop", [("1", 0, 1)])],
    ]
    with pytest.raises(GenerationError):
        vllm_answer(outputs, body_for(1))


def test_weights_that_are_none_of_ours_fail_the_request() -> None:
    """A replica that restarted between the probe and the request samples with "default" weights."""
    outputs = [
        [output(0, [11], [-0.5], "stop", [("default", 0, 1)])],
        [output(0, [12], [-0.5], "stop", [("2", 0, 1)])],
    ]
    with pytest.raises(ValueError, match="default"):
        parse_completions(vllm_answer(outputs, body_for(1)), len(PROMPTS), 1, labels(2))


def test_our_cpu_servers_answer_is_a_vllm_completion_response(model_dir: Path) -> None:
    app = rollout_server.build_app(str(model_dir), NAME, 64, "float32", 60.0)
    body = completion_request(NAME, PROMPTS, SamplingParams(n=2, max_new_tokens=6, seed=5), seed=5)
    answer = TestClient(app).post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    response = CompletionResponse.model_validate(answer.json())
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    for choice in response.choices:
        assert choice.weight_versions == [WeightVersionSpan("default", 0, len(choice.token_ids or []))]
    groups = parse_completions(answer.json(), len(PROMPTS), 2, {"default": 0}.__getitem__)
    assert all(len(c.token_ids) == len(c.logprobs) for group in groups for c in group)


def paused_engine_error() -> RequestError:
    """The error vLLM's engine core gives a request added while paused (`pause_generation` in mode
    `wait` or `abort`), read from `EngineCoreProc._reject_add_while_paused`'s source."""
    source = textwrap.dedent(inspect.getsource(EngineCoreProc._reject_add_while_paused))
    (call,) = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "RequestError"
    ]
    return RequestError(**{keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords})


def test_a_paused_cpu_server_turns_requests_away_as_vllm_does(model_dir: Path) -> None:
    """While paused, vLLM answers a new completion with the HTTP status and body its exception
    handling makes of that error (503, retryable: our client waits and sends it again); our CPU
    server, paused the way our client pauses vLLM, answers the same, and serves again on /resume."""
    error = paused_engine_error()
    assert error.retryable
    refusal = error.to_exception()
    expected = create_error_response(refusal).model_dump(mode="json")
    app = rollout_server.build_app(str(model_dir), NAME, 64, "float32", 60.0)
    client = TestClient(app)
    body = completion_request(NAME, PROMPTS, SamplingParams(n=1, max_new_tokens=4, seed=5), seed=5)
    assert client.post("/pause", params={"mode": "wait", "clear_cache": True}).status_code == 200
    answer = client.post("/v1/completions", json=body)
    assert (answer.status_code, answer.json()) == (refusal.status_code, expected)
    assert client.post("/resume").status_code == 200
    assert client.post("/v1/completions", json=body).status_code == 200

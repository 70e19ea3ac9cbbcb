"""Rollout and teacher servers as real processes on loopback, and the clients that talk to them.

The servers run `rlsd-trainer serve ...` on a tiny random Qwen3 saved to disk; this process plays
learner rank 0 for gloo weight transfers. Every server and this process compute with one thread, so
their float results can be compared exactly.
"""

from __future__ import annotations

import importlib
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from functools import partial
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from processes import Server, free_port, one_torch_thread, start_server, wait_healthy
from tiny_models import EOS, save_tiny_model, tiny_model
from transformers import AutoModelForCausalLM, PreTrainedModel

from rlsd_contracts import liveness
from rlsd_contracts.config import load_config
from rlsd_contracts.run_token import RunTokenError
from rlsd_contracts.wire import OPEN_PATHS, RUN_TOKEN_FILE_ENV, RUN_TOKEN_MIDDLEWARE
from rlsd_trainer.cli import _served_model
from rlsd_trainer.cli import main as cli_main
from rlsd_trainer.model.embedded import build_model_dir
from rlsd_trainer.model.logprobs import shared_prompt_logprobs
from rlsd_trainer.remote.http import HttpCallError
from rlsd_trainer.remote.replicas import chunk_bounds
from rlsd_trainer.remote.rollout_client import (
    RemoteRolloutEngine,
    RolloutError,
    chunk_seed,
    completion_request,
    parse_completions,
)
from rlsd_trainer.remote.teacher_client import RemoteTeacherClient
from rlsd_trainer.rollout.engine import Completion, LocalEngine, SamplingParams
from rlsd_trainer.serving.auth import RunTokenMiddleware, authorization_headers
from rlsd_trainer.serving.rollout_server import build_app as rollout_app
from rlsd_trainer.serving.teacher_server import build_app as teacher_app
from rlsd_trainer.weights.sender import BroadcastSender
from rlsd_trainer.weights.wire import TransferError, broadcast_update_info

NAME = "policy"
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [20], [30, 31, 32, 33]]
PARAMS = SamplingParams(n=2, temperature=1.0, top_p=0.9, max_new_tokens=8, seed=11)
# What vLLM 0.33.0's server answers a request its paused engine core turned away (503).
PAUSED_ANSWER = {
    "message": "Generation is paused. Please retry after it resumes.",
    "type": "ServiceUnavailableError",
    "param": None,
    "code": 503,
}


@contextmanager
def _servers(specs: list[tuple[str, str]], model_dir: Path, log_dir: Path) -> Iterator[list[Server]]:
    servers = [start_server(role, model_dir, log_dir, NAME, backend) for role, backend in specs]
    try:
        wait_healthy(servers)
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def servers(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """Two rollout replicas, a third for filesystem reloads and malformed requests, and a teacher."""
    specs = {
        "r1": ("rollout", "gloo"),
        "r2": ("rollout", "gloo"),
        "fs": ("rollout", "gloo"),
        "teacher": ("teacher", "gloo"),
    }
    with _servers(list(specs.values()), model_dir, tmp_path_factory.mktemp("logs")) as started:
        yield dict(zip(specs, started, strict=True))


def _load(model_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def _local_chunks(
    model: PreTrainedModel, prompts: list[list[int]], params: SamplingParams, replicas: int, version: int
) -> list[list[Completion]]:
    """What the remote engine must return: LocalEngine on each chunk, with the chunk's seed."""
    engine = LocalEngine(model, [EOS])
    engine.policy_version = version
    groups: list[list[Completion]] = []
    for start, stop in chunk_bounds(len(prompts), replicas):
        groups += engine.generate(prompts[start:stop], replace(params, seed=chunk_seed(params.seed, start)))
    return groups


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


# --------------------------------------------------------------------------------------------------
# Rollout
# --------------------------------------------------------------------------------------------------


def test_completion_equals_local_engine_and_is_identical_across_replicas(
    servers: dict[str, Server], model_dir: Path
) -> None:
    body = completion_request(NAME, PROMPTS, PARAMS, seed=PARAMS.seed)
    answers = [httpx.post(servers[r].url + "/v1/completions", json=body).json() for r in ("r1", "r2")]
    assert answers[0]["choices"] == answers[1]["choices"]
    expected = LocalEngine(_load(model_dir), [EOS]).generate(PROMPTS, PARAMS)
    assert parse_completions(answers[0], len(PROMPTS), PARAMS.n, {"default": 0}.__getitem__) == expected
    choice = answers[0]["choices"][PARAMS.n]  # prompt 1, sample 0
    assert choice["prompt_token_ids"] == PROMPTS[1] and choice["index"] == PARAMS.n
    assert answers[0]["usage"]["completion_tokens"] == sum(len(c.token_ids) for g in expected for c in g)

    engine = RemoteRolloutEngine([servers["r1"].url, servers["r2"].url], NAME, "gloo")
    try:
        assert engine.generate(PROMPTS, PARAMS) == _local_chunks(_load(model_dir), PROMPTS, PARAMS, 2, 0)
    finally:
        engine.close()
    assert httpx.get(servers["r1"].url + "/v1/models").json()["data"][0]["id"] == NAME


def test_gloo_update_makes_replicas_generate_what_the_new_weights_do(
    servers: dict[str, Server], model_dir: Path
) -> None:
    urls = [servers["r1"].url, servers["r2"].url]
    engine = RemoteRolloutEngine(urls, NAME, "gloo", transfer_host="127.0.0.1", transfer_port=0)
    new = tiny_model(seed=1)
    try:
        engine.update_weights(new.named_parameters(), version=1)
        assert engine.policy_version == 1
        assert engine.generate(PROMPTS, PARAMS) == _local_chunks(new, PROMPTS, PARAMS, 2, 1)
        assert all(httpx.get(url + "/weight_info").json() == {"weight_version": "1"} for url in urls)
        assert _metric(urls[0], "rlsd_rollout_policy_version") == 1.0
    finally:
        # Leave the replicas on the initial policy for the other tests (same group, no rebuild).
        engine.update_weights(_load(model_dir).named_parameters(), version=0)
        assert engine.replicas.sender.groups_built == 1
        engine.close()


def test_a_paused_replica_turns_requests_away_as_vllm_and_the_client_waits_for_it(
    servers: dict[str, Server], model_dir: Path
) -> None:
    """vLLM's engine core rejects new requests while paused (mode wait or abort) with a retryable
    `engine_paused` error, answered 503 (tests/conformance derives the body from vLLM's code); the
    client sends the request again once the replica resumes, and gets the same tokens."""
    url = servers["r2"].url
    engine = RemoteRolloutEngine([url], NAME, "gloo")
    result: list[list[list[Completion]]] = []
    worker = threading.Thread(target=lambda: result.append(engine.generate(PROMPTS, PARAMS)))
    try:
        engine.update_weights(_load(model_dir).named_parameters(), version=0)  # a push pauses and resumes
        assert httpx.post(url + "/pause?mode=wait").status_code == 200
        refused = httpx.post(url + "/v1/completions", json=completion_request(NAME, PROMPTS, PARAMS, seed=1))
        assert refused.status_code == 503
        assert refused.json() == {"error": PAUSED_ANSWER}
        errors = _metric(url, 'rlsd_rollout_requests_total{outcome="error"}')
        worker.start()
        while _metric(url, 'rlsd_rollout_requests_total{outcome="error"}') < errors + 2:  # asked twice
            assert worker.is_alive(), "the request did not wait for the paused replica"
        assert httpx.post(url + "/resume").status_code == 200
        worker.join()
        assert result == [_local_chunks(_load(model_dir), PROMPTS, PARAMS, 1, 0)]
    finally:
        httpx.post(url + "/resume")
        if worker.ident is not None:
            worker.join(timeout=60)
        engine.close()


def test_filesystem_update_reloads_from_the_shared_directory(
    servers: dict[str, Server], tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    engine = RemoteRolloutEngine([servers["fs"].url], NAME, "filesystem", shared_dir=shared)
    try:
        for version, seed in ((3, 2), (4, 3)):
            new = tiny_model(seed=seed)
            engine.update_weights(new.named_parameters(), version=version)
            assert engine.generate(PROMPTS, PARAMS) == _local_chunks(new, PROMPTS, PARAMS, 1, version)
            # Written under a temp name then renamed; older versions are pruned once all servers hold it.
            assert [p.name for p in shared.iterdir()] == [f"policy-v{version:08d}"]
    finally:
        engine.close()


def test_replica_killed_mid_request_is_retried_elsewhere_then_all_dead_is_a_clear_error(
    model_dir: Path, tmp_path: Path
) -> None:
    params = SamplingParams(n=4, temperature=1.0, top_p=1.0, max_new_tokens=120, seed=5)
    prompts = [[3 + i, 40 + i] for i in range(8)]
    with _servers([("rollout", "gloo"), ("rollout", "gloo")], model_dir, tmp_path) as (first, second):
        urls = [first.url, second.url]
        engine = RemoteRolloutEngine(urls, NAME, "gloo", request_timeout_s=60.0, max_retries=1)
        try:
            engine.update_weights(_load(model_dir).named_parameters(), version=1)
            baseline = engine.generate(prompts, params)
            assert baseline == _local_chunks(_load(model_dir), prompts, params, 2, 1)
            served_before = _metric(second.url, 'rlsd_rollout_requests_total{outcome="ok"}')

            # Kill the first replica while it works on chunk 0: the chunk is redone on the second.
            result: list[list[list[Completion]]] = []
            worker = threading.Thread(target=lambda: result.append(engine.generate(prompts, params)))
            worker.start()
            while _metric(first.url, "rlsd_rollout_requests_in_flight") < 1:
                assert worker.is_alive(), "chunk 0 finished before the replica could be killed"
            first.kill()
            worker.join()
            assert result == [baseline]
            assert _metric(second.url, 'rlsd_rollout_requests_total{outcome="ok"}') == served_before + 2

            # Dead before the request: the health probe leaves it out.
            assert engine.generate(prompts, params) == baseline
            # The live set changed: the next update builds a new group (new port) with the survivor.
            new = tiny_model(seed=4)
            engine.update_weights(new.named_parameters(), version=2)
            assert engine.replicas.sender.groups_built == 2
            assert engine.generate(prompts, params) == _local_chunks(new, prompts, params, 2, 2)

            second.kill()
            # Every replica lost at once: a client that waits a few seconds for one to come back
            # (the request timeout: the operator replaces lost pods meanwhile) then names them all.
            impatient = RemoteRolloutEngine(urls, NAME, "gloo", request_timeout_s=3.0)
            try:
                with pytest.raises(RolloutError) as error:
                    impatient.generate(prompts, params)
                assert first.url in str(error.value) and second.url in str(error.value)
                with pytest.raises(RolloutError, match="could not push policy version 3"):
                    impatient.update_weights(new.named_parameters(), version=3)
            finally:
                impatient.close()

            # ... while the patient one waits, and goes on once a replica is back at its address.
            back: list[Server] = []
            restart = partial(start_server, "rollout", model_dir, tmp_path, NAME, port=_port(first.url))
            threading.Timer(2.0, lambda: back.append(restart())).start()
            try:
                engine.update_weights(new.named_parameters(), version=3)
                assert engine.replicas.pushed[first.url] == "3"
                assert engine.generate(prompts, params) == _local_chunks(new, prompts, params, 2, 3)
            finally:
                for server in back:
                    server.stop()
        finally:
            engine.close()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _probe(url: str) -> subprocess.CompletedProcess[str]:
    """The kubelet's liveness probe of the operator's server pods, run as it runs it."""
    command = [sys.executable, "-m", "rlsd_contracts.liveness", "--port", str(_port(url)), "--timeout", "1"]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


class Relay:
    """A TCP hop in front of a server, standing for a pod's DNS name: after `forget_after(n)` it
    takes n more connections and then closes its listener (the name gone, as for a pod being
    deleted: new connections fail), while every connection made before goes on being served."""

    def __init__(self, target_url: str) -> None:
        self.target = ("127.0.0.1", _port(target_url))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.left: int | None = None  # connections still taken; None: no end
        threading.Thread(target=self._accept, daemon=True).start()

    def forget_after(self, connections: int) -> None:
        self.left = connections
        if connections == 0:
            self._forget()

    def _forget(self) -> None:
        with suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.left is not None:
                self.left -= 1
                if self.left <= 0:  # before the last one is served: no later call can get in first
                    self._forget()
            upstream = socket.create_connection(self.target)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with suppress(OSError):
        while data := source.recv(1 << 16):
            sink.sendall(data)
    with suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def test_a_push_that_failed_with_its_group_half_built_leaves_the_next_a_free_port(
    servers: dict[str, Server], model_dir: Path
) -> None:
    """The learner's transfer port is fixed in a pod (29600): a try whose group never formed still
    holds its store's port (the group's constructor waits for the missing servers), so the next try
    takes the next port. The quick start's attempt 2 failed so: every retry met EADDRINUSE."""
    port = free_port()
    # A connection per call, as the learner's sender has (ReplicaSet.fresh_http).
    http = httpx.Client(timeout=60, limits=httpx.Limits(max_keepalive_connections=0))
    sender = BroadcastSender("gloo", http, "127.0.0.1", port, 10.0, 10.0)
    initial = [(n, t.detach()) for n, t in _load(model_dir).named_parameters()]
    # A server gone between /get_world_size and /init_weight_transfer_engine, as a rollout pod deleted
    # between the two: the push's release of the old group, then /get_world_size, get through.
    gone = Relay(servers["r2"].url)
    gone.forget_after(2)
    try:
        with pytest.raises(HttpCallError, match="init_weight_transfer_engine: ConnectError"):
            sender.push([gone.url], initial, 1)
        with pytest.raises(OSError):  # what the next try met before: the port still held
            socket.create_server(("127.0.0.1", port)).close()
        sender.push([servers["r1"].url], initial, 0)  # the initial weights: the other tests' state
        assert httpx.get(servers["r1"].url + "/weight_info").json() == {"weight_version": "0"}
        assert (sender.groups_tried, sender.groups_built) == (2, 1)
    finally:
        sender.close()


def test_a_replica_lost_mid_push_is_left_out_at_no_retry_and_its_old_connections_do_not_keep_it(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A rollout pod deleted while the learner pushes: its DNS name goes at once, the process goes on
    answering on the connections it has. The quick start's attempt 2 failed so (learner exit 1): the
    probe, on a pooled connection, called the pod live, and the push's three tries, each failing to
    connect, were spent in 40 ms. Now a probe opens a new connection, and a try that failed because a
    replica was lost costs no retry: here none is allowed (max_retries 0)."""
    params = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=3)
    with _servers([("rollout", "gloo"), ("rollout", "gloo")], model_dir, tmp_path) as (first, second):
        relay = Relay(second.url)
        urls = [first.url, relay.url]
        engine = RemoteRolloutEngine(urls, NAME, "gloo", request_timeout_s=60.0, max_retries=0)
        try:
            engine.update_weights(_load(model_dir).named_parameters(), version=1)
            engine.generate(PROMPTS, params)  # each replica now has a pooled connection of the engine's

            # The name goes after the next probe's two calls (/health, /weight_info), mid-push.
            relay.forget_after(2)
            new = tiny_model(seed=4)
            with caplog.at_level(logging.WARNING, logger="rlsd_trainer.remote.replicas"):
                engine.update_weights(new.named_parameters(), version=2)
            (failed_try,) = [r.getMessage() for r in caplog.records if "version 2" in r.message]
            assert relay.url in failed_try and "ConnectError" in failed_try, failed_try
            assert engine.replicas.pushed == {first.url: "2", relay.url: "1"}
            with pytest.raises(httpx.ConnectError):
                httpx.get(relay.url + "/health")

            # Gone for good: the next push and calls leave it out with no failed try.
            caplog.clear()
            newer = tiny_model(seed=5)
            with caplog.at_level(logging.WARNING, logger="rlsd_trainer.remote.replicas"):
                engine.update_weights(newer.named_parameters(), version=3)
                assert engine.generate(PROMPTS, params) == _local_chunks(newer, PROMPTS, params, 2, 3)
            assert not caplog.records, [r.getMessage() for r in caplog.records]
            assert engine.replicas.pushed == {first.url: "3", relay.url: "1"}
            assert httpx.get(second.url + "/weight_info").json() == {"weight_version": "1"}
        finally:
            engine.close()


def test_a_wedged_replica_bounds_the_push_fails_liveness_and_is_taken_back_once_replaced(
    model_dir: Path, tmp_path: Path
) -> None:
    """A server stuck in a weight transfer whose sender stopped mid-push (its engine waits in the
    collective's receive, as vLLM's worker waits in NCCL's, which never returns) still answers
    /health. The learner's push to it gives up at weight_push_timeout_s, naming it; its probe
    (/weight_info, which goes through the engine) leaves it out, so the next push regroups with the
    others; the liveness probe fails for it alone; and once replaced (a new process on its address,
    as the operator's new pod), the next push takes it back."""
    params = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=3)
    with _servers([("rollout", "gloo"), ("rollout", "gloo")], model_dir, tmp_path) as (first, second):
        urls = [first.url, second.url]
        engine = RemoteRolloutEngine(urls, NAME, "gloo", request_timeout_s=60.0, weight_push_timeout_s=3.0)
        # The sender that stopped: it opens an update on the second server and never sends.
        stopped = BroadcastSender("gloo", httpx.Client(timeout=120), "127.0.0.1", 0, 60.0, 60.0)
        tensors = [(n, t.detach()) for n, t in _load(model_dir).named_parameters()]
        try:
            stopped._connect([second.url])
            httpx.post(second.url + "/start_weight_update").raise_for_status()
            update = {"update_info": broadcast_update_info(tensors)}

            def receive() -> None:  # until the server is killed
                with suppress(httpx.HTTPError):
                    httpx.post(second.url + "/update_weights", json=update, timeout=120)

            threading.Thread(target=receive, daemon=True).start()
            deadline = time.monotonic() + 120  # bounds the wait for the event only
            while liveness.check(_port(second.url), timeout_s=1.0) is None:  # until the receive holds it
                assert time.monotonic() < deadline, "the update never held the second server's engine"
            assert httpx.get(second.url + "/health").status_code == 200  # what /health cannot see
            assert _probe(first.url).returncode == 0
            probe = _probe(second.url)
            assert probe.returncode == 1 and "timed out" in probe.stderr, probe

            # A push that has it in its group (as one that began before it wedged) gives up in time.
            with pytest.raises(TransferError, match="weight_push_timeout_s") as gave_up:
                engine.replicas.sender.push([second.url], tensors, 1)
            assert second.url in str(gave_up.value)

            new = tiny_model(seed=4)
            engine.update_weights(new.named_parameters(), version=1)  # without the wedged replica
            assert engine.replicas.pushed == {first.url: "1", second.url: "default"}
            assert httpx.get(first.url + "/weight_info").json() == {"weight_version": "1"}
            assert engine.generate(PROMPTS, params) == _local_chunks(new, PROMPTS, params, 2, 1)

            second.kill()  # the kubelet's kill; the operator's new pod keeps the DNS name
            replaced = start_server("rollout", model_dir, tmp_path, NAME, port=_port(second.url))
            try:
                wait_healthy([replaced])
                newer = tiny_model(seed=5)
                engine.update_weights(newer.named_parameters(), version=2)
                assert engine.replicas.pushed == dict.fromkeys(urls, "2")
                assert all(httpx.get(url + "/weight_info").json() == {"weight_version": "2"} for url in urls)
                assert _probe(second.url).returncode == 0
            finally:
                replaced.stop()
        finally:
            stopped.control.http.close()
            engine.close()


# --------------------------------------------------------------------------------------------------
# Teacher
# --------------------------------------------------------------------------------------------------


def test_teacher_scores_equal_the_colocated_computation_bit_for_bit(
    servers: dict[str, Server], model_dir: Path
) -> None:
    prompts = [[3, 4, 5, 6], [7, 8]]
    responses = [[9, 10, EOS], [11], [12, 13, 14, 15], [16, 17]]
    url = servers["teacher"].url
    client = RemoteTeacherClient([url], NAME, "gloo")
    try:
        expected = shared_prompt_logprobs(_load(model_dir), prompts, responses, 2)
        assert torch.equal(client.score(prompts, responses, group_size=2).teacher, expected)
        groups = [
            {"prompt_ids": p, "response_ids": responses[2 * i : 2 * i + 2]} for i, p in enumerate(prompts)
        ]
        answer = httpx.post(url + "/v1/score", json={"model": NAME, "groups": groups}).json()
        assert answer["groups"][1]["logprobs"][0] == expected[2, :4].tolist()

        new = tiny_model(seed=5)
        client.update_weights(new.named_parameters(), version=7)
        scored = client.score(prompts, responses, group_size=2).teacher
        assert torch.equal(scored, shared_prompt_logprobs(new.eval(), prompts, responses, 2))
        assert _metric(url, "rlsd_teacher_policy_version") == 7.0
    finally:
        client.close()


# --------------------------------------------------------------------------------------------------
# Malformed requests
# --------------------------------------------------------------------------------------------------


UNEQUAL_GROUPS = [{"prompt_ids": [1], "response_ids": [[2]]}, {"prompt_ids": [1], "response_ids": [[2], [3]]}]
MALFORMED = [
    ("/v1/completions", {"model": NAME}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2]], "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[5, 6], []]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hello"}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2]], "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": [[1, 500]]}, 400, "prompt[0][1]"),
    ("/v1/completions", {"prompt": [[1, 2]], "logprobs": 5}, 400, "logprobs"),
    ("/v1/completions", {"prompt": [[1, 2]], "model": "other"}, 404, "model"),
    ("/v1/completions", b"{bad json", 400, "body"),
    ("/v1/complete", {"prompt": [[1, 2]]}, 404, None),
    ("/init_weight_transfer_engine", {"init_info": {"bogus": 1}}, 400, "init_info.master_address"),
    ("/update_weights", {"updates": {}}, 400, "update_info"),
    ("/finish_weight_update", {"weight_version": 2}, 400, "weight_version"),
    ("/finish_weight_update", {"weight_version": "2"}, 500, None),  # no update was started, as vLLM
    ("/pause?mode=keep", None, 400, "mode"),
    ("/collective_rpc", {"method": "sleep"}, 400, "method"),
    (
        "/collective_rpc",
        {"method": "reload_weights", "kwargs": {"weights_path": "w"}},
        400,
        "kwargs.weights_path",
    ),
    ("/v1/score", {"groups": [UNEQUAL_GROUPS[0], {"prompt_ids": [1]}]}, 400, "groups[1].response_ids"),
    ("/v1/score", {"groups": UNEQUAL_GROUPS}, 400, "groups[1].response_ids"),
    ("/v1/score", {"groups": [{"prompt_ids": [1.5], "response_ids": [[2]]}]}, 400, "groups[0].prompt_ids[0]"),
]


@pytest.mark.parametrize(("route", "body", "status", "param"), MALFORMED)
def test_malformed_requests_get_4xx_naming_the_field_and_the_server_stays_up(
    servers: dict[str, Server], route: str, body: dict | bytes, status: int, param: str | None
) -> None:
    url = servers["teacher" if route == "/v1/score" else "fs"].url
    if isinstance(body, bytes):
        answer = httpx.post(url + route, content=body, headers={"content-type": "application/json"})
    else:
        answer = httpx.post(url + route, json=body)
    assert answer.status_code == status, answer.text
    if param is not None:
        error = answer.json()["error"]
        assert error["param"] == param and param.split(".")[0].split("[")[0] in error["message"]
    assert httpx.get(url + "/health").status_code == 200


def test_one_update_session_at_a_time_as_vllm(servers: dict[str, Server]) -> None:
    url = servers["fs"].url
    label = httpx.get(url + "/weight_info").json()
    httpx.post(url + "/start_weight_update").raise_for_status()
    try:
        second = httpx.post(url + "/start_weight_update")
        assert second.status_code == 500 and "already active" in second.json()["error"]["message"]
        release = httpx.post(url + "/shutdown_weight_transfer_engine")
        assert release.status_code == 500 and "during a weight update" in release.json()["error"]["message"]
    finally:
        httpx.post(url + "/finish_weight_update").raise_for_status()  # no version: the label stays
    assert httpx.get(url + "/weight_info").json() == label


@pytest.mark.parametrize("backend", ["nccl", "disk"])
def test_serve_rejects_a_backend_it_cannot_receive(backend: str) -> None:
    config = f'{{"backend": "{backend}"}}'
    assert cli_main(["serve", "rollout", "--model", "unused", "--weight-transfer-config", config]) == 3


def test_the_embedded_model_is_served_as_the_learners_build_it(tmp_path: Path) -> None:
    """`--model embedded` (model.path on Kubernetes) is built from the run's config: the same files
    as the learners' (the weights are pushed before use, the tokenizer must match); without the
    config, a clear error and exit 3."""
    assert cli_main(["serve", "rollout", "--model", "embedded"]) == 3
    config = tmp_path / "run.yaml"
    task = {"num_train": 50, "max_terms": 3}
    data = {"train": {"kind": "embedded"}, "embedded": task}
    run = {"run": {"seed": 5}, "model": {"path": "embedded"}, "data": data}
    config.write_text(yaml.safe_dump(run))
    served = Path(_served_model("embedded", str(config)))
    learners = build_model_dir(tmp_path / "learner", load_config(config).data.embedded, 5)
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        assert (served / name).read_bytes() == (learners / name).read_bytes(), name


@pytest.mark.parametrize("role", ["rollout", "teacher"])
def test_without_the_runs_token_a_server_answers_only_probes_and_scrapes(
    role: str, model_dir: Path, tmp_path: Path
) -> None:
    """`--middleware` (vLLM's flag) with the run's token middleware, as the operator starts servers:
    every route of the server's own route table refuses a request without the token, or with another
    one (401); /health and /metrics answer anyone; the token opens the rest."""
    token = tmp_path / "token"
    token.write_text("the-runs-token\n")
    server = start_server(
        role, model_dir, tmp_path, NAME, extra=("--middleware", RUN_TOKEN_MIDDLEWARE),
        env={RUN_TOKEN_FILE_ENV: str(token)},
    )  # fmt: skip
    try:
        wait_healthy([server])
        build_app = rollout_app if role == "rollout" else teacher_app
        app = build_app(str(model_dir), NAME, 8, "float32", 60.0)
        paths = app.openapi()["paths"]  # the route table (FastAPI's public view of it)
        routes = [(method.upper(), path) for path, methods in paths.items() for method in methods]
        guarded = [(method, path) for method, path in routes if path not in OPEN_PATHS]
        assert {path for _, path in routes} >= {*OPEN_PATHS, "/pause", "/update_weights", "/weight_info"}
        for method, path in guarded:
            for headers in ({}, {"Authorization": "Bearer another-runs-token"}):
                answer = httpx.request(method, server.url + path, json={}, headers=headers)
                assert answer.status_code == 401, (method, path, headers, answer.text)
                assert answer.json()["error"]["type"] == "AuthenticationError"
        for path in OPEN_PATHS:
            assert httpx.get(server.url + path).status_code == 200
        allowed = {"Authorization": "Bearer the-runs-token"}
        assert httpx.get(server.url + "/weight_info", headers=allowed).json() == {"weight_version": "default"}
        assert httpx.get(server.url + "/v1/models", headers=allowed).json()["data"][0]["id"] == NAME
    finally:
        server.stop()


def test_a_server_told_to_check_a_token_it_cannot_read_refuses_to_start(model_dir: Path) -> None:
    arguments = ["serve", "rollout", "--model", str(model_dir), "--middleware", RUN_TOKEN_MIDDLEWARE]
    assert cli_main(arguments) == 3  # RLSD_RUN_TOKEN_FILE unset: no credential, so no server


def test_clients_send_the_runs_token_where_the_run_has_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(RUN_TOKEN_FILE_ENV, raising=False)
    assert authorization_headers() == {}
    (tmp_path / "token").write_text("abc\n")
    monkeypatch.setenv(RUN_TOKEN_FILE_ENV, str(tmp_path / "token"))
    assert authorization_headers() == {"Authorization": "Bearer abc"}
    monkeypatch.setenv(RUN_TOKEN_FILE_ENV, str(tmp_path / "missing"))
    with pytest.raises(RunTokenError, match="RLSD_RUN_TOKEN_FILE="):
        authorization_headers()
    # The import path the operator passes to vLLM and to our servers names this very class.
    module, _, name = RUN_TOKEN_MIDDLEWARE.rpartition(".")
    assert getattr(importlib.import_module(module), name) is RunTokenMiddleware


def test_chunks_are_contiguous_and_depend_only_on_the_configured_replica_count() -> None:
    assert chunk_bounds(5, 2) == [(0, 3), (3, 5)]
    assert chunk_bounds(1, 3) == [(0, 1)]
    assert chunk_bounds(0, 2) == []
    assert chunk_seed(11, 0) != chunk_seed(11, 3) and chunk_seed(11, 3) == chunk_seed(11, 3)

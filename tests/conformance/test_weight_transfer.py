"""Our weight-transfer client through a run's life, against vLLM's own RL routes and against our CPU
rollout and teacher servers, the same scenarios for each, so they can never drift apart.

`vllm`: vLLM's routers, AsyncLLM's and the Worker's own weight methods and the NCCL engine's own
init/update-info models over a stand-in engine whose data plane is gloo (vllm_engine.py), served on
loopback; `cpu-rollout` / `cpu-teacher`: `rlsd-trainer serve rollout|teacher`'s apps, served the
same way. This process is learner rank 0 and really broadcasts every tensor over gloo; every replica
really receives them, and the tests compare what each one serves with what was pushed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from loopback import Served, get_json
from tiny_models import tiny_model
from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferInitInfo
from vllm_engine import StandInEngineClient, build_vllm_app, starting_label

from rlsd_contracts import liveness
from rlsd_trainer.remote.replicas import RemoteRole, ReplicaError
from rlsd_trainer.remote.rollout_client import RemoteRolloutEngine
from rlsd_trainer.remote.teacher_client import RemoteTeacherClient
from rlsd_trainer.serving import rollout_server, teacher_server
from rlsd_trainer.weights.wire import INCOMPLETE_WEIGHTS, STARTING_WEIGHTS, nccl_init_info

NAME = "policy"
KINDS = ["vllm", "cpu-rollout", "cpu-teacher"]
HERE = Path(__file__).parent


@dataclass
class Replica:
    kind: str
    served: Served
    weights: Callable[[], dict[str, torch.Tensor]]
    client: StandInEngineClient | None  # the vLLM stand-in's engine, which records its calls

    @property
    def url(self) -> str:
        return self.served.url

    def label(self) -> str:
        return get_json(self.url, "/weight_info")["weight_version"]  # type: ignore[index]


def start_replica(kind: str, model_dir: Path, port: int | None = None) -> Replica:
    if kind == "vllm":
        client = StandInEngineClient(dict(tiny_model(seed=0).named_parameters()))
        served = Served(build_vllm_app(client), port)
        return Replica(kind, served, lambda: client.model.served, client)
    module = rollout_server if kind == "cpu-rollout" else teacher_server
    app = module.build_app(str(model_dir), NAME, 64, "float32", 60.0)
    host = app.state.host
    served = Served(app, port)
    return Replica(kind, served, lambda: dict(host.model.named_parameters()), None)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def replicas(kind: str, model_dir: Path) -> Iterator[list[Replica]]:
    started = [start_replica(kind, model_dir) for _ in range(2)]
    yield started
    for replica in started:
        replica.served.stop()


def client_for(kind: str, replicas: list[Replica], **options: Any) -> RemoteRole:
    role = RemoteTeacherClient if kind == "cpu-teacher" else RemoteRolloutEngine
    return role([r.url for r in replicas], NAME, "gloo", **{"request_timeout_s": 60.0, **options})


def push(client: RemoteRole, version: int, seed: int) -> dict[str, torch.Tensor]:
    pushed = {name: t.detach().clone() for name, t in tiny_model(seed=seed).named_parameters()}
    client.update_weights(iter(pushed.items()), version)
    return pushed


def push_to_all(client: RemoteRole, replicas: list[Replica], version: int, seed: int) -> None:
    """Push `tiny_model(seed)` as `version`; every replica must then serve it under that label."""
    weights = push(client, version, seed)
    for replica in replicas:
        assert_serves(replica, weights, str(version))


def assert_serves(replica: Replica, weights: dict[str, torch.Tensor], label: str) -> None:
    assert replica.label() == label
    served = replica.weights()
    assert set(served) == set(weights)
    for name, tensor in weights.items():
        assert torch.equal(served[name].detach(), tensor), f"{replica.url}: {name} differs"


def engine_calls(replica: Replica) -> list[str]:
    """The stand-in engine's calls in order: worker RPCs as `method` (or `method!` when it raised),
    `pause`, `resume` and `label=<weight version>`."""
    assert replica.client is not None
    names = []
    for name, outcome in replica.client.calls:
        if name == "label":
            names.append(f"label={outcome}")
        elif name in ("pause", "resume") or outcome == "ok":
            names.append(name)
        else:
            names.append(f"{name}!")
    return names


def push_calls(version: int) -> list[str]:
    """One update: paused, one session, labelled, resumed."""
    return [
        "pause",
        "start_weight_update",
        "update_weights",
        "finish_weight_update",
        f"label={version}",
        "resume",
    ]


# A new group: release the old engine, join.
RELEASE = ["shutdown_weight_transfer_engine"]
REGROUP = [*RELEASE, "init_weight_transfer_engine"]
# After a failed update: close the session, label the weights incomplete, release the engine.
ABANDON = ["finish_weight_update", f"label={INCOMPLETE_WEIGHTS}", "shutdown_weight_transfer_engine"]


# --------------------------------------------------------------------------------------------------


def test_the_stand_in_starts_from_vllms_own_label() -> None:
    assert starting_label() == STARTING_WEIGHTS == "default"


def test_fresh_replicas_serve_default_until_the_first_push_then_every_push_lands(
    kind: str, replicas: list[Replica]
) -> None:
    client = client_for(kind, replicas)
    try:
        # Problem 1: vLLM answers "default" before any update; that is the run's starting policy.
        assert [r.label() for r in replicas] == [STARTING_WEIGHTS] * 2
        assert client.replicas._ready() == [r.url for r in replicas]
        assert client.replicas.version_of(STARTING_WEIGHTS) == 0
        for version, seed in ((0, 1), (1, 2), (2, 3)):
            push_to_all(client, replicas, version, seed)
        assert client.policy_version == 2 and client.replicas.sender.groups_built == 1  # type: ignore[attr-defined]
        # After a push, "default" is a replica that restarted: not the policy.
        with pytest.raises(ValueError, match="default"):
            client.replicas.version_of(STARTING_WEIGHTS)
        assert client.replicas.version_of("1") == 1
    finally:
        client.close()
    if kind == "vllm":
        for replica in replicas:
            # One group, then one paused update per push, and the group released at close.
            pushes = [call for version in (0, 1, 2) for call in push_calls(version)]
            assert engine_calls(replica) == [*REGROUP, *pushes, *RELEASE]


def test_every_push_pauses_clears_the_caches_and_resumes(kind: str, replicas: list[Replica]) -> None:
    """Problem 4: prefix caching would reuse KV computed by the old weights. vLLM's /pause (mode
    wait) drains in-flight requests and, with clear_cache's default, resets the KV and prefix caches
    (EngineCore._finish_pause); every update happens inside pause ... resume."""
    client = client_for(kind, replicas)
    try:
        push(client, 0, 1)
        push(client, 1, 2)
    finally:
        client.close()
    for replica in replicas:
        assert get_json(replica.url, "/is_paused") == {"is_paused": False}
        if replica.client is None:
            continue
        pauses = [args for name, args in replica.client.calls if name == "pause"]
        assert pauses == [{"mode": "wait", "clear_cache": True}] * 2
        assert engine_calls(replica) == [*REGROUP, *push_calls(0), *push_calls(1), *RELEASE]


def test_a_learner_killed_half_way_through_a_push_leaves_servers_a_new_learner_can_update(
    kind: str, replicas: list[Replica], tmp_path: Path
) -> None:
    """Problem 5: the dead learner's update stays half-done; the next learner closes what is left
    open, releases the old group and pushes the whole model again."""
    dying = pushing_half(kind, replicas)
    dying.kill()
    dying.wait()
    # The half-pushed weights were never committed: each replica still serves version 0's label.
    assert [r.label() for r in replicas] == ["0", "0"]

    second = client_for(kind, replicas)
    try:
        push_to_all(second, replicas, 1, 2)
    finally:
        second.close()
    if kind == "vllm":
        for replica in replicas:
            calls = engine_calls(replica)
            # The dead learner's update failed on the server (its gloo peer went away) ...
            assert "update_weights!" in calls
            tail = calls[calls.index("update_weights!") + 1 :]
            # ... and the next one released the engine and built a new group before pushing.
            assert tail == [*REGROUP, *push_calls(1), *RELEASE]


def pushing_half(kind: str, replicas: list[Replica]) -> subprocess.Popen[bytes]:
    """Version 0 pushed by a first learner, then a second one (half_push.py) half-way through its
    push of version 1, left running: the caller ends it."""
    first = client_for(kind, replicas)
    try:
        push(first, 0, 1)
    finally:
        first.close()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE.parent / "trainer"), os.environ.get("PYTHONPATH", "")]),
    }
    learner = subprocess.Popen(
        [sys.executable, str(HERE / "half_push.py"), "1", "2", *[r.url for r in replicas]],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert learner.stdout is not None and learner.stdout.readline().strip() == b"HALF"
    except BaseException:
        learner.kill()
        learner.wait()
        raise
    return learner


def test_a_replica_waiting_on_a_stopped_learner_answers_health_but_not_the_engine(
    kind: str, replicas: list[Replica]
) -> None:
    """A learner stopped half-way through a push (SIGSTOP: its gloo peer stays open, as an NCCL
    receive whose sender died never returns): each replica's engine waits in the receive. /health
    still answers 200; /weight_info, through the engine, does not, so the kubelet's liveness probe
    (rlsd_contracts.liveness) fails and the next learner's push leaves every replica out at once
    and says so, instead of hanging. Once the receive ends (here the stopped learner is killed and
    gloo errors; with NCCL only a replaced pod ends it) the replicas take the push."""
    stopped = pushing_half(kind, replicas)
    # It waits for a live replica no longer than its request timeout.
    second = client_for(kind, replicas, weight_push_timeout_s=5.0, request_timeout_s=5.0)
    try:
        stopped.send_signal(signal.SIGSTOP)
        for replica in replicas:
            assert httpx.get(replica.url + "/health", timeout=10).status_code == 200
            failure = liveness.check(replica.served.port, timeout_s=1.0)
            assert failure is not None and "timed out" in failure, failure
        with pytest.raises(ReplicaError, match="no server is live"):
            push(second, 1, 2)

        stopped.kill()
        stopped.wait()
        deadline = time.monotonic() + 120  # bounds the wait for the event only
        for replica in replicas:
            while liveness.check(replica.served.port, timeout_s=1.0) is not None:  # until the receive failed
                assert time.monotonic() < deadline, f"{replica.url} still stuck after its learner was killed"
        push_to_all(second, replicas, 1, 2)
    finally:
        stopped.kill()
        stopped.wait()
        second.close()


def test_an_update_session_left_open_is_closed_and_the_push_retried(
    kind: str, replicas: list[Replica]
) -> None:
    """Problem 5 again: a learner that died right after /start_weight_update leaves a session open,
    and vLLM refuses every later start until it is finished. The push fails on that replica, the
    client closes the session, labels the weights incomplete, regroups and pushes again."""
    client = client_for(kind, replicas)
    try:
        push(client, 0, 1)
        httpx.post(replicas[0].url + "/start_weight_update").raise_for_status()
        push_to_all(client, replicas, 1, 2)
        assert client.replicas.sender.groups_built == 2  # type: ignore[attr-defined]
    finally:
        client.close()
    if kind == "vllm":
        # The refused push is abandoned on both (session closed, weights labelled incomplete, engine
        # released), then a new group and the push again.
        retry = [*ABANDON, *REGROUP, *push_calls(1), *RELEASE]
        dead_learners_start = ["start_weight_update"]
        assert engine_calls(replicas[0]) == [
            *REGROUP, *push_calls(0), *dead_learners_start, "pause", "start_weight_update!", *retry
        ]  # fmt: skip
        assert engine_calls(replicas[1]) == [*REGROUP, *push_calls(0), "pause", "start_weight_update", *retry]


def test_a_new_learner_closes_the_session_a_dead_one_left_open(kind: str, replicas: list[Replica]) -> None:
    """A learner that died right after /start_weight_update: vLLM refuses to shut the transfer
    engine down during the session, so the next learner abandons it first (closes the session,
    labels the weights incomplete), then forms its group."""
    httpx.post(replicas[0].url + "/start_weight_update").raise_for_status()
    client = client_for(kind, replicas)
    try:
        push_to_all(client, replicas, 0, 1)
        assert client.replicas.sender.groups_built == 1  # type: ignore[attr-defined]
    finally:
        client.close()
    if kind == "vllm":
        refused = ["shutdown_weight_transfer_engine!", *ABANDON]
        assert engine_calls(replicas[0]) == [
            "start_weight_update", *refused, "init_weight_transfer_engine", *push_calls(0), *RELEASE
        ]  # fmt: skip
        assert engine_calls(replicas[1]) == [*REGROUP, *push_calls(0), *RELEASE]


def test_a_lost_replica_is_left_out_until_it_comes_back_then_the_group_is_rebuilt(
    kind: str, replicas: list[Replica], model_dir: Path
) -> None:
    client = client_for(kind, replicas)
    try:
        push(client, 0, 1)
        lost = replicas[1]
        lost.served.stop()
        weights = push(client, 1, 2)
        assert_serves(replicas[0], weights, "1")
        assert client.replicas._ready() == [replicas[0].url]
        assert client.replicas.sender.groups_built == 2  # type: ignore[attr-defined]

        # It restarts with its starting weights: "default" is not the policy any more.
        back = start_replica(kind, model_dir, lost.served.port)
        replicas[1] = back
        assert back.label() == STARTING_WEIGHTS
        assert client.replicas._ready() == [replicas[0].url]
        push_to_all(client, replicas, 2, 3)
        assert client.replicas.sender.groups_built == 3  # type: ignore[attr-defined]
    finally:
        client.close()
    if kind == "vllm":
        # Each regroup released the survivor's old group before it joined the new one.
        assert engine_calls(replicas[0]) == [
            *REGROUP, *push_calls(0),
            *REGROUP, *push_calls(1),
            *RELEASE, *REGROUP, *push_calls(2), *RELEASE,
        ]  # fmt: skip
        assert engine_calls(replicas[1]) == [*REGROUP, *push_calls(2), *RELEASE]


def test_filesystem_pushes_reload_from_the_shared_directory(
    kind: str, replicas: list[Replica], tmp_path: Path
) -> None:
    """vLLM 0.33.0 has no disk weight-transfer backend but reloads in place from a directory
    (`/collective_rpc` reload_weights: Worker.reload_weights, DefaultModelLoader's file discovery);
    the `filesystem` backend uses that, against vLLM and our servers alike."""
    role = RemoteTeacherClient if kind == "cpu-teacher" else RemoteRolloutEngine
    client = role([r.url for r in replicas], NAME, "filesystem", shared_dir=tmp_path / "shared")
    try:
        for version, seed in ((0, 1), (1, 2)):
            push_to_all(client, replicas, version, seed)
    finally:
        client.close()
    if kind == "vllm":
        for replica in replicas:
            assert engine_calls(replica) == ["pause", "reload_weights", "label=0", "resume"] * 1 + [
                "pause", "reload_weights", "label=1", "resume"
            ]  # fmt: skip


def test_a_failed_reload_labels_the_weights_incomplete(
    kind: str, replicas: list[Replica], tmp_path: Path
) -> None:
    role = RemoteTeacherClient if kind == "cpu-teacher" else RemoteRolloutEngine
    client = role([replicas[0].url], NAME, "filesystem", shared_dir=tmp_path / "shared", max_retries=0)
    wrong = {name: torch.zeros(3) for name, _ in tiny_model().named_parameters()}
    try:
        with pytest.raises(RuntimeError, match=r"could not push policy version 0|rejected policy version 0"):
            client.update_weights(iter(wrong.items()), 0)
    finally:
        client.close()
    assert replicas[0].label() == INCOMPLETE_WEIGHTS


def test_our_nccl_init_info_is_what_vllms_engine_parses() -> None:
    """The nccl backend's JSON (the broadcast itself needs GPUs): vLLM's own init-info model takes it
    in its unique-id mode, unpacked, with our rank offset and world size."""
    unique_id = os.urandom(128)
    info = NCCLWeightTransferInitInfo(**nccl_init_info(unique_id, rank_offset=3, world_size=5))
    assert info.nccl_unique_id_bytes == unique_id
    assert (info.rank_offset, info.world_size, info.packed) == (3, 5, False)
    assert info.master_address is None and info.master_port is None

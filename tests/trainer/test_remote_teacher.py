"""A remote teacher with rollouts generated ahead: RLSD's Delta from one policy version, teacher pushes
labelled with the version they are, and a teacher replica that missed a push never scoring.

Two real `rlsd-trainer serve teacher` processes on loopback; the learner runs in this process
(`Trainer`, with its own rollout engine). With `rollout.max_staleness: 1` a live teacher's servers
score the batch of step s with policy s - 1 while the learner is at pi_s: each batch from step 1 on
must carry the same weights' student-prompt log-probs, from the same answer, and its Delta must be
taken within that pair. Every process computes with one thread, so the servers' values can be
recomputed here exactly. At k = 0 nothing changes: no pair is asked for, and a remote teacher's run
equals a colocated teacher's bit for bit.
"""

from __future__ import annotations

import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from processes import Server, one_torch_thread, start_server, wait_healthy
from test_local_run import tiny_config

from rlsd_contracts.config import EmbeddedTaskSection, ModelSection, parse_config
from rlsd_trainer.model.embedded import build_model_dir
from rlsd_trainer.model.loading import load_model
from rlsd_trainer.model.logprobs import shared_prompt_logprobs
from rlsd_trainer.remote import replicas
from rlsd_trainer.remote.replicas import chunk_bounds
from rlsd_trainer.remote.teacher_client import RemoteTeacherClient, TeacherError, TeacherScores
from rlsd_trainer.training.plan import StepPlan
from rlsd_trainer.training.trainer import Trainer

pytestmark = pytest.mark.slow
OK_REQUESTS = 'rlsd_teacher_requests_total{outcome="ok"}'


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model the learners of tiny_config build, for the servers to start from."""
    raw = tiny_config(Path("unused"), total_steps=1)
    directory = tmp_path_factory.mktemp("model") / "embedded-model"
    return build_model_dir(directory, EmbeddedTaskSection(**raw["data"]["embedded"]), raw["run"]["seed"])


@pytest.fixture
def teachers(model_dir: Path, tmp_path: Path) -> Iterator[list[Server]]:
    started = [start_server("teacher", model_dir, tmp_path, "policy") for _ in range(2)]
    try:
        wait_healthy(started)
        yield started
    finally:
        for server in started:
            server.process.send_signal(signal.SIGCONT)
            server.stop()


def _trainer(
    output: Path,
    model_dir: Path,
    total_steps: int,
    max_staleness: int,
    teachers: list[Server] | None,
    mode: str = "live",
) -> Trainer:
    """An RLSD run with a `mode` teacher (frozen: synced every 2 steps), remote (on `teachers`) or
    colocated (None)."""
    raw = tiny_config(output, total_steps=total_steps)
    raw["eval"]["every"] = 100
    raw["rollout"]["max_staleness"] = max_staleness
    raw["teacher"].update(mode=mode, sync_interval=2)
    if teachers is not None:
        raw["teacher"].update(
            placement="remote",
            servers={
                "urls": [t.url for t in teachers],
                "model_name": "policy",
                "request_timeout_s": 60,
                "weight_transfer": {"backend": "gloo"},
            },
        )
    output.mkdir()
    shutil.copytree(model_dir, output / "embedded-model")
    return Trainer(parse_config(raw))


def _record_scores(trainer: Trainer) -> list[tuple[dict[str, Any], TeacherScores]]:
    """Every call of the planner's teacher client, its arguments and what it returned, in order."""
    assert trainer.plans is not None
    client = trainer.plans.planner.teacher_client
    assert client is not None
    calls: list[tuple[dict[str, Any], TeacherScores]] = []
    score = client.score

    def recorded(prompts: Any, responses: Any, group_size: int, student_prompts: Any = None) -> TeacherScores:
        scores = score(prompts, responses, group_size, student_prompts)
        calls.append(
            ({"prompts": prompts, "responses": responses, "student_prompts": student_prompts}, scores)
        )
        return scores

    client.score = recorded  # type: ignore[method-assign]
    return calls


def _record_plans(trainer: Trainer) -> list[StepPlan]:
    assert trainer.plans is not None
    plans: list[StepPlan] = []
    next_plan = trainer.plans.next_plan

    def recorded(step: int) -> StepPlan:
        plans.append(next_plan(step))
        return plans[-1]

    trainer.plans.next_plan = recorded  # type: ignore[method-assign]
    return plans


def _policy(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in trainer.learner.full_policy()}


def _server_logprobs(
    model: torch.nn.Module, prompts: list[list[int]], responses: list[list[int]], group: int, replicas: int
) -> torch.Tensor:
    """What the servers compute: one batch per request, a request per configured replica."""
    rows = []
    for start, stop in chunk_bounds(len(prompts), replicas):
        scored = shared_prompt_logprobs(
            model, prompts[start:stop], responses[start * group : stop * group], group
        )
        rows += [scored[i] for i in range(scored.shape[0])]
    width = max(len(r) for r in responses)
    return torch.stack([torch.nn.functional.pad(row, (0, width - row.shape[0])) for row in rows])


def _metric(server: Server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_one_request_scores_both_prompts_with_the_weights_it_names(
    teachers: list[Server], model_dir: Path
) -> None:
    """With student prompts, each response is also scored after its group's student prompt, by the
    same weights (the answer's label is the version pushed); the teacher's values are those of a
    request without them, bit for bit."""
    teacher_prompts, student_prompts = [[3, 4, 5, 6, 7, 8], [9, 10, 11]], [[3, 4], [9]]
    responses = [[12, 13, 14], [15], [16, 17, 18, 19], [20, 21]]
    client = RemoteTeacherClient([t.url for t in teachers], "policy", "gloo")
    model = load_model(model_dir, ModelSection()).model.eval()
    try:
        client.update_weights(model.named_parameters(), version=4)
        plain = client.score(teacher_prompts, responses, 2)
        paired = client.score(teacher_prompts, responses, 2, student_prompts)
        assert (plain.student, plain.version, paired.version) == (None, 4, 4)
        assert torch.equal(paired.teacher, plain.teacher)
        with torch.no_grad():
            assert torch.equal(paired.teacher, _server_logprobs(model, teacher_prompts, responses, 2, 2))
            assert torch.equal(paired.student, _server_logprobs(model, student_prompts, responses, 2, 2))
        one_sided = {"groups": [{"prompt_ids": [1], "response_ids": [[2]], "student_prompt_ids": [1]}] * 2}
        one_sided["groups"][1] = {"prompt_ids": [1], "response_ids": [[2]]}
        refused = httpx.post(teachers[0].url + "/v1/score", json=one_sided)
        assert (
            refused.status_code == 400 and refused.json()["error"]["param"] == "groups[1].student_prompt_ids"
        )
    finally:
        client.close()


def test_an_answer_from_other_weights_than_those_pushed_is_refused_and_retried(
    teachers: list[Server], model_dir: Path
) -> None:
    """A replica whose weights change between the readiness probe and its answer (here relabelled
    while the request waits out a pause) is not taken at its word: its answer is refused and the
    request retried on the other replica."""
    first, second = teachers
    client = RemoteTeacherClient([first.url, second.url], "policy", "gloo")
    model = load_model(model_dir, ModelSection()).model.eval()
    prompts, responses = [[3, 4, 5], [6, 7]], [[8, 9], [10], [11, 12, 13], [14]]
    result: list[TeacherScores] = []
    worker = threading.Thread(target=lambda: result.append(client.score(prompts, responses, 2)))
    try:
        client.update_weights(model.named_parameters(), version=1)
        assert httpx.post(first.url + "/pause?mode=wait").status_code == 200
        errors = _metric(first, 'rlsd_teacher_requests_total{outcome="error"}')
        worker.start()  # the probe passes; the request to the first replica is turned away (paused)
        while _metric(first, 'rlsd_teacher_requests_total{outcome="error"}') == errors:
            assert worker.is_alive()
        httpx.post(first.url + "/update_weight_version", json={"new_version": "7"}).raise_for_status()
        httpx.post(first.url + "/resume").raise_for_status()
        worker.join()
        assert len(result) == 1 and result[0].version == 1
        with torch.no_grad():
            assert torch.equal(result[0].teacher, _server_logprobs(model, prompts, responses, 2, 2))
        assert _metric(first, OK_REQUESTS) == 1  # it answered, with weights labelled 7: refused
        assert _metric(second, OK_REQUESTS) == 2  # its own chunk, and the first's again
    finally:
        httpx.post(first.url + "/resume")
        worker.join(timeout=60)
        client.close()


def test_rows_delta_comes_from_one_teacher_version_and_a_replica_that_missed_a_push_never_scores(
    teachers: list[Server], model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replicas, "HEALTH_TIMEOUT_S", 1.0)  # a stopped replica is found out quickly
    first, second = teachers
    trainer = _trainer(tmp_path / "run", model_dir, total_steps=6, max_staleness=1, teachers=teachers)
    assert trainer.plans is not None
    calls, plans = _record_scores(trainer), _record_plans(trainer)
    group = trainer.config.algorithm.group_size
    model = load_model(model_dir, ModelSection()).model.eval()
    params = dict(model.named_parameters())
    try:
        trainer.push_weights(teacher_too=True)
        policies = [_policy(trainer)]  # policy version v: policies[v]
        values = []
        for step in range(4):
            if step in (1, 3):
                # The second replica is stopped across this step's teacher push (version step + 1):
                # the push goes to the first alone, and the second comes back serving version step.
                second.process.send_signal(signal.SIGSTOP)
            values.append(trainer.train_step())
            trainer.plans.wait()
            policies.append(_policy(trainer))
            if step in (1, 3):
                second.process.send_signal(signal.SIGCONT)
                assert httpx.get(second.url + "/weight_info").json() == {"weight_version": str(step)}
            if step == 1:
                served_by_second = _metric(second, OK_REQUESTS)
                assert served_by_second > 0  # its share of the first batches
            if step == 3:
                first.kill()

        # The batch of step 3 was scored after the second replica missed version 2: not by it.
        assert _metric(second, OK_REQUESTS) == served_by_second
        # Batch s was scored by policy max(0, s - 1), the live teacher's version, and from step 1 on
        # with that version's student-prompt log-probs from the same answer.
        for step, (plan, (asked, scores)) in enumerate(zip(plans, calls[:4], strict=True)):
            version = max(0, step - 1)
            assert (plan.teacher_version, scores.version) == (version, version)
            assert (
                (plan.paired_student_logprobs is not None)
                == (step >= 1)
                == (asked["student_prompts"] is not None)
            )
            with torch.no_grad():
                for name, tensor in policies[version].items():
                    params[name].copy_(tensor)
                for prompts, scored in (
                    (asked["prompts"], scores.teacher),
                    (asked["student_prompts"], scores.student),
                ):
                    if prompts is not None:
                        assert torch.equal(scored, _server_logprobs(model, prompts, plan.responses, group, 2))
            assert values[step]["teacher_version_lag"] == (1.0 if step else 0.0)
            assert values[step]["delta_paired_fraction"] == (1.0 if step else 0.0)
            if step:  # the learner's Delta is the pair's: token mean of teacher - paired student
                pairs = zip(plan.teacher_logprobs or [], plan.paired_student_logprobs or [], strict=True)
                deltas = [t - s for teacher, student in pairs for t, s in zip(teacher, student, strict=True)]
                assert values[step]["delta_mean"] == pytest.approx(sum(deltas) / len(deltas), rel=1e-5)

        # The second replica missed the push of version 4 and the first is gone: scoring the batch of
        # step 5 (during step 4) fails, naming both, and the run stops by the step that needs it
        # (as the TeacherError itself there, or wrapped at step 4 if it had failed by then).
        with pytest.raises(RuntimeError) as failed:
            for _ in range(2):
                trainer.train_step()
        message = str(failed.value)
        assert isinstance(failed.value, TeacherError) or "the batch of step 5 failed" in message, message
        assert f"{second.url} serves weights labelled '3', not '4'" in message, message
        assert first.url in message
        assert trainer.step <= 5
    finally:
        trainer.close()


def test_a_frozen_teacher_pairs_only_the_batches_a_sync_separates_from_their_step(
    teachers: list[Server], model_dir: Path, tmp_path: Path
) -> None:
    """Frozen, synced at steps 2 and 4, k = 1: batch s is scored by the snapshot of the last sync up
    to s - 1. Batches 2 and 4 were scored by the snapshot before the learner's (lag 2) and get the
    pair; the others by the learner's own snapshot, their Delta against pi_s as RLSD's frozen mode
    defines it."""
    trainer = _trainer(tmp_path / "run", model_dir, 5, max_staleness=1, teachers=teachers[:1], mode="frozen")
    plans = _record_plans(trainer)
    try:
        trainer.push_weights(teacher_too=True)
        values = [trainer.train_step() for _ in range(5)]
    finally:
        trainer.close()
    assert [p.teacher_version for p in plans] == [0, 0, 0, 2, 2]
    assert [v["teacher_version_lag"] for v in values] == [0.0, 0.0, 2.0, 0.0, 2.0]
    assert [v["delta_paired_fraction"] for v in values] == [0.0, 0.0, 1.0, 0.0, 1.0]
    assert [p.paired_student_logprobs is not None for p in plans] == [False, False, True, False, True]


def test_at_k0_a_remote_teacher_asks_no_pair_and_equals_a_colocated_one_bit_for_bit(
    teachers: list[Server], model_dir: Path, tmp_path: Path
) -> None:
    """On-policy, the teacher servers hold the learner's teacher version at every step (pushed as
    the step it is), so Delta is taken against pi_s as a colocated teacher takes it, and the runs are
    equal: every logged value and the final weights."""
    runs = {}
    for placement, servers in (("remote", teachers[:1]), ("colocated", None)):
        trainer = _trainer(tmp_path / placement, model_dir, total_steps=3, max_staleness=0, teachers=servers)
        plans = _record_plans(trainer)
        try:
            trainer.push_weights(teacher_too=True)
            values = [trainer.train_step() for _ in range(3)]
            runs[placement] = (values, _policy(trainer))
        finally:
            trainer.close()
        if placement == "remote":
            assert [p.teacher_version for p in plans] == [0, 1, 2]
            assert all(p.paired_student_logprobs is None for p in plans)
            assert httpx.get(teachers[0].url + "/weight_info").json() == {"weight_version": "3"}
            assert all(v["teacher_version_lag"] == 0.0 and v["delta_paired_fraction"] == 0.0 for v in values)
    (remote, remote_weights), (colocated, colocated_weights) = runs["remote"], runs["colocated"]
    for step, (r, c) in enumerate(zip(remote, colocated, strict=True)):
        shared = {k for k in c if not k.startswith(("time_", "step_seconds", "tokens_per_second"))}
        assert {k: r[k] for k in shared} == {k: c[k] for k in shared}, step
    assert all(torch.equal(remote_weights[name], colocated_weights[name]) for name in colocated_weights)

"""The real API server rejects malformed RLSDRuns at apply time, naming the field (schema + CEL)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client
from rlsdrun_samples import deep_update, run_manifest

from rlsd_operator import names

pytestmark = pytest.mark.k8s
Spec = dict[str, Any]


def create(
    custom: client.CustomObjectsApi, namespace: str, body: dict[str, Any], dry_run: bool = True
) -> Any:
    return custom.create_namespaced_custom_object(
        names.GROUP,
        names.VERSION,
        namespace,
        names.PLURAL,
        body,
        dry_run="All" if dry_run else None,
        field_validation="Strict",
    )


def without(path: str) -> Callable[[Spec], Spec]:
    def edit(spec: Spec) -> Spec:
        *parents, leaf = path.split(".")
        node = spec
        for part in parents:
            node = node[part]
        del node[leaf]
        return spec

    return edit


def patch(extra: Spec) -> Callable[[Spec], Spec]:
    return lambda spec: deep_update(spec, extra)


# (case, how the spec is broken, what the message must name)
MALFORMED: list[tuple[str, Callable[[Spec], Spec], str]] = [
    ("model-missing", without("model"), "spec.model: Required value"),
    ("model-path-empty", patch({"model": {"path": ""}}), "spec.model.path"),
    ("model-dtype", patch({"model": {"dtype": "float16"}}), "spec.model.dtype"),
    ("dataset-kind", patch({"dataset": {"train": {"kind": "csv"}}}), "spec.dataset.train.kind"),
    ("dataset-path-missing", without("dataset.train.path"), "spec.dataset.train: Invalid value"),
    ("steps-missing", without("steps"), "spec.steps: Required value"),
    ("steps-zero", patch({"steps": 0}), "spec.steps"),
    ("algorithm-name", patch({"algorithm": {"name": "ppo"}}), "spec.algorithm.name"),
    ("group-size", patch({"algorithm": {"groupSize": 1}}), "spec.algorithm.groupSize"),
    ("lambda-initial", patch({"algorithm": {"lambda": {"initial": 1.5}}}), "spec.algorithm.lambda.initial"),
    ("lambda-final", patch({"algorithm": {"lambda": {"final": -0.1}}}), "spec.algorithm.lambda.final"),
    ("eps-w-one", patch({"algorithm": {"epsW": 1.0}}), "spec.algorithm.epsW"),
    ("eps-w-zero", patch({"algorithm": {"epsW": 0.0}}), "spec.algorithm.epsW"),
    ("clip-low", patch({"algorithm": {"clipLow": 0}}), "spec.algorithm.clipLow"),
    ("clip-order", patch({"algorithm": {"clipLow": 0.3, "clipHigh": 0.2}}), "algorithm.clipHigh"),
    ("learner-nodes", patch({"learner": {"nodes": 0}}), "spec.learner.nodes"),
    ("learner-image", without("learner.image"), "spec.learner.image: Required value"),
    ("gpus-vs-ranks", patch({"learner": {"nprocPerNode": 8}}), "learner.nprocPerNode must equal"),
    ("rollout-replicas", patch({"rollout": {"replicas": 0}}), "rollout.replicas must be at least 1"),
    ("rollout-backend", patch({"rollout": {"backend": "tgi"}}), "spec.rollout.backend"),
    ("rollout-image", without("rollout.image"), "rollout.image is required"),
    ("cpu-nccl", patch({"rollout": {"backend": "cpu", "weightTransfer": "nccl"}}), "rollout.weightTransfer"),
    (
        "vllm-gloo",
        patch({"rollout": {"backend": "vllm", "weightTransfer": "gloo"}}),
        "rollout.weightTransfer gloo",
    ),
    (
        "temperature",
        patch({"rollout": {"sampling": {"temperature": 2.5}}}),
        "spec.rollout.sampling.temperature",
    ),
    ("top-p", patch({"rollout": {"sampling": {"topP": 1.5}}}), "spec.rollout.sampling.topP"),
    (
        "teacher-replicas",
        patch({"teacher": {"placement": "remote", "replicas": 0, "image": "t"}}),
        "teacher.replicas",
    ),
    ("teacher-placement", patch({"teacher": {"placement": "elsewhere"}}), "spec.teacher.placement"),
    (
        "volume-both",
        patch({"checkpoint": {"volume": {"claimTemplate": {"resources": {"requests": {"storage": "1Gi"}}}}}}),
        "checkpoint.volume needs exactly one of claimName and claimTemplate",
    ),
    (
        "volume-neither",
        patch({"checkpoint": {"volume": {"claimName": None}}}),
        "checkpoint.volume needs exactly one",
    ),
    ("backoff-limit", patch({"restartPolicy": {"backoffLimit": -1}}), "spec.restartPolicy.backoffLimit"),
    (
        "backoff-order",
        patch({"restartPolicy": {"backoffLimit": 1, "backoffSeconds": 60, "maxBackoffSeconds": 10}}),
        "restartPolicy.maxBackoffSeconds must be >= restartPolicy.backoffSeconds",
    ),
    ("verifier-callable", patch({"reward": {"verifier": "callable"}}), "reward.callable"),
    ("callable-format", patch({"reward": {"callable": "no_colon"}}), "spec.reward.callable"),
    ("unknown-field", patch({"learner": {"gpus": 4}}), 'unknown field "spec.learner.gpus"'),
    (
        "grace-range",
        patch({"checkpoint": {"preemptionGraceSeconds": 0}}),
        "spec.checkpoint.preemptionGraceSeconds",
    ),
    (
        "hf-secret-name",
        patch({"huggingFaceTokenSecret": {"key": "token"}}),
        "spec.huggingFaceTokenSecret.name",
    ),
    ("lr-word", patch({"optim": {"lr": "fast"}}), "spec.optim.lr"),
    ("lr-string", patch({"optim": {"lr": "1e-6"}}), "spec.optim.lr"),
    ("lr-zero", patch({"optim": {"lr": 0}}), "spec.optim.lr"),
    ("lr-negative", patch({"optim": {"lr": -1e-6}}), "spec.optim.lr"),
    # Every count and size is bounded.
    ("replicas-huge", patch({"rollout": {"replicas": 100000}}), "spec.rollout.replicas"),
    ("nodes-huge", patch({"learner": {"nodes": 513}}), "spec.learner.nodes"),
    ("prompts-huge", patch({"rollout": {"promptsPerStep": 10**12}}), "spec.rollout.promptsPerStep"),
    ("group-huge", patch({"algorithm": {"groupSize": 4096}}), "spec.algorithm.groupSize"),
    ("tokens-huge", patch({"rollout": {"sampling": {"maxNewTokens": 10**9}}}), "maxNewTokens"),
    ("steps-huge", patch({"steps": 10**10}), "spec.steps"),
    ("env-many", patch({"learner": {"env": [{"name": f"E{i}", "value": "x"} for i in range(257)]}}), "env"),
    ("args-many", patch({"rollout": {"extraArgs": ["--x"] * 257}}), "spec.rollout.extraArgs"),
    ("arg-long", patch({"rollout": {"extraArgs": ["x" * 5000]}}), "spec.rollout.extraArgs[0]"),
    ("image-long", patch({"learner": {"image": "x" * 1025}}), "spec.learner.image"),
    (
        "rwo-gang",
        patch(
            {
                "checkpoint": {
                    "volume": {
                        "claimName": None,
                        "claimTemplate": {
                            "accessModes": ["ReadWriteOnce"],
                            "resources": {"requests": {"storage": "1Gi"}},
                        },
                    }
                }
            }
        ),
        "a ReadWriteOnce claim is mounted by the pods of one node only",
    ),
    ("staleness-negative", patch({"rollout": {"maxStaleness": -1}}), "spec.rollout.maxStaleness"),
    ("staleness-huge", patch({"rollout": {"maxStaleness": 9}}), "spec.rollout.maxStaleness"),
    (
        "sampling-rounds",
        patch({"rollout": {"dynamicSampling": {"enabled": True, "maxRounds": 0}}}),
        "spec.rollout.dynamicSampling.maxRounds",
    ),
    ("importance-cap", patch({"algorithm": {"importanceCap": 0.5}}), "spec.algorithm.importanceCap"),
    ("queue-name-not-a-name", patch({"queueName": "Team A"}), "spec.queueName"),
    ("queue-name-too-long", patch({"queueName": "q" * 64}), "spec.queueName"),
]


@pytest.mark.parametrize(
    ("edit", "field"), [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED]
)
def test_malformed_run_is_rejected_naming_the_field(
    custom: client.CustomObjectsApi, namespace: str, edit: Callable[[Spec], Spec], field: str
) -> None:
    body = run_manifest()
    body["spec"] = edit(body["spec"])
    with pytest.raises(client.ApiException) as rejected:
        create(custom, namespace, body)
    assert rejected.value.status in (400, 422), rejected.value.body  # 400: strict decoding
    message = json.loads(rejected.value.body)["message"]
    assert field in message, message


@pytest.mark.parametrize("name", ["team.a.run-1", "1st-run", "r" * 253])
def test_any_object_name_is_accepted(custom: client.CustomObjectsApi, namespace: str, name: str) -> None:
    assert create(custom, namespace, run_manifest(name))["metadata"]["name"] == name


def test_a_valid_run_is_accepted_with_defaults(custom: client.CustomObjectsApi, namespace: str) -> None:
    body = run_manifest(spec={"optim": {"lr": 1e-6}})
    del body["spec"]["learner"]["nodes"]
    created = create(custom, namespace, body)
    spec = created["spec"]
    assert spec["learner"]["nodes"] == 1
    assert spec["restartPolicy"] == {"backoffLimit": 3, "backoffSeconds": 10, "maxBackoffSeconds": 300}
    assert spec["checkpoint"]["mountPath"] == "/checkpoints" and spec["suspend"] is False
    assert spec["optim"]["lr"] == 1e-6
    for lr in (3e-5, 1):
        assert (
            create(custom, namespace, run_manifest(spec={"optim": {"lr": lr}}))["spec"]["optim"]["lr"] == lr
        )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model": {"path": "other/model"}}, "model is immutable"),
        ({"algorithm": {"name": "grpo"}}, "algorithm is immutable"),
        ({"checkpoint": {"mountPath": "/elsewhere"}}, "checkpoint.mountPath is immutable"),
    ],
)
def test_identity_fields_are_immutable(
    custom: client.CustomObjectsApi, namespace: str, change: Spec, field: str
) -> None:
    create(custom, namespace, run_manifest(spec={"algorithm": {"name": "rlsd"}}), dry_run=False)
    with pytest.raises(client.ApiException) as rejected:
        custom.patch_namespaced_custom_object(
            names.GROUP, names.VERSION, namespace, names.PLURAL, "demo", {"spec": change}
        )
    assert field in rejected.value.body
    # Fields that apply at once, or at the next learner attempt, may change.
    custom.patch_namespaced_custom_object(
        names.GROUP, names.VERSION, namespace, names.PLURAL, "demo", {"spec": {"suspend": True, "steps": 500}}
    )

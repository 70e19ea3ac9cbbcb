"""RLSDRun manifests for the operator tests."""

from __future__ import annotations

import copy
from typing import Any

from controlplane import KWOK_NODE_SELECTOR, KWOK_TOLERATION

from rlsd_operator import names


def deep_update(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_update(merged[key], value)
        else:
            merged[key] = value
    return merged


def run_manifest(name: str = "demo", spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """A run whose pods land on the kwok GPU nodes: 2 learners x 4 GPUs, 2 vLLM rollout replicas."""
    base = {
        "model": {"path": "Qwen/Qwen3-0.6B", "dtype": "bfloat16"},
        "dataset": {"train": {"kind": "jsonl", "path": "/data/train.jsonl", "questionField": "problem"}},
        "steps": 100,
        "learner": {
            "image": "rlsd/trainer:gpu",
            "nodes": 2,
            "nprocPerNode": 4,
            "resources": {"limits": {"nvidia.com/gpu": 4}},
        },
        "rollout": {
            "backend": "vllm",
            "image": "vllm/vllm-openai:v0.11.0",
            "replicas": 2,
            "resources": {"limits": {"nvidia.com/gpu": 1}},
        },
        "checkpoint": {"volume": {"claimName": "checkpoints"}},
        "scheduling": {"nodeSelector": dict(KWOK_NODE_SELECTOR), "tolerations": [dict(KWOK_TOLERATION)]},
    }
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.KIND,
        "metadata": {"name": name},
        "spec": deep_update(base, spec or {}),
    }


# What the API server's defaulting adds to run_manifest() (the unit tests run without one).
API_DEFAULTS = {
    "learner": {},
    "checkpoint": {"mountPath": "/checkpoints", "preemptionGraceSeconds": 120},
    "restartPolicy": {"backoffLimit": 3, "backoffSeconds": 10, "maxBackoffSeconds": 300},
    "suspend": False,
}


def defaulted_run(name: str = "demo", spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """run_manifest() as the API server returns it: defaulted, with namespace and uid."""
    run = run_manifest(name, deep_update(API_DEFAULTS, spec or {}))
    run["metadata"].update({"namespace": "team-a", "uid": "1234-5678"})
    return run

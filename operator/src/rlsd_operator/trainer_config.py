"""The trainer's configuration (rlsd_trainer/config.py's schema) rendered from an RLSDRun spec.

Only fields the user set are rendered, so the trainer's own defaults apply to the rest; the trainer
validates the result at start-up (a bad one makes the learner exit 3 and the run Failed).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

from rlsd_operator import names

# (spec path, trainer config path, conversion) for every field that maps one to one.
_FIELDS: list[tuple[str, str, Callable[[Any], Any] | None]] = [
    ("seed", "run.seed", None),
    ("steps", "run.total_steps", None),
    ("model.path", "model.path", None),
    ("model.dtype", "model.dtype", None),
    ("model.trustRemoteCode", "model.trust_remote_code", None),
    ("dataset.maxPromptTokens", "data.max_prompt_tokens", None),
    ("algorithm.name", "algorithm.name", None),
    ("algorithm.groupSize", "algorithm.group_size", None),
    ("algorithm.lambda.kind", "algorithm.lam.kind", None),
    ("algorithm.lambda.initial", "algorithm.lam.initial", None),
    ("algorithm.lambda.final", "algorithm.lam.final", None),
    ("algorithm.lambda.warmupSteps", "algorithm.lam.warmup_steps", None),
    ("algorithm.lambda.decaySteps", "algorithm.lam.decay_steps", None),
    ("algorithm.epsW", "algorithm.eps_w", None),
    ("algorithm.clipLow", "algorithm.clip_low", None),
    ("algorithm.clipHigh", "algorithm.clip_high", None),
    ("algorithm.dualClip", "algorithm.dual_clip", None),
    ("algorithm.klCoef", "algorithm.kl_coef", None),
    ("algorithm.entropyCoef", "algorithm.entropy_coef", None),
    ("algorithm.opsdCoef", "algorithm.opsd_coef", None),
    ("optim.lr", "optim.lr", float),
    ("optim.weightDecay", "optim.weight_decay", None),
    ("optim.gradClip", "optim.grad_clip", None),
    ("reward.verifier", "reward.verifier", None),
    ("reward.callable", "reward.callable", None),
    ("reward.timeoutSeconds", "reward.timeout_s", None),
    ("reward.workers", "reward.workers", None),
    ("learner.microBatchTokens", "learner.micro_batch_tokens", None),
    ("learner.activationCheckpointing", "learner.activation_checkpointing", None),
    ("learner.mixedPrecision", "learner.mixed_precision", None),
    ("rollout.promptsPerStep", "rollout.prompts_per_step", None),
    ("rollout.sampling.temperature", "rollout.sampling.temperature", None),
    ("rollout.sampling.topP", "rollout.sampling.top_p", None),
    ("rollout.sampling.maxNewTokens", "rollout.sampling.max_new_tokens", None),
    ("teacher.placement", "teacher.placement", None),
    ("teacher.mode", "teacher.mode", None),
    ("teacher.syncInterval", "teacher.sync_interval", None),
    ("checkpoint.every", "checkpoint.every", None),
    ("checkpoint.keepLast", "checkpoint.keep_last", None),
    ("checkpoint.asyncSave", "checkpoint.async_save", None),
    ("checkpoint.preemptionGraceSeconds", "checkpoint.preemption_grace_s", None),
    ("trackers.wandb.project", "metrics.wandb.project", None),
    ("trackers.wandb.entity", "metrics.wandb.entity", None),
    ("trackers.mlflow.trackingUri", "metrics.mlflow.tracking_uri", None),
    ("trackers.mlflow.experiment", "metrics.mlflow.experiment", None),
    ("trackers.tensorboard.logDir", "metrics.tensorboard.log_dir", None),
]
# The trainer's trackers, in the order it starts them (credentials go to the pods' env, see builders).
TRACKERS = ("wandb", "mlflow", "tensorboard")
_DATA_SOURCE_FIELDS = {
    "kind": "kind",
    "path": "path",
    "split": "split",
    "questionField": "question_field",
    "answerField": "answer_field",
    "referenceField": "reference_field",
}
# The `--weight-transfer-config` backend a server needs for each spec transfer: nccl (vLLM) and gloo
# (our CPU servers) are transfer engines; filesystem reloads through vLLM's `/collective_rpc` and
# needs none.
SERVER_TRANSFER_BACKEND = {"nccl": "nccl", "gloo": "gloo", "filesystem": None}


def lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _put(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` merged into a copy of `base`; nested mappings merge, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def spec_problems(spec: dict[str, Any]) -> list[str]:
    """What the API server cannot check (CEL cannot type a number-or-string field)."""
    lr = lookup(spec, "optim.lr")
    if lr is None:
        return []
    try:
        valid = not isinstance(lr, bool) and math.isfinite(float(lr)) and float(lr) > 0
    except (TypeError, ValueError):
        valid = False
    return [] if valid else [f"optim.lr must be a positive number such as 1e-6, got {lr!r}"]


def rollout_transfer(spec: dict[str, Any]) -> str:
    """The rollout weight-transfer backend: as set, else vLLM's nccl or the CPU server's gloo."""
    rollout = spec.get("rollout") or {}
    return rollout.get("weightTransfer") or ("nccl" if rollout.get("backend") == "vllm" else "gloo")


def remote_rollout(spec: dict[str, Any]) -> bool:
    return (spec.get("rollout") or {}).get("backend", "local") != "local"


def remote_teacher(spec: dict[str, Any]) -> bool:
    return (spec.get("teacher") or {}).get("placement") == "remote"


def run_dir(spec: dict[str, Any], run: str) -> str:
    """The run's directory on the checkpoint volume (a claim may be shared by several runs)."""
    return f"{spec['checkpoint']['mountPath'].rstrip('/')}/{run}"


def build_trainer_config(
    spec: dict[str, Any], run: str, namespace: str, cluster_domain: str = "cluster.local"
) -> dict[str, Any]:
    """The trainer's config for the run `run` in `namespace` (spec as defaulted by the API server)."""
    config: dict[str, Any] = {
        "run": {"name": run, "output_dir": run_dir(spec, run)},
        # Fixed, so the operator knows where to scrape; no progress bar in a pod's log.
        "metrics": {
            "prometheus_port": names.METRICS_PORT,
            "prometheus_host": "0.0.0.0",
            "progress_bar": False,
        },
    }
    for source, target, convert in _FIELDS:
        value = lookup(spec, source)
        if value is not None:
            _put(config, target, convert(value) if convert else value)
    trackers = [name for name in TRACKERS if name in (spec.get("trackers") or {})]
    if trackers:
        config["metrics"]["trackers"] = trackers
    for split in ("train", "eval"):
        data_source = lookup(spec, f"dataset.{split}") or {}
        for source, target in _DATA_SOURCE_FIELDS.items():
            if source in data_source:
                _put(config, f"data.{split}.{target}", data_source[source])

    learner_host = names.learner_dns(run, namespace, cluster_domain)
    shared_dir = f"{run_dir(spec, run)}/weights"
    if remote_rollout(spec):
        backend = rollout_transfer(spec)
        replicas = spec["rollout"]["replicas"]
        _put(config, "rollout.backend", "remote")
        _put(
            config,
            "rollout.servers",
            {
                "urls": [
                    names.server_url(run, names.ROLLOUT, i, namespace, cluster_domain)
                    for i in range(replicas)
                ],
                "model_name": names.SERVED_MODEL_NAME,
                "weight_transfer": _transfer(backend, learner_host, names.ROLLOUT_TRANSFER_PORT, shared_dir),
            },
        )
    if remote_teacher(spec):
        teacher = spec["teacher"]
        _put(
            config,
            "teacher.servers",
            {
                "urls": [
                    names.server_url(run, names.TEACHER, i, namespace, cluster_domain)
                    for i in range(teacher["replicas"])
                ],
                "model_name": names.SERVED_MODEL_NAME,
                "weight_transfer": _transfer(
                    teacher["weightTransfer"], learner_host, names.TEACHER_TRANSFER_PORT, shared_dir
                ),
            },
        )
    return deep_merge(config, spec.get("trainerConfig") or {})


def _transfer(backend: str, host: str, port: int, shared_dir: str) -> dict[str, Any]:
    transfer: dict[str, Any] = {"backend": backend, "host": host, "port": port}
    if backend == "filesystem":
        transfer["shared_dir"] = shared_dir
    return transfer

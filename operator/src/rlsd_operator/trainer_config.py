"""The trainer's configuration rendered from an RLSDRun spec, and validated with the trainer's own
schema (`rlsd_contracts.config`) before any pod exists.

No field list is kept here: a spec field renders to the trainer field of the same path in snake_case
(`rollout.sampling.maxNewTokens` -> `rollout.sampling.max_new_tokens`), after the few renames in
`RENAMED` and the `...Seconds` -> `..._s` unit suffix; the fields in `OPERATOR_FIELDS` are the
operator's own (pods, images, volumes) and are never rendered. tests/operator/test_contract.py
checks that every other CRD field lands on a trainer field with the same type and bounds.

Only fields the user set are rendered, so the trainer's defaults apply to the rest.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from rlsd_contracts.config import ConfigError, parse_config
from rlsd_contracts.wire import (
    METRICS_PORT,
    ROLLOUT,
    ROLLOUT_TRANSFER_PORT,
    SERVED_MODEL_NAME,
    TEACHER,
    TEACHER_TRANSFER_PORT,
)
from rlsd_operator import names

Object = dict[str, Any]
# Spec paths whose trainer name is not their snake_case form (`lambda` is a Python keyword).
RENAMED = {
    "steps": "run.total_steps",
    "seed": "run.seed",
    "dataset": "data",
    "algorithm.lambda": "algorithm.lam",
    "trackers": "metrics",
}
# The trainer's trackers, in the order it starts them (credentials go to the pods' env, see builders).
TRACKERS = ("wandb", "mlflow", "tensorboard")
# Spec fields the operator itself acts on (pods, servers, volumes, scheduling); never rendered.
OPERATOR_FIELDS = frozenset(
    {
        "learner.nodes",
        "learner.nprocPerNode",
        "learner.image",
        "learner.imagePullPolicy",
        "learner.resources",
        "learner.env",
        "rollout.backend",
        "rollout.replicas",
        "rollout.image",
        "rollout.resources",
        "rollout.env",
        "rollout.weightTransfer",
        "rollout.extraArgs",
        "teacher.replicas",
        "teacher.image",
        "teacher.resources",
        "teacher.env",
        "teacher.weightTransfer",
        "checkpoint.volume",
        "checkpoint.mountPath",
        "restartPolicy",
        "scheduling",
        "queueName",
        "imagePullSecrets",
        "huggingFaceTokenSecret",
        "trackers.wandb.apiKeySecret",
        "trackers.mlflow.tokenSecret",
        "suspend",
        "ttlSecondsAfterFinished",
        "networkPolicy",
        "trainerConfig",
    }
)


class InvalidSpec(ValueError):
    """A spec the trainer would refuse (or that cannot be realised); the message names the fields."""


def trainer_path(spec_path: str) -> str:
    """The trainer config path a spec field renders to."""
    for prefix, renamed in RENAMED.items():
        if spec_path == prefix or spec_path.startswith(prefix + "."):
            spec_path = renamed + spec_path[len(prefix) :]
            break
    parts = [re.sub(r"(?<!^)([A-Z])", r"_\1", part).lower() for part in spec_path.split(".")]
    return ".".join(re.sub(r"_seconds$", "_s", part) for part in parts)


def _leaves(tree: Object, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, value) of every non-mapping value in `tree`."""
    found = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            found += _leaves(value, path + ".")
        else:
            found.append((path, value))
    return found


def _put(tree: Object, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def rollout_transfer(spec: Object) -> str:
    """The rollout weight-transfer backend: as set, else vLLM's nccl or the CPU server's gloo."""
    rollout = spec.get("rollout") or {}
    return rollout.get("weightTransfer") or ("nccl" if rollout.get("backend") == "vllm" else "gloo")


def remote_rollout(spec: Object) -> bool:
    return (spec.get("rollout") or {}).get("backend", "local") != "local"


def remote_teacher(spec: Object) -> bool:
    return (spec.get("teacher") or {}).get("placement") == "remote"


def run_dir(spec: Object, run: str) -> str:
    """The run's directory on the checkpoint volume (a claim may be shared by several runs)."""
    return f"{spec['checkpoint']['mountPath'].rstrip('/')}/{run}"


def render(spec: Object, run: str, namespace: str, cluster_domain: str) -> tuple[Object, dict[str, str]]:
    """The raw trainer config of run `run` (spec as defaulted by the API server), and where each of
    its fields came from (trainer path -> `spec.<path>`), to name the spec field in errors."""
    config: Object = {
        "run": {"name": run, "output_dir": run_dir(spec, run)},
        # Fixed, so the operator knows where to scrape; no progress bar in a pod's log.
        "metrics": {"prometheus_port": METRICS_PORT, "prometheus_host": "0.0.0.0", "progress_bar": False},
    }
    origin: dict[str, str] = {}
    for path, value in _leaves(spec):
        parts = path.split(".")
        if any(".".join(parts[:n]) in OPERATOR_FIELDS for n in range(1, len(parts) + 1)):
            continue
        target = trainer_path(path)
        _put(config, target, value)
        origin[target] = f"spec.{path}"

    trackers = [name for name in TRACKERS if name in (spec.get("trackers") or {})]
    if trackers:
        config["metrics"]["trackers"] = trackers
    if remote_rollout(spec):
        _put(config, "rollout.backend", "remote")
        servers = _servers(spec, run, namespace, cluster_domain, ROLLOUT, rollout_transfer(spec))
        _put(config, "rollout.servers", servers)
    if remote_teacher(spec):
        servers = _servers(spec, run, namespace, cluster_domain, TEACHER, spec["teacher"]["weightTransfer"])
        _put(config, "teacher.servers", servers)
    extra = spec.get("trainerConfig") or {}
    for path, _ in _leaves(extra):
        origin[path] = f"spec.trainerConfig.{path}"
    return _merge(config, extra), origin


def _servers(spec: Object, run: str, namespace: str, cluster_domain: str, role: str, backend: str) -> Object:
    """The `servers` section of the rollout or teacher role: the replicas' stable URLs, and learner
    rank 0 as the host of the weight-transfer group."""
    transfer: Object = {
        "backend": backend,
        "host": names.learner_dns(run, namespace, cluster_domain),
        "port": ROLLOUT_TRANSFER_PORT if role == ROLLOUT else TEACHER_TRANSFER_PORT,
    }
    if backend == "filesystem":
        transfer["shared_dir"] = f"{run_dir(spec, run)}/weights"
    return {
        "urls": [
            names.server_url(run, role, i, namespace, cluster_domain) for i in range(spec[role]["replicas"])
        ],
        "model_name": SERVED_MODEL_NAME,
        "weight_transfer": transfer,
    }


def _merge(base: Object, extra: Object) -> Object:
    """`extra` merged into a copy of `base`; nested mappings merge, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def build_trainer_config(
    spec: Object, run: str, namespace: str, cluster_domain: str = "cluster.local"
) -> Object:
    """The trainer config of the run, validated with the trainer's schema: only the fields that were
    set, in the schema's types (a `trainerConfig` lr of "1e-6" becomes 1e-06). Raises InvalidSpec naming the
    spec fields the schema refuses."""
    raw, origin = render(spec, run, namespace, cluster_domain)
    try:
        config = parse_config(raw, "the rendered trainer config")
    except ConfigError as exc:
        raise InvalidSpec(_name_spec_fields(str(exc), origin)) from None
    _check_model_length(spec, config.data.max_prompt_tokens, config.rollout.sampling.max_new_tokens)
    return config.model_dump(mode="json", exclude_unset=True)


def _check_model_length(spec: Object, prompt_tokens: int, new_tokens: int) -> None:
    """A `--max-model-len` in `rollout.extraArgs` must hold a prompt and its response: vLLM refuses
    (400) every request that could outgrow it, and no step would ever run."""
    args = [str(arg) for arg in (spec.get("rollout") or {}).get("extraArgs") or []]
    limit = None
    for index, arg in enumerate(args):
        if arg in ("--max-model-len", "--max_model_len") and index + 1 < len(args):
            limit = args[index + 1]
        elif arg.startswith(("--max-model-len=", "--max_model_len=")):
            limit = arg.split("=", 1)[1]
    tokens = model_length(limit) if limit is not None else None
    if tokens is not None and prompt_tokens + new_tokens > tokens:
        raise InvalidSpec(
            f"rollout.extraArgs: --max-model-len {limit} ({tokens} tokens) cannot hold a prompt of "
            f"dataset.maxPromptTokens ({prompt_tokens}) and a response of rollout.sampling.maxNewTokens "
            f"({new_tokens}); raise it to at least {prompt_tokens + new_tokens} or lower those"
        )


_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def model_length(text: str) -> int | None:
    """vLLM's `--max-model-len` in tokens ('32768', '32k' = 32000, '32K' = 32768, '25.6k'), or None for
    'auto' / -1 (the model's own); tests/conformance checks it against vLLM's own parser."""
    value = text.strip()
    if value.lower() == "auto" or value == "-1":
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT])", value)
    try:
        if match is None:
            return int(value)
        number, suffix = match.groups()
        if suffix in _DECIMAL:
            return int(float(number) * _DECIMAL[suffix])
        return int(number) * _BINARY[suffix]
    except ValueError:
        raise InvalidSpec(f"rollout.extraArgs: --max-model-len {text!r} is not a number of tokens") from None


def _name_spec_fields(message: str, origin: dict[str, str]) -> str:
    """The schema's error lines, each naming the spec field its trainer path came from."""
    problems = []
    for line in message.splitlines()[1:]:
        path, _, problem = line.strip().partition(": ")
        parts = path.split(".")
        where = f"trainer config {path}"
        for n in range(len(parts), 0, -1):
            prefix = ".".join(parts[:n])
            if prefix in origin:
                where = ".".join([origin[prefix], *parts[n:]])
                break
        else:  # a whole section is refused: name where its fields came from
            inside = set()
            for key, source in origin.items():
                if key.startswith(path + "."):
                    below = key.count(".") - path.count(".")  # components of `key` under `path`
                    inside.add(".".join(source.split(".")[: max(source.count(".") + 1 - below, 2)]))
            where = " / ".join(sorted(inside)) or where
        problems.append(f"{where}: {problem}")
    return "; ".join(problems) or message

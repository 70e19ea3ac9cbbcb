"""Pure functions from an RLSDRun (a dict, as the API server returns it) to the Kubernetes objects
the operator creates for it. No I/O: the handlers create what these return.

Every object carries the run's labels and an owner reference to the run (`kopf.adopt`), so the
garbage collector deletes them with it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import kopf
import yaml
from kubernetes.utils import parse_quantity

from rlsd_contracts.config import RolloutSection, ServersSection
from rlsd_contracts.wire import (
    LEARNER,
    METRICS_PORT,
    RENDEZVOUS_PORT,
    ROLLOUT,
    RUN_TOKEN_DIR,
    RUN_TOKEN_FILE_ENV,
    RUN_TOKEN_KEY,
    RUN_TOKEN_MIDDLEWARE,
    SERVED_MODEL_NAME,
    SERVER_PORT,
    SERVER_TRANSFER_BACKEND,
    TEACHER,
    TERMINATION_LOG_ENV,
    TERMINATION_LOG_PATH,
)
from rlsd_operator import names, security
from rlsd_operator.trainer_config import (
    InvalidSpec,
    build_trainer_config,
    remote_rollout,
    remote_teacher,
    rollout_transfer,
)

Object = dict[str, Any]
# Seconds a learner pod gets after SIGTERM beyond `checkpoint.preemptionGraceSeconds` (process exit).
TERMINATION_SLACK_SECONDS = 30
# What the API server stores of a ConfigMap's data at most (1 MiB).
CONFIG_MAP_MAX_BYTES = 1024 * 1024
# A claim these access modes allow is mounted by pods on any nodes; any other (ReadWriteOnce) only by
# pods on one node.
SHARED_ACCESS_MODES = {"ReadWriteMany", "ReadOnlyMany"}
HOSTNAME_TOPOLOGY = "kubernetes.io/hostname"
# A server's probes. Startup: /health may take long to come up (a model downloaded and loaded).
STARTUP_PERIOD_SECONDS, STARTUP_FAILURES = 2, 1800
# Liveness: rlsd_contracts.liveness, through vLLM's engine core; a stall is a wedge once it outlasts
# the longest a weight push may hold the engine (the role's weight_push_timeout_s).
LIVENESS_PERIOD_SECONDS, LIVENESS_TIMEOUT_SECONDS = 5, 5
# A server saves nothing on SIGTERM (the learners retry its in-flight requests elsewhere), and a
# wedged one must go soon after its liveness probe gives up: with restartPolicy Never the kubelet ends
# the whole pod, with the pod's grace period (a probe's own is used only for a container restart).
SERVER_GRACE_SECONDS = 10


def _run_name(run: Object) -> str:
    return run["metadata"]["name"]


def _owned(run: Object, obj: Object) -> Object:
    kopf.adopt(obj, owner=run)
    return obj


def spec_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def build_config_map(run: Object, cluster_domain: str = "cluster.local") -> Object:
    """The trainer's config file (validated with the trainer's schema), and the spec it was rendered
    from (to name deferred changes). Raises InvalidSpec when the schema refuses it or it is too large."""
    name, namespace = _run_name(run), run["metadata"]["namespace"]
    config = build_trainer_config(run["spec"], name, namespace, cluster_domain)
    data = {
        names.CONFIG_FILE: yaml.safe_dump(config, sort_keys=False),
        names.APPLIED_SPEC_FILE: json.dumps(run["spec"], sort_keys=True),
    }
    size = sum(len(key) + len(value.encode()) for key, value in data.items())
    if size > CONFIG_MAP_MAX_BYTES:
        raise InvalidSpec(
            f"spec: the rendered trainer config and the spec take {size} bytes, more than the "
            f"{CONFIG_MAP_MAX_BYTES} a ConfigMap holds; shorten spec.trainerConfig"
        )
    metadata = {"name": names.config_map_name(name), "labels": names.labels(name)}
    return _owned(run, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})


def max_staleness(config_map: Object) -> int:
    """The `rollout.max_staleness` the trainer config of `config_map` runs with: as rendered (from
    `spec.rollout.maxStaleness` or `trainerConfig`), else the trainer's default."""
    config = yaml.safe_load(config_map["data"][names.CONFIG_FILE])
    default: int = RolloutSection.model_fields["max_staleness"].default
    return int((config.get("rollout") or {}).get("max_staleness", default))


def total_steps(config_map: Object) -> int:
    """The `run.total_steps` the trainer config of `config_map` runs with (always rendered: from
    `spec.steps`, or `trainerConfig`)."""
    config = yaml.safe_load(config_map["data"][names.CONFIG_FILE])
    return int(config["run"]["total_steps"])


def pod_count(spec: Object) -> int:
    """Learner and server pods the run has at once."""
    count = spec["learner"]["nodes"]
    count += spec["rollout"]["replicas"] if remote_rollout(spec) else 0
    return count + (spec["teacher"]["replicas"] if remote_teacher(spec) else 0)


def template_access_modes(spec: Object) -> list[str]:
    """The access modes of the claim made from `claimTemplate`: as the template says, else one pod
    alone may have it ReadWriteOnce and several share it ReadWriteMany."""
    template = spec["checkpoint"]["volume"]["claimTemplate"]
    return template.get("accessModes") or ["ReadWriteOnce" if pod_count(spec) == 1 else "ReadWriteMany"]


def volume_problem(spec: Object, access_modes: list[str]) -> str | None:
    """Why the run's pods cannot share a checkpoint claim with `access_modes`, or None.

    A ReadWriteOnce claim is mounted by the pods of one node only: the operator places every pod of
    such a run on one node (see `colocated`, and placement.py), which a gang of several learner pods
    defeats. A ReadWriteOncePod claim is mounted by one pod only."""
    if SHARED_ACCESS_MODES & set(access_modes):
        return None
    volume = spec["checkpoint"]["volume"]
    which = f"claim {volume['claimName']!r}" if volume.get("claimName") else "the claim of claimTemplate"
    if access_modes == ["ReadWriteOncePod"] and pod_count(spec) > 1:
        return (
            f"checkpoint.volume: {which} is ReadWriteOncePod, which one pod alone can mount, and the run "
            f"has {pod_count(spec)} pods; use a ReadWriteMany claim"
        )
    if spec["learner"]["nodes"] > 1:
        return (
            f"checkpoint.volume: {which} is {'/'.join(access_modes) or 'ReadWriteOnce'}, which only pods "
            f"on one node can mount, and learner.nodes is {spec['learner']['nodes']} (a gang across "
            "nodes); use a ReadWriteMany claim, or learner.nodes: 1 (every pod of the run on one node)"
        )
    return None


def colocated(access_modes: list[str]) -> bool:
    """Whether every pod of the run must land on one node to mount its claim."""
    return not SHARED_ACCESS_MODES & set(access_modes)


def build_claim(run: Object) -> Object | None:
    """The checkpoint PersistentVolumeClaim made from `claimTemplate`, or None for an existing claim."""
    template = run["spec"]["checkpoint"]["volume"].get("claimTemplate")
    if template is None:
        return None
    name = _run_name(run)
    spec = {**template, "accessModes": template_access_modes(run["spec"])}
    return _owned(
        run,
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": names.claim_name(name), "labels": names.labels(name)},
            "spec": spec,
        },
    )


def build_service(run: Object, role: str) -> Object:
    """A headless Service: stable DNS names for the pods of `role` (rendezvous, server URLs)."""
    name = _run_name(run)
    ports = (
        [
            {"name": "rendezvous", "port": RENDEZVOUS_PORT},
            {"name": "metrics", "port": METRICS_PORT},
        ]
        if role == LEARNER
        else [{"name": "http", "port": SERVER_PORT}]
    )
    return _owned(
        run,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": names.service_name(name, role), "labels": names.labels(name, role)},
            "spec": {
                "clusterIP": "None",
                "selector": names.labels(name, role),
                "ports": ports,
                # Ranks resolve each other while they start, before any of them is ready.
                "publishNotReadyAddresses": role == LEARNER,
            },
        },
    )


def build_services(run: Object) -> list[Object]:
    spec = run["spec"]
    roles = [LEARNER]
    roles += [ROLLOUT] if remote_rollout(spec) else []
    roles += [TEACHER] if remote_teacher(spec) else []
    return [build_service(run, role) for role in roles]


@dataclass(frozen=True)
class NetworkPolicyDefaults:
    """The operator's NetworkPolicy settings (chart value `networkPolicy`, in the environment variable
    RLSD_OPERATOR_NETWORK_POLICY as JSON): whether runs get one when their spec does not say, the peers
    that scrape metrics unless the spec names its own, and the operator's own pods (which read learner
    rank 0's progress), always admitted to the metrics ports."""

    enabled: bool = False
    metrics_from: tuple[Object, ...] = ()
    operator: Object | None = None

    @classmethod
    def from_json(cls, text: str) -> NetworkPolicyDefaults:
        """Parsed from RLSD_OPERATOR_NETWORK_POLICY; a ValueError names what is wrong."""
        try:
            value = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"RLSD_OPERATOR_NETWORK_POLICY is not JSON: {exc}") from None
        unknown = set(value) - {"enabled", "metricsFrom", "operator"} if isinstance(value, dict) else None
        if unknown is None or unknown:
            raise ValueError(
                "RLSD_OPERATOR_NETWORK_POLICY must be a JSON object with the keys enabled, metricsFrom "
                f"(a list of NetworkPolicy peers) and operator (a peer); got {text!r}"
            )
        return cls(
            bool(value.get("enabled", False)), tuple(value.get("metricsFrom") or ()), value.get("operator")
        )


NO_NETWORK_POLICY = NetworkPolicyDefaults()


def build_network_policy(run: Object, defaults: NetworkPolicyDefaults = NO_NETWORK_POLICY) -> Object | None:
    """The run's NetworkPolicy, or None when it has none (`spec.networkPolicy.enabled`, else the
    operator's default): the run's pods accept traffic from each other on any port (torchrun, NCCL and
    gloo pick ports of their own) and, on the metrics ports only (learners' 9400, the servers' HTTP
    port, where vLLM serves /metrics), from the operator and the `metricsFrom` peers. Egress is not
    restricted (model downloads, trackers, DNS)."""
    name = _run_name(run)
    wanted = run["spec"].get("networkPolicy") or {}
    if not wanted.get("enabled", defaults.enabled):
        return None
    scrapers = [defaults.operator] if defaults.operator else []
    scrapers += wanted.get("metricsFrom", defaults.metrics_from)
    members = {"matchLabels": names.labels(name)}
    ingress: list[Object] = [{"from": [{"podSelector": members}]}]
    if scrapers:
        ports = [{"protocol": "TCP", "port": port} for port in (METRICS_PORT, SERVER_PORT)]
        ingress.append({"from": copy.deepcopy(scrapers), "ports": ports})
    spec = {"podSelector": members, "policyTypes": ["Ingress"], "ingress": ingress}
    metadata = {
        "name": names.network_policy_name(name),
        "labels": names.labels(name),
        # The API server adds defaults to the spec: a change is seen by this hash, not by comparing.
        "annotations": {names.ANNOTATION_SPEC_HASH: spec_hash(spec)},
    }
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": metadata}
    return _owned(run, {**policy, "spec": spec})


def _resources(section: Object) -> Object:
    """Resource requirements with every quantity as a string, as the API's Quantity type has them."""
    return {
        kind: {resource: str(quantity) for resource, quantity in quantities.items()}
        for kind, quantities in (section.get("resources") or {}).items()
    }


def _torch_threads_env(section: Object, processes: int = 1) -> list[Object]:
    """OMP_NUM_THREADS for a container of `processes` torch processes: the container's CPU (its
    limit, else its request) in whole cores per process, at least one. Unset, torch starts a thread
    per core of the node, and on a node shared with other pods they spin waiting for each other: the
    quick start's warm-up took 15 times longer beside one busy core (docs/kubernetes.md). Nothing
    where the section names no CPU or sets the variable itself."""
    if any(variable.get("name") == "OMP_NUM_THREADS" for variable in section.get("env") or []):
        return []
    resources = section.get("resources") or {}
    cpu = (resources.get("limits") or {}).get("cpu") or (resources.get("requests") or {}).get("cpu")
    if cpu is None:
        return []
    threads = max(1, math.floor(parse_quantity(str(cpu)) / processes))
    return [{"name": "OMP_NUM_THREADS", "value": str(threads)}]


def _secret_env(variable: str, reference: Object) -> Object:
    secret = {"name": reference["name"], "key": reference["key"]}
    return {"name": variable, "valueFrom": {"secretKeyRef": secret}}


def _tracker_secrets(spec: Object) -> list[tuple[str, str, Object]]:
    """(tracker, field, secret reference) of every tracker credential the spec names."""
    trackers = spec.get("trackers") or {}
    return [
        (tracker, field, trackers[tracker][field])
        for tracker, field in names.TRACKER_SECRETS
        if (trackers.get(tracker) or {}).get(field)
    ]


def tracker_env(spec: Object) -> list[Object]:
    """The experiment trackers' credentials, from the Secrets the spec names (never in the ConfigMap)."""
    return [
        _secret_env(names.TRACKER_SECRETS[tracker, field], reference)
        for tracker, field, reference in _tracker_secrets(spec)
    ]


def secret_keys_read(spec: Object) -> list[tuple[str, Object]]:
    """Every Secret key the run's pods read through the environment, with the spec field naming it:
    a missing one would leave the pods in CreateContainerConfigError, so it is checked first."""
    token = spec.get("huggingFaceTokenSecret")
    return [
        *([("huggingFaceTokenSecret", token)] if token else []),
        *((f"trackers.{tracker}.{field}", reference) for tracker, field, reference in _tracker_secrets(spec)),
    ]


def _env(spec: Object, section: Object, extra: list[Object]) -> list[Object]:
    env = [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": RUN_TOKEN_FILE_ENV, "value": f"{RUN_TOKEN_DIR}/{RUN_TOKEN_KEY}"},
        *extra,
    ]
    token = spec.get("huggingFaceTokenSecret")
    if token:
        env.append(_secret_env(names.HF_TOKEN_ENV, token))
    return env + list(section.get("env") or [])


def build_run_token(run: Object, token: str) -> Object:
    """The run's credential (`token`, random: see handlers), which its servers demand of every request
    but probes and scrapes; immutable (the kubelet need not watch it), owned by the run."""
    name = _run_name(run)
    return _owned(
        run,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": names.run_token_name(name), "labels": names.labels(name)},
            "type": "Opaque",
            "immutable": True,
            "stringData": {RUN_TOKEN_KEY: token},
        },
    )


def _volumes(run: Object, with_config: bool) -> tuple[list[Object], list[Object]]:
    """(volumes, mounts): the checkpoint volume, a memory-backed /dev/shm, the run's token and, for
    learners (and servers of the embedded model), the config."""
    checkpoint = run["spec"]["checkpoint"]
    claim = checkpoint["volume"].get("claimName") or names.claim_name(_run_name(run))
    token = {"secretName": names.run_token_name(_run_name(run)), "defaultMode": 0o440}
    volumes = [
        {"name": "checkpoints", "persistentVolumeClaim": {"claimName": claim}},
        {"name": "shm", "emptyDir": {"medium": "Memory"}},
        {"name": "run-token", "secret": token},
    ]
    mounts = [
        {"name": "checkpoints", "mountPath": checkpoint["mountPath"]},
        {"name": "shm", "mountPath": "/dev/shm"},
        {"name": "run-token", "mountPath": RUN_TOKEN_DIR, "readOnly": True},
    ]
    if with_config:
        volumes.append({"name": "config", "configMap": {"name": names.config_map_name(_run_name(run))}})
        mounts.append({"name": "config", "mountPath": names.CONFIG_DIR, "readOnly": True})
    return volumes, mounts


def _pod(
    run: Object,
    name: str,
    pod_labels: dict[str, str],
    container: Object,
    hostname: str,
    subdomain: str,
    grace_seconds: int,
    with_config: bool = False,
) -> Object:
    spec = run["spec"]
    scheduling = spec.get("scheduling") or {}
    volumes, mounts = _volumes(run, with_config)
    container = {
        # The learner writes why it failed there (rlsd_contracts.wire); else the log's tail is kept.
        "terminationMessagePath": TERMINATION_LOG_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": mounts,
        **container,
    }
    pod_spec: Object = {
        "hostname": hostname,
        "subdomain": subdomain,
        # The operator restarts (a whole gang, from a checkpoint); the kubelet never does.
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": grace_seconds,
        "containers": [container],
        "volumes": volumes,
    }
    for field in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "schedulerName"):
        if scheduling.get(field):
            pod_spec[field] = scheduling[field]
    if spec.get("imagePullSecrets"):
        pod_spec["imagePullSecrets"] = spec["imagePullSecrets"]
    return _owned(
        run,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": pod_labels},
            "spec": security.harden(pod_spec),
        },
    )


def beside_run(pod: Object, run: str) -> Object:
    """`pod` with a required affinity to the other pods of run `run` on the same node: the first pod of
    the run goes anywhere, the others follow it. For the runs whose node the operator does not choose
    itself (see decide: queued runs, whose pods Kueue starts once it admits them); the scheduler
    places pods one by one, so a busy cluster can leave the followers pending for good."""
    term = {"labelSelector": {"matchLabels": names.labels(run)}, "topologyKey": HOSTNAME_TOPOLOGY}
    spec = copy.deepcopy(pod["spec"])
    pod_affinity = spec.setdefault("affinity", {}).setdefault("podAffinity", {})
    pod_affinity.setdefault("requiredDuringSchedulingIgnoredDuringExecution", []).append(term)
    return {**pod, "spec": spec}


def learner_command(run: Object, node_rank: int, cluster_domain: str = "cluster.local") -> list[str]:
    learner = run["spec"]["learner"]
    master = names.learner_dns(_run_name(run), run["metadata"]["namespace"], cluster_domain)
    return [
        "rlsd-trainer",
        "learner",
        "--config",
        f"{names.CONFIG_DIR}/{names.CONFIG_FILE}",
        "--nnodes",
        str(learner["nodes"]),
        "--nproc-per-node",
        str(learner["nprocPerNode"]),
        "--node-rank",
        str(node_rank),
        "--master-addr",
        master,
        "--master-port",
        str(RENDEZVOUS_PORT),
    ]


def build_learner_pod(
    run: Object, node_rank: int, attempt: int, cluster_domain: str = "cluster.local"
) -> Object:
    name = _run_name(run)
    spec = run["spec"]
    learner = spec["learner"]
    extra_env = [
        {"name": "RLSD_ATTEMPT", "value": str(attempt)},
        # Why it failed, where the kubelet reads it: the run's status shows it (see lifecycle).
        {"name": TERMINATION_LOG_ENV, "value": TERMINATION_LOG_PATH},
        *_torch_threads_env(learner, learner["nprocPerNode"]),
        *tracker_env(spec),
    ]
    container = {
        "name": LEARNER,
        "image": learner["image"],
        "command": learner_command(run, node_rank, cluster_domain),
        "env": _env(spec, learner, extra_env),
        "ports": [
            {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT},
            {"name": "metrics", "containerPort": METRICS_PORT},
        ],
        "resources": _resources(learner),
    }
    if learner.get("imagePullPolicy"):
        container["imagePullPolicy"] = learner["imagePullPolicy"]
    pod_labels = names.labels(
        name, LEARNER, **{names.LABEL_ATTEMPT: str(attempt), names.LABEL_RANK: str(node_rank)}
    )
    return _pod(
        run,
        names.learner_pod_name(name, attempt, node_rank),
        pod_labels,
        container,
        hostname=names.learner_hostname(name, node_rank),
        subdomain=names.service_name(name, LEARNER),
        # SIGTERM saves a checkpoint (checkpoint.preemptionGraceSeconds), then the process ends.
        grace_seconds=spec["checkpoint"]["preemptionGraceSeconds"] + TERMINATION_SLACK_SECONDS,
        with_config=True,
    )


def server_command(spec: Object, role: str) -> list[str]:
    """vLLM's server, or the trainer's CPU server, with the weight-transfer backend the learners use."""
    section = spec[role]
    backend = SERVER_TRANSFER_BACKEND[
        rollout_transfer(spec) if role == ROLLOUT else section["weightTransfer"]
    ]
    model = spec["model"]["path"]
    common = [
        "--served-model-name",
        SERVED_MODEL_NAME,
        "--host",
        "0.0.0.0",
        "--port",
        str(SERVER_PORT),
        # Only the run's own pods may steer it: vLLM's own extension point, and ours the same.
        "--middleware",
        RUN_TOKEN_MIDDLEWARE,
    ]
    if backend is not None:
        common += ["--weight-transfer-config", json.dumps({"backend": backend})]
    if spec["model"].get("dtype"):
        common += ["--dtype", spec["model"]["dtype"]]
    if serves_vllm(spec, role):
        command = ["vllm", "serve", model, *common]
    else:
        command = ["rlsd-trainer", "serve", role, "--model", model, *common]
        if serves_embedded_model(spec, role):  # built from the run's config, as the learners build it
            command += ["--config", f"{names.CONFIG_DIR}/{names.CONFIG_FILE}"]
    return command + list(section.get("extraArgs") or [])


def serves_vllm(spec: Object, role: str) -> bool:
    """Whether the `role` server is vLLM's (rollouts with the vllm backend), not rlsd-trainer's."""
    return role == ROLLOUT and spec[role].get("backend") == "vllm"


def serves_embedded_model(spec: Object, role: str) -> bool:
    """Whether the `role` server is rlsd-trainer's with the embedded task's model (`model.path:
    embedded`), which it builds from the run's config file (mounted as the learners have it)."""
    return spec["model"]["path"] == "embedded" and not serves_vllm(spec, role)


def build_server_pod(run: Object, role: str, index: int) -> Object:
    """Rollout or teacher replica `index`; its name (and so its DNS name) is the same forever. Its
    spec hash leaves out where the run's pods go (decide adds that when it creates the pod)."""
    name = _run_name(run)
    spec = run["spec"]
    section = spec[role]
    # vLLM sizes its own CPU threads; the trainer's servers run torch as the learners do.
    vllm = serves_vllm(spec, role)
    extra_env = [{"name": "VLLM_SERVER_DEV_MODE", "value": "1"}] if vllm else _torch_threads_env(section)
    pod_name = names.server_pod_name(name, role, index)
    container = {
        "name": role,
        "image": section["image"],
        "command": server_command(spec, role),
        "env": _env(spec, section, extra_env),
        "ports": [{"name": "http", "containerPort": SERVER_PORT}],
        "resources": _resources(section),
        **_server_probes(spec, role),
    }
    subdomain = names.service_name(name, role)
    with_config = serves_embedded_model(spec, role)
    labels = names.labels(name, role)
    pod = _pod(run, pod_name, labels, container, pod_name, subdomain, SERVER_GRACE_SECONDS, with_config)
    pod["metadata"]["annotations"] = {names.ANNOTATION_SPEC_HASH: spec_hash(pod["spec"])}
    return pod


def weight_push_timeout_s(spec: Object, role: str) -> float:
    """The role's `servers.weight_push_timeout_s` as the trainer will read it (the run's trainerConfig,
    else the schema's default)."""
    servers = ((spec.get("trainerConfig") or {}).get(role) or {}).get("servers") or {}
    return float(
        servers.get("weight_push_timeout_s", ServersSection.model_fields["weight_push_timeout_s"].default)
    )


def _server_probes(spec: Object, role: str) -> Object:
    """Ready while /health answers; alive while the engine answers /weight_info, or has stalled no
    longer than a weight push may (a longer stall is a wedged engine: the kubelet kills it, the pod
    fails, and the operator replaces it)."""
    health = {"httpGet": {"path": "/health", "port": SERVER_PORT}}
    tolerated = weight_push_timeout_s(spec, role) + LIVENESS_TIMEOUT_SECONDS
    command = ["python3", "-m", "rlsd_contracts.liveness", "--timeout", str(LIVENESS_TIMEOUT_SECONDS)]
    return {
        "startupProbe": {
            **health,
            "periodSeconds": STARTUP_PERIOD_SECONDS,
            "failureThreshold": STARTUP_FAILURES,
        },
        "readinessProbe": {**health, "periodSeconds": 5},
        "livenessProbe": {
            "exec": {"command": command},
            "periodSeconds": LIVENESS_PERIOD_SECONDS,
            # The probe's own timeout comes first and says why; this one only bounds the process.
            "timeoutSeconds": LIVENESS_TIMEOUT_SECONDS + 2,
            "failureThreshold": math.ceil(tolerated / LIVENESS_PERIOD_SECONDS) + 1,
        },
    }


def build_server_pods(run: Object) -> list[Object]:
    spec = run["spec"]
    pods = []
    if remote_rollout(spec):
        pods += [build_server_pod(run, ROLLOUT, i) for i in range(spec["rollout"]["replicas"])]
    if remote_teacher(spec):
        pods += [build_server_pod(run, TEACHER, i) for i in range(spec["teacher"]["replicas"])]
    return pods

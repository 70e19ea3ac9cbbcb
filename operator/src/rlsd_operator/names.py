"""Names, labels, ports and DNS names shared by the builders and the handlers.

Every name is derived from the run's name, so reconciling twice finds (or creates) the same objects.
"""

from __future__ import annotations

from pathlib import Path

GROUP = "rlsd.io"
VERSION = "v1alpha1"
PLURAL = "rlsdruns"
KIND = "RLSDRun"
API_VERSION = f"{GROUP}/{VERSION}"
CRD_PATH = Path(__file__).with_name("crds") / f"{PLURAL}.{GROUP}.yaml"

LABEL_APP = "app.kubernetes.io/name"
LABEL_RUN = "rlsd.io/run"
LABEL_ROLE = "rlsd.io/role"
LABEL_ATTEMPT = "rlsd.io/attempt"
LABEL_RANK = "rlsd.io/rank"
# Hash of a server pod's rendered spec: a server is replaced when its spec changed, at an attempt start.
ANNOTATION_SPEC_HASH = "rlsd.io/spec-hash"
# Overrides where the operator scrapes learner rank 0's Prometheus metrics (tests serve their own).
ANNOTATION_METRICS_URL = "rlsd.io/metrics-url"

LEARNER, ROLLOUT, TEACHER = "learner", "rollout", "teacher"
SERVER_ROLES = (ROLLOUT, TEACHER)

CONFIG_DIR = "/etc/rlsd"
CONFIG_FILE = "config.yaml"
APPLIED_SPEC_FILE = "spec.json"
METRICS_PORT = 9400
RENDEZVOUS_PORT = 29500
SERVER_PORT = 8000
# Base ports of the weight-transfer groups hosted by learner rank 0 (the trainer adds one per group).
ROLLOUT_TRANSFER_PORT = 29600
TEACHER_TRANSFER_PORT = 29700
SERVED_MODEL_NAME = "policy"
HF_TOKEN_ENV = "HF_TOKEN"
# spec.trackers.<tracker>.<field> naming a Secret -> the variable the tracker's library reads it from.
TRACKER_SECRETS = {
    ("wandb", "apiKeySecret"): "WANDB_API_KEY",
    ("mlflow", "tokenSecret"): "MLFLOW_TRACKING_TOKEN",
}


def labels(run: str, role: str | None = None, **extra: str) -> dict[str, str]:
    result = {LABEL_APP: "rlsd", LABEL_RUN: run}
    if role is not None:
        result[LABEL_ROLE] = role
    return {**result, **extra}


def config_map_name(run: str) -> str:
    return f"{run}-config"


def claim_name(run: str) -> str:
    """The claim the operator creates from `checkpoint.volume.claimTemplate`."""
    return f"{run}-checkpoints"


def service_name(run: str, role: str) -> str:
    """The headless Service that gives the pods of one role their DNS names."""
    return f"{run}-{role}s" if role == LEARNER else f"{run}-{role}"


def learner_pod_name(run: str, attempt: int, rank: int) -> str:
    # The attempt is in the name so a gang restart never waits for the old pods' names to be free.
    return f"{run}-learner-a{attempt}-{rank}"


def learner_hostname(run: str, rank: int) -> str:
    # ... and not in the hostname, so rank r has the same DNS name in every attempt.
    return f"{run}-learner-{rank}"


def server_pod_name(run: str, role: str, index: int) -> str:
    return f"{run}-{role}-{index}"


def pod_dns(hostname: str, run: str, role: str, namespace: str, cluster_domain: str) -> str:
    return f"{hostname}.{service_name(run, role)}.{namespace}.svc.{cluster_domain}"


def learner_dns(run: str, namespace: str, cluster_domain: str, rank: int = 0) -> str:
    return pod_dns(learner_hostname(run, rank), run, LEARNER, namespace, cluster_domain)


def server_url(run: str, role: str, index: int, namespace: str, cluster_domain: str) -> str:
    host = pod_dns(server_pod_name(run, role, index), run, role, namespace, cluster_domain)
    return f"http://{host}:{SERVER_PORT}"


def learner_metrics_url(run: str, namespace: str, cluster_domain: str) -> str:
    """Learner rank 0's Prometheus endpoint: the progress in a run's status comes from there."""
    return f"http://{learner_dns(run, namespace, cluster_domain)}:{METRICS_PORT}/metrics"

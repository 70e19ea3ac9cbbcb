"""Names, labels and DNS names of the objects the operator makes for a run, from the run's name.

Every name is derived from the run's name, so reconciling twice finds (or creates) the same objects.
A run's name may be any object name (a DNS-1123 subdomain: dots, 253 characters, digits first), but
a Service name must be a DNS-1035 label (a letter first, no dots, 63 characters) and so must the
pods' hostnames and the `rlsd.io/run` label value. So names derive from the run's *stem*: the run's
name itself when it is a short DNS-1035 label (the usual case: `demo` -> `demo-learner-a1-0`), else
a readable prefix of it plus a hash of the whole name (`team.a.run-1` -> `team-a-run-1-3e0c1f27b4`),
stable across operator restarts and distinct for distinct names.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

from rlsd_contracts.wire import LEARNER, METRICS_PORT, SERVER_PORT, TEACHER

GROUP = "rlsd.io"
VERSION = "v1alpha1"
PLURAL = "rlsdruns"
KIND = "RLSDRun"
API_VERSION = f"{GROUP}/{VERSION}"
CRD_PATH = Path(__file__).with_name("crds") / f"{PLURAL}.{GROUP}.yaml"

LABEL_APP = "app.kubernetes.io/name"
APP = "rlsd"
LABEL_RUN = "rlsd.io/run"
LABEL_ROLE = "rlsd.io/role"
LABEL_ATTEMPT = "rlsd.io/attempt"
LABEL_RANK = "rlsd.io/rank"
# Hash of a server pod's rendered spec: a server is replaced when its spec changed, at an attempt start.
ANNOTATION_SPEC_HASH = "rlsd.io/spec-hash"

CONFIG_DIR = "/etc/rlsd"
CONFIG_FILE = "config.yaml"
APPLIED_SPEC_FILE = "spec.json"
HF_TOKEN_ENV = "HF_TOKEN"
# spec.trackers.<tracker>.<field> naming a Secret -> the variable the tracker's library reads it from.
TRACKER_SECRETS = {
    ("wandb", "apiKeySecret"): "WANDB_API_KEY",
    ("mlflow", "tokenSecret"): "MLFLOW_TRACKING_TOKEN",
}

# The largest replica or rank index the CRD allows (its maxima are 512), and so the longest suffix a
# name built on the stem gets: "-teacher-511" or "-learner-511" (a hostname, at most 63 characters).
MAX_INDEX = 511
LONGEST_SUFFIX = len(f"-{TEACHER}-{MAX_INDEX}")
DNS_LABEL = 63
STEM_MAX = DNS_LABEL - LONGEST_SUFFIX
HASH_CHARS = 10
_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


@functools.lru_cache(maxsize=4096)
def stem(run: str) -> str:
    """The DNS-1035 label (at most STEM_MAX characters) every derived name and label starts with."""
    if len(run) <= STEM_MAX and _DNS1035.fullmatch(run):
        return run
    readable = re.sub(r"[^a-z0-9-]+", "-", run.lower())
    if not readable[:1].isalpha():
        readable = "r" + readable
    digest = hashlib.sha256(run.encode()).hexdigest()[:HASH_CHARS]
    readable = readable[: STEM_MAX - HASH_CHARS - 1].rstrip("-")
    return f"{readable}-{digest}"


def labels(run: str, role: str | None = None, **extra: str) -> dict[str, str]:
    result = {LABEL_APP: APP, LABEL_RUN: stem(run)}
    if role is not None:
        result[LABEL_ROLE] = role
    return {**result, **extra}


def network_policy_name(run: str) -> str:
    return f"{stem(run)}-netpol"


def config_map_name(run: str) -> str:
    return f"{stem(run)}-config"


def run_token_name(run: str) -> str:
    """The Secret with the run's credential (rlsd_contracts.wire.RUN_TOKEN_*)."""
    return f"{stem(run)}-run-token"


def claim_name(run: str) -> str:
    """The claim the operator creates from `checkpoint.volume.claimTemplate`."""
    return f"{stem(run)}-checkpoints"


def service_name(run: str, role: str) -> str:
    """The headless Service that gives the pods of one role their DNS names."""
    return f"{stem(run)}-{role}s" if role == LEARNER else f"{stem(run)}-{role}"


def learner_pod_name(run: str, attempt: int, rank: int) -> str:
    # The attempt is in the name so a gang restart never waits for the old pods' names to be free.
    return f"{stem(run)}-learner-a{attempt}-{rank}"


def learner_hostname(run: str, rank: int) -> str:
    # ... and not in the hostname, so rank r has the same DNS name in every attempt.
    return f"{stem(run)}-learner-{rank}"


def server_pod_name(run: str, role: str, index: int) -> str:
    """Also the server's hostname."""
    return f"{stem(run)}-{role}-{index}"


def pod_dns(hostname: str, run: str, role: str, namespace: str, cluster_domain: str) -> str:
    return f"{hostname}.{service_name(run, role)}.{namespace}.svc.{cluster_domain}"


def learner_dns(run: str, namespace: str, cluster_domain: str, rank: int = 0) -> str:
    return pod_dns(learner_hostname(run, rank), run, LEARNER, namespace, cluster_domain)


def server_url(run: str, role: str, index: int, namespace: str, cluster_domain: str) -> str:
    host = pod_dns(server_pod_name(run, role, index), run, role, namespace, cluster_domain)
    return f"http://{host}:{SERVER_PORT}"


def metrics_url(pod_ip: str) -> str:
    """A learner pod's Prometheus endpoint, by its IP (rank 0's: the progress in a run's status)."""
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    return f"http://{host}:{METRICS_PORT}/metrics"

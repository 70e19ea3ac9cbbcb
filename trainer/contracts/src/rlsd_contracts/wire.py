"""Ports, role names and metric names that the operator's pods and the trainer's processes share."""

from __future__ import annotations

# The roles of a run (operator/README.md): pods' `rlsd.io/role` label, `rlsd-trainer` subcommands.
LEARNER, ROLLOUT, TEACHER = "learner", "rollout", "teacher"
SERVER_ROLES = (ROLLOUT, TEACHER)

# Learner rank 0's Prometheus endpoint in a pod (the operator scrapes it; the PodMonitor too).
METRICS_PORT = 9400
# torchrun's rendezvous on learner rank 0.
RENDEZVOUS_PORT = 29500
# Rollout and teacher servers' HTTP port (vLLM's and `rlsd-trainer serve`'s default).
SERVER_PORT = 8000
# Base ports of the weight-transfer groups hosted by learner rank 0 (the trainer adds one per group).
ROLLOUT_TRANSFER_PORT = 29600
TEACHER_TRANSFER_PORT = 29700
# The model name servers serve the policy under (vLLM's --served-model-name).
SERVED_MODEL_NAME = "policy"
# A learner's weight-transfer backend -> the servers' `--weight-transfer-config` backend: nccl (vLLM)
# and gloo (our CPU servers) are transfer engines; filesystem reloads through vLLM's `/collective_rpc`
# and needs none.
SERVER_TRANSFER_BACKEND: dict[str, str | None] = {"nccl": "nccl", "gloo": "gloo", "filesystem": None}

# Where a learner writes why it failed (exit 1 or 3), for the operator to show in the run's status: the
# operator sets it to the container's termination-message path (Kubernetes' /dev/termination-log).
TERMINATION_LOG_ENV = "RLSD_TERMINATION_LOG"
TERMINATION_LOG_PATH = "/dev/termination-log"
# Kubernetes keeps at most 4096 bytes of a termination message.
TERMINATION_LOG_MAX_BYTES = 4096

# The run's credential: a Secret the operator makes per run (key RUN_TOKEN_KEY), mounted read-only into
# the learner and server pods at RUN_TOKEN_DIR and named to the processes by RUN_TOKEN_FILE_ENV. The
# servers (ours, and vLLM through `--middleware RUN_TOKEN_MIDDLEWARE`) answer only requests that carry
# it as `Authorization: Bearer <token>`, but for OPEN_PATHS (probes and Prometheus scrapes).
RUN_TOKEN_FILE_ENV = "RLSD_RUN_TOKEN_FILE"
RUN_TOKEN_DIR = "/var/run/secrets/rlsd"
RUN_TOKEN_KEY = "token"
RUN_TOKEN_MIDDLEWARE = "rlsd_trainer.serving.auth.RunTokenMiddleware"
OPEN_PATHS = ("/health", "/metrics")

# Gauges of learner rank 0 (metrics key `k` is served as `rlsd_k`) that a run's status shows.
PROGRESS_GAUGES = (
    "rlsd_policy_version",
    "rlsd_reward_mean",
    "rlsd_eval_accuracy",
    "rlsd_checkpoint_step",
    "rlsd_rollout_staleness_max",
)

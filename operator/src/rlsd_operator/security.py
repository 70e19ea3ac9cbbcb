"""The security posture of every pod the operator creates (learner, rollout, teacher), in one place.

Each pod passes Pod Security "restricted": it runs as the trainer images' non-root user, without
privilege escalation, with every capability dropped and the runtime's default seccomp profile. Its
root filesystem is read-only: the processes write only to emptyDirs, and the environment points
every library that writes (torch, torchrun, Triton/Inductor, vLLM, Hugging Face, CUDA's JIT cache) at
them. No service-account token is mounted: none of these processes calls the Kubernetes API.

`harden` applies it to a built pod spec (a pure function, like the builders).
"""

from __future__ import annotations

import copy
from typing import Any

Object = dict[str, Any]

# The user the trainer images create and run as (Dockerfile: useradd --uid 1000;
# tests/chart/test_dockerfile.py checks the two agree). Other images (vllm/vllm-openai) run as it too:
# nothing they need is owned by root alone, and HOME below does not depend on /etc/passwd.
RUN_AS_USER = 1000
RUN_AS_GROUP = 1000

# The writable directories, each an emptyDir (volume name -> mount path). HOME holds every cache a
# library keeps under `~` or $XDG_CACHE_HOME (vLLM's torch.compile cache, Triton's kernels, CUDA's JIT
# cache, FlashInfer); the Hugging Face cache (model weights, possibly tens of GB) has its own.
TMP_DIR = "/tmp"
HOME_DIR = "/home/rlsd"
HF_CACHE_DIR = "/var/cache/huggingface"
WRITABLE_DIRS = {"tmp": TMP_DIR, "home": HOME_DIR, "hf-cache": HF_CACHE_DIR}


def writable_env(dirs: dict[str, str] = WRITABLE_DIRS) -> list[Object]:
    """Where the processes' libraries write, all inside the writable directories `dirs`:
    - TMPDIR: Python's tempfile (torchrun's log dirs, vLLM's IPC sockets, Triton's compiler work) and
      Inductor's default cache (/tmp/torchinductor_<user>);
    - HOME and the XDG directories: everything under `~` (Triton's ~/.triton, CUDA's ~/.nv,
      FlashInfer's and DeepGEMM's JIT caches) and $XDG_CACHE_HOME / $XDG_CONFIG_HOME (vLLM's cache
      and config roots, torch hub);
    - HF_HOME: the Hugging Face hub cache (models, datasets, the token file)."""
    home = dirs["home"]
    return [
        {"name": "HOME", "value": home},
        {"name": "TMPDIR", "value": dirs["tmp"]},
        {"name": "XDG_CACHE_HOME", "value": f"{home}/.cache"},
        {"name": "XDG_CONFIG_HOME", "value": f"{home}/.config"},
        {"name": "HF_HOME", "value": dirs["hf-cache"]},
    ]


POD_SECURITY_CONTEXT: Object = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS_USER,
    "runAsGroup": RUN_AS_GROUP,
    # The checkpoint claim is writable by the pods' group; ownership is changed only when the volume's
    # root does not already have it (a large checkpoint volume is not walked at every pod start).
    "fsGroup": RUN_AS_GROUP,
    "fsGroupChangePolicy": "OnRootMismatch",
    "seccompProfile": {"type": "RuntimeDefault"},
}

CONTAINER_SECURITY_CONTEXT: Object = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
}


def harden(pod_spec: Object) -> Object:
    """`pod_spec` with the restricted posture: security contexts, no service-account token, the
    writable emptyDirs mounted in every container and the environment that points at them (a variable
    the container already sets, from the spec's `env`, wins)."""
    pod_spec = copy.deepcopy(pod_spec)
    pod_spec["automountServiceAccountToken"] = False
    pod_spec["securityContext"] = copy.deepcopy(POD_SECURITY_CONTEXT)
    pod_spec["volumes"] = [
        *pod_spec.get("volumes", []),
        *({"name": name, "emptyDir": {}} for name in WRITABLE_DIRS),
    ]
    for container in pod_spec["containers"]:
        container["securityContext"] = copy.deepcopy(CONTAINER_SECURITY_CONTEXT)
        container["volumeMounts"] = [
            *container.get("volumeMounts", []),
            *({"name": name, "mountPath": path} for name, path in WRITABLE_DIRS.items()),
        ]
        own = {variable["name"] for variable in container.get("env", [])}
        container["env"] = [
            *(variable for variable in writable_env() if variable["name"] not in own),
            *container.get("env", []),
        ]
    return pod_spec

"""What the API server's refusals mean, and when a ResourceQuota frees room (pure functions).

A create the API server refuses (Pod Security, a ResourceQuota, a LimitRange, the Priority plugin's
missing PriorityClass, an admission webhook or policy, validation, RBAC) becomes a `Refusal` of the
run with a reason that names the cause; its message names the object and quotes the API server.
"""

from __future__ import annotations

import re
from typing import Any

from kubernetes.utils import parse_quantity

Object = dict[str, Any]

# (reason, who refused, pattern of the API server's message), the first match wins. The patterns are
# the messages of kube-apiserver's admission plugins (tests/operator/test_admission.py provokes each on
# the real API server of tests/k8s).
_CAUSES = [
    ("PodSecurity", "Pod Security admission", r"violates PodSecurity"),
    ("QuotaExceeded", "a ResourceQuota", r"exceeded quota"),
    ("QuotaRequiresResources", "a ResourceQuota", r"failed quota: .*must specify"),
    ("LimitRange", "a LimitRange", r"usage per (Container|Pod) is|limit to request ratio per"),
    ("PriorityClassNotFound", "the Priority admission plugin", r"no PriorityClass with name"),
    ("AdmissionWebhook", "an admission webhook", r"admission webhook .* denied|failed calling webhook"),
    ("AdmissionPolicy", "a ValidatingAdmissionPolicy", r"ValidatingAdmissionPolicy .* denied"),
    ("NotPermitted", "RBAC (the operator's permissions)", r"cannot \w+ resource"),
]
# Reasons that a change of quota can clear.
QUOTA_REASONS = {"QuotaExceeded"}


def refusal(kind: str, name: str, status: int, message: str) -> tuple[str, str]:
    """(reason, message) of a refused create of `kind` `name`: the API server's HTTP `status` and
    its `message`."""
    fallback = ("Invalid", "validation") if status == 422 else ("CreateRefused", "the API server")
    reason, who = next(
        ((reason, who) for reason, who, pattern in _CAUSES if re.search(pattern, message)), fallback
    )
    return reason, f"{kind} {name} refused by {who}: {message}"


def is_refusal(status: int, message: str) -> bool:
    """Whether an API error is a refusal to surface and retry later (validation, admission, quota,
    RBAC), rather than a failure of the call itself; a webhook that cannot be reached answers 500."""
    return status in (400, 403, 422) or (status == 500 and "failed calling webhook" in message)


def _quantities(quota: Object, field: str) -> dict[str, Any]:
    values = (quota.get("status") or {}).get(field) or {}
    return {resource: parse_quantity(value) for resource, value in values.items()}


def quota_freed(old: Object | None, new: Object | None) -> bool:
    """Whether a ResourceQuota's change may let a refused create through: it was deleted, a hard limit
    grew or went, or usage shrank (what the quota controller records when pods end)."""
    if old is None:
        return False  # a new quota only restricts
    if new is None:
        return True
    old_hard, new_hard = _quantities(old, "hard"), _quantities(new, "hard")
    old_used, new_used = _quantities(old, "used"), _quantities(new, "used")
    return any(r not in new_hard or new_hard[r] > limit for r, limit in old_hard.items()) or any(
        new_used.get(r, 0) < used for r, used in old_used.items()
    )

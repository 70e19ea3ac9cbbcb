"""A learner that dies half-way through a weight push: `python half_push.py VERSION SEED URL...`.

It pushes `tiny_model(SEED)` as VERSION over gloo with the real client, broadcasts the first half
of the tensors, prints HALF and waits to be killed (SIGKILL, as a preempted pod's end), leaving every
server in the middle of `/update_weights`.
"""

from __future__ import annotations

import sys
import time

from tiny_models import tiny_model

from rlsd_trainer import weight_transfer
from rlsd_trainer.rollout_client import RemoteRolloutEngine

full_broadcast = weight_transfer.BroadcastSender._broadcast


def half_then_hang(self: weight_transfer.BroadcastSender, tensors: list) -> None:
    full_broadcast(self, tensors[: len(tensors) // 2])
    print("HALF", flush=True)
    time.sleep(600)


if __name__ == "__main__":
    version, seed, urls = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    weight_transfer.BroadcastSender._broadcast = half_then_hang  # type: ignore[method-assign]
    engine = RemoteRolloutEngine(urls, "policy", "gloo", request_timeout_s=600.0)
    engine.update_weights(tiny_model(seed=seed).named_parameters(), version)

"""A learner that dies half-way through a weight push: `python half_push.py VERSION SEED URL...`.

It pushes `tiny_model(SEED)` as VERSION over gloo with the real client, broadcasts the first half
of the tensors, prints HALF and waits to be killed (SIGKILL, as a preempted pod's end), leaving every
server in the middle of `/update_weights`.
"""

from __future__ import annotations

import sys
import time

from tiny_models import tiny_model

from rlsd_trainer.remote.rollout_client import RemoteRolloutEngine
from rlsd_trainer.weights import sender as weight_sender

full_broadcast = weight_sender.BroadcastSender._broadcast


def half_then_hang(self: weight_sender.BroadcastSender, tensors: list) -> None:
    full_broadcast(self, tensors[: len(tensors) // 2])
    print("HALF", flush=True)
    time.sleep(600)


if __name__ == "__main__":
    version, seed, urls = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    weight_sender.BroadcastSender._broadcast = half_then_hang  # type: ignore[method-assign]
    engine = RemoteRolloutEngine(urls, "policy", "gloo", request_timeout_s=600.0)
    engine.update_weights(tiny_model(seed=seed).named_parameters(), version)

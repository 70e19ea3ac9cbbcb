"""Wall time of the named phases of a step."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StepTimer:
    """Wall time of the named phases of one step (rollout, reward, teacher, learn, sync, checkpoint).

    Each phase is also a `torch.profiler` range named `PHASE_PREFIX + name`, so a profile of a step
    splits by phase (nearly free when no profiler runs)."""

    PHASE_PREFIX = "rlsd/"

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(self.PHASE_PREFIX + name):
                yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def values(self) -> dict[str, float]:
        return {f"time_{name}_seconds": seconds for name, seconds in self.seconds.items()}

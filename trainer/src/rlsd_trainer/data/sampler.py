"""The resumable order in which the trainer visits the training rows."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any


class ResumableSampler:
    """Endless, seeded, epoch-by-epoch order over `num_examples` rows that checkpoints exactly.

    Each epoch visits every index once in an order drawn from the run seed and the epoch number
    alone, so a run restored from `state_dict()` continues with the very indices the uninterrupted
    run would have drawn.
    """

    def __init__(self, num_examples: int, seed: int) -> None:
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}")
        self._num_examples = num_examples
        self._seed = seed
        self._epoch = 0
        self._position = 0
        self._order = self._permutation(0)

    @property
    def epoch(self) -> int:
        """The epoch the next index comes from (0-based)."""
        return self._epoch

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self._num_examples))
        random.Random(self._seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_indices(self, n: int) -> list[int]:
        """The next `n` indices, continuing into the next epoch's order when this one runs out."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        indices: list[int] = []
        while len(indices) < n:
            take = min(n - len(indices), self._num_examples - self._position)
            indices.extend(self._order[self._position : self._position + take])
            self._position += take
            if self._position == self._num_examples:
                self._epoch += 1
                self._position = 0
                self._order = self._permutation(self._epoch)
        return indices

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self._seed,
            "num_examples": self._num_examples,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state`; a different seed or dataset size means the data changed under the run."""
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
            seed, num_examples = int(state["seed"]), int(state["num_examples"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"sampler state is malformed ({exc!r}); expected {sorted(self.state_dict())}"
            ) from None
        if num_examples != self._num_examples:
            raise ValueError(
                f"sampler state is for {num_examples} examples but the dataset now has {self._num_examples}; "
                "the training data changed since the checkpoint was written"
            )
        if seed != self._seed:
            raise ValueError(
                f"sampler state was written with seed {seed} but this run uses seed {self._seed}; "
                "resume with the original run.seed"
            )
        if epoch < 0 or not 0 <= position < num_examples:
            raise ValueError(f"sampler state has epoch {epoch}, position {position}: out of range")
        self._epoch, self._position = epoch, position
        self._order = self._permutation(epoch)

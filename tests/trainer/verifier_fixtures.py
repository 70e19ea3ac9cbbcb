"""User verifiers for the RewardPool tests, imported by name in the spawned worker processes.

`by_response` routes on the response text, so one pool exercises every behaviour.
"""

from __future__ import annotations

import os
import time


def correct(response: str, answer: str) -> float:
    return float(response.strip() == answer.strip())


def raises(response: str, answer: str) -> float:
    raise RuntimeError("verifier exploded")


def sleeps(response: str, answer: str) -> float:
    time.sleep(60)  # far past any test timeout: only killing the worker ends it
    return 1.0


def returns_nan(response: str, answer: str) -> float:
    return float("nan")


def returns_text(response: str, answer: str) -> str:
    return "1.0"


def returns_true(response: str, answer: str) -> bool:
    return True


def dies(response: str, answer: str) -> float:
    os._exit(3)


_BEHAVIOURS = {
    "raise": raises,
    "sleep": sleeps,
    "nan": returns_nan,
    "text": returns_text,
    "true": returns_true,
    "die": dies,
}


def by_response(response: str, answer: str) -> object:
    return _BEHAVIOURS.get(response, correct)(response, answer)


NOT_CALLABLE = 42


def digit_share(response: str, answer: str) -> float:
    """A dense reward for runs of an untrained model: the share of digits in the response."""
    return sum(ch.isdigit() for ch in response) / max(1, len(response))

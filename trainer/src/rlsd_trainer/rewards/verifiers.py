"""Verifiable rewards: answer extraction, the built-in verifiers and a pool that runs them safely.

A verifier maps `(response, answer)` to a reward, normally 1.0 for a correct response and 0.0
otherwise. The built-in verifiers never raise on malformed text; a user callable may do anything,
so `RewardPool` runs every verifier in separate worker processes, where a crash, a bad return
value or a hang costs that one item a 0.0 reward (and a count in the batch's `errors` or
`timeouts`) and never the training run.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import math
import multiprocessing
import numbers
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from rlsd_contracts.config import ConfigError, RewardSection

logger = logging.getLogger(__name__)

# math_verify bounds each parse and comparison with signal.alarm (whole seconds, main thread only).
# One second is far above what a real answer needs, and lets a pathological expression score 0
# inside the worker instead of costing a worker restart at the pool deadline.
_MATH_STEP_TIMEOUT_S = 1
# A worker that has not finished importing its verifier by then is broken, not slow.
_STARTUP_TIMEOUT_S = 120.0
# Error messages sent back from workers are cut to this length (they reach the log).
_MAX_ERROR_CHARS = 500

# What a brace scan needs to see; an escaped character (such as \{) is not a group.
_GROUP_TOKEN = re.compile(r"(?P<box>\\boxed\s*\{)|(?P<escape>\\.)|(?P<open>\{)|(?P<close>\})", re.DOTALL)
_ANSWER_PHRASE = re.compile(r"\banswer(?:\s*:|\s+is\b\s*:?)", re.IGNORECASE)
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_GROUPED_NUMBER = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_LATEX_FRACTION = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")


def extract_answer(response: str) -> str | None:
    """The final answer in a response: the last `\\boxed{...}`, else the rest of the line after the
    last "Answer:" or "answer is", else None."""
    boxed = _last_boxed(response)
    if boxed is not None:
        return boxed.strip()
    phrases = list(_ANSWER_PHRASE.finditer(response))
    if not phrases:
        return None
    text = response[phrases[-1].end() :].split("\n", 1)[0]
    # Strip markdown emphasis ("**Answer:** 42"), the sentence's full stop and inline-math dollars.
    text = text.strip().strip("*").strip().rstrip(".").strip()
    if len(text) >= 2 and text[0] == text[-1] == "$":
        text = text[1:-1].strip()
    return text or None


def _last_boxed(text: str) -> str | None:
    """Content of the last complete top-level `\\boxed{}`, with a box that only holds a box unwrapped.

    One pass over the text, so a runaway response (thousands of unclosed boxes) stays cheap. A box
    truncated by the token limit never closes, but complete boxes inside it still count.
    """
    first_box = text.find("\\boxed")
    if first_box < 0:
        return None
    # Open groups: (token start, content start) for a box, None for a plain brace.
    stack: list[tuple[int, int] | None] = []
    # The most recently closed box: its token start, closing index and unwrapped content span. It
    # is the answer: a box closing later either follows it or encloses it.
    last: tuple[int, int, int, int] | None = None
    # Braces before the first box cannot change which box content closes where.
    for token in _GROUP_TOKEN.finditer(text, first_box):
        kind = token.lastgroup
        if kind == "box":
            stack.append((token.start(), token.end()))
        elif kind == "open":
            stack.append(None)
        elif kind == "close" and stack:
            group = stack.pop()
            if group is not None:
                token_start, content_start = group
                span = (content_start, token.start())
                if last is not None and last[:2] == _trimmed(text, content_start, token.start()):
                    span = last[2:]  # \boxed{\boxed{3}} answers 3
                last = (token_start, token.start(), *span)
    return None if last is None else text[last[2] : last[3]]


def _trimmed(text: str, start: int, end: int) -> tuple[int, int]:
    """First and last non-space index of text[start:end]."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end - 1


def _prediction(response: str) -> str:
    # A reply with no answer marker, such as a bare "42", is taken as the answer itself.
    extracted = extract_answer(response)
    return response if extracted is None else extracted


def exact_match(response: str, answer: str) -> float:
    """1.0 when the extracted answer equals `answer` up to whitespace, else 0.0."""
    expected = " ".join(answer.split())
    return float(bool(expected) and " ".join(_prediction(response).split()) == expected)


def numeric_match(response: str, answer: str, rel_tol: float = 1e-6) -> float:
    """1.0 when the extracted answer and `answer` are the same number within `rel_tol`, else 0.0.

    Accepted forms: integers, decimals, signs, exponents, thousands commas (`1,234.5`), fractions
    (`3/4`, `\\frac{3}{4}`), a leading `$` and a trailing `%` (both ignored).
    """
    predicted, expected = _parse_number(_prediction(response)), _parse_number(answer)
    if predicted is None or expected is None:
        return 0.0
    return float(math.isclose(predicted, expected, rel_tol=rel_tol, abs_tol=1e-12))


def _parse_number(text: str) -> float | None:
    text = text.strip().rstrip(".").strip()
    fraction = _LATEX_FRACTION.fullmatch(text)
    numerator, slash, denominator = text.partition("/")
    if fraction:
        numerator, denominator = fraction.groups()
    if fraction or slash:
        top, bottom = _parse_plain(numerator), _parse_plain(denominator)
        if top is None or bottom is None or bottom == 0:
            return None
        value = top / bottom
    else:
        value = _parse_plain(text)
    return value if value is not None and math.isfinite(value) else None


def _parse_plain(text: str) -> float | None:
    text = text.strip()
    for prefix in ("\\$", "$"):
        text = text.removeprefix(prefix)
    for suffix in ("\\%", "%"):
        text = text.removesuffix(suffix)
    text = text.strip()
    if _GROUPED_NUMBER.fullmatch(text):
        text = text.replace(",", "")
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    return float(text)


def math_match(response: str, answer: str) -> float:
    """1.0 when math_verify finds the response's answer equivalent to `answer` (`\\frac{1}{2}`, `0.5`
    and `1/2` are all equal), else 0.0.

    Outside the main thread math_verify's signal-based step limits cannot work and are switched
    off; bound the call yourself there (RewardPool's deadline does).
    """
    from math_verify import parse, verify  # imported here: sympy is slow to import and only `math` needs it

    step_timeout = _MATH_STEP_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    gold = _parse_gold(answer, step_timeout)
    if not gold:
        return 0.0
    prediction = parse(response, parsing_timeout=step_timeout)
    return float(bool(prediction) and verify(list(gold), prediction, timeout_seconds=step_timeout))


@functools.lru_cache(maxsize=4096)
def _parse_gold(answer: str, step_timeout: int | None) -> tuple[Any, ...]:
    # Cached: each answer is scored against a whole group of responses.
    from math_verify import parse

    if "$" not in answer and "\\boxed" not in answer:
        answer = f"${answer}$"
    return tuple(parse(answer, parsing_timeout=step_timeout))


def load_callable(spec: str) -> Callable[[str, str], Any]:
    """The function named by a `reward.callable` spec, "package.module:function"."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"reward.callable {spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(
            f"reward.callable {spec!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc}); "
            "install it or add its folder to PYTHONPATH"
        ) from exc
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(
                f"reward.callable {spec!r}: module {module_name!r} has no attribute {attribute!r}"
            ) from None
    if not callable(target):
        raise ConfigError(
            f"reward.callable {spec!r}: {attribute!r} is a {type(target).__name__}, not a function"
        )
    return target


_BUILT_IN: dict[str, Callable[[str, str], float]] = {
    "exact": exact_match,
    "numeric": numeric_match,
    "math": math_match,
}


def _verifier_function(verifier: str, spec: str | None) -> Callable[[str, str], Any]:
    if verifier == "callable":
        assert spec is not None  # RewardSection requires it for `callable`
        return load_callable(spec)
    return _BUILT_IN[verifier]


def _as_reward(value: Any) -> float:
    """A verifier's return value as a finite float; bools count as 0/1."""
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, numbers.Real):
        raise TypeError(f"verifier returned {type(value).__name__}, expected a number")
    reward = float(value)
    if not math.isfinite(reward):
        raise ValueError(f"verifier returned {reward}, expected a finite number")
    return reward


@dataclass
class RewardBatch:
    """Rewards in input order; failed items score 0.0 and are counted in `errors` or `timeouts`."""

    rewards: list[float]
    errors: int
    timeouts: int


def _worker_main(conn: Connection, verifier: str, spec: str | None) -> None:
    """Worker process: announce readiness, then score one `(response, answer)` at a time."""
    # Ctrl-C reaches the whole process group; the parent handles it and shuts the workers down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        function = _verifier_function(verifier, spec)
        if verifier == "math":
            math_match("0", "0")  # builds math_verify's parsers now rather than on the first timed item
    except Exception as exc:
        conn.send(("failed", f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]))
        return
    conn.send(("ready", None))
    try:
        while (item := conn.recv()) is not None:
            try:
                result: tuple[float, str | None] = (_as_reward(function(*item)), None)
            except Exception as exc:
                result = (0.0, f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS])
            conn.send(result)
    except (EOFError, OSError):  # the parent is gone
        return


@dataclass(eq=False)  # workers are found in the list by identity
class _Worker:
    process: BaseProcess
    conn: Connection
    startup_deadline: float
    ready: bool = False
    # Index of the item being scored and when it runs out of time; None while idle.
    item: int | None = None
    deadline: float = 0.0


class RewardPool:
    """Scores batches with the configured verifier in `config.workers` spawned processes.

    Timeouts: an item gets `config.timeout_s` seconds of wall-clock time from the moment it is handed
    to an idle worker; waiting for a free worker and worker start-up are never charged to it. An item
    past its deadline scores 0.0 and counts in `timeouts`; only its worker is killed, and a fresh one
    is started in its place while the other workers carry on, so nothing in the batch is lost or run
    twice and a hung verifier never blocks later calls. An item whose verifier raises, returns a
    non-number or a non-finite number, or kills its worker scores 0.0 and counts in `errors`.

    `score` raises only for misuse (mismatched lengths, a closed pool) or when a worker cannot start
    at all, never for what a verifier does with an item. Not thread-safe: call from one thread.
    """

    def __init__(self, config: RewardSection) -> None:
        self._config = config
        if config.verifier == "callable":
            assert config.callable is not None
            load_callable(config.callable)  # a bad spec fails here, with its message, not in the workers
        # Spawn, not fork: the trainer holds torch threads and CUDA state that must not be forked.
        self._context = multiprocessing.get_context("spawn")
        self._closed = False
        self._workers = [self._spawn() for _ in range(config.workers)]

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe()
        process = self._context.Process(
            target=_worker_main,
            args=(child_conn, self._config.verifier, self._config.callable),
            name="rlsd-reward-worker",
            daemon=True,
        )
        process.start()
        # Drop our copy of the child's end, so a dead worker shows up as EOF on ours.
        child_conn.close()
        return _Worker(process, parent_conn, time.monotonic() + _STARTUP_TIMEOUT_S)

    def _replace(self, worker: _Worker) -> None:
        worker.process.kill()
        worker.process.join()
        worker.conn.close()
        self._workers[self._workers.index(worker)] = self._spawn()

    def score(self, responses: list[str], answers: list[str]) -> RewardBatch:
        """Rewards for `responses[i]` against `answers[i]`; see the class docstring for failures."""
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        if self._closed:
            raise RuntimeError("RewardPool is closed")
        batch = RewardBatch([0.0] * len(responses), errors=0, timeouts=0)
        pending = deque(range(len(responses)))
        first_error: str | None = None
        try:
            while pending or any(worker.item is not None for worker in self._workers):
                self._dispatch(pending, responses, answers)
                error = self._collect(batch)
                first_error = first_error or error
        except BaseException:
            # Interrupted mid-batch: workers still busy would answer into the next batch.
            for worker in list(self._workers):
                if worker.item is not None:
                    self._replace(worker)
            raise
        if batch.errors or batch.timeouts:
            logger.warning(
                "reward: %d of %d items scored 0 after failing (%d errors, %d timeouts of %.3g s); "
                "first error: %s",
                batch.errors + batch.timeouts,
                len(responses),
                batch.errors,
                batch.timeouts,
                self._config.timeout_s,
                first_error or "none",
            )
        return batch

    def _dispatch(self, pending: deque[int], responses: list[str], answers: list[str]) -> None:
        """Hand the next pending items to idle workers, one each."""
        for worker in list(self._workers):
            if not pending:
                return
            if worker.ready and worker.item is None:
                index = pending.popleft()
                try:
                    worker.conn.send((responses[index], answers[index]))
                except OSError:  # the worker died while idle: the item waits for its replacement
                    pending.appendleft(index)
                    self._replace(worker)
                    continue
                worker.item = index
                worker.deadline = time.monotonic() + self._config.timeout_s

    def _collect(self, batch: RewardBatch) -> str | None:
        """Wait for results or the next deadline, record what came, and return the first error message."""
        waiting = [worker for worker in self._workers if worker.item is not None or not worker.ready]
        next_deadline = min(
            worker.deadline if worker.ready else worker.startup_deadline for worker in waiting
        )
        by_conn = {worker.conn: worker for worker in waiting}
        first_error = None
        for conn in wait(list(by_conn), timeout=max(0.0, next_deadline - time.monotonic())):
            worker = by_conn[conn]
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                if not worker.ready:
                    worker.process.join(timeout=1.0)  # reap it, for the exit code
                    self._fail(
                        f"a reward worker exited during start-up (exit code {worker.process.exitcode}); "
                        "its traceback is on stderr"
                    )
                batch.errors += 1
                first_error = first_error or "the worker process died"
                self._replace(worker)
                continue
            if not worker.ready:
                status, detail = message
                if status != "ready":
                    self._fail(f"a reward worker could not start: {detail}")
                worker.ready = True
                continue
            reward, error = message
            assert worker.item is not None
            batch.rewards[worker.item] = reward
            if error is not None:
                batch.errors += 1
                first_error = first_error or error
            worker.item = None
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.item is not None and now >= worker.deadline:
                batch.timeouts += 1
                self._replace(worker)
            elif not worker.ready and now >= worker.startup_deadline:
                self._fail(f"a reward worker did not start within {_STARTUP_TIMEOUT_S:.0f} s")
        return first_error

    def _fail(self, message: str) -> None:
        self.close()
        raise RuntimeError(f"reward.verifier {self._config.verifier!r}: {message}") from None

    def close(self) -> None:
        """Stop the workers: idle ones exit cleanly, busy or starting ones are killed."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            if worker.ready and worker.item is None:
                with contextlib.suppress(OSError):
                    worker.conn.send(None)
            else:
                worker.process.kill()
        for worker in self._workers:
            worker.process.join(timeout=1.0)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        self._workers = []

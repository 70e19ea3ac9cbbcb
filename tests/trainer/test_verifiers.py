"""Answer extraction, the built-in verifiers, and RewardPool's handling of misbehaving verifiers."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlsd_contracts.config import ConfigError, RewardSection
from rlsd_trainer.rewards.verifiers import (
    RewardPool,
    exact_match,
    extract_answer,
    load_callable,
    math_match,
    numeric_match,
)

FIXTURES_DIR = str(Path(__file__).resolve().parent)
MALFORMED = ["\\boxed{", "", "   ", "garbage }{ \\frac{", "日本語 ☃ \\boxed{☃}", "\\boxed{}}}{{", "\x00\x01"]


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\boxed{3}}", "3"),
        ("first \\boxed{1}, then \\boxed{2}", "2"),
        ("\\boxed{7} and then a truncated \\boxed{8", "7"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed { 5 }", "5"),
        ("Some work.\nAnswer: 42.", "42"),
        ("the answer is 17\nmore text", "17"),
        ("The ANSWER IS: -3.", "-3"),
        ("**Answer:** $x+1$", "x+1"),
        ("Answer: 1\nno wait. Answer: 2", "2"),
        ("no marker at all", None),
        ("Answer:", None),
        ("", None),
    ],
)
def test_extract_answer(response: str, expected: str | None) -> None:
    assert extract_answer(response) == expected


def test_extract_answer_is_linear_on_runaway_output() -> None:
    # This process's CPU time, not the wall clock: other processes on a busy machine do not count
    # (about 0.04 s; a quadratic scan takes minutes).
    start = time.process_time()
    assert extract_answer("\\boxed{" * 20000) is None
    assert extract_answer("\\boxed{" * 5000 + "7" + "}" * 5000) == "7"
    assert extract_answer("so " * 50000 + "Answer: 9") == "9"
    assert time.process_time() - start < 1.0


def test_exact_match() -> None:
    assert exact_match("so \\boxed{ 42 }", "42") == 1.0
    assert exact_match("Answer: x  +  1", "x + 1") == 1.0
    assert exact_match("42", " 42 ") == 1.0  # a bare reply is its own answer
    assert exact_match("\\boxed{41}", "42") == 0.0
    assert exact_match("the answer is 42", "") == 0.0


def test_numeric_match() -> None:
    assert numeric_match("\\boxed{1,234}", "1234") == 1.0
    assert numeric_match("Answer: $5.", "5") == 1.0
    assert numeric_match("\\boxed{50\\%}", "50%") == 1.0
    assert numeric_match("\\boxed{3/4}", "0.75") == 1.0
    assert numeric_match("\\boxed{\\frac{3}{4}}", ".75") == 1.0
    assert numeric_match("-2.5", "-5/2") == 1.0
    assert numeric_match("\\boxed{1e3}", "1000") == 1.0
    assert numeric_match("\\boxed{1.0000001}", "1", rel_tol=1e-6) == 1.0
    assert numeric_match("\\boxed{1.001}", "1", rel_tol=1e-6) == 0.0
    assert numeric_match("\\boxed{1,23}", "123") == 0.0  # not a thousands grouping
    assert numeric_match("\\boxed{1/0}", "1") == 0.0
    assert numeric_match("\\boxed{1e400}", "1e400") == 0.0  # overflows to infinity
    assert numeric_match("\\boxed{inf}", "inf") == 0.0
    assert numeric_match("\\boxed{seven}", "7") == 0.0


@pytest.mark.parametrize("response", MALFORMED)
@pytest.mark.parametrize("answer", ["42", "", "\\boxed{\\frac{", "雪", "1/0"])
def test_builtin_verifiers_score_malformed_text_zero(response: str, answer: str) -> None:
    for verifier in (exact_match, numeric_match, math_match):
        assert verifier(response, answer) == 0.0


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("The answer is $0.5$", "\\frac{1}{2}"),
        ("1/2", "\\frac{1}{2}"),
        ("so \\boxed{\\dfrac{2}{4}}", "1/2"),
        ("\\boxed{-3}", "-3"),
        ("\\boxed{x+1}", "1+x"),
    ],
)
def test_math_match_equivalent_forms(response: str, answer: str) -> None:
    assert math_match(response, answer) == 1.0


def test_math_match_rejects_wrong_answers() -> None:
    assert math_match("\\boxed{\\frac{1}{3}}", "0.5") == 0.0
    assert math_match("\\boxed{4}", "\\boxed{5}") == 0.0


def test_math_match_outside_the_main_thread() -> None:
    # math_verify's signal-based limits only work in the main thread; they must be switched off elsewhere.
    results: list[float] = []
    thread = threading.Thread(target=lambda: results.append(math_match("\\boxed{0.5}", "\\frac{1}{2}")))
    thread.start()
    thread.join()
    assert results == [1.0]


def test_load_callable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(FIXTURES_DIR)
    assert load_callable("verifier_fixtures:correct")("1", "1") == 1.0
    with pytest.raises(ConfigError, match=r"reward.callable 'nope': expected 'package.module:function'"):
        load_callable("nope")
    with pytest.raises(ConfigError, match=r"reward.callable .*cannot import module 'no_such_module_xyz'"):
        load_callable("no_such_module_xyz:f")
    with pytest.raises(ConfigError, match=r"reward.callable .*has no attribute 'missing'"):
        load_callable("verifier_fixtures:missing")
    with pytest.raises(ConfigError, match=r"reward.callable .*'NOT_CALLABLE' is a int, not a function"):
        load_callable("verifier_fixtures:NOT_CALLABLE")


def test_pool_rejects_a_bad_callable_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(FIXTURES_DIR)
    with pytest.raises(ConfigError, match="has no attribute"):
        RewardPool(RewardSection(verifier="callable", callable="verifier_fixtures:missing"))


@pytest.fixture(scope="module")
def callable_pool() -> Iterator[RewardPool]:
    """One pool over `by_response`, whose behaviour each item picks with its response text."""
    with pytest.MonkeyPatch.context() as patch:
        # The workers get the parent's sys.path from spawn; PYTHONPATH also covers any process they start.
        patch.syspath_prepend(FIXTURES_DIR)
        patch.setenv(
            "PYTHONPATH", os.pathsep.join(filter(None, [FIXTURES_DIR, os.environ.get("PYTHONPATH")]))
        )
        config = RewardSection(
            verifier="callable", callable="verifier_fixtures:by_response", workers=2, timeout_s=0.5
        )
        with RewardPool(config) as pool:
            yield pool


def test_pool_scores_a_user_callable(callable_pool: RewardPool) -> None:
    batch = callable_pool.score(["1", "2", "3", "true"], ["1", "1", "3", "x"])
    assert batch.rewards == [1.0, 0.0, 1.0, 1.0]
    assert (batch.errors, batch.timeouts) == (0, 0)
    assert callable_pool.score([], []).rewards == []


def test_pool_counts_failing_items_as_errors(callable_pool: RewardPool) -> None:
    batch = callable_pool.score(["raise", "1", "nan", "text", "die", "2"], ["1", "1", "1", "1", "1", "2"])
    assert batch.rewards == [0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert (batch.errors, batch.timeouts) == (4, 0)
    # The worker that died was replaced.
    assert callable_pool.score(["5"], ["5"]).rewards == [1.0]


def test_pool_survives_a_hung_verifier(callable_pool: RewardPool) -> None:
    before = workers()
    batch = callable_pool.score(["sleep", "1", "2", "3"], ["1", "1", "2", "0"])
    assert batch.rewards == [0.0, 1.0, 1.0, 0.0]
    assert (batch.errors, batch.timeouts) == (0, 1)
    # The hung worker (it sleeps for a minute) was killed and replaced, not waited for; the other
    # one carries on: seen in the processes, not in a wall-clock bound a busy machine could break.
    after = workers()
    assert len(before) == len(after) == 2 and len(before & after) == 1
    batch = callable_pool.score([str(i) for i in range(20)], [str(i) for i in range(20)])
    assert batch.rewards == [1.0] * 20
    assert (batch.errors, batch.timeouts) == (0, 0)
    assert workers() == after


def workers() -> set[int]:
    """The process ids of this process's live children (the pool's workers)."""
    return {process.pid for process in multiprocessing.active_children() if process.pid is not None}


def test_pool_times_out_several_hung_items(callable_pool: RewardPool) -> None:
    batch = callable_pool.score(["sleep", "sleep", "sleep", "7"], ["1", "1", "1", "7"])
    assert batch.rewards == [0.0, 0.0, 0.0, 1.0]
    assert (batch.errors, batch.timeouts) == (0, 3)


def test_pool_rejects_mismatched_lengths(callable_pool: RewardPool) -> None:
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        callable_pool.score(["1", "2"], ["1"])


def test_math_pool_scores_a_batch() -> None:
    # No wall-clock bound (about 0.3 s on two cores): a busy machine must not fail it.
    responses = [f"Adding up gives \\boxed{{{i}}}." for i in range(256)]
    answers = [str(i if i % 4 else i + 1) for i in range(256)]
    with RewardPool(RewardSection(verifier="math", workers=2, timeout_s=5.0)) as pool:
        pool.score(["0"], ["0"])  # waits for the workers to start
        batch = pool.score(responses, answers)
    assert batch.rewards == [0.0 if i % 4 == 0 else 1.0 for i in range(256)]
    assert (batch.errors, batch.timeouts) == (0, 0)


def test_closed_pool_refuses_work() -> None:
    pool = RewardPool(RewardSection(verifier="exact", workers=1))
    assert pool.score(["\\boxed{4}"], ["4"]).rewards == [1.0]
    pool.close()
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.score(["4"], ["4"])

"""The operator in-process (kopf's KopfRunner), for the `operator` fixture and tests that restart it.

A module of its own rather than conftest: a test importing from `conftest` gets whichever conftest
module is first on sys.path (tests/chart has one too)."""

from __future__ import annotations

from kopf.testing import KopfRunner

OPERATOR_ARGS = ["run", "--all-namespaces", "--standalone", "-m", "rlsd_operator.handlers"]


def start_operator() -> KopfRunner:
    return KopfRunner(OPERATOR_ARGS, timeout=60)

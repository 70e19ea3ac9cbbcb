"""Fixtures of the chart tests: helm and promtool (built from the Go module proxy by
tests/k8s/build-chart-tools.sh and cached) and the chart's render script."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from charttools import CHART, chart_tools

_build_error: Exception | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    """Builds the tools (when not cached) before the first test, outside the per-test timeout."""
    global _build_error
    if session.config.option.collectonly or not any("tests/chart" in str(i.path) for i in session.items):
        return
    capture = session.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        try:
            chart_tools()
        except Exception as exc:  # reported by the fixture: the chart tests fail, never skip
            _build_error = exc


@pytest.fixture(scope="session")
def tools() -> Path:
    if _build_error is not None:
        raise _build_error
    return chart_tools()


@pytest.fixture(scope="session")
def helm(tools: Path) -> str:
    return str(tools / "helm")


@pytest.fixture(scope="session")
def render() -> ModuleType:
    """charts/rlsd-operator/hack/render.py, imported."""
    spec = importlib.util.spec_from_file_location("rlsd_chart_render", CHART / "hack/render.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module

"""Fixtures for the tests that run against a real control plane (see k8s/README.md), shared by
tests/k8s and tests/operator (`controlplane` is importable through pytest's `pythonpath`).

`control_plane` (session): etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok
with fake GPU nodes, all on 127.0.0.1; `kueue` (session): a Kueue manager on it
(k8s/kueue_manager.py); `kubeconfig` (session): the admin's kubeconfig path; `api_client`
(session): a kubernetes ApiClient for the admin; `namespace`: a fresh namespace whose default
service account exists, deleted after the test.
"""

from __future__ import annotations

import uuid
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from controlplane import ControlPlane, build_assets, wait_until
from kubernetes import client
from kueue_manager import Kueue, build_kueue

# tests/conformance runs in the vLLM environment (`make test-vllm`, part of `make test`), which does
# not load this file (--confcutdir); the main environment never holds vLLM.
collect_ignore = ["conformance"]

_running: ControlPlane | None = None
_build_error: Exception | None = None
_kueue_build_error: Exception | None = None


def pytest_report_header() -> str:
    return "tests/conformance (vLLM's own code) runs in the vLLM environment: make test-vllm"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Builds the binaries (when not cached) before the first test, where neither the per-test
    timeout nor output capture applies: a cold build takes many minutes."""
    global _build_error, _kueue_build_error
    if session.config.option.collectonly or not any(i.get_closest_marker("k8s") for i in session.items):
        return
    capture = session.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        try:
            build_assets()
        except Exception as exc:  # reported by the fixture, so every k8s test fails with it
            _build_error = exc
        if any(i.get_closest_marker("kueue") for i in session.items):
            try:
                build_kueue()
            except Exception as exc:  # reported by the kueue fixture
                _kueue_build_error = exc


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and _running is not None:
        report.sections.append(("control plane logs", _running.logs()))
    return report


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    global _running
    if _build_error is not None:
        raise _build_error
    plane = ControlPlane(build_assets(), tmp_path_factory.mktemp("k8s"))
    try:
        plane.start()
        _running = plane
        yield plane
    finally:
        _running = None
        plane.stop()


@pytest.fixture(scope="session")
def kueue(control_plane: ControlPlane, api_client: client.ApiClient) -> Kueue:
    """A Kueue manager on the control plane (tests/k8s/kueue.py), until the session ends."""
    if _kueue_build_error is not None:
        raise _kueue_build_error
    manager = Kueue(build_kueue(), control_plane)
    manager.start(api_client)
    return manager


@pytest.fixture(scope="session")
def kubeconfig(control_plane: ControlPlane) -> Path:
    return control_plane.kubeconfig


@pytest.fixture(scope="session")
def api_client(control_plane: ControlPlane) -> Iterator[client.ApiClient]:
    with control_plane.api_client() as api:
        yield api


@pytest.fixture
def namespace(api_client: client.ApiClient) -> Iterator[str]:
    core = client.CoreV1Api(api_client)
    name = f"test-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    wait_until(lambda: core.read_namespaced_service_account("default", name), f"{name}/default SA")
    yield name
    core.delete_namespace(name)

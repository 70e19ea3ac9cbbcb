"""Fixtures for the tests that run against a real control plane (see k8s/README.md), shared by
tests/k8s and tests/operator (`controlplane` is importable through pytest's `pythonpath`).

`control_plane` (session): etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok
with fake GPU nodes, all on 127.0.0.1; `kueue` (session): a Kueue manager on it
(k8s/kueue_manager.py); `kubeconfig` (session): the admin's kubeconfig path; `api_client`
(session): a kubernetes ApiClient for the admin; `namespace`: a fresh namespace whose default
service account exists, deleted after the test. The real node of tests/e2e (k8s/realnode.py) is
a control plane of its own, started by tests/e2e/conftest.py; its binaries and images are built
here too, before the first test.
"""

from __future__ import annotations

import uuid
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from charttools import chart_tools
from controlplane import BUILD_ERRORS, ControlPlane, build_assets, raise_build_error, wait_until
from kubernetes import client
from kueue_manager import Kueue, build_kueue
from realnode import build_images, build_node

# tests/conformance runs in the vLLM environment (`make test-vllm`, part of `make test`), which does
# not load this file (--confcutdir); the main environment never holds vLLM.
collect_ignore = ["conformance"]

_running: ControlPlane | None = None


def pytest_report_header() -> str:
    return "tests/conformance (vLLM's own code) runs in the vLLM environment: make test-vllm"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Builds the binaries (when not cached) before the first test, where neither the per-test
    timeout nor output capture applies: a cold build takes many minutes."""
    if session.config.option.collectonly:
        return
    builds = {
        "k8s": build_assets,
        "kueue": build_kueue,
        "realnode": lambda: (build_node(), build_images(), chart_tools()),
    }
    wanted = [name for name in builds if any(i.get_closest_marker(name) for i in session.items)]
    capture = session.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        for name in wanted:
            try:
                builds[name]()
            except Exception as exc:  # reported by the fixture, so every test that needs it fails with it
                BUILD_ERRORS[name] = exc


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and _running is not None:
        report.sections.append(("control plane logs", _running.logs()))
    return report


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    global _running
    raise_build_error("k8s")
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
    raise_build_error("kueue")
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

"""Fixtures of the end-to-end tests: a control plane and a real node in a network namespace of their
own (k8s/realnode.py), the images built from the repository's Dockerfile imported into its containerd
(k8s/build-images.sh), and the chart installed by helm with those images, as the README's cluster
quick start does. Started once for the tests of this directory and stopped after them."""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator

import pytest
from charttools import chart_tools
from controlplane import ControlPlane, build_assets, raise_build_error
from e2e_cluster import CHART, RealCluster
from netns import NetNs
from realnode import NODE_ADDRESS, RealNode, build_images, build_node

SYSTEM = "rlsd-system"
RELEASE = "rlsd"
_running: RealCluster | None = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and _running is not None:
        report.sections.append(("real cluster", _running.diagnostics()))
    return report


@pytest.fixture(scope="package")
def real_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    global _running
    raise_build_error("k8s")
    raise_build_error("realnode")
    workdir = tmp_path_factory.mktemp(f"real-node-{os.getpid()}")
    netns = NetNs(f"rlsd-{os.getpid()}", NODE_ADDRESS)
    plane = ControlPlane(build_assets(), workdir, gpu_nodes=0, netns=netns)
    node = RealNode(plane, build_node(), build_images(), workdir)
    try:
        plane.start()
        node.start()
        _running = RealCluster(plane, node, netns, chart_tools() / "helm", workdir)
        yield _running
    finally:
        _running = None
        node.stop()
        plane.stop()
        netns.delete()


@pytest.fixture(scope="package")
def operator_release(real_cluster: RealCluster) -> str:
    """The README's `helm install`: the chart's defaults, the operator image built here; returns the
    operator pod's name once it is Ready."""
    real_cluster.helm(
        "install",
        RELEASE,
        str(CHART),
        "--namespace",
        SYSTEM,
        "--create-namespace",
        "--wait",
        "--timeout",
        "180s",
    )
    pods = real_cluster.core.list_namespaced_pod(
        SYSTEM, label_selector=f"app.kubernetes.io/instance={RELEASE}"
    )
    (pod,) = pods.items
    return pod.metadata.name

"""Fixtures of the operator tests: the RLSDRun CRD on the real API server, the operator in-process
(kopf's KopfRunner against the admin's kubeconfig), and what a run's pods need in a namespace."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from controlplane import bound_claim, wait_until
from kopf.testing import KopfRunner
from kubernetes import client
from operator_runner import start_operator

from rlsd_operator import decide, handlers, names


@pytest.fixture(scope="session")
def rlsd_crd(api_client: client.ApiClient) -> str:
    """The RLSDRun CRD from the package, applied (create or replace) and served."""
    crd = yaml.safe_load(names.CRD_PATH.read_text())
    extensions = client.ApiextensionsV1Api(api_client)
    try:
        extensions.create_custom_resource_definition(crd)
    except client.ApiException as exc:
        if exc.status != 409:
            raise
        crd["metadata"]["resourceVersion"] = extensions.read_custom_resource_definition(
            crd["metadata"]["name"]
        ).metadata.resource_version
        extensions.replace_custom_resource_definition(crd["metadata"]["name"], crd)

    def established() -> bool:
        status = extensions.read_custom_resource_definition(crd["metadata"]["name"]).status
        return any(c.type == "Established" and c.status == "True" for c in status.conditions or [])

    wait_until(established, "the RLSDRun CRD to be Established")
    custom = client.CustomObjectsApi(api_client)
    wait_until(
        lambda: custom.list_cluster_custom_object(names.GROUP, names.VERSION, names.PLURAL), "discovery"
    )
    return crd["metadata"]["name"]


@pytest.fixture
def custom(api_client: client.ApiClient, rlsd_crd: str) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client)


@pytest.fixture
def core(api_client: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api_client)


@pytest.fixture
def checkpoint_claim(core: client.CoreV1Api, namespace: str) -> Iterator[str]:
    """A claim named `checkpoints`, bound to a hostPath volume made for it (the scheduler waits for a
    bound claim). Runs that use a claimTemplate bind `pv_for` themselves."""
    with bound_claim(core, namespace) as claim:
        yield claim


@pytest.fixture
def operator_env(kubeconfig: Path, rlsd_crd: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Environment of an in-process operator: the admin's kubeconfig, fast scrapes, retries and
    placements."""
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setattr(decide, "SCRAPE_SECONDS", 0.5)
    monkeypatch.setattr(decide, "REFERENCE_RETRY_SECONDS", 1.0)
    monkeypatch.setattr(decide, "REFUSAL_RETRY_SECONDS", 1.0)
    monkeypatch.setattr(decide, "REFUSAL_RETRY_MAX_SECONDS", 2.0)
    monkeypatch.setattr(decide, "PLACEMENT_RETRY_SECONDS", 1.0)
    monkeypatch.setattr(decide, "PLACEMENT_GRACE_SECONDS", 5.0)
    monkeypatch.setattr(handlers, "CLUSTER_SECONDS", 0.5)


@pytest.fixture
def operator(operator_env: None) -> Iterator[KopfRunner]:
    with start_operator() as runner:
        yield runner
    assert runner.exception is None, runner.output

"""The few Kubernetes API calls the operator makes, as plain dicts in the API's own (camelCase) form.

The client is synchronous; the handlers call these methods in worker threads.
"""

from __future__ import annotations

import json
import os
from typing import Any

import kopf
from kubernetes import client, config

from rlsd_operator import names

Object = dict[str, Any]


def load_api_client() -> client.ApiClient:
    """In a pod: its service account; elsewhere: the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        # Read KUBECONFIG now: the client library reads it once, at import time.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    return client.ApiClient()


def connection_info(api: client.ApiClient) -> kopf.ConnectionInfo:
    """kopf's credentials from the same configuration as `load_api_client` (kopf's own client login
    would read a KUBECONFIG set after start-up nowhere)."""
    configuration = api.configuration
    header = configuration.get_api_key_with_prefix("BearerToken") or configuration.get_api_key_with_prefix(
        "authorization"
    )
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        scheme=scheme or None,
        token=token or None,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )


def _absent(exc: client.ApiException) -> bool:
    return exc.status == 404


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    # -- runs -------------------------------------------------------------------------------------

    def get_run(self, namespace: str, name: str) -> Object | None:
        try:
            return self.custom.get_namespaced_custom_object(
                names.GROUP, names.VERSION, namespace, names.PLURAL, name
            )
        except client.ApiException as exc:
            if _absent(exc):
                return None
            raise

    def patch_run_status(self, namespace: str, name: str, status: Object) -> None:
        self.custom.patch_namespaced_custom_object_status(
            names.GROUP, names.VERSION, namespace, names.PLURAL, name, {"status": status}
        )

    def delete_run(self, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(
                names.GROUP, names.VERSION, namespace, names.PLURAL, name
            )
        except client.ApiException as exc:
            if not _absent(exc):
                raise

    # -- owned objects ----------------------------------------------------------------------------

    def list_pods(self, namespace: str, run: str) -> list[Object]:
        selector = f"{names.LABEL_RUN}={run},{names.LABEL_APP}=rlsd"
        response = self.core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False)
        return json.loads(response.data)["items"]

    def create(self, namespace: str, obj: Object) -> bool:
        """Create `obj` unless an object of that name exists; True when this call created it."""
        create = {
            "Pod": self.core.create_namespaced_pod,
            "Service": self.core.create_namespaced_service,
            "ConfigMap": self.core.create_namespaced_config_map,
            "PersistentVolumeClaim": self.core.create_namespaced_persistent_volume_claim,
        }[obj["kind"]]
        try:
            create(namespace, obj)
        except client.ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def delete_pod(self, namespace: str, name: str) -> None:
        try:
            self.core.delete_namespaced_pod(name, namespace)
        except client.ApiException as exc:
            if not _absent(exc):
                raise

    def read_config_map(self, namespace: str, name: str) -> Object | None:
        try:
            return self.core.read_namespaced_config_map(name, namespace).data or {}
        except client.ApiException as exc:
            if _absent(exc):
                return None
            raise

    def replace_config_map(self, namespace: str, obj: Object) -> None:
        if not self.create(namespace, obj):
            self.core.replace_namespaced_config_map(obj["metadata"]["name"], namespace, obj)

    # -- references the user names ----------------------------------------------------------------

    def secret_keys(self, namespace: str, name: str) -> set[str] | None:
        try:
            return set((self.core.read_namespaced_secret(name, namespace).data or {}).keys())
        except client.ApiException as exc:
            if _absent(exc):
                return None
            raise

    def claim_exists(self, namespace: str, name: str) -> bool:
        try:
            self.core.read_namespaced_persistent_volume_claim(name, namespace)
        except client.ApiException as exc:
            if _absent(exc):
                return False
            raise
        return True

"""A real Kubernetes control plane on 127.0.0.1 for the operator tests.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok run as child processes of the
test session, with certificates made here. kwok plays the kubelet of a few fake GPU nodes, so pods
that the real scheduler binds to them become Running. The binaries come from
build-control-plane.sh (or from KUBEBUILDER_ASSETS, see README.md).

Given a network namespace (netns.py), the same control plane runs inside it instead, without kwok:
the API server on the namespace's node address (the `kubernetes` Service's endpoint, which pods reach
through kube-proxy), clients of this process through a forwarded loopback port. realnode.py joins a
real node to it.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import functools
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes import client, config

if TYPE_CHECKING:
    from netns import NetNs

BUILD_SCRIPT = Path(__file__).with_name("build-control-plane.sh")
SERVICE_CIDR = "10.0.0.0/24"
POD_CIDR = "10.244.0.0/16"
KUBERNETES_SERVICE_NAMES = [
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
]
GPU = "nvidia.com/gpu"
# How a pod lands on a fake node: kwok manages nodes with this annotation, and they carry this
# label and taint so that nothing else is scheduled there by accident.
KWOK_NODE_ANNOTATION = {"kwok.x-k8s.io/node": "fake"}
KWOK_NODE_SELECTOR = {"type": "kwok"}
KWOK_TAINT = {"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}
KWOK_TOLERATION = {"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}
T = TypeVar("T")
GPU_NODE_CAPACITY = {GPU: "8", "cpu": "64", "memory": "512Gi", "pods": "110", "ephemeral-storage": "1Ti"}


# What a build before the first test raised (tests/conftest.py), by the marker of the tests that need
# it: the fixtures raise it, so every such test fails with it (none is skipped).
BUILD_ERRORS: dict[str, Exception] = {}


def raise_build_error(marker: str) -> None:
    if marker in BUILD_ERRORS:
        raise BUILD_ERRORS[marker]


def run_build(script: Path) -> Path:
    """Runs a build script of tests/k8s (a no-op once built) and returns the directory it prints.

    The script's progress goes to stderr; a failed build raises, so the tests fail rather than skip.
    """
    result = subprocess.run(["nice", "-n", "19", str(script)], stdout=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{script} failed with exit code {result.returncode}; see its stderr")
    return Path(result.stdout.strip().splitlines()[-1])


@functools.cache
def build_assets() -> Path:
    """The directory of the control plane's binaries (build-control-plane.sh)."""
    return run_build(BUILD_SCRIPT)


class Pki:
    """A throw-away certificate authority and the keys and certificates it issues, as PEM files."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rlsd-test-ca")])
        builder = _cert_builder(name, name, self._ca_key.public_key())
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        builder = builder.add_extension(_key_usage(cert_sign=True), critical=True)
        self._ca_cert = builder.sign(self._ca_key, hashes.SHA256())
        self.ca_cert = self._write("ca.crt", self._ca_cert.public_bytes(serialization.Encoding.PEM))
        self.ca_key = self._write_key("ca.key", self._ca_key)

    def issue(
        self, name: str, common_name: str, groups: Sequence[str] = (), hosts: Sequence[str] = ()
    ) -> tuple[Path, Path]:
        """Writes `name`.crt/.key: a client certificate for user `common_name` in `groups`, or a
        serving certificate when `hosts` (DNS names or IP addresses) are given."""
        key = ec.generate_private_key(ec.SECP256R1())
        attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, group) for group in groups]
        subject = x509.Name([*attributes, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = _cert_builder(subject, self._ca_cert.subject, key.public_key())
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        builder = builder.add_extension(_key_usage(), critical=True)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if hosts else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName(_san(hosts)), critical=False)
        cert = builder.sign(self._ca_key, hashes.SHA256())
        return (
            self._write(f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM)),
            self._write_key(f"{name}.key", key),
        )

    def signing_key(self, name: str) -> tuple[Path, Path]:
        """Writes a bare key pair, `name`.key and `name`.pub (for service-account tokens)."""
        key = ec.generate_private_key(ec.SECP256R1())
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return self._write_key(f"{name}.key", key), self._write(f"{name}.pub", public)

    def _write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        return path

    def _write_key(self, name: str, key: ec.EllipticCurvePrivateKey) -> Path:
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path = self._write(name, pem)
        path.chmod(0o600)
        return path


def _cert_builder(subject: x509.Name, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
    )


def _key_usage(cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _san(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def write_kubeconfig(path: Path, server: str, ca: Path, cert: Path, key: Path, user: str) -> Path:
    """Writes a kubeconfig (JSON, which is YAML too) for one user of one cluster."""
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "rlsd-test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "rlsd-test", "context": {"cluster": "rlsd-test", "user": user}}],
        "current-context": "rlsd-test",
    }
    path.write_text(json.dumps(kubeconfig, indent=2))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel sends it SIGTERM when the test process dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ControlPlane:
    """etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok with fake GPU nodes.

    `start()` returns once all are healthy and the nodes are Ready; `stop()` ends them all (it is
    safe to call after a failed start). Logs stay in `workdir`/logs.

    With `netns`, every component runs inside that network namespace (the well-known ports are free
    there), the API server listens on the namespace's address, and `server` is a loopback port of the
    host forwarded to it; `internal_server` is the address components inside use.
    """

    def __init__(self, assets: Path, workdir: Path, gpu_nodes: int = 2, netns: NetNs | None = None) -> None:
        self.assets = assets
        self.workdir = workdir
        self.netns = netns
        self.gpu_nodes = [f"kwok-gpu-{i}" for i in range(gpu_nodes)]
        self.logdir = workdir / "logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.pki = Pki(workdir / "pki")
        self.address = netns.address if netns else "127.0.0.1"
        self.port = 6443 if netns else free_port()
        self.internal_server = f"https://{self.address}:{self.port}"
        self.server = f"https://127.0.0.1:{netns.forward(self.port) if netns else self.port}"
        self.kubeconfig = workdir / "admin.kubeconfig"
        self.etcd_url = f"http://127.0.0.1:{self._port(2379)}"
        self._sa_key, self._sa_pub = self.pki.signing_key("service-account")
        self._procs: dict[str, tuple[subprocess.Popen[bytes], IO[bytes]]] = {}

    def _port(self, well_known: int) -> int:
        """`well_known` inside a namespace of the test's own, else a free port of the host."""
        return well_known if self.netns else free_port()

    def http_ok(self, url: str, context: ssl.SSLContext | None = None) -> bool:
        """`http_ok` from where the components listen (inside the namespace, if any)."""
        return self.netns.call(http_ok, url, context) if self.netns else http_ok(url, context)

    # -- life cycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        self.kubeconfig_for("admin", ["system:masters"], self.kubeconfig)
        self._start_etcd(deadline)
        self._start_apiserver(deadline)
        with self.api_client() as api:
            core = client.CoreV1Api(api)
            self._start_controllers(core, deadline)
            if self.gpu_nodes:
                self._start_kwok(core, deadline)

    def stop(self) -> None:
        for name in reversed(list(self._procs)):
            self.stop_component(name)
        shutil.rmtree(self.workdir / "etcd", ignore_errors=True)  # keep the logs only

    def stop_component(self, name: str) -> None:
        """SIGTERM to one component, SIGKILL 15 s later; a no-op for one that is not running."""
        entry = self._procs.pop(name, None)
        if entry is None:
            return
        proc, log = entry
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()

    def _start_etcd(self, deadline: float) -> None:
        client_url = self.etcd_url
        peer_url = f"http://127.0.0.1:{self._port(2380)}"
        self.spawn(
            "etcd",
            f"--data-dir={self.workdir / 'etcd'}",
            "--name=etcd",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=etcd={peer_url}",
            "--unsafe-no-fsync",
            "--log-level=warn",
        )
        self.wait("etcd /health", lambda: self.http_ok(f"{client_url}/health"), deadline)

    def _start_apiserver(self, deadline: float) -> None:
        cert, key = self.pki.issue(
            "apiserver",
            "kube-apiserver",
            hosts=["localhost", "127.0.0.1", self.address, "10.0.0.1", *KUBERNETES_SERVICE_NAMES],
        )
        # What the API server shows kubelets (logs, exec), which ask it whether that user may: as
        # kubeadm's certificate of old, in system:masters.
        kubelet_cert, kubelet_key = self.pki.issue(
            "apiserver-kubelet-client", "kube-apiserver-kubelet-client", ["system:masters"]
        )
        if self.netns:  # pods reach it as the `kubernetes` Service, whose endpoint is this address
            endpoints = [f"--bind-address={self.address}", f"--advertise-address={self.address}"]
            # Nothing resolves node names for the API server itself: kubelets are reached by address.
            endpoints.append("--kubelet-preferred-address-types=InternalIP")
        else:  # a loopback address is no valid endpoint
            endpoints = ["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"]
            endpoints.append("--endpoint-reconciler-type=none")
        # The aggregation layer's front proxy has a CA of its own, as in kubeadm clusters.
        front_proxy = Pki(self.workdir / "front-proxy")
        proxy_cert, proxy_key = front_proxy.issue("front-proxy-client", "front-proxy-client")
        self.spawn(
            "kube-apiserver",
            f"--etcd-servers={self.etcd_url}",
            *endpoints,
            f"--secure-port={self.port}",
            f"--cert-dir={self.workdir / 'apiserver'}",
            f"--tls-cert-file={cert}",
            f"--tls-private-key-file={key}",
            f"--client-ca-file={self.pki.ca_cert}",
            "--authorization-mode=Node,RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={self._sa_pub}",
            f"--service-account-signing-key-file={self._sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--requestheader-client-ca-file={front_proxy.ca_cert}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={proxy_cert}",
            f"--proxy-client-key-file={proxy_key}",
            f"--kubelet-client-certificate={kubelet_cert}",
            f"--kubelet-client-key={kubelet_key}",
            "--allow-privileged=true",
            "--profiling=false",
        )
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        admin_cert, admin_key = self.pki.dir / "admin.crt", self.pki.dir / "admin.key"
        context.load_cert_chain(str(admin_cert), str(admin_key))
        readyz = f"{self.internal_server}/readyz"
        self.wait("kube-apiserver /readyz", lambda: self.http_ok(readyz, context), deadline)

    def _start_controllers(self, core: client.CoreV1Api, deadline: float) -> None:
        insecure = ssl.create_default_context()  # their serving certificates are self-signed
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        for name, user, extra in [
            (
                "kube-controller-manager",
                "system:kube-controller-manager",
                [
                    "--use-service-account-credentials=true",
                    f"--service-account-private-key-file={self._sa_key}",
                    f"--root-ca-file={self.pki.ca_cert}",
                    f"--cluster-signing-cert-file={self.pki.ca_cert}",
                    f"--cluster-signing-key-file={self.pki.ca_key}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                ],
            ),
            ("kube-scheduler", "system:kube-scheduler", []),
        ]:
            kubeconfig = self.kubeconfig_for(user, inside=True)
            port = self._port({"kube-controller-manager": 10257, "kube-scheduler": 10259}[name])
            self.spawn(
                name,
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={self.workdir / name}",
                "--leader-elect=false",
                *extra,
            )
            url = f"https://127.0.0.1:{port}/healthz"
            self.wait(f"{name} /healthz", lambda url=url: self.http_ok(url, insecure), deadline)
        # The service-account controller at work: pods can't be created in a namespace before.
        default_sa = functools.partial(core.read_namespaced_service_account, "default", "default")
        self.wait("the default service account", default_sa, deadline)

    def _start_kwok(self, core: client.CoreV1Api, deadline: float) -> None:
        self.spawn(
            "kwok",
            f"--kubeconfig={self.kubeconfig_for('kwok', ['system:masters'])}",
            f"--config={self.assets / 'kwok-stages.yaml'}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={_selector(KWOK_NODE_ANNOTATION)}",
            f"--cidr={POD_CIDR}",
            "--node-ip=127.0.0.1",
            env={"KWOK_WORKDIR": str(self.workdir / "kwok")},  # ignore any ~/.kwok/kwok.yaml
        )
        for name in self.gpu_nodes:
            core.create_node(gpu_node(name))

        def nodes_ready() -> bool:
            nodes = core.list_node(label_selector=_selector(KWOK_NODE_SELECTOR)).items
            ready = [n for n in nodes if _condition(n.status.conditions, "Ready")]
            return len(ready) == len(self.gpu_nodes)

        self.wait("the kwok GPU nodes to be Ready", nodes_ready, deadline)

    # -- clients ----------------------------------------------------------------------------------

    def kubeconfig_for(
        self, user: str, groups: Sequence[str] = (), path: Path | None = None, inside: bool = False
    ) -> Path:
        """A kubeconfig for `user` in `groups`, authenticated by a client certificate; for this process
        (through the forwarded port, if any), or `inside` the components' network."""
        stem = user.replace(":", "-")
        cert, key = self.pki.issue(stem, user, groups)
        server = self.internal_server if inside else self.server
        path = path or self.workdir / f"{stem}{'-inside' if inside else ''}.kubeconfig"
        return write_kubeconfig(path, server, self.pki.ca_cert, cert, key, user)

    def api_client(self, kubeconfig: Path | None = None) -> client.ApiClient:
        """A kubernetes ApiClient for `kubeconfig` (the cluster admin by default)."""
        return config.new_client_from_config(config_file=str(kubeconfig or self.kubeconfig))

    # -- processes and logs -----------------------------------------------------------------------

    def spawn(
        self, name: str, *args: str, env: dict[str, str] | None = None, binary: Path | None = None
    ) -> None:
        """Starts `binary` (the asset `name` by default) as one more component: its log beside the
        others', stopped with them."""
        log = (self.logdir / f"{name}.log").open("wb")
        command = [str(binary or self.assets / name), *args]
        proc = subprocess.Popen(
            self.netns.command(*command) if self.netns else command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        self._procs[name] = (proc, log)

    def pids(self) -> dict[str, int]:
        """Component name -> process id (for benchmarks that account CPU time per component)."""
        return {name: proc.pid for name, (proc, _) in self._procs.items()}

    def wait(self, what: str, ready: Callable[[], object], deadline: float) -> None:
        """Polls `ready` until it returns something truthy; raises, with the logs, when a component
        exited or `deadline` (a time.monotonic() value) passed."""
        error: Exception | None = None
        while time.monotonic() < deadline:
            for name, (proc, _) in self._procs.items():
                if proc.poll() is not None:
                    message = f"{name} exited with {proc.returncode} while waiting for {what}"
                    raise RuntimeError(f"{message}\n{self.logs()}")
            try:
                if ready():
                    return
            except Exception as exc:  # not up yet: connection refused, 5xx, 404, ...
                error = exc
            time.sleep(0.3)
        raise RuntimeError(f"timed out waiting for {what} (last error: {error!r})\n{self.logs()}")

    def logs(self, lines: int = 30) -> str:
        """The last `lines` lines of each component's log."""
        parts = []
        for path in sorted(self.logdir.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"===== {path} (last {len(tail)} lines) =====\n" + "\n".join(tail))
        return "\n".join(parts)


def wait_until(
    condition: Callable[[], T | None],
    what: str,
    timeout: float = 60.0,
    retry_on: tuple[type[Exception], ...] = (client.ApiException,),
) -> T:
    """Polls `condition` until it returns something truthy, and returns that; raises on timeout.

    Exceptions of the `retry_on` types (a 404 before an object exists, say) count as not yet.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = condition()
            if last:
                return last
        except retry_on as exc:
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; last result: {last!r}")
        time.sleep(0.3)


def http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    """Whether GET `url` answers 200 (raises while it cannot connect)."""
    with urllib.request.urlopen(url, context=context, timeout=5) as response:
        return response.status == 200


def _selector(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items())


def _condition(conditions: Iterable[Any] | None, kind: str) -> bool:
    """Whether the condition of type `kind` is True in a list of API object conditions."""
    return any(c.type == kind and c.status == "True" for c in conditions or [])


def gpu_node(name: str, capacity: dict[str, str] = GPU_NODE_CAPACITY) -> dict[str, Any]:
    """A Node object that kwok manages, with 8 GPUs by default."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": dict(KWOK_NODE_ANNOTATION),
            "labels": {
                **KWOK_NODE_SELECTOR,
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
            },
        },
        "spec": {"taints": [dict(KWOK_TAINT)]},
        "status": {"capacity": dict(capacity), "allocatable": dict(capacity)},
    }


def terminated_status(
    container: str,
    image: str,
    code: int,
    message: str = "",
    started: str = "2026-01-01T00:00:00Z",
    finished: str = "2026-01-01T00:00:01Z",
) -> dict[str, Any]:
    """A pod status whose one container has exited with `code`, as a kubelet reports it (kwok
    completes only Job-owned pods, so tests and benchmarks patch this in themselves)."""
    terminated = {
        "exitCode": code,
        "reason": "Completed" if code == 0 else "Error",
        "message": message,
        "startedAt": started,
        "finishedAt": finished,
    }
    state = {"name": container, "image": image, "imageID": "", "ready": False, "restartCount": 0}
    return {
        "phase": "Succeeded" if code == 0 else "Failed",
        "containerStatuses": [{**state, "state": {"terminated": terminated}}],
    }


def exit_pod(core: client.CoreV1Api, namespace: str, pod: str, code: int, message: str = "") -> None:
    """Patch `pod`'s status so its (first) container has exited with `code`."""
    container = core.read_namespaced_pod(pod, namespace).spec.containers[0]
    status = terminated_status(container.name, container.image, code, message)
    core.patch_namespaced_pod_status(pod, namespace, {"status": status})


@contextlib.contextmanager
def kubelet_stops_deleted_pods(
    core: client.CoreV1Api, namespace: str, exit_code: Callable[[client.V1Pod], int]
) -> Iterator[None]:
    """What a kubelet does to a pod deleted on its node, for the pods of `namespace`: its container
    stops (exits `exit_code(pod)`, as the process would on SIGTERM) and the pod's phase becomes
    terminal. kwok deletes pods at once, which a finalizer (Kueue's) defeats: such a pod would stay
    Running. A thread, polling, for as long as the context lasts."""
    stop = threading.Event()

    def stop_deleted() -> None:
        while not stop.wait(0.3):
            for pod in core.list_namespaced_pod(namespace).items:
                terminal = pod.status.phase in ("Succeeded", "Failed")
                if pod.metadata.deletion_timestamp and pod.spec.node_name and not terminal:
                    with contextlib.suppress(client.ApiException):  # gone meanwhile
                        exit_pod(core, namespace, pod.metadata.name, exit_code(pod))

    thread = threading.Thread(target=stop_deleted, name=f"kubelet {namespace}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def pv_for(core: client.CoreV1Api, namespace: str, claim: str) -> Iterator[None]:
    """A PersistentVolume pre-bound to claim `claim` in `namespace`, deleted afterwards."""
    name = f"{namespace}-{claim}"
    volume = {
        "metadata": {"name": name},
        "spec": {
            "capacity": {"storage": "1Ti"},
            "accessModes": ["ReadWriteOnce", "ReadWriteMany"],
            "hostPath": {"path": f"/tmp/{name}"},
            "claimRef": {"namespace": namespace, "name": claim},
            "storageClassName": "",
        },
    }
    core.create_persistent_volume(volume)
    try:
        yield
    finally:
        core.delete_persistent_volume(name)


@contextlib.contextmanager
def bound_claim(core: client.CoreV1Api, namespace: str, claim: str = "checkpoints") -> Iterator[str]:
    """A ReadWriteMany claim `claim` in `namespace`, bound to a volume made for it by `pv_for` (the
    scheduler waits for a bound claim); the volume is deleted afterwards (the claim goes with its
    namespace)."""
    with pv_for(core, namespace, claim):
        core.create_namespaced_persistent_volume_claim(
            namespace,
            {
                "metadata": {"name": claim},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "",
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            },
        )
        yield claim

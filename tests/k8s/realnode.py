"""A real Kubernetes node beside a control plane, for the tests that run the project's own images
(tests/e2e): containerd with runc and the CNI bridge, kubelet, kube-proxy and CoreDNS, all in the
control plane's network namespace (netns.py), with the images of build-images.sh imported.

What this machine needs of them (../shared/REAL-NODE.md has the findings): containerd with
`restrict_oom_score_adj` (root here lacks CAP_SYS_RESOURCE), cgroupfs on cgroup v1 (kubelet 1.35 with
`failCgroupV1: false`), no image pulls (every image is imported; image garbage collection off), DNS
from CoreDNS on the node's address (learner rendezvous and server URLs are names of headless
Services), storage as `local` PersistentVolumes on directories of the work dir.

Nothing outside the work dir is touched but the cgroup subtree `/rlsd-node-<pid>` of each hierarchy
(the kubelet's cgroup root, so that two test beds on one machine never share one) and containerd's
content store, which persists between sessions in the node cache when no other session holds it
(importing the trainer image costs minutes; an unchanged image is never imported again). `stop()`
ends every container and process, unmounts what is under the work dir and removes the cgroups; a
later start reaps what a killed session left.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from typing import IO, Any

from controlplane import ControlPlane, run_build
from kubernetes import client

NODE_NAME = "rlsd-node"
NODE_ADDRESS = "10.200.0.2"
POD_SUBNET = "10.244.0.0/24"
CLUSTER_DOMAIN = "cluster.local"
BUILD_NODE_SCRIPT = Path(__file__).with_name("build-node.sh")
BUILD_IMAGES_SCRIPT = Path(__file__).with_name("build-images.sh")
PAUSE_IMAGE = "registry.k8s.io/pause:rlsd"
CNI_BIN_DIR = Path("/usr/lib/cni")
CGROUP_FS = Path("/sys/fs/cgroup")
COREDNS_READY_PORT = 8181
KUBELET_HEALTHZ_PORT = 10248
# What the images are called in pods (`rlsd/trainer:cpu` is `docker.io/rlsd/trainer:cpu` to containerd).
REGISTRY_PREFIX = "docker.io/"


@functools.cache
def build_node() -> Path:
    """The directory of kubelet, kube-proxy, coredns and pause (build-node.sh)."""
    return run_build(BUILD_NODE_SCRIPT)


@functools.cache
def build_images() -> Path:
    """The directory of the images' OCI archives (build-images.sh)."""
    return run_build(BUILD_IMAGES_SCRIPT)


def image_archives(directory: Path) -> list[Path]:
    return sorted(directory.glob("operator-*.tar")) + sorted(directory.glob("trainer-cpu-*.tar"))


def archive_image(archive: Path) -> tuple[str, str]:
    """(reference, manifest digest) of the one image of an OCI archive, its reference qualified as
    containerd names it."""
    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        assert member is not None
        (manifest,) = json.load(member)["manifests"]
    name = manifest["annotations"]["org.opencontainers.image.ref.name"]
    return qualified(name), manifest["digest"]


def qualified(image: str) -> str:
    """`rlsd/trainer:cpu` -> `docker.io/rlsd/trainer:cpu` (a name with a registry stays as it is)."""
    first = image.split("/", 1)[0]
    return image if "." in first or ":" in first or first == "localhost" else REGISTRY_PREFIX + image


def pause_archive(pause: Path, target: Path) -> Path:
    """An OCI archive of the pause image, the static `pause` binary alone; the same bytes every time
    (so an unchanged binary is never imported twice)."""

    def add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), mode, 0
        tar.addfile(info, io.BytesIO(data))

    layer_buffer = io.BytesIO()
    with tarfile.open(fileobj=layer_buffer, mode="w", format=tarfile.PAX_FORMAT) as layer_tar:
        add(layer_tar, "pause", pause.read_bytes(), 0o755)
    layer = layer_buffer.getvalue()

    def blob(data: bytes, media_type: str) -> tuple[dict[str, Any], bytes]:
        return {
            "mediaType": media_type,
            "digest": f"sha256:{hashlib.sha256(data).hexdigest()}",
            "size": len(data),
        }, data

    layer_desc, _ = blob(layer, "application/vnd.oci.image.layer.v1.tar")
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": ["/pause"]},
            "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
        }
    ).encode()
    config_desc, _ = blob(config, "application/vnd.oci.image.config.v1+json")
    manifest = json.dumps(
        {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
         "config": config_desc, "layers": [layer_desc]}
    ).encode()  # fmt: skip
    manifest_desc, _ = blob(manifest, "application/vnd.oci.image.manifest.v1+json")
    index = {
        "schemaVersion": 2,
        "manifests": [{**manifest_desc, "annotations": {"org.opencontainers.image.ref.name": PAUSE_IMAGE}}],
    }
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as tar:
        add(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        add(tar, "index.json", json.dumps(index).encode())
        for desc, data in ((layer_desc, layer), (config_desc, config), (manifest_desc, manifest)):
            add(tar, f"blobs/sha256/{desc['digest'].removeprefix('sha256:')}", data)
    return target


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cgroup_hierarchies() -> list[Path]:
    """The cgroup v1 hierarchies mounted under /sys/fs/cgroup (one per controller or name)."""
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    return [Path(line.split()[1]) for line in mounts if line.split()[2] == "cgroup"]


def kill_cgroup_tree(name: str) -> None:
    """SIGKILL every process under `/<name>` of every hierarchy, then remove the cgroups (deepest
    first)."""
    for hierarchy in cgroup_hierarchies():
        top = hierarchy / name
        if not top.is_dir():
            continue
        for _ in range(50):
            pids = [int(p) for f in top.rglob("cgroup.procs") for p in f.read_text().split()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for directory in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


def shims_of(address: str | None = None) -> list[int]:
    """Process ids of the containerd runc shims serving `address` (every test bed's when None:
    containerd 1.6 re-parents them, so they outlive containerd)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            argv = cmdline.read_bytes().split(b"\0")
            if not argv[0].endswith(b"containerd-shim-runc-v2") or b"-address" not in argv:
                continue
            served = argv[argv.index(b"-address") + 1].decode()
            if (address is None and served.endswith("/rlsd-node/containerd.sock")) or served == address:
                found.append(int(cmdline.parent.name))
    return found


def unmount_under(directory: Path) -> None:
    """Lazily unmounts every mount point under `directory`, deepest first."""
    prefix = str(directory.resolve()) + "/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(prefix):
            points.append(point)
    for point in sorted(set(points), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def reap_dead_sessions() -> None:
    """What a killed test session left: its containers (whose shims outlive it) and its cgroups."""
    for hierarchy in cgroup_hierarchies():
        for top in hierarchy.glob("rlsd-node-*"):
            match = re.fullmatch(r"rlsd-node-(\d+)", top.name)
            if match and not _pid_alive(int(match.group(1))):
                kill_cgroup_tree(top.name)
    for pid in shims_of():
        address = _shim_address(pid)
        if address and not Path(address).exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _shim_address(pid: int) -> str | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return argv[argv.index(b"-address") + 1].decode()
    return None


class ContentStore:
    """containerd's root directory (content store and snapshots): the node cache's, held by one session
    at a time with a lock, or one of the work dir's when another session holds it."""

    def __init__(self, shared: Path, private: Path) -> None:
        shared.mkdir(parents=True, exist_ok=True)
        self._lock: IO[bytes] | None = (shared.parent / f"{shared.name}.lock").open("wb")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.root = shared
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            self.root = private

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None


class RealNode:
    """One node, `rlsd-node`, with 2 CPUs' worth of this machine; `start()` returns once it is Ready,
    CoreDNS answers and the images are in containerd; `stop()` undoes everything (safe after a failed
    start)."""

    def __init__(self, plane: ControlPlane, assets: Path, images: Path, workdir: Path) -> None:
        assert plane.netns is not None, "a real node runs in the control plane's network namespace"
        self.plane, self.assets, self.images = plane, assets, images
        self.workdir = workdir
        self.cgroup_root = f"rlsd-node-{os.getpid()}"
        self.containerd_dir = workdir / "rlsd-node"  # shims_of() knows test beds by this name
        self.socket = self.containerd_dir / "containerd.sock"
        self.store: ContentStore | None = None
        self.volumes = workdir / "volumes"

    # -- life cycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        reap_dead_sessions()
        for hierarchy in cgroup_hierarchies():
            top = hierarchy / self.cgroup_root
            top.mkdir(exist_ok=True)
            if (hierarchy / "cpuset.cpus").exists():  # a new cpuset takes no task before it has both
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    (top / knob).write_text((hierarchy / knob).read_text())
        self.volumes.mkdir(parents=True, exist_ok=True)
        self._start_containerd(deadline)
        self._import_images()
        self._start_kubelet()
        self._start_kube_proxy()
        self._start_coredns()
        with self.plane.api_client() as api:
            core = client.CoreV1Api(api)

            def ready() -> bool:
                node = core.read_node(NODE_NAME)
                return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])

            self.plane.wait(f"node {NODE_NAME} Ready", ready, deadline)
        ready_url = f"http://{NODE_ADDRESS}:{COREDNS_READY_PORT}/ready"
        self.plane.wait("CoreDNS /ready", lambda: self.plane.http_ok(ready_url), deadline)

    def stop(self) -> None:
        """Pods first (the kubelet stops them as it would), then the node's processes, the containers
        left, the mounts and the cgroups."""
        with contextlib.suppress(Exception):
            self._delete_pods()
        for name in ("coredns", "kube-proxy", "kubelet", "containerd"):
            self.plane.stop_component(name)
        for pid in shims_of(str(self.socket)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        kill_cgroup_tree(self.cgroup_root)
        unmount_under(self.workdir)
        if self.store is not None:
            self.store.release()

    def _delete_pods(self, timeout: float = 30.0) -> None:
        with self.plane.api_client() as api:
            core = client.CoreV1Api(api)
            for pod in core.list_pod_for_all_namespaces().items:
                with contextlib.suppress(client.ApiException):
                    core.delete_namespaced_pod(
                        pod.metadata.name, pod.metadata.namespace, grace_period_seconds=1
                    )
            deadline = time.monotonic() + timeout
            while core.list_pod_for_all_namespaces().items and time.monotonic() < deadline:
                time.sleep(0.5)

    # -- containerd -------------------------------------------------------------------------------

    def ctr(self, *args: str, stdin: IO[bytes] | None = None) -> str:
        result = subprocess.run(
            ["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args],
            stdin=stdin, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def _start_containerd(self, deadline: float) -> None:
        state = self.containerd_dir / "state"
        net_d = self.workdir / "cni" / "net.d"
        for directory in (state, net_d):
            directory.mkdir(parents=True, exist_ok=True)
        cache_root = build_node().parent / "containerd-root"
        self.store = ContentStore(cache_root, self.containerd_dir / "root")
        (net_d / "10-rlsd.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "rlsd",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": "cni0",
                            "isGateway": True,
                            "ipMasq": False,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": POD_SUBNET}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                                "dataDir": str(self.workdir / "cni" / "ipam"),
                            },
                        },
                        {"type": "portmap", "capabilities": {"portMappings": True}},
                        {"type": "loopback"},
                    ],
                },
                indent=2,
            )
        )
        runc = '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc'
        config = f"""version = 2
root = "{self.store.root}"
state = "{state}"
[grpc]
  address = "{self.socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # Root here lacks CAP_SYS_RESOURCE: without this, every sandbox fails ("can't get final child's PID").
  restrict_oom_score_adj = true
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    {runc}]
      runtime_type = "io.containerd.runc.v2"
      {runc}.options]
        SystemdCgroup = false
        Root = "{state / "runc"}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{net_d}"
"""
        path = self.containerd_dir / "config.toml"
        path.write_text(config)
        self.plane.spawn("containerd", f"--config={path}", binary=Path("/usr/bin/containerd"))
        self.plane.wait("containerd", lambda: self.ctr("version"), deadline)
        # Containers of an earlier session that used the same content store (their state is gone).
        stale = self.ctr("containers", "list", "--quiet").split()
        if stale:
            self.ctr("containers", "delete", *stale)

    def _import_images(self) -> None:
        archives = [
            pause_archive(self.assets / "pause", self.workdir / "pause.tar"),
            *image_archives(self.images),
        ]
        present = {}
        for line in self.ctr("images", "list").splitlines()[1:]:
            fields = line.split()
            present[fields[0]] = fields[2]
        for archive in archives:
            reference, digest = archive_image(archive)
            if present.get(reference) == digest:
                continue
            started = time.monotonic()
            with archive.open("rb") as stream:
                self.ctr("images", "import", "-", stdin=stream)
            print(f"realnode: imported {reference} in {time.monotonic() - started:.0f}s", flush=True)

    # -- kubelet, kube-proxy, CoreDNS -------------------------------------------------------------

    def _start_kubelet(self) -> None:
        plane = self.plane
        kubeconfig = plane.kubeconfig_for(f"system:node:{NODE_NAME}", ["system:nodes"], inside=True)
        serving_cert, serving_key = plane.pki.issue(
            "kubelet-serving", f"system:node:{NODE_NAME}", hosts=[NODE_ADDRESS]
        )
        resolv = self.workdir / "resolv.conf"
        resolv.write_text(f"nameserver {NODE_ADDRESS}\n")
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{self.cgroup_root}",
            "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "address": NODE_ADDRESS,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": KUBELET_HEALTHZ_PORT,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(plane.pki.ca_cert)},
            },
            "authorization": {"mode": "Webhook"},
            "tlsCertFile": str(serving_cert),
            "tlsPrivateKeyFile": str(serving_key),
            "clusterDNS": [NODE_ADDRESS],
            "clusterDomain": CLUSTER_DOMAIN,
            "resolvConf": str(resolv),
            "podLogsDir": str(self.workdir / "pod-logs"),
            # Every image is imported, none can be pulled: never collect one.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
            },
            "serializeImagePulls": False,
            "maxPods": 50,
        }
        path = self.workdir / "kubelet-config.json"
        path.write_text(json.dumps(config, indent=2))
        plane.spawn(
            "kubelet",
            f"--config={path}",
            f"--kubeconfig={kubeconfig}",
            f"--root-dir={self.workdir / 'kubelet'}",
            f"--cert-dir={self.workdir / 'kubelet-pki'}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={NODE_ADDRESS}",
            "--v=1",
            binary=self.assets / "kubelet",
        )

    def _start_kube_proxy(self) -> None:
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {
                "kubeconfig": str(self.plane.kubeconfig_for("system:kube-proxy", inside=True))
            },
            "mode": "iptables",
            "hostnameOverride": NODE_NAME,
            "bindAddress": NODE_ADDRESS,
            "healthzBindAddress": f"{NODE_ADDRESS}:10256",
            "metricsBindAddress": f"{NODE_ADDRESS}:10249",
            "clusterCIDR": POD_SUBNET,
            # The connection-tracking table is the machine's, not the namespace's: leave it alone.
            "conntrack": {"maxPerCore": 0},
        }
        path = self.workdir / "kube-proxy-config.json"
        path.write_text(json.dumps(config, indent=2))
        self.plane.spawn("kube-proxy", f"--config={path}", binary=self.assets / "kube-proxy")

    def _start_coredns(self) -> None:
        kubeconfig = self.plane.kubeconfig_for("coredns", ["system:masters"], inside=True)
        corefile = self.workdir / "Corefile"
        corefile.write_text(
            f""".:53 {{
    bind {NODE_ADDRESS}
    errors
    ready {NODE_ADDRESS}:{COREDNS_READY_PORT}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} rlsd-test
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
}}
"""
        )
        self.plane.spawn("coredns", "-conf", str(corefile), binary=self.assets / "coredns")

    # -- storage ----------------------------------------------------------------------------------

    def local_volume(
        self, name: str, claim: tuple[str, str] | None = None, storage: str = "10Gi"
    ) -> dict[str, Any]:
        """A `local` PersistentVolume on a new directory of the node (the kubelet gives it the pods'
        fsGroup), ReadWriteOnce and ReadWriteMany (one node), pre-bound to `claim` (namespace, name)."""
        path = self.volumes / name
        path.mkdir(parents=True, exist_ok=True)
        spec: dict[str, Any] = {
            "capacity": {"storage": storage},
            "accessModes": ["ReadWriteOnce", "ReadWriteMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "local": {"path": str(path)},
            "nodeAffinity": {
                "required": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": "kubernetes.io/hostname", "operator": "In", "values": [NODE_NAME]}
                            ]
                        }
                    ]
                }
            },
        }
        if claim is not None:
            spec["claimRef"] = {"namespace": claim[0], "name": claim[1]}
        return {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name}, "spec": spec}

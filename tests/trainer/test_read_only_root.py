"""The learner and the rollout and teacher servers run with the posture the operator gives their pods
(rlsd_operator.security): as user 1000 without capabilities or privilege escalation, with a read-only
root filesystem, and with only the pod's emptyDirs and checkpoint volume writable, the environment
pointing the libraries at them.

A mount namespace stands in for the container (it needs root, as `make test` has in CI): every mount
is remounted read-only, tmpfs file systems stand in for the emptyDirs at the pods' paths, a bind mount
for the checkpoint volume, and the processes run in a user namespace as uid 1000 with no
capabilities and `no_new_privs`. What this cannot show: seccomp's RuntimeDefault profile (the
container runtime's), and vLLM and CUDA, which need a GPU.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from processes import Server, free_port, kill_session, wait_healthy
from test_distributed import SEED, TASK, final_weights, run_config

from rlsd_contracts.config import EmbeddedTaskSection
from rlsd_operator import security
from rlsd_trainer.model.embedded import build_model_dir

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
REPOSITORY = Path(__file__).resolve().parents[2]
CHECKPOINTS = "/mnt/checkpoints"  # the pods' checkpoint.mountPath (any path; this one has a parent to cover)
STEPS = 2


def sandbox_script(volume: Path) -> str:
    """The shell script that builds the pod's file systems in a new mount namespace, then runs "$@" as
    the pods' user, without capabilities, with only the pod's environment."""
    writable = [CHECKPOINTS, *security.WRITABLE_DIRS.values()]  # the volume first: /tmp hides its source
    # The "image": this checkout and its venv, which the writable mounts may hide (a clone under /tmp).
    # Each is held open before the mounts and bound back at its path afterwards, read-only below.
    image = sorted({str(REPOSITORY), str(Path(sys.prefix).resolve())})
    lines = ["set -euo pipefail"]
    lines += [f"exec {3 + i}<{shlex.quote(path)}" for i, path in enumerate(image)]
    for path in writable:
        parent = Path(path).parent
        if not Path(path).exists():
            # The container runtime creates mount points; here the parent (which has no other mount
            # point in it) is covered by an empty tmpfs holding it, made read-only below like the rest.
            assert parent.exists() and parent != Path("/"), f"no parent to cover for {path}"
            assert not any(Path(other).parent == parent for other in writable if other != path), path
            lines.append(f"mount -t tmpfs -o mode=0755 tmpfs {parent}")
            lines.append(f"mkdir -p {path}")
        if path == CHECKPOINTS:
            lines.append(f"mount --bind {volume} {path}")
        else:
            lines.append(f"mount -t tmpfs -o mode=1777 tmpfs {path}")  # an emptyDir is world-writable
    for i, path in enumerate(image):
        # --no-canonicalize: mount must follow the descriptor, not the path it names (now covered).
        lines += [
            f"mkdir -p {shlex.quote(path)}",
            f"mount --no-canonicalize --bind /proc/self/fd/{3 + i} {shlex.quote(path)}",
            f"exec {3 + i}<&-",
        ]
    keep = "|".join(["/proc*", "/sys*", "/dev*", *writable])
    lines += [
        # Every other mount read-only: the image's root filesystem and whatever else is visible.
        "awk '{print $5}' /proc/self/mountinfo | sort -u | while read -r point; do",
        f'  case "$point" in {keep}) continue;; esac',
        '  [ -e "$point" ] || continue  # hidden under a covered parent',
        '  mount -o remount,bind,ro "$point"',
        "done",
    ]
    environment = {
        "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).parent),  # the reward callables of verifier_fixtures
        **{variable["name"]: variable["value"] for variable in security.writable_env()},
    }
    user, group = security.RUN_AS_USER, security.RUN_AS_GROUP
    # Mapping uid 0 of the parent namespace needs CAP_SETFCAP (Linux >= 5.12): the only one kept until
    # the user namespace exists; inside it the processes are uid 1000 and hold none.
    lines.append(
        "exec setpriv --no-new-privs --inh-caps=-all --bounding-set=-all,+setfcap -- "
        f"unshare --user --map-user={user} --map-group={group} -- "
        f'env -i {" ".join(shlex.quote(f"{k}={v}") for k, v in environment.items())} "$@"'
    )
    return "\n".join(lines)


def sandboxed(volume: Path, *command: str) -> list[str]:
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "bash",
        "-c",
        sandbox_script(volume),
        "pod",
        *command,
    ]


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    """The checkpoint volume, with the embedded model the servers load."""
    if os.geteuid() != 0:
        pytest.fail("building the pods' file systems needs root (mount namespaces); run the suite as root")
    directory = tmp_path / "volume"
    build_model_dir(directory / "embedded-model", EmbeddedTaskSection(**TASK), SEED)
    return directory


PROBE = """
import errno, os, sys
for path in sys.argv[1:]:
    try:
        with open(os.path.join(path, ".probe"), "w"):
            pass
        print(path, "writable")
    except OSError as exc:
        print(path, errno.errorcode[exc.errno])
print("uid", os.getuid(), "caps", open("/proc/self/status").read().split("CapEff:")[1].split()[0])
"""


def test_the_sandbox_is_what_the_pods_get(volume: Path) -> None:
    """The control: only the pods' writable places accept a file; the user is 1000, without capabilities."""
    places = [
        *security.WRITABLE_DIRS.values(),
        CHECKPOINTS,
        "/",
        "/etc",
        str(BIN),
        str(Path.cwd()),
        os.environ.get("HOME", "/root"),
    ]
    result = subprocess.run(
        sandboxed(volume, "python", "-c", PROBE, *places), capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    found = dict(line.rsplit(" ", 1) for line in result.stdout.splitlines()[:-1])
    assert found == {
        **{path: "writable" for path in [*security.WRITABLE_DIRS.values(), CHECKPOINTS]},
        **{path: "EROFS" for path in places[4:]},
    }
    assert result.stdout.splitlines()[-1] == f"uid {security.RUN_AS_USER} caps 0000000000000000"
    assert (volume / ".probe").exists()  # the checkpoint volume is the host's directory


def test_learner_rollout_and_teacher_run_with_a_read_only_root(volume: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    model = f"{CHECKPOINTS}/embedded-model"
    started: dict[str, list[Server]] = {}
    processes = []
    try:
        for role in ("rollout", "teacher"):
            port = free_port()
            log = logs / f"{role}.log"
            command = ["rlsd-trainer", "serve", role, "--model", model, "--port", str(port)]
            command += ["--served-model-name", "policy", "--weight-transfer-config", '{"backend": "gloo"}']
            with log.open("wb") as sink:
                process = subprocess.Popen(sandboxed(volume, *command), stdout=sink, stderr=subprocess.STDOUT)
            processes.append(process)
            started[role] = [Server(process, f"http://127.0.0.1:{port}", log)]
        wait_healthy([s for group in started.values() for s in group])

        # The config the learner reads, with the paths it has in the pod.
        host = run_config(tmp_path / "config", started, run={"total_steps": STEPS}, checkpoint={"every": 1})
        config = yaml.safe_load(host.read_text())
        config["run"]["output_dir"] = CHECKPOINTS
        config["algorithm"]["lam"]["decay_steps"] = STEPS
        (volume / "run.yaml").write_text(yaml.safe_dump(config))
        learner = [
            "rlsd-trainer",
            "learner",
            "--config",
            f"{CHECKPOINTS}/run.yaml",
            "--nproc-per-node",
            "1",
            "--standalone",
        ]
        log = logs / "learner.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                sandboxed(volume, *learner), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )
        processes.append(process)
        assert process.wait(timeout=600) == 0, log.read_text()[-5000:]
    finally:
        for process in processes:
            kill_session(process)
    text = "\n".join(p.read_text(errors="replace") for p in logs.glob("*.log"))
    assert "Read-only file system" not in text and "Permission denied" not in text, text[-5000:]
    assert final_weights(volume)  # written on the checkpoint volume
    assert sorted(p.name for p in (volume / "checkpoints").iterdir())[-1] == f"step-{STEPS:08d}"
    shutil.rmtree(volume / "checkpoints")

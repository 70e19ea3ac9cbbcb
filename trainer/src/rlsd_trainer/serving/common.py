"""What the rollout and teacher servers share: the served model behind one lock, the weight-version
label it serves, vLLM 0.33.0's RL routes (see `weights/wire.py`), `/health`, `/v1/models`,
`/metrics`, and 4xx answers that name the offending field.

Requests run one at a time (the lock), so an answer depends only on the request and the weights,
never on what else the server is doing: the same request gives the same tokens on every replica.
Errors use the OpenAI/vLLM shape `{"error": {"message", "type", "param", "code"}}`; a weight route
called out of order is answered 500, as vLLM answers its worker's RuntimeError.

The RL routes behave as vLLM's (vllm/entrypoints/rl/online/api_router.py, v1/worker/gpu_worker.py,
v1/engine/core.py): the label is "default" until an update names one; one update session at a time;
`/pause` (mode `wait` only: a running request always completes here) turns new generation and
scoring requests away with 503 until `/resume`, as vLLM's engine core does (a retryable
`engine_paused` error; clients wait and retry); `/collective_rpc` runs `reload_weights` from a
safetensors directory. Where vLLM has `nccl`, these servers receive over `gloo` (our own backend).
"""

from __future__ import annotations

import importlib
import inspect
import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, StrictStr, ValidationError
from transformers import PreTrainedModel

from rlsd_contracts.config import ModelSection
from rlsd_trainer.model.loading import LoadedModel, load_model
from rlsd_trainer.weights.receiver import WeightReceiver, read_policy
from rlsd_trainer.weights.wire import STARTING_WEIGHTS, ReloadKwargs, TransferError, UpdateOrderError

_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class RequestError(Exception):
    """A request the server refuses; answered with `status` and the field (`param`) at fault."""

    def __init__(self, param: str, message: str, status: int = 400) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.status = status


class GenerationPaused(Exception):
    """A request that came while generation is paused: vLLM's engine core rejects it
    (v1/engine/core.py `_reject_add_while_paused`), and its server answers 503 with this message."""

    MESSAGE = "Generation is paused. Please retry after it resumes."


def _error(status: int, message: str, param: str | None) -> JSONResponse:
    body = {"message": message, "type": _ERROR_TYPES.get(status, "Error"), "param": param, "code": status}
    return JSONResponse({"error": body}, status_code=status)


def _field_path(loc: Sequence[str | int]) -> str:
    """`("groups", 0, "prompt_ids")` -> `groups[0].prompt_ids`."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path


def _describe_errors(errors: Sequence[Any], prefix: str = "") -> tuple[str, str]:
    """(param, message) for pydantic/FastAPI errors, naming the first offending field."""
    messages, first = [], None
    for error in errors:
        loc = [part for part in error["loc"] if part != "body"]
        if error["type"] == "json_invalid":
            param, text = "body", f"body: invalid JSON: {error.get('ctx', {}).get('error', error['msg'])}"
        else:
            param = _field_path([*([prefix] if prefix else []), *loc]) or "body"
            text = f"{param}: {error['msg'].removeprefix('Value error, ')}"
        first = first or param
        messages.append(text)
    return first or "body", "; ".join(messages)


class ServerMetrics:
    """The Prometheus series of one server, named `rlsd_<role>_*`."""

    def __init__(self, role: str, work_unit: str, work_help: str) -> None:
        self.registry = CollectorRegistry()
        prefix = f"rlsd_{role}"
        self.requests = Counter(
            f"{prefix}_requests", f"{role} requests handled, by outcome", ["outcome"], registry=self.registry
        )
        self.tokens = Counter(f"{prefix}_{work_unit}", work_help, registry=self.registry)
        self.latency = Histogram(
            f"{prefix}_request_latency_seconds",
            f"Time from receiving a {role} request to answering it (waiting included)",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            f"{prefix}_requests_in_flight",
            f"{role} requests received, not yet answered",
            registry=self.registry,
        )
        self.policy_version = Gauge(
            f"{prefix}_policy_version", "Policy version served", registry=self.registry
        )
        self.weight_updates = Counter(
            f"{prefix}_weight_updates", "Weight updates applied", registry=self.registry
        )

    @contextmanager
    def track(self) -> Iterator[None]:
        self.in_flight.inc()
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.requests.labels("error").inc()
            raise
        else:
            self.requests.labels("ok").inc()
        finally:
            self.in_flight.dec()
            self.latency.observe(time.perf_counter() - start)


class ModelHost:
    """The served model, the weight-version label it holds, the lock every use of it takes, and
    vLLM's pause: while paused, new requests are turned away (`GenerationPaused`)."""

    def __init__(
        self,
        model: PreTrainedModel,
        receiver: WeightReceiver,
        metrics: ServerMetrics,
        served_name: str,
        model_path: str,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.receiver = receiver
        self.metrics = metrics
        self.served_name = served_name
        self.model_path = model_path
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.lock = threading.Lock()
        # Weight routes run one at a time, as vLLM's worker runs its collective RPCs.
        self.transfer_lock = threading.Lock()
        self.label = STARTING_WEIGHTS
        self._admission = threading.Lock()  # pausing vs admitting a request
        self._paused = False

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.served_name:
            raise RequestError("model", f"The model `{name}` does not exist.", status=404)

    def check_token_ids(self, param: str, ids: Sequence[int]) -> None:
        for position, token in enumerate(ids):
            if not 0 <= token < self.vocab_size:
                raise RequestError(
                    f"{param}[{position}]",
                    f"token id {token} is outside the vocabulary [0, {self.vocab_size})",
                )

    @contextmanager
    def serving(self) -> Iterator[str]:
        """Hold the model for one request; yields the label it serves. Refused while paused."""
        with self._admission:
            if self._paused:
                raise GenerationPaused(GenerationPaused.MESSAGE)
            self.lock.acquire()
        try:
            yield self.label
        finally:
            self.lock.release()

    def pause(self) -> None:
        """Turn new requests away and wait for the running one to finish."""
        with self._admission:
            self._paused = True
        with self.lock:
            pass

    def resume(self) -> None:
        with self._admission:
            self._paused = False

    @property
    def paused(self) -> bool:
        return self._paused

    def set_label(self, label: str) -> None:
        self.label = label
        if label.isdigit():
            self.metrics.policy_version.set(int(label))

    def apply(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load a complete update (all checked first, so a bad one changes nothing)."""
        params = dict(self.model.named_parameters())
        for name, tensor in tensors.items():
            if name not in params:
                raise RequestError("update_info.names", f"unknown parameter {name!r}")
            if tensor.shape != params[name].shape:
                raise RequestError(
                    "update_info.shapes",
                    f"{name}: shape {list(tensor.shape)} is not the model's {list(params[name].shape)}",
                )
        with self.lock, torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor)
        self.metrics.weight_updates.inc()


class InitRequest(BaseModel):
    init_info: dict[str, Any]


class UpdateRequest(BaseModel):
    update_info: dict[str, Any]


class FinishRequest(BaseModel):
    weight_version: StrictStr | None = None


class VersionRequest(BaseModel):
    new_version: StrictStr


class RpcRequest(BaseModel):
    method: str
    kwargs: dict[str, Any] = {}


def _weight_router(host: ModelHost) -> APIRouter:
    """vLLM's RL routes (vllm/entrypoints/rl/online/api_router.py) and its dev `/collective_rpc`
    (reload_weights only), same bodies and answers."""
    router = APIRouter()
    receiver = host.receiver

    @router.post("/init_weight_transfer_engine")
    def init_weight_transfer_engine(request: InitRequest) -> dict[str, str]:
        with host.transfer_lock:
            try:
                receiver.init(request.init_info)
            except ValidationError as exc:
                raise RequestError(*_describe_errors(exc.errors(), "init_info")) from exc
        return {"message": "Weight transfer initialized"}

    @router.post("/shutdown_weight_transfer_engine")
    def shutdown_weight_transfer_engine() -> dict[str, str]:
        with host.transfer_lock:
            receiver.shutdown()
        return {"message": "Weight transfer shut down"}

    @router.post("/start_weight_update")
    def start_weight_update() -> dict[str, str]:
        with host.transfer_lock:
            receiver.start()
        return {"message": "Weight update started"}

    @router.post("/update_weights")
    def update_weights(request: UpdateRequest) -> dict[str, str]:
        with host.transfer_lock:
            try:
                receiver.receive(request.update_info)
            except ValidationError as exc:
                raise RequestError(*_describe_errors(exc.errors(), "update_info")) from exc
        return {"message": "Weights updated"}

    @router.post("/finish_weight_update")
    def finish_weight_update(request: FinishRequest | None = None) -> dict[str, str]:
        with host.transfer_lock:
            host.apply(receiver.finish())
            if request is not None and request.weight_version is not None:
                host.set_label(request.weight_version)
        return {"message": "Weight update finished"}

    @router.post("/update_weight_version")
    def update_weight_version(request: VersionRequest) -> dict[str, Any]:
        host.set_label(request.new_version)
        return {"success": True, "new_version": request.new_version}

    @router.get("/weight_info")
    def weight_info() -> dict[str, str]:
        # Behind the weight routes, as vLLM's engine core answers it behind the utility call in
        # progress: a transfer stuck on a dead peer stalls it there too (what liveness probes see).
        with host.transfer_lock:
            return {"weight_version": host.label}

    @router.get("/get_world_size")
    def get_world_size() -> dict[str, int]:
        return {"world_size": 1}

    @router.post("/pause")
    def pause(mode: str = "abort", clear_cache: bool = True) -> dict[str, str]:
        # Nothing to clear: every request builds its own KV cache.
        del clear_cache
        if mode != "wait":
            raise RequestError(
                "mode", f"pause mode {mode!r} is not supported by this CPU server; use mode=wait"
            )
        host.pause()
        return {"status": "paused"}

    @router.post("/resume")
    def resume() -> dict[str, str]:
        host.resume()
        return {"status": "resumed"}

    @router.get("/is_paused")
    def is_paused() -> dict[str, bool]:
        return {"is_paused": host.paused}

    @router.post("/collective_rpc")
    def collective_rpc(request: RpcRequest) -> dict[str, list[None]]:
        if request.method != "reload_weights":
            raise RequestError(
                "method", f"{request.method!r}: this CPU server runs only 'reload_weights' over RPC"
            )
        with host.transfer_lock:
            try:
                tensors = read_policy(ReloadKwargs.model_validate(request.kwargs).weights_path)
            except ValidationError as exc:
                raise RequestError(*_describe_errors(exc.errors(), "kwargs")) from exc
            host.apply(tensors)
        return {"results": [None]}

    return router


def create_app(role: str, host: ModelHost, role_router: APIRouter) -> FastAPI:
    app = FastAPI(title=f"rlsd {role} server")
    app.state.host = host

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        param, message = _describe_errors(exc.errors())
        return _error(400, message, param)

    @app.exception_handler(RequestError)
    async def _refused(_: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, str(exc), exc.param)

    @app.exception_handler(GenerationPaused)
    async def _paused(_: Request, exc: GenerationPaused) -> JSONResponse:
        return _error(503, str(exc), None)

    @app.exception_handler(UpdateOrderError)
    async def _out_of_order(_: Request, exc: UpdateOrderError) -> JSONResponse:
        return _error(500, str(exc), None)

    @app.exception_handler(TransferError)
    async def _transfer_failed(_: Request, exc: TransferError) -> JSONResponse:
        return _error(500, str(exc), None)

    @app.get("/health")
    def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(host.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        card = {
            "id": host.served_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "rlsd",
            "root": host.model_path,
            "parent": None,
        }
        return {"object": "list", "data": [card]}

    app.include_router(_weight_router(host))
    app.include_router(role_router)
    return app


def add_middleware(app: FastAPI, import_paths: Sequence[str]) -> None:
    """vLLM's `--middleware`, with its rules (vllm/entrypoints/serve/middleware/register.py): a class is
    added as ASGI middleware, a coroutine function as HTTP middleware, anything else refused. A
    class is built here, not at the first request, so a misconfigured one stops the server."""
    for path in import_paths:
        module_path, _, name = path.rpartition(".")
        imported = getattr(importlib.import_module(module_path), name)
        if inspect.isclass(imported):
            app.add_middleware(imported)
        elif inspect.iscoroutinefunction(imported):
            app.middleware("http")(imported)
        else:
            raise ValueError(f"{path} must be a middleware class or a coroutine function")
    app.middleware_stack = app.build_middleware_stack()


def serve(app: FastAPI, host: str, port: int) -> None:
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


def check_transfer_config(text: str) -> None:
    """`--weight-transfer-config` (vLLM's flag, a JSON object with "backend"): these servers receive
    over gloo only (and reload from a directory with any backend, as vLLM)."""
    try:
        backend = json.loads(text).get("backend")
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"--weight-transfer-config must be a JSON object, got {text!r}") from exc
    if backend != "gloo":
        raise ValueError(
            f"--weight-transfer-config: backend must be 'gloo', got {backend!r} (nccl is vLLM's; this CPU "
            "server receives over gloo, or reloads from a shared directory whatever the backend)"
        )


def load_host(
    role: str,
    work_unit: str,
    work_help: str,
    model_path: str,
    served_name: str | None,
    dtype: str,
    transfer_timeout_s: float,
) -> tuple[ModelHost, LoadedModel]:
    """Load the model a server starts with (the initial policy) and wrap it for serving."""
    loaded = load_model(model_path, ModelSection(dtype=dtype))
    host = ModelHost(
        loaded.model,
        WeightReceiver(transfer_timeout_s),
        ServerMetrics(role, work_unit, work_help),
        served_name or model_path,
        model_path,
    )
    return host, loaded

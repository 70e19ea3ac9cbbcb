"""Only a run may steer its vLLM servers, proven with vLLM's own code over real HTTP.

The operator's `vllm serve` command is parsed by vLLM's own CLI parser; vLLM's own registration
(`init_entrypoints_middleware`, what `vllm serve` runs) adds the middleware that command names to an
app with vLLM's RL and dev routes, its /health and its /metrics (vllm_engine.py). Then every route
of that app refuses a request without the run's token, or with another (401), /health and /metrics
answer anyone, and the token opens the rest with vLLM's normal answers. The control: vLLM's own
`--api-key` leaves the RL routes open, which is why the middleware exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from loopback import Served
from test_vllm_serve_args import MINIMAL_VLLM_RUN, cpu_platform, parse_vllm_serve, vllm_pods
from tiny_models import tiny_model
from vllm.entrypoints.serve.instrumentator.metrics import attach_router
from vllm.entrypoints.serve.middleware.register import init_entrypoints_middleware
from vllm_engine import StandInEngineClient, build_vllm_app, starting_label

from rlsd_contracts.wire import OPEN_PATHS, RUN_TOKEN_FILE_ENV, RUN_TOKEN_MIDDLEWARE

_FIXTURES = (cpu_platform,)  # imported for its fixture: the parser's defaults need a platform
TOKEN = "the-runs-token"


def vllm_app(argv: list[str]) -> Any:
    """vLLM's app for `vllm <argv>`: its routes on a stand-in engine, its metrics, and the middleware
    of its own registration, from the arguments its own parser made."""
    args = parse_vllm_serve(argv)
    app = build_vllm_app(StandInEngineClient(dict(tiny_model().state_dict())))
    attach_router(app)
    init_entrypoints_middleware(args, app, ("generate",))
    return app


def routes(app: Any) -> list[tuple[str, str]]:
    """(method, path) of every route and mount of the app (the mount answers GET)."""
    found = []
    for route in app.routes:
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method != "HEAD":
                found.append((method, route.path))
    return found


@pytest.fixture
def token_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    monkeypatch.setenv(RUN_TOKEN_FILE_ENV, str(path))
    return path


def test_vllm_started_as_the_operator_starts_it_answers_only_the_runs_pods(token_file: Path) -> None:
    (pod,) = vllm_pods(MINIMAL_VLLM_RUN)
    command = pod["spec"]["containers"][0]["command"]
    assert parse_vllm_serve(command[1:]).middleware == [RUN_TOKEN_MIDDLEWARE]
    app = vllm_app(command[1:])
    served = Served(app)
    try:
        table = routes(app)
        guarded = [(method, path) for method, path in table if path not in OPEN_PATHS]
        for needed in ("/pause", "/resume", "/init_weight_transfer_engine", "/update_weights",
                       "/update_weight_version", "/collective_rpc", "/weight_info"):  # fmt: skip
            assert any(path == needed for _, path in guarded), needed
        for method, path in guarded:
            for headers in ({}, {"Authorization": "Bearer someone-elses-token"}):
                answer = httpx.request(method, served.url + path, json={}, headers=headers, timeout=10)
                assert answer.status_code == 401, (method, path, headers, answer.text)
        for path in OPEN_PATHS:
            assert httpx.get(served.url + path, timeout=10).status_code == 200, path
        allowed = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.get(served.url + "/weight_info", headers=allowed).json() == {
            "weight_version": starting_label()
        }
        assert httpx.post(served.url + "/pause?mode=wait", headers=allowed).status_code == 200
        assert httpx.get(served.url + "/is_paused", headers=allowed).json() == {"is_paused": True}
        assert httpx.post(served.url + "/resume", headers=allowed).status_code == 200
        assert httpx.get(served.url + "/is_paused", headers=allowed).json() == {"is_paused": False}
    finally:
        served.stop()


def test_vllms_own_api_key_leaves_the_rl_routes_open() -> None:
    """Why the run needs a middleware of its own: `--api-key` guards /v1, /v2, /inference and /cohere
    only; whoever reaches the pod may pause it, or push weights, without it."""
    app = vllm_app(["serve", "m", "--api-key", TOKEN])
    served = Served(app)
    try:
        assert httpx.post(served.url + "/pause?mode=wait").status_code == 200
        assert httpx.get(served.url + "/is_paused").json() == {"is_paused": True}
        assert httpx.get(served.url + "/v1/models").status_code == 401
    finally:
        served.stop()

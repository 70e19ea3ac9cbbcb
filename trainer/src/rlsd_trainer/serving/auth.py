"""The run's credential on the servers and in their clients: only a run's own pods may steer its
servers.

`RunTokenMiddleware` is a plain ASGI middleware, for our CPU servers and for vLLM (whose `--middleware`
flag takes an import path: the operator passes `rlsd_contracts.wire.RUN_TOKEN_MIDDLEWARE`): every
request must carry `Authorization: Bearer <the run's token>`, but those to `OPEN_PATHS` (/health for
the kubelet's probes, /metrics for Prometheus). vLLM's own `--api-key` guards only /v1, /v2,
/inference and /cohere; its RL routes (weight transfer, pause, /collective_rpc) stay open under it.

The token is read from the file RLSD_RUN_TOKEN_FILE names (a Secret mounted by the operator); a
middleware without one refuses everything (fail closed), and `authorization_headers` gives clients
the header, or nothing when no token is configured (one machine, loopback).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from rlsd_contracts.run_token import RunTokenError, run_token
from rlsd_contracts.wire import OPEN_PATHS, RUN_TOKEN_FILE_ENV

log = logging.getLogger(__name__)
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def authorization_headers() -> dict[str, str]:
    """What a client of the run's servers sends with every request."""
    token = run_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _open(path: str) -> bool:
    return any(path == open_path or path.startswith(open_path + "/") for open_path in OPEN_PATHS)


class RunTokenMiddleware:
    """Refuses (401) every HTTP or WebSocket request without the run's token, but to OPEN_PATHS."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        token = run_token()
        if token is None:
            raise RunTokenError(f"{RUN_TOKEN_FILE_ENV} is not set: this server would have no credential")
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"")
        if _open(path) or hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        log.warning(
            "refused %s %s: %s run token", scope.get("method", "WS"), path, "wrong" if given else "no"
        )
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        error = {
            "message": "this run's servers answer only its own pods: send Authorization: Bearer <run token>",
            "type": "AuthenticationError",
            "param": None,
            "code": 401,
        }
        body = json.dumps({"error": error}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

"""JSON over HTTP to our servers, with errors that say which server failed and how.

Every client-side call to a rollout or teacher server goes through `call_json`, so retry decisions
need only one question: `HttpCallError.retryable` (the server or the network failed, so another
replica or another try may succeed) or not (the server rejected the request: a bug to surface).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

import httpx

T = TypeVar("T")
R = TypeVar("R")


class HttpCallError(RuntimeError):
    """A call to `url` failed; `status` is the HTTP status, or None when no answer came."""

    def __init__(self, url: str, cause: str, status: int | None = None) -> None:
        super().__init__(f"{url}: {cause}")
        self.url = url
        self.cause = cause
        self.status = status

    @property
    def retryable(self) -> bool:
        # 409: the server's state is not what we assumed (say, it restarted mid-update).
        return self.status is None or self.status >= 500 or self.status == 409


def call_json(
    http: httpx.Client,
    method: str,
    url: str,
    path: str,
    body: dict[str, Any] | None = None,
    timeout_s: float | None = None,
) -> Any:
    """The decoded JSON answer (None for an empty body) of `method url+path`; raises HttpCallError."""
    target = url + path
    timeout = httpx.USE_CLIENT_DEFAULT if timeout_s is None else timeout_s
    # A GET is tried twice on a broken connection: vLLM's server (uvicorn) closes a connection after
    # answering an error from its exception handlers, so a pooled one may be dead when reused.
    for attempt in range(2 if method == "GET" else 1):
        try:
            response = http.request(method, target, json=body, timeout=timeout)
            break
        except httpx.TransportError as exc:
            if method == "GET" and attempt == 0:
                continue
            raise HttpCallError(target, f"{type(exc).__name__}: {exc or 'no answer'}") from exc
        except httpx.HTTPError as exc:
            raise HttpCallError(target, f"{type(exc).__name__}: {exc or 'no answer'}") from exc
    if response.status_code >= 400:
        raise HttpCallError(
            target, f"HTTP {response.status_code}: {response.text[:500]}", response.status_code
        )
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError as exc:
        raise HttpCallError(target, f"answer is not JSON: {response.text[:200]!r}") from exc


def fan_out(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """`fn` on every item at once (one thread each); results in item order, first failure raised."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(fn, items))


def run_together(main: Callable[[], R], side: Sequence[Callable[[], object]]) -> R:
    """Run `main` and every `side` call concurrently; return `main`'s result once all succeeded.

    Collective rendezvous needs this: the learner's broadcast and the servers' HTTP calls that make
    them receive it must be in flight together. The first failure is raised at once instead of
    after the others time out (their threads are left to finish on their own).
    """
    pool = ThreadPoolExecutor(max_workers=1 + len(side))
    try:
        main_future = pool.submit(main)
        futures: list[Future[Any]] = [main_future, *(pool.submit(call) for call in side)]
        # Returns when one call raised, or else when all have finished.
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            if future in done and (error := future.exception()) is not None:
                raise error
        return main_future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)

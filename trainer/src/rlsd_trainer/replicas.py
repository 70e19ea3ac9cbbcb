"""The replicas of one remote role (rollout or teacher): which can serve, spreading work, retrying.

Shared by `RemoteRolloutEngine` and `RemoteTeacherClient`. A replica can serve when `/health`
answers and it holds the current policy version: `/weight_info` reports the version it serves
(`null` for the weights it started with, version 0), which also catches a replica that restarted
with its initial weights; where that route is missing (older vLLM), the version we last pushed to it
counts. Work is cut into requests by the caller; request i goes to a ready replica chosen by i, and
on a network or server failure (never on a 4xx, which is a bug to surface) to the next one, up to
`max_retries` more times. A replica that missed a weight update sits out until the next one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import torch

from rlsd_trainer.httpjson import HttpCallError, call_json, fan_out
from rlsd_trainer.weight_transfer import TransferKind, make_sender

T = TypeVar("T")
R = TypeVar("R")

HEALTH_TIMEOUT_S = 5.0


class ReplicaError(RuntimeError):
    """No replica could serve a request; the message names every URL tried and why it failed."""


@dataclass(frozen=True)
class Probe:
    url: str
    version: int | None  # None: not reachable or not healthy
    cause: str = ""


class ReplicaSet:
    def __init__(
        self,
        urls: Sequence[str],
        weight_transfer: TransferKind,
        transfer_host: str,
        transfer_port: int,
        shared_dir: Path | None,
        request_timeout_s: float,
        max_retries: int,
        role: str,
        error: type[ReplicaError],
    ) -> None:
        if not urls:
            raise ValueError(f"no {role} server URLs given")
        self.urls = [url.rstrip("/") for url in urls]
        self.max_retries = max_retries
        self.role = role
        self.error = error
        self.http = httpx.Client(timeout=request_timeout_s)
        self.sender = make_sender(
            weight_transfer, self.http, transfer_host, transfer_port, shared_dir, request_timeout_s
        )
        self.policy_version = 0
        self.pushed = dict.fromkeys(self.urls, 0)

    def probe(self) -> list[Probe]:
        return fan_out(self._probe, self.urls)

    def _probe(self, url: str) -> Probe:
        try:
            call_json(self.http, "GET", url, "/health", timeout_s=HEALTH_TIMEOUT_S)
        except HttpCallError as exc:
            return Probe(url, None, exc.cause)
        try:
            reported = call_json(self.http, "GET", url, "/weight_info", timeout_s=HEALTH_TIMEOUT_S)
        except HttpCallError as exc:
            if exc.status == 404:
                return Probe(url, self.pushed[url])
            return Probe(url, None, exc.cause)
        version = reported.get("weight_version") if isinstance(reported, dict) else None
        try:
            return Probe(url, 0 if version is None else int(version))
        except ValueError:
            return Probe(url, None, f"serves weight_version {version!r}, which is none of ours")

    def _ready(self) -> list[str]:
        probes = self.probe()
        ready = [p.url for p in probes if p.version == self.policy_version]
        if not ready:
            raise self.error(
                f"no {self.role} server can serve policy version {self.policy_version}: "
                + "; ".join(_describe(p, self.policy_version) for p in probes)
            )
        return ready

    def map(self, requests: Sequence[T], call: Callable[[str, T], R]) -> list[R]:
        """`call(url, request)` for every request, concurrently, each on a ready replica (retried on
        another after a failure); results in request order."""
        ready = self._ready()
        failed: dict[str, str] = {}

        def attempt(index: int) -> R:
            start = index % len(ready)
            order = ready[start:] + ready[:start]
            # Skip replicas that already failed in this call, unless none is left.
            order = [url for url in order if url not in failed] or order
            causes = []
            for url in order[: self.max_retries + 1]:
                try:
                    return call(url, requests[index])
                except HttpCallError as exc:
                    if not exc.retryable:
                        raise self.error(f"{self.role} server rejected request {index}: {exc}") from exc
                    failed[url] = exc.cause
                    causes.append(str(exc))
            raise self.error(
                f"{self.role} request {index} failed on every server tried: " + "; ".join(causes)
            )

        return fan_out(attempt, range(len(requests)))

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Push the weights to every live replica; retried (on a new group) when one fails mid-way.

        `named_tensors` is consumed once (under FSDP every rank gathers in step), into one CPU copy
        that a retry can send again."""
        tensors = [(name, tensor.detach().to("cpu")) for name, tensor in named_tensors]
        causes: list[str] = []
        for _ in range(self.max_retries + 1):
            probes = [p for p in self.probe() if p.version is not None]
            live = [p.url for p in probes]
            if not live:
                causes.append("no server is live")
                break
            if any(p.version != self.pushed[p.url] for p in probes):
                self.sender.close()  # a replica restarted (or missed a push): build a new group
            try:
                self.sender.push(live, tensors, version)
            except RuntimeError as exc:  # HTTP, transfer-group and torch.distributed failures
                if isinstance(exc, HttpCallError) and not exc.retryable:
                    raise self.error(f"{self.role} server rejected policy version {version}: {exc}") from exc
                causes.append(f"push to {live} failed: {exc}")
                continue
            self.pushed.update(dict.fromkeys(live, version))
            self.policy_version = version
            return
        raise self.error(
            f"could not push policy version {version} to the {self.role} servers {self.urls}: "
            + "; ".join(causes)
        )

    def close(self) -> None:
        self.sender.close()
        self.http.close()


def _describe(probe: Probe, wanted: int) -> str:
    if probe.version is None:
        return f"{probe.url} is down ({probe.cause})"
    return f"{probe.url} serves version {probe.version}, not {wanted}"


class RemoteRole:
    """What both remote clients share: the replica set, the policy version it serves, weight pushes."""

    role = "remote"
    error: type[ReplicaError] = ReplicaError

    def __init__(
        self,
        urls: Sequence[str],
        model_name: str,
        weight_transfer: TransferKind = "gloo",
        transfer_host: str = "127.0.0.1",
        transfer_port: int = 0,
        shared_dir: Path | None = None,
        request_timeout_s: float = 600.0,
        max_retries: int = 2,
    ) -> None:
        self.model_name = model_name
        self.replicas = ReplicaSet(
            urls,
            weight_transfer,
            transfer_host,
            transfer_port,
            shared_dir,
            request_timeout_s,
            max_retries,
            self.role,
            self.error,
        )

    @property
    def policy_version(self) -> int:
        return self.replicas.policy_version

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load new weights on every live server; later results carry `version`."""
        self.replicas.update_weights(named_tensors, version)

    def close(self) -> None:
        self.replicas.close()


def chunk_bounds(count: int, parts: int) -> list[tuple[int, int]]:
    """`[start, stop)` of up to `parts` contiguous non-empty chunks of `count` items (sizes differ by
    at most one). The caller passes the configured number of replicas, not the live one, so requests
    (and the results they seed) do not change when a replica comes or goes."""
    if count == 0:
        return []
    parts = max(1, min(parts, count))
    base, extra = divmod(count, parts)
    bounds, start = [], 0
    for index in range(parts):
        stop = start + base + (1 if index < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds

"""The replicas of one remote role (rollout or teacher): which can serve, spreading work, retrying.

Shared by `RemoteRolloutEngine` and `RemoteTeacherClient`. A replica can serve when `/health`
answers and it holds the current policy: `/weight_info` reports the label of the weights it serves,
`str(version)` after our updates and vLLM's `"default"` for the weights it started with. Until the
first push, `"default"` is the current policy (version 0: servers start from the run's initial
policy); after it, `"default"` means the replica restarted, and it sits out, as does one that missed
a push or whose update failed (`"incomplete"`), until the next push, which rebuilds the transfer
group for it. Work is cut into requests by the caller; request i goes to a ready replica chosen by i,
and on a network or server failure (never on a 4xx, which is a bug to surface) to the next one, up
to `max_retries` more times. A 503 is a replica paused for a weight update (vLLM's engine core turns
new requests away until `/resume`, a retryable `engine_paused` error): the request waits and is sent
to it again, for up to the request timeout, without counting as a failure. While no replica is live
at all (all lost together), calls and pushes wait for one, probing again, for up to the request
timeout: the operator replaces lost servers, and the run should not fail for the moments that takes.

A replica is live when `/health` and `/weight_info` both answer within `HEALTH_TIMEOUT_S` on a new
connection (a deleted pod still answers on the ones it has). vLLM's `/health` answers from its API
server alone, while `/weight_info` is a utility call on the engine core, which runs them inline: an
engine core wedged in a weight transfer (an NCCL receive whose sender died never returns) fails the
second. A push that runs past `weight_push_timeout_s` is abandoned and tried again on a new group of
the replicas still live; a replica lost mid-push costs no retry, only the wait for the others. The
operator's liveness probe (the same route) replaces a replica that stays wedged, and the first push
after that takes it back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import torch

from rlsd_trainer.remote.http import HttpCallError, call_json, fan_out
from rlsd_trainer.serving.auth import authorization_headers
from rlsd_trainer.weights.sender import make_sender
from rlsd_trainer.weights.wire import STARTING_WEIGHTS, TransferKind

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0
# The first and the longest wait before probing again while no replica is live.
RETURN_RETRY_S = (1.0, 10.0)
PAUSED_RETRY_S = (0.05, 1.0)  # the first and the longest wait before asking a paused replica again


class ReplicaError(RuntimeError):
    """No replica could serve a request; the message names every URL tried and why it failed."""


@dataclass(frozen=True)
class Probe:
    url: str
    label: str | None  # the weight-version label it serves; None: not reachable or not healthy
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
        weight_push_timeout_s: float,
        max_retries: int,
        role: str,
        error: type[ReplicaError],
    ) -> None:
        if not urls:
            raise ValueError(f"no {role} server URLs given")
        self.urls = [url.rstrip("/") for url in urls]
        self.max_retries = max_retries
        self.request_timeout_s = request_timeout_s
        self.role = role
        self.error = error
        # Every request carries the run's token, where the run has one (its pods on Kubernetes).
        headers = authorization_headers()
        self.http = httpx.Client(timeout=request_timeout_s, headers=headers)
        # Probes and the weight routes get a connection per call. A probe must see what a new
        # connection sees: a pod being deleted goes on answering on the connections it has while its
        # DNS name is already gone, so a pooled probe called it live and every push to it failed at
        # once. And after an error answer (an update session already open, say) vLLM's server closes
        # the connection, so the clean-up calls that follow must not be sent down it.
        self.fresh_http = httpx.Client(
            timeout=request_timeout_s, limits=httpx.Limits(max_keepalive_connections=0), headers=headers
        )
        self.sender = make_sender(
            weight_transfer,
            self.fresh_http,
            transfer_host,
            transfer_port,
            shared_dir,
            request_timeout_s,
            weight_push_timeout_s,
        )
        self.policy_version = 0
        # The label every ready replica serves, and the label each replica got from our last push.
        self.current = STARTING_WEIGHTS
        self.pushed = dict.fromkeys(self.urls, STARTING_WEIGHTS)

    def probe(self) -> list[Probe]:
        return fan_out(self._probe, self.urls)

    def _probe(self, url: str) -> Probe:
        try:
            call_json(self.fresh_http, "GET", url, "/health", timeout_s=HEALTH_TIMEOUT_S)
            reported = call_json(self.fresh_http, "GET", url, "/weight_info", timeout_s=HEALTH_TIMEOUT_S)
        except HttpCallError as exc:
            return Probe(url, None, exc.cause)
        label = reported.get("weight_version") if isinstance(reported, dict) else None
        if not isinstance(label, str):
            return Probe(url, None, f"/weight_info answered {reported!r}, not a weight_version label")
        return Probe(url, label)

    def version_of(self, label: str) -> int:
        """Our policy version for weights labelled `label`; ValueError when they are none of ours."""
        if label == self.current:
            return self.policy_version
        if label.isdigit() and int(label) < self.policy_version:
            return int(label)  # an older version (a completion that started before a push)
        raise ValueError(
            f"served by weights labelled {label!r}, which are not policy version <= {self.policy_version}"
        )

    def _live_probes(self) -> list[Probe]:
        """Every replica's probe, once one of them is live. While none is (all lost together: a node
        gone, pods being replaced), they are probed again with growing waits for up to the request
        timeout, as the operator recreates lost servers: the run does not fail for the moments that
        takes."""
        deadline = time.monotonic() + self.request_timeout_s
        wait, longest = RETURN_RETRY_S
        while True:
            probes = self.probe()
            if any(p.label is not None for p in probes) or time.monotonic() + wait > deadline:
                return probes
            log.warning(
                "no %s server is live (%s); probing again in %.0f s",
                self.role,
                "; ".join(_describe(p, self.current) for p in probes),
                wait,
            )
            time.sleep(wait)
            wait = min(2 * wait, longest)

    def _ready(self) -> list[str]:
        probes = self._live_probes()
        ready = [p.url for p in probes if p.label == self.current]
        if not ready:
            raise self.error(
                f"no {self.role} server can serve policy version {self.policy_version}: "
                + "; ".join(_describe(p, self.current) for p in probes)
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
                    return self._through_pauses(call, url, requests[index])
                except HttpCallError as exc:
                    if not exc.retryable:
                        raise self.error(f"{self.role} server rejected request {index}: {exc}") from exc
                    failed[url] = exc.cause
                    causes.append(str(exc))
            raise self.error(
                f"{self.role} request {index} failed on every server tried: " + "; ".join(causes)
            )

        return fan_out(attempt, range(len(requests)))

    def _through_pauses(self, call: Callable[[str, T], R], url: str, request: T) -> R:
        """`call(url, request)`, sent again while the replica answers 503 (paused), with growing
        waits, until the request timeout has passed."""
        deadline = time.monotonic() + self.request_timeout_s
        wait, longest = PAUSED_RETRY_S
        while True:
            try:
                return call(url, request)
            except HttpCallError as exc:
                if exc.status != 503 or time.monotonic() + wait > deadline:
                    raise
            time.sleep(wait)
            wait = min(2 * wait, longest)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Push the weights to every live replica; retried (on a new group) when one fails mid-way.

        A try that failed because one of its replicas was lost meanwhile (not live at the next probe:
        deleted, wedged, restarting) is tried again with the others, for up to the request timeout,
        as calls wait out lost replicas. A try that failed with every replica still live is a fault
        of the push itself, tried `max_retries` more times.

        `named_tensors` is consumed once (under FSDP every rank gathers in step), into one CPU copy
        that a retry can send again."""
        tensors = [(name, tensor.detach().to("cpu")) for name, tensor in named_tensors]
        deadline = time.monotonic() + self.request_timeout_s
        causes: list[str] = []
        failed_with: list[str] = []  # the replicas of the last failed try
        unexplained = 0
        while True:
            probes = [p for p in self._live_probes() if p.label is not None]
            live = [p.url for p in probes]
            if failed_with:
                unexplained += set(failed_with) <= set(live)
                if unexplained > self.max_retries or time.monotonic() > deadline:
                    break
            if not live:
                causes.append("no server is live")
                break
            if any(p.label != self.pushed[p.url] for p in probes):
                self.sender.close()  # a replica restarted, missed a push or failed one: a new group
            try:
                self.sender.push(live, tensors, version)
            except RuntimeError as exc:  # HTTP, transfer-group and torch.distributed failures
                if isinstance(exc, HttpCallError) and not exc.retryable:
                    raise self.error(f"{self.role} server rejected policy version {version}: {exc}") from exc
                causes.append(f"push to {live} failed: {exc}")
                failed_with = live
                log.warning(
                    "%s push of policy version %d to %s failed (%s); trying again with the servers "
                    "still live",
                    self.role,
                    version,
                    live,
                    exc,
                )
                continue
            self.current = str(version)
            self.pushed.update(dict.fromkeys(live, self.current))
            self.policy_version = version
            return
        shown = causes[-(self.max_retries + 2) :]  # a run of lost replicas can make many
        left_out = len(causes) - len(shown)
        hidden = f" ({left_out} earlier failures not shown)" if left_out else ""
        raise self.error(
            f"could not push policy version {version} to the {self.role} servers {self.urls}{hidden}: "
            + "; ".join(shown)
        )

    def close(self) -> None:
        self.sender.close()
        self.http.close()
        self.fresh_http.close()


def _describe(probe: Probe, wanted: str) -> str:
    if probe.label is None:
        return f"{probe.url} is down ({probe.cause})"
    return f"{probe.url} serves weights labelled {probe.label!r}, not {wanted!r}"


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
        weight_push_timeout_s: float = 300.0,
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
            weight_push_timeout_s,
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

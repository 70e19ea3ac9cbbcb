"""The kubelet's liveness probe of a rollout or teacher server, run in its container:
`python3 -m rlsd_contracts.liveness` asks the server on localhost for `GET /weight_info`, with the
run's token, and exits 0 when it answers a weight label in time, 1 (saying why) otherwise.

Why this route: vLLM's /health answers from its API server alone, while /weight_info is a utility
call on the engine core, which runs those inline, after the one in progress. An engine core stuck in
a weight transfer whose sender died (an NCCL receive never returns) keeps /health at 200 and stalls
this. Our CPU servers answer it behind their weight routes alike. The probe tolerates stalls as long
as a push may take (`weight_push_timeout_s`); the operator sets its threshold from that.
Standard library only: it starts every few seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

from rlsd_contracts.run_token import RunTokenError, run_token
from rlsd_contracts.wire import SERVER_PORT

LIVENESS_ROUTE = "/weight_info"


def check(port: int, timeout_s: float) -> str | None:
    """None when the server on localhost:`port` answers its weight label within `timeout_s`, else why not."""
    try:
        token = run_token()
    except RunTokenError as exc:
        return str(exc)
    request = urllib.request.Request(f"http://127.0.0.1:{port}{LIVENESS_ROUTE}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            answer = json.loads(response.read())
    except (OSError, ValueError) as exc:  # refused, timed out, HTTP error status, not JSON
        return f"GET {LIVENESS_ROUTE}: {exc}"
    if not isinstance(answer, dict) or not isinstance(answer.get("weight_version"), str):
        return f"GET {LIVENESS_ROUTE} answered {answer!r}, not a weight_version label"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m rlsd_contracts.liveness", description=__doc__)
    parser.add_argument("--port", type=int, default=SERVER_PORT)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    failure = check(args.port, args.timeout)
    if failure is not None:
        print(failure, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`rlsd-operator`: run the operator (one replica; see operator/README.md)."""

from __future__ import annotations

import argparse
import os
import socket

import kopf
from prometheus_client import start_http_server

from rlsd_operator import handlers  # importing it registers the handlers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rlsd-operator", description=__doc__)
    parser.add_argument("--namespace", action="append", default=[], help="watch only these (default: all)")
    parser.add_argument("--metrics-port", type=int, default=9090, help="rlsd_operator_* metrics; 0 disables")
    parser.add_argument("--liveness-port", type=int, default=8080, help="serves /healthz")
    args = parser.parse_args(argv)
    handlers.WATCHED_NAMESPACES = args.namespace
    if args.metrics_port:
        start_http_server(args.metrics_port)
    kopf.configure(verbose=False)
    # kopf's default identity asks for the user's name, which the chart's uid 65532 does not have (no
    # passwd entry in the image): the pod's name (kopf's POD_ID, else the hostname) names it instead.
    identity = os.environ.get("POD_ID") or socket.gethostname()
    kopf.run(
        identity=identity,
        registry=kopf.get_default_registry(),
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=f"http://0.0.0.0:{args.liveness_port}/healthz",
    )


if __name__ == "__main__":
    main()

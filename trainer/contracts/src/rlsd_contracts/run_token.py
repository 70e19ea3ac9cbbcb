"""Reading the run's token (a Secret the operator mounts in the run's pods) where it is needed: the
servers' middleware, their clients, and the liveness probe. Standard library only."""

from __future__ import annotations

import os
from pathlib import Path

from rlsd_contracts.wire import RUN_TOKEN_FILE_ENV


class RunTokenError(RuntimeError):
    """The run's token is configured but cannot be read."""


def run_token() -> str | None:
    """The run's token, from the file RLSD_RUN_TOKEN_FILE names; None when the variable is not set."""
    path = os.environ.get(RUN_TOKEN_FILE_ENV)
    if not path:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise RunTokenError(f"{RUN_TOKEN_FILE_ENV}={path}: cannot read the run's token: {exc}") from exc
    if not token:
        raise RunTokenError(f"{RUN_TOKEN_FILE_ENV}={path}: the file is empty")
    return token

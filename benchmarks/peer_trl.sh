#!/usr/bin/env bash
# Run benchmarks/peer_trl.py (our GRPO vs TRL's GRPOTrainer) in its own virtual environment.
#
# TRL is a dependency of this benchmark only, so it lives in `.venv-peer` (git-ignored), never in
# the trainer's `.venv`. The first call creates `.venv-peer` and installs the trainer and its
# contracts package (editable) and TRL into it; torch and transformers are pinned to the versions of
# `.venv` when that exists, so both environments run the same kernels. Later calls reuse it. Every argument is passed on:
#
#   benchmarks/peer_trl.sh                 # defaults
#   benchmarks/peer_trl.sh --steps 5       # fewer timed steps
#
# Environment: PEER_VENV (default .venv-peer), TRL_SPEC (default "trl"; e.g. "trl==1.16.0").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PEER_VENV="${PEER_VENV:-.venv-peer}"
TRL_SPEC="${TRL_SPEC:-trl}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$PEER_VENV/bin/python" ] || ! "$PEER_VENV/bin/python" -c "import trl, rlsd_contracts, rlsd_trainer.training.trainer" 2>/dev/null; then
    echo "setting up $PEER_VENV (trainer + $TRL_SPEC) ..." >&2
    [ -x "$PEER_VENV/bin/python" ] || "$PYTHON" -m venv "$PEER_VENV"
    "$PEER_VENV/bin/pip" install --quiet --upgrade pip
    pins=()
    if [ -x .venv/bin/python ]; then
        # Same torch/transformers as the trainer's own environment.
        mapfile -t pins < <(.venv/bin/python - <<'PY'
from importlib.metadata import version
for name in ("torch", "transformers"):
    print(f"{name}=={version(name)}")
PY
)
    fi
    "$PEER_VENV/bin/pip" install -e trainer/contracts -e trainer "$TRL_SPEC" "${pins[@]}"
fi
exec "$PEER_VENV/bin/python" benchmarks/peer_trl.py "$@"

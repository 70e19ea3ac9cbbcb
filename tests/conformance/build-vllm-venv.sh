#!/usr/bin/env bash
# Builds the virtual environment of the vLLM conformance suite and prints its directory (progress
# goes to stderr). It holds the vLLM of trainer/requirements-vllm.txt (the Dockerfile's pin) with the
# torch and transformers vLLM pins, plus the contracts, the trainer and the operator (editable) and pytest, so the
# suite runs vLLM's own code on CPU and the trainer's tests run under the GPU image's versions. The
# main .venv never holds vLLM.
#
#   venv   ${RLSD_VLLM_CACHE:-$HOME/.cache/rlsd/vllm}/<vllm version>-py<python version>
#
# Like tests/k8s/build-*.sh: built once (about 5 minutes cold: mostly downloading torch's CUDA
# wheels, which import fine without a GPU), then a no-op while its stamp (hash of the pin file and of
# the contracts', trainer's and operator's pyproject.toml) is unchanged. One build at a time per
# cache (flock): `make test` starts it in the background at once and calls it again before the
# suite, which then waits for the first call to finish. Callers run it with PYTHONPATH naming their
# checkout's trainer/contracts/src, trainer/src and operator/src, so the editable installs may point
# at any checkout.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
pin_file=$root/trainer/requirements-vllm.txt
log() { echo "build-vllm-venv: $*" >&2; }

version=$(sed -n 's/^vllm==\([^ ;#]*\).*/\1/p' "$pin_file")
[[ -n "$version" ]] || { log "$pin_file pins no vllm==<version>"; exit 1; }
python=${PYTHON:-python3}
py_version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
cache=${RLSD_VLLM_CACHE:-$HOME/.cache/rlsd/vllm}
venv=$cache/$version-py$py_version
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9 # one build at a time per cache directory

stamp="$(cat "$pin_file" "$root/trainer/contracts/pyproject.toml" "$root/trainer/pyproject.toml" "$root/operator/pyproject.toml" | sha256sum | cut -c1-16)"
if [[ -x "$venv/bin/python" && "$(cat "$venv/.rlsd-stamp" 2>/dev/null)" == "$stamp" ]]; then
  echo "$venv"
  exit 0
fi

log "installing vllm $version, the trainer and the operator into $venv (slow the first time)"
SECONDS=0
rm -f "$venv/.rlsd-stamp"
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check --upgrade pip
# One resolve, so the trainer's and operator's requirements meet vLLM's pins (torch, transformers).
"$venv/bin/pip" install --quiet --disable-pip-version-check \
  -r "$pin_file" -e "$root/trainer/contracts" -e "$root/trainer[test]" -e "$root/operator"
"$venv/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" >&2
echo "$stamp" >"$venv/.rlsd-stamp"
log "built in ${SECONDS}s"
echo "$venv"

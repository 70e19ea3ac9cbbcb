#!/usr/bin/env bash
# Builds the images a real node of the test bed runs, from the repository's own Dockerfile, and prints
# the directory that holds them as OCI archives (progress goes to stderr):
#
#   base-<hash>.tar        a Debian bookworm root filesystem (debootstrap: python3, venv, pip, CA
#                          certificates), the Dockerfile's PYTHON_IMAGE here (no Docker Hub)
#   wheels/                every wheel the images install (pip download from PyPI: torch of the
#                          Dockerfile's TORCH_VERSION, the trainer's and the operator's dependencies)
#   operator-<hash>.tar    `--target operator`,    tagged rlsd/operator:<appVersion>
#   trainer-cpu-<hash>.tar `--target trainer-cpu`, tagged rlsd/trainer:cpu
#
# buildah builds each target with PYTHON_IMAGE=the local base and pip pointed at the wheel directory
# (an /etc/pip.conf mounted into the build: no index), so a build needs no network; PyPI's torch
# brings its CUDA libraries (about 3 GB; the PyTorch CPU index is not reachable here). An archive's
# name carries the hash of everything it is built from (Dockerfile, the files of the build context it
# copies, the base, the build arguments, this script): it is rebuilt only when one of them changes;
# buildah's layer cache keeps the layers below a change (torch's, above all).
# Cache: ${RLSD_IMAGES_CACHE:-$HOME/.cache/rlsd/images}. Needs root (buildah, debootstrap).
set -euo pipefail

SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,python3-pip,ca-certificates
TARGETS=(operator trainer-cpu)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
log() { echo "build-images: $*" >&2; }

# runc: the OCI runtime buildah runs a RUN step in (Debian only recommends one, and recommends are
# not installed; a build that came before build-node.sh's install failed with "exec: no command").
"$here/install-debian-packages.sh" buildah runc debootstrap
out=${RLSD_IMAGES_CACHE:-$HOME/.cache/rlsd/images}
mkdir -p "$out"
exec 9>"$out/.lock"
flock 9
tmp=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
hash() { sha256sum | cut -c1-16; }
files_hash() { # the content and names of the files under the given paths (of the repository)
  (cd "$root" && find "$@" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' ! -path '*.egg-info/*' \
    -print0 | sort -z | xargs -0 sha256sum) | hash
}
dockerfile_arg() { sed -n "s/^ARG $1=//p" "$root/Dockerfile" | head -1; }

# -- the base image ----------------------------------------------------------------------------------
base_key=$(echo "$SUITE $BASE_PACKAGES python-link" | hash)
base_tag=localhost/rlsd-test-base:$base_key
if [[ ! -f "$out/base-$base_key.tar" ]]; then
  log "making the base image (debootstrap $SUITE)"
  SECONDS=0
  debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$tmp/rootfs" >"$tmp/debootstrap.log" 2>&1 ||
    { tail -20 "$tmp/debootstrap.log" >&2; exit 1; }
  ln -sf python3 "$tmp/rootfs/usr/bin/python" # what the Dockerfile calls, as python:*-slim has it
  rm -rf "$tmp/rootfs/var/cache/apt/archives/"*.deb "$tmp/rootfs/var/lib/apt/lists/"*
  tar -C "$tmp/rootfs" --numeric-owner -cf "$tmp/base.tar" .
  mv "$tmp/base.tar" "$out/base-$base_key.tar"
  rm -rf "$tmp/rootfs"
  log "made the base image in ${SECONDS}s"
fi
if ! buildah inspect --type image "$base_tag" >/dev/null 2>&1; then
  container=$(buildah from scratch)
  buildah add --quiet "$container" "$out/base-$base_key.tar" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$container"
  buildah commit --quiet --rm "$container" "$base_tag" >/dev/null
fi

# -- the wheels --------------------------------------------------------------------------------------
torch_version=$(dockerfile_arg TORCH_VERSION)
requirements=("torch==$torch_version" ./trainer/contracts "./trainer[trackers]" ./operator "setuptools>=77")
wheels_key=$( (echo "${requirements[*]}"; cat "$root"/trainer/pyproject.toml "$root"/operator/pyproject.toml \
  "$root"/trainer/contracts/pyproject.toml) | hash)
if [[ "$(cat "$out/wheels/.stamp" 2>/dev/null)" != "$wheels_key" ]]; then
  log "downloading the images' wheels from PyPI (torch $torch_version: about 3 GB the first time)"
  SECONDS=0
  mkdir -p "$out/wheels"
  (cd "$root" && python3 -m pip download --quiet --disable-pip-version-check --no-cache-dir \
    --dest "$out/wheels" "${requirements[@]}")
  echo "$wheels_key" >"$out/wheels/.stamp"
  log "downloaded the wheels in ${SECONDS}s"
fi
# At a fixed path: buildah's layer cache keys a RUN step on its mounts too.
printf '[global]\nno-index = true\nfind-links = /wheels\n' >"$out/pip.conf"

# -- the images --------------------------------------------------------------------------------------
version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$root/charts/rlsd-operator/Chart.yaml")
declare -A tags=([operator]="rlsd/operator:$version" [trainer-cpu]="rlsd/trainer:cpu")
declare -A sources=([operator]="operator trainer/contracts" [trainer-cpu]="trainer")
build_args=(--build-arg "PYTHON_IMAGE=$base_tag" --build-arg "TORCH_INDEX_URL=https://pypi.org/simple"
  --build-arg "VERSION=$version")
for target in "${TARGETS[@]}"; do
  # shellcheck disable=SC2086 # the source paths are words
  key=$( (cat "$root/Dockerfile" "$root/.dockerignore" "$0"; echo "$base_key $wheels_key ${build_args[*]}"
    files_hash ${sources[$target]}) | hash)
  archive=$out/$target-$key.tar
  [[ -f "$archive" ]] && continue
  log "building $target (${tags[$target]})"
  SECONDS=0
  buildah bud --quiet --layers --pull-never --target "$target" "${build_args[@]}" \
    --volume "$out/wheels:/wheels:ro" --volume "$out/pip.conf:/etc/pip.conf:ro" \
    --tag "${tags[$target]}" "$root" >/dev/null
  # Uncompressed: containerd unpacks it at once, and gzip on 2 cores costs minutes for torch.
  buildah push --quiet --disable-compression "${tags[$target]}" \
    "oci-archive:$tmp/$target.tar:docker.io/${tags[$target]}" # the name containerd gives it in a pod
  rm -f "$out/$target"-*.tar
  mv "$tmp/$target.tar" "$archive"
  log "built $target in ${SECONDS}s ($(du -h "$archive" | cut -f1))"
done
# What older builds left in buildah's storage: every image that none of the current ones descends from
# (its layers are not a prefix of theirs), and stray working containers. The layer cache of the
# current images stays (torch's layer above all).
buildah rm --all >/dev/null 2>&1 || true
python3 - "$base_tag" "${tags[@]}" <<'PRUNE'
import json, subprocess, sys

def layers(ref):
    info = json.loads(subprocess.run(["buildah", "inspect", "--type", "image", ref], capture_output=True, check=True).stdout)
    return info["OCIv1"]["rootfs"]["diff_ids"]

current = [layers(tag) for tag in sys.argv[1:]]
images = json.loads(subprocess.run(["buildah", "images", "--all", "--json"], capture_output=True, check=True).stdout or "[]")
stale = [i["id"] for i in images if not any(chain[: len(layers(i["id"]))] == layers(i["id"]) for chain in current)]
for image in stale:
    subprocess.run(["buildah", "rmi", "--force", image], capture_output=True)
PRUNE
echo "$out"

#!/usr/bin/env bash
# Builds the Kueue manager that the queueing tests (tests/operator/test_kueue.py) run against, from
# the Go module proxy, and prints the directory that holds it (progress goes to stderr). The sibling
# of build-control-plane.sh, with its conventions:
#
#   kueue          <- tools/kueue/go.mod (sigs.k8s.io/kueue/cmd/kueue, its k8s.io modules raised
#                     to the control plane's, so the two builds share them in the Go build cache)
#   kueue-crds/    <- the CRDs the module ships (config/components/crd/bases), as upstream
#                     generated them from its Go types, and the kustomization that says which are
#                     served through the conversion webhook
#   kueue-webhooks.yaml <- the module's webhook configurations (config/components/webhook), which
#                     the tests point at the manager on loopback
#
# Everything lands in ${RLSD_KUEUE_CACHE:-$HOME/.cache/rlsd/kueue}/<version> with a stamp (version,
# Go version, hash of go.mod/go.sum; the copies: version and this script) and is redone only when
# that changes.
set -euo pipefail

KUEUE_VERSION=v0.17.0 # keep in step with tools/kueue/go.mod

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { echo "build-kueue: $*" >&2; }

command -v go >/dev/null || { log "go is not installed (needs Go >= 1.26)"; exit 1; }
out=${RLSD_KUEUE_CACHE:-$HOME/.cache/rlsd/kueue}/$KUEUE_VERSION
mkdir -p "$out/.stamps"
exec 9>"$out/.lock"
flock 9 # one build at a time per cache directory

dir=$here/tools/kueue
go_version=$(go env GOVERSION)
binary_stamp="$KUEUE_VERSION $go_version $(cat "$dir/go.mod" "$dir/go.sum" | sha256sum | cut -c1-16)"
# What is copied from the module, and how: changes with this script.
manifests_stamp="$KUEUE_VERSION $(sha256sum <"${BASH_SOURCE[0]}" | cut -c1-16)"
up_to_date() { [[ -e "$out/$1" && "$(cat "$out/.stamps/$1" 2>/dev/null)" == "$2" ]]; }

tmp=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
if ! up_to_date kueue "$binary_stamp"; then
  log "building kueue $KUEUE_VERSION (slow the first time)"
  SECONDS=0
  version=sigs.k8s.io/kueue/pkg/version
  (cd "$dir" && go build -trimpath -o "$tmp/kueue" \
    -ldflags="-s -w -X $version.GitVersion=$KUEUE_VERSION -X $version.GitCommit=module -X $version.BuildDate=1970-01-01" \
    sigs.k8s.io/kueue/cmd/kueue)
  mv -f "$tmp/kueue" "$out/kueue"
  echo "$binary_stamp" >"$out/.stamps/kueue"
  log "built kueue in ${SECONDS}s"
fi
if ! up_to_date kueue-crds "$manifests_stamp" || ! up_to_date kueue-webhooks.yaml "$manifests_stamp"; then
  module=$(cd "$dir" && go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)
  # The CRDs, and the kustomization that names those served with a conversion webhook.
  cp -r "$module/config/components/crd/bases" "$tmp/kueue-crds"
  cp "$module/config/components/crd/kustomization.yaml" "$tmp/kueue-crds/"
  cp "$module/config/components/webhook/manifests.yaml" "$tmp/kueue-webhooks.yaml"
  chmod -R u+w "$tmp/kueue-crds" "$tmp/kueue-webhooks.yaml" # the module cache is read-only
  rm -rf "$out/kueue-crds"
  for name in kueue-crds kueue-webhooks.yaml; do
    mv -f "$tmp/$name" "$out/$name"
    echo "$manifests_stamp" >"$out/.stamps/$name"
  done
fi
echo "$out"

#!/usr/bin/env bash
# Builds the real Kubernetes control plane that tests/k8s runs against, from the Go module proxy,
# and prints the directory that holds the binaries (progress goes to stderr).
#
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl  <- tools/kube/go.mod
#   etcd                                                              <- tools/etcd/go.mod
#   kwok, kwok-stages.yaml                                            <- go install @KWOK_VERSION
#
# kwok-stages.yaml holds kwok's default stages (those kwokctl uses): nodes become Ready and keep a
# lease, pods on them become Running, and deleted pods go away.
#
# Binaries land in ${RLSD_K8S_ASSETS_CACHE:-$HOME/.cache/rlsd/k8s-assets}/<k8s version>; each has a
# stamp (version, Go version, hash of its go.mod/go.sum) and is rebuilt only when that changes.
# If KUBEBUILDER_ASSETS names a directory that holds all of these files, it is used as is.
set -euo pipefail

K8S_VERSION=v1.35.4  # keep in step with tools/kube/go.mod
ETCD_VERSION=v3.6.16 # keep in step with tools/etcd/go.mod
KWOK_VERSION=v0.8.0
ASSETS=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok kwok-stages.yaml)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { echo "build-control-plane: $*" >&2; }

has_all() {
  local dir=$1 name
  for name in "${ASSETS[@]}"; do [[ -f "$dir/$name" ]] || return 1; done
}

if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
  if has_all "$KUBEBUILDER_ASSETS"; then
    echo "$KUBEBUILDER_ASSETS"
    exit 0
  fi
  log "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS lacks some of ${ASSETS[*]}; using the cache instead"
fi

command -v go >/dev/null || { log "go is not installed (needs Go >= 1.26)"; exit 1; }
out=${RLSD_K8S_ASSETS_CACHE:-$HOME/.cache/rlsd/k8s-assets}/$K8S_VERSION
mkdir -p "$out/.stamps"
exec 9>"$out/.lock"
flock 9 # one build at a time per cache directory

go_version=$(go env GOVERSION)
# shellcheck source=build-lib.sh
source "$here/build-lib.sh"

tmp=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

kube=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
stamp=$(stamp_of "$K8S_VERSION" "$here/tools/kube")
if ! up_to_date "$stamp" "${kube[@]}"; then
  log "building ${kube[*]} $K8S_VERSION (slow the first time)"
  ldflags=$(kube_ldflags "$K8S_VERSION")
  SECONDS=0
  (cd "$here/tools/kube" && go build -trimpath -ldflags="$ldflags" -o "$tmp/" \
    "${kube[@]/#/k8s.io/kubernetes/cmd/}")
  install_built "$tmp" "$stamp" "${kube[@]}"
  log "built ${kube[*]} in ${SECONDS}s"
fi

stamp=$(stamp_of "$ETCD_VERSION" "$here/tools/etcd")
if ! up_to_date "$stamp" etcd; then
  log "building etcd $ETCD_VERSION"
  SECONDS=0
  (cd "$here/tools/etcd" && go build -trimpath -ldflags="-s -w" -o "$tmp/etcd" .)
  install_built "$tmp" "$stamp" etcd
  log "built etcd in ${SECONDS}s"
fi

stamp=$(stamp_of "$KWOK_VERSION")
if ! up_to_date "$stamp" kwok kwok-stages.yaml; then
  log "building kwok $KWOK_VERSION"
  SECONDS=0
  GOBIN=$tmp go install -trimpath -ldflags="-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
  stages=$(go env GOMODCACHE)/sigs.k8s.io/kwok@$KWOK_VERSION/kustomize/stage
  for f in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
    pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete; do
    echo "---"
    cat "$stages/$f.yaml"
  done >"$tmp/kwok-stages.yaml"
  install_built "$tmp" "$stamp" kwok kwok-stages.yaml
  log "built kwok in ${SECONDS}s"
fi

echo "$out"

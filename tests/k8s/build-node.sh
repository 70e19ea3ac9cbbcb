#!/usr/bin/env bash
# Builds what a real Kubernetes node of the test bed runs beside the control plane (realnode.py), and
# prints the directory that holds it (progress goes to stderr):
#
#   kubelet, kube-proxy  <- k8s.io/kubernetes of tools/kube/go.mod (the control plane's module and versions)
#   coredns              <- go install github.com/coredns/coredns@COREDNS_VERSION
#   pause                <- build/pause/linux/pause.c of that k8s.io/kubernetes module, gcc -static
#   containerd, runc, the CNI plugins, iptables, conntrack <- Debian packages (install-debian-packages.sh)
#
# Binaries land in ${RLSD_NODE_CACHE:-$HOME/.cache/rlsd/node}/<k8s version>, each rebuilt only when its
# stamp (version, Go version, hash of its go.mod/go.sum) changes. kubelet and kube-proxy are linked
# from the Go build cache that build-control-plane.sh fills, so they cost little after it.
set -euo pipefail

K8S_VERSION=v1.35.4 # keep in step with tools/kube/go.mod and build-control-plane.sh
COREDNS_VERSION=v1.15.0
PACKAGES=(containerd runc containernetworking-plugins iptables conntrack)
ASSETS=(kubelet kube-proxy coredns pause)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { echo "build-node: $*" >&2; }

"$here/install-debian-packages.sh" "${PACKAGES[@]}"
command -v go >/dev/null || { log "go is not installed (needs Go >= 1.26)"; exit 1; }
out=${RLSD_NODE_CACHE:-$HOME/.cache/rlsd/node}/$K8S_VERSION
mkdir -p "$out/.stamps"
exec 9>"$out/.lock"
flock 9

go_version=$(go env GOVERSION)
# shellcheck source=build-lib.sh
source "$here/build-lib.sh"

tmp=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

node=(kubelet kube-proxy)
stamp=$(stamp_of "$K8S_VERSION" "$here/tools/kube")
if ! up_to_date "$stamp" "${node[@]}"; then
  log "building ${node[*]} $K8S_VERSION"
  ldflags=$(kube_ldflags "$K8S_VERSION")
  SECONDS=0
  (cd "$here/tools/kube" && go build -trimpath -ldflags="$ldflags" -o "$tmp/" \
    "${node[@]/#/k8s.io/kubernetes/cmd/}")
  install_built "$tmp" "$stamp" "${node[@]}"
  log "built ${node[*]} in ${SECONDS}s"
fi

stamp=$(stamp_of "$K8S_VERSION" "$here/tools/kube")
if ! up_to_date "$stamp" pause; then
  source=$(cd "$here/tools/kube" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c
  gcc -Os -static -DVERSION="$K8S_VERSION-rlsd" -o "$tmp/pause" "$source"
  install_built "$tmp" "$stamp" pause
  log "built pause"
fi

stamp=$(stamp_of "$COREDNS_VERSION")
if ! up_to_date "$stamp" coredns; then
  log "building coredns $COREDNS_VERSION"
  SECONDS=0
  GOBIN=$tmp go install -trimpath -ldflags="-s -w" "github.com/coredns/coredns@$COREDNS_VERSION"
  install_built "$tmp" "$stamp" coredns
  log "built coredns in ${SECONDS}s"
fi

for name in "${ASSETS[@]}"; do [[ -x "$out/$name" ]] || { log "$name is missing"; exit 1; }; done
echo "$out"

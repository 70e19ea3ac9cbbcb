# Shared by build-control-plane.sh and build-node.sh (sourced): stamps that say what a cached binary
# was built from, and the version flags of the k8s.io/kubernetes binaries. Needs $out (the cache
# directory, with .stamps/) and $go_version.

stamp_of() { # stamp_of <version> [module dir]: what a binary is built from
  local hash=none
  [[ -n "${2:-}" ]] && hash=$(cat "$2/go.mod" "$2/go.sum" | sha256sum | cut -c1-16)
  echo "$1 $go_version $hash"
}

up_to_date() { # up_to_date <stamp> <binaries...>: each is in $out with that stamp
  local stamp=$1 name
  shift
  for name in "$@"; do
    [[ -f "$out/$name" && "$(cat "$out/.stamps/$name" 2>/dev/null)" == "$stamp" ]] || return 1
  done
}

install_built() { # install_built <tmp dir> <stamp> <binaries...>: move into place, then stamp
  local tmp=$1 stamp=$2 name
  shift 2
  for name in "$@"; do
    mv -f "$tmp/$name" "$out/$name"
    echo "$stamp" >"$out/.stamps/$name"
  done
}

kube_ldflags() { # kube_ldflags <version, e.g. v1.35.4>: what `kubectl version` and the servers report
  local minor=${1#v1.} flags="-s -w" pkg
  minor=${minor%%.*}
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$1 -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$flags"
}

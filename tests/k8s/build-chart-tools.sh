#!/usr/bin/env bash
# Builds the tools of the chart tests from the Go module proxy, and prints the directory that holds
# them (progress goes to stderr). The sibling of build-control-plane.sh, with its conventions:
#
#   helm      <- tools/helm/go.mod      (helm.sh/helm/v3/cmd/helm)
#   promtool  <- tools/promtool/go.mod  (github.com/prometheus/prometheus/cmd/promtool)
#   prometheus <- the same go.mod (github.com/prometheus/prometheus/cmd/prometheus): the server, whose
#             HTTP API the monitoring tests query; built without the `builtinassets` tag, so it
#             serves no web UI (that needs an npm build of the assets) but the whole API
#   monitoring-crds/  <- tools/monitoring-crds/go.mod: the prometheus-operator CRDs ServiceMonitor,
#             PodMonitor and PrometheusRule, generated from their Go types
#             (github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring) by
#             controller-gen, as upstream generates its CRDs, so the API server validates the
#             chart's monitoring objects against their real schemas
#
# Binaries land in ${RLSD_CHART_TOOLS_CACHE:-$HOME/.cache/rlsd/chart-tools}; each has a stamp
# (version, Go version, hash of its go.mod/go.sum) and is rebuilt only when that changes.
# If RLSD_CHART_TOOLS names a directory that holds both, it is used as is.
set -euo pipefail

HELM_VERSION=v3.22.0         # keep in step with tools/helm/go.mod
PROMETHEUS_VERSION=v0.316.0  # keep in step with tools/promtool/go.mod (Prometheus 3.16)
MONITORING_VERSION=v0.95.2   # keep in step with tools/monitoring-crds/go.mod
MONITORING_CRDS=(servicemonitors podmonitors prometheusrules)
TOOLS=(helm promtool prometheus monitoring-crds)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { echo "build-chart-tools: $*" >&2; }

if [[ -n "${RLSD_CHART_TOOLS:-}" ]]; then
  if [[ -x "$RLSD_CHART_TOOLS/helm" && -x "$RLSD_CHART_TOOLS/promtool" && -x "$RLSD_CHART_TOOLS/prometheus" &&
    -d "$RLSD_CHART_TOOLS/monitoring-crds" ]]; then
    echo "$RLSD_CHART_TOOLS"
    exit 0
  fi
  log "RLSD_CHART_TOOLS=$RLSD_CHART_TOOLS lacks some of ${TOOLS[*]}; using the cache instead"
fi

command -v go >/dev/null || { log "go is not installed (needs Go >= 1.26)"; exit 1; }
out=${RLSD_CHART_TOOLS_CACHE:-$HOME/.cache/rlsd/chart-tools}
mkdir -p "$out/.stamps"
exec 9>"$out/.lock"
flock 9 # one build at a time per cache directory

go_version=$(go env GOVERSION)
stamp_of() { # stamp_of <version> <module dir>
  echo "$1 $go_version $(cat "$2/go.mod" "$2/go.sum" | sha256sum | cut -c1-16)"
}
up_to_date() { # up_to_date <stamp> <binary>
  [[ -e "$out/$2" && "$(cat "$out/.stamps/$2" 2>/dev/null)" == "$1" ]]
}

tmp=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

build() { # build <binary> <version> <module dir> <package> <ldflags>
  local name=$1 version=$2 dir=$3 pkg=$4 ldflags=$5 stamp
  stamp=$(stamp_of "$version" "$dir")
  up_to_date "$stamp" "$name" && return 0
  log "building $name $version (slow the first time)"
  SECONDS=0
  (cd "$dir" && go build -trimpath -ldflags="-s -w $ldflags" -o "$tmp/$name" "$pkg")
  mv -f "$tmp/$name" "$out/$name"
  echo "$stamp" >"$out/.stamps/$name"
  log "built $name in ${SECONDS}s"
}

build helm "$HELM_VERSION" "$here/tools/helm" helm.sh/helm/v3/cmd/helm \
  "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
common=github.com/prometheus/common/version
prometheus_ldflags="-X $common.Version=3.16.0 -X $common.Revision=$PROMETHEUS_VERSION -X $common.Branch=module"
build promtool "$PROMETHEUS_VERSION" "$here/tools/promtool" github.com/prometheus/prometheus/cmd/promtool \
  "$prometheus_ldflags"
# Most of its packages are promtool's too (the Go build cache shares them): about 3 more minutes cold.
build prometheus "$PROMETHEUS_VERSION" "$here/tools/promtool" github.com/prometheus/prometheus/cmd/prometheus \
  "$prometheus_ldflags"

stamp=$(stamp_of "$MONITORING_VERSION" "$here/tools/monitoring-crds")
if ! up_to_date "$stamp" monitoring-crds; then
  log "generating the prometheus-operator CRDs $MONITORING_VERSION with controller-gen"
  SECONDS=0
  dir=$here/tools/monitoring-crds
  (cd "$dir" && go build -trimpath -o "$tmp/controller-gen" sigs.k8s.io/controller-tools/cmd/controller-gen)
  (cd "$dir" && "$tmp/controller-gen" crd:crdVersions=v1 output:crd:dir="$tmp/crds" \
    paths=github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1)
  mkdir -p "$tmp/monitoring-crds"
  for kind in "${MONITORING_CRDS[@]}"; do
    mv "$tmp/crds/monitoring.coreos.com_$kind.yaml" "$tmp/monitoring-crds/"
  done
  rm -rf "$out/monitoring-crds"
  mv "$tmp/monitoring-crds" "$out/monitoring-crds"
  echo "$stamp" >"$out/.stamps/monitoring-crds"
  log "generated the monitoring CRDs in ${SECONDS}s"
fi

echo "$out"

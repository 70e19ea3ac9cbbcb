#!/usr/bin/env bash
# Installs the Debian packages given as arguments that are not installed yet (apt-get, as root), one
# install at a time on this machine; a no-op when all are there. Used by build-node.sh and
# build-images.sh: a real node needs containerd, runc, the CNI plugins, iptables and conntrack; the
# images need buildah, runc and debootstrap.
set -euo pipefail
log() { echo "install-debian-packages: $*" >&2; }

missing() {
  local name
  for name in "$@"; do
    dpkg-query -W -f='${Status}\n' "$name" 2>/dev/null | grep -q '^install ok installed$' || echo "$name"
  done
}

wanted=$(missing "$@")
[[ -z "$wanted" ]] && exit 0
if [[ $(id -u) -ne 0 ]]; then
  log "missing Debian packages: $wanted; install them as root (apt-get install $wanted) and run again"
  exit 1
fi
exec 9>/var/lock/rlsd-apt.lock
flock 9
wanted=$(missing "$@") # another build may have installed them meanwhile
[[ -z "$wanted" ]] && exit 0
log "installing $wanted"
SECONDS=0
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086 # one word per package
apt-get update -qq && apt-get install -y -qq --no-install-recommends $wanted >/dev/null
log "installed in ${SECONDS}s"

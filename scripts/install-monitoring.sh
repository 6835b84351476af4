#!/usr/bin/env bash
# Prometheus + promtool (Debian's `prometheus`) and tshark, for the observability tests. Idempotent.
# Called by `make tools`; safe to run again (already installed -> no-op).
# Prometheus is installed as a plain binary for tests and operators to start themselves: the package's
# service is never left running (its start is blocked with policy-rc.d during the install, then stopped
# and disabled in case anything started it). tshark is installed without the setuid dumpcap
# (debconf wireshark-common/install-setuid=false): capture as root, or grant capabilities yourself.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
log() { echo "install-monitoring: $*"; }

need=()
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v tshark >/dev/null 2>&1 || need+=(tshark)
if [ ${#need[@]} -eq 0 ]; then
  log "prometheus, promtool and tshark already installed"
  exit 0
fi

echo "wireshark-common wireshark-common/install-setuid boolean false" | $SUDO debconf-set-selections

# Block service starts from maintainer scripts for this install only (scripts/lib-apt.sh).
. "$(dirname "$0")/lib-apt.sh"
block_service_starts

log "apt-get install ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null

# Never leave Debian's Prometheus service running or enabled: tests start their own on loopback.
if [ -x /etc/init.d/prometheus ]; then
  $SUDO /etc/init.d/prometheus stop >/dev/null 2>&1 || true
  command -v update-rc.d >/dev/null 2>&1 && { $SUDO update-rc.d prometheus disable >/dev/null 2>&1 || true; }
fi
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
# A daemon started by the package despite the above runs as user `prometheus`: stop that one by pid.
for pid in $(pgrep -u prometheus -x prometheus 2>/dev/null || true); do
  $SUDO kill "$pid" 2>/dev/null || true
done

prometheus --version 2>&1 | head -n1
tshark --version 2>/dev/null | head -n1

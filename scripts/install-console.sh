#!/usr/bin/env bash
# What the console tests drive: Chromium (headless, Debian's package) loads and screenshots report.html;
# tmux gives `make demo` a pseudo-terminal whose screen the test reads back. Idempotent.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v tmux >/dev/null 2>&1 || need+=(tmux)
if [ ${#need[@]} -eq 0 ]; then
  echo "install-console: chromium and tmux already installed"
  exit 0
fi
echo "install-console: apt-get install ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
chromium --version

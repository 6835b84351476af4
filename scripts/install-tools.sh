#!/usr/bin/env bash
# System tools the test-suite needs; each part is idempotent and may be run alone.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
for part in install-monitoring.sh install-docker.sh install-helm.sh install-console.sh; do
  if [ -f "$here/$part" ]; then bash "$here/$part"; fi
done

#!/bin/sh
# Runs as root in the shared `os` stage of every image: a Python 3.10-3.12 with venv, the unprivileged
# `fedtune` user (uid/gid 10001) and the data folders it owns. Works on python:3.11-slim, the local
# debootstrap base (both Debian) and nvidia/cuda runtime images (Ubuntu, no Python of their own).
set -eu
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    python3 python3-venv ca-certificates >/dev/null
  rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
fi
# nginx: the SuperLink's Fleet-only TLS proxy (superlink/proxy.py; Debian bookworm's nginx-light, ~1 MB).
# In this shared stage so every image reuses one cached layer; `fedtune-superlink` runs it as uid 10001.
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  own_policy=0  # block the package's service start (invoke-rc.d honours policy-rc.d)
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d && own_policy=1
  fi
  apt-get update -qq
  pkg=nginx-light
  apt-cache show nginx-light >/dev/null 2>&1 || pkg=nginx
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
  [ "$own_policy" = 0 ] || rm -f /usr/sbin/policy-rc.d
  rm -f /etc/nginx/sites-enabled/default
  rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
fi
/usr/sbin/nginx -v
python3 - <<'PY'
import sys
assert (3, 10) <= sys.version_info[:2] < (3, 13), f"fedtune needs Python 3.10-3.12, base has {sys.version}"
PY
getent group fedtune >/dev/null || groupadd --gid 10001 fedtune
getent passwd fedtune >/dev/null || \
  useradd --uid 10001 --gid 10001 --home-dir /home/fedtune --create-home --shell /usr/sbin/nologin fedtune
# Named volumes mounted on these start out owned by fedtune (Docker copies the folder's owner).
# /pki (CA key) and /certs are written only by the one-shot certificate job; services mount them read-only.
mkdir -p /app /state /outputs /certs /pki /cache/huggingface /cache/fedtune /home/fedtune/.flwr
chown -R 10001:10001 /state /outputs /certs /pki /cache /home/fedtune
chmod 0700 /pki

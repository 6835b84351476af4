#!/usr/bin/env bash
# Builds a local base image (Debian bookworm, python3 3.11 + venv + CA certificates) with debootstrap,
# for machines that reach no image registry. Every Dockerfile under docker/ takes it as BASE_IMAGE:
#   docker build --build-arg BASE_IMAGE=local/debian-py:bookworm ...
# Idempotent: an existing image of that tag is kept unless --force.
#   BASE_IMAGE_TAG  (default local/debian-py:bookworm)   DEBIAN_MIRROR  (default: debootstrap's)
set -euo pipefail
TAG=${BASE_IMAGE_TAG:-local/debian-py:bookworm}
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-}
force=0
[ "${1:-}" = "--force" ] && force=1

if [ $force -eq 0 ] && docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "build-base-image: $TAG exists"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "build-base-image: debootstrap missing (scripts/install-docker.sh installs it)" >&2; exit 1; }

rootfs=$(mktemp -d /var/tmp/fedtune-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
echo "build-base-image: debootstrap $SUITE into $rootfs"
# minbase + python3 (3.11 in bookworm, the ABI of the CPU torch wheel) + venv + CA bundle.
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$SUITE" "$rootfs" $MIRROR >"$rootfs.log" 2>&1 || { tail -n 30 "$rootfs.log" >&2; exit 1; }
rm -f "$rootfs.log"
# Slim it like the official slim images: no apt lists, docs or man pages.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/usr/share/doc/* \
  "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
tar -C "$rootfs" -c . | docker import \
  -c 'ENV LANG=C.UTF-8' \
  -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'CMD ["/bin/bash"]' \
  - "$TAG" >/dev/null
echo "build-base-image: $TAG ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"

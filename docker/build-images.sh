#!/usr/bin/env bash
# Builds fedtune's images from the repository root, one after the other so later ones reuse the layers
# of the first (the classic builder does not share work between concurrent builds).
#   fedtune/superlink:$TAG  fedtune/supernode:cpu (and :$TAG-cpu)   [--cuda] fedtune/supernode:cuda
# Environment:
#   BASE_IMAGE        base of the CPU images (default python:3.11-slim; tests: local/debian-py:bookworm)
#   CUDA_BASE_IMAGE   base of the CUDA image (default nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04)
#   TAG               SuperLink tag (default: the version in pyproject.toml)
#   IMAGE_PREFIX      repository prefix (default fedtune)
#   TORCH_WHEEL       a local torch CPU wheel to use instead of downloading one (copied to docker/.context/)
#   EXTRA_CA          a CA bundle pip must trust during the build (copied to docker/.context/extra-ca.crt)
#   DOCKER_BUILD_ARGS extra arguments for every `docker build` (e.g. --pull, --no-cache)
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}
CUDA_BASE_IMAGE=${CUDA_BASE_IMAGE:-nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04}
IMAGE_PREFIX=${IMAGE_PREFIX:-fedtune}
TAG=${TAG:-$(sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -n1)}
cuda=0
for arg in "$@"; do
  case "$arg" in
    --cuda) cuda=1 ;;
    *) echo "usage: $0 [--cuda]" >&2; exit 2 ;;
  esac
done
mkdir -p docker/.context
if [ -n "${TORCH_WHEEL:-}" ]; then
  rm -f docker/.context/torch-*.whl
  cp "$TORCH_WHEEL" docker/.context/
fi
if [ -n "${EXTRA_CA:-}" ]; then
  cp "$EXTRA_CA" docker/.context/extra-ca.crt
fi
build() {  # target tag [build-arg...]
  local target=$1 tag=$2; shift 2
  local args=()
  for a in "$@"; do args+=(--build-arg "$a"); done
  echo "build-images: $tag (target $target)"
  local t0=$SECONDS
  # shellcheck disable=SC2086
  docker build -f docker/Dockerfile --target "$target" -t "$tag" "${args[@]}" ${DOCKER_BUILD_ARGS:-} . \
    >"docker/.context/build-${target}-${tag//[:\/]/_}.log" 2>&1 \
    || { tail -n 40 "docker/.context/build-${target}-${tag//[:\/]/_}.log" >&2; exit 1; }
  echo "build-images: $tag built in $((SECONDS - t0)) s, $(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}')"
}
build superlink "$IMAGE_PREFIX/superlink:$TAG" "BASE_IMAGE=$BASE_IMAGE"
build supernode "$IMAGE_PREFIX/supernode:cpu" "BASE_IMAGE=$BASE_IMAGE"
docker tag "$IMAGE_PREFIX/supernode:cpu" "$IMAGE_PREFIX/supernode:$TAG-cpu"
if [ $cuda -eq 1 ]; then
  # PyPI's default torch for Linux x86_64 is the CUDA build (its CUDA libraries come as wheels).
  build supernode "$IMAGE_PREFIX/supernode:cuda" "BASE_IMAGE=$CUDA_BASE_IMAGE" "TORCH_INDEX_URL="
  docker tag "$IMAGE_PREFIX/supernode:cuda" "$IMAGE_PREFIX/supernode:$TAG-cuda"
fi

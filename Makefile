# Two commands on a fresh machine:   make demo   |   make test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# flwr must never phone home, in any process we start.
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv proxy demo test test-fast test-slow test-containers test-helm lint typecheck tools clean

$(VENV)/.installed: pyproject.toml scripts/install-python.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/install-python.sh
	touch $@

venv: $(VENV)/.installed proxy

## nginx for the SuperLink's Fleet-only TLS proxy (fedtune-superlink runs it; no-op when installed).
proxy:
	bash scripts/install-proxy.sh

## Runs the main job on the embedded offline default: TLS SuperLink + 2 SuperNodes on loopback.
demo: venv
	$(PY) -m fedtune.demo

## Installs system tools the tests need (docker engine, compose, prometheus, helm, tshark), then all tests.
test: venv tools
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -v --timeout=1800 --durations=30 tests

tools:
	bash scripts/install-tools.sh

test-fast: venv
	$(PY) -m pytest -v -m "not slow and not container and not helm and not k8s" tests

test-slow: venv
	$(PY) -m pytest -v -m slow tests

test-containers: venv tools
	$(PY) -m pytest -v -m container tests

test-helm: venv tools
	$(PY) -m pytest -v -m helm tests

## The chart on a real cluster: ../shared/k8s (started and stopped by the test) or $KUBECONFIG's.
test-k8s: venv tools
	$(PY) -m pytest -v -s -m k8s tests/k8s

lint: venv
	$(VENV)/bin/ruff check .

## The type checker over shipped code ([tool.mypy] in pyproject.toml).
typecheck: venv
	$(VENV)/bin/mypy

clean:
	rm -rf .demo outputs .pytest_cache

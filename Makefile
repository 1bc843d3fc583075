# The two commands: `make demo` and `make test`. Each sets itself up from nothing on Debian 12 as root.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench bless lint setup clean

# Debian packages: libvirt-python compiles against libvirt-dev; the controller reads repositories with git
# and checks commit signatures with gpg.
DEB_BUILD := python3 python3-venv python3-dev gcc pkg-config libvirt-dev git gnupg

$(STAMP): pyproject.toml
	@if ! (command -v python3 >/dev/null && python3 -c 'import venv, ensurepip' 2>/dev/null \
	       && pkg-config --exists libvirt && command -v gcc >/dev/null && command -v git >/dev/null \
	       && command -v gpg >/dev/null); then \
	  echo "installing Debian packages: $(DEB_BUILD)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEB_BUILD) >/dev/null; \
	fi
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	@$(PY) -m controller.demo

# As root, the real-hypervisor tests (tests/integration/test_qemu.py) get libvirtd + QEMU and the tiny guest
# first; both scripts are idempotent. Without root they are skipped (under CI=true they fail).
GUEST_DIR ?= /var/lib/vmflow-guest

test: $(STAMP)
	@if [ "$$(id -u)" = 0 ]; then scripts/setup-libvirt.sh && scripts/build-guest.sh $(GUEST_DIR); fi
	VMFLOW_GUEST_DIR=$(GUEST_DIR) $(PY) -m pytest -q
	$(VENV)/bin/lint-imports

# bench/apply.py needs root (libvirtd + QEMU, set up as for the tests) and installs Ansible into its own venv.
bench: $(STAMP)
	$(PY) bench/compile.py
	$(PY) bench/plan.py
	$(PY) bench/latency.py
	$(PY) bench/monitor.py
	@if [ "$$(id -u)" = 0 ]; then scripts/setup-libvirt.sh && $(PY) bench/apply.py; \
	 else echo "bench/apply.py skipped: it needs root for libvirtd"; fi

bless: $(STAMP)
	VMFLOW_BLESS=1 $(PY) -m pytest -q tests/test_golden.py tests/test_plan_golden.py tests/test_plan_markdown.py tests/test_preview.py tests/test_simulate.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

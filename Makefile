# make venv   build .venv with msgd installed (editable)
# make run    start a node on etc/node.ini in the foreground
# make test   install the test extras and run the whole suite
# make bench  run the benchmark suite (see docs/performance.rst)

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q --disable-pip-version-check
CONFIG ?= etc/node.ini
TRIAL_ARGS ?=

.PHONY: venv run test bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e . --config-settings editable_mode=compat
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(PIP) -e '.[test]' --config-settings editable_mode=compat
	touch $@

run: venv
	$(BIN)/twistd --nodaemon --pidfile= msgd -c $(CONFIG)

test: $(VENV)/.test-installed
	@set -o pipefail; status=0; \
	$(BIN)/python -m twisted.trial $(TRIAL_ARGS) tests 2>&1 | tee .trial.log || status=$$?; \
	$(BIN)/python .ci/trial_summary.py .trial.log || status=1; \
	exit $$status

bench: $(VENV)/.test-installed
	$(BIN)/python -m bench all

clean:
	rm -rf $(VENV) _trial_temp* .trial.log build *.egg-info

# make venv     build .venv with msgd installed (editable)
# make run      start a node on etc/node.ini in the foreground
# make test     install the test extras and run the whole suite
# make bench    run the benchmark suite (see docs/performance.rst)
# make lint     ruff and mypy (the lint extra)
# make docs     build docs/ with Sphinx into docs/_build/html; warnings are errors
# make dist     build the sdist and the wheel into dist/ and check them with twine
# make lowest   the suite again with every dependency at its declared floor (.ci/lowest)
# make install  PREFIX=/opt/msgd: a venv there with msgd installed and Twisted's plugin cache written

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q --disable-pip-version-check
CONFIG ?= etc/node.ini
TRIAL_ARGS ?=
PREFIX ?= /opt/msgd
# Twisted writes twisted/plugins/dropin.cache when it first scans the plugins
# after an install or upgrade; done here, as the install's owner, the node
# (often another user) finds it fresh and never tries to write it.
PLUGIN_CACHE := from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))

.PHONY: venv run test bench lint docs dist lowest install clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e . --config-settings editable_mode=compat
	$(BIN)/python -c "$(PLUGIN_CACHE)"
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(PIP) -e '.[test]' --config-settings editable_mode=compat
	touch $@

$(VENV)/.lint-installed: $(VENV)/.installed
	$(PIP) -e '.[lint]' --config-settings editable_mode=compat
	touch $@

$(VENV)/.docs-installed: $(VENV)/.installed
	$(PIP) -e '.[docs]' --config-settings editable_mode=compat
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

lint: $(VENV)/.lint-installed
	$(BIN)/ruff check .
	$(BIN)/mypy

docs: $(VENV)/.docs-installed
	$(BIN)/sphinx-build -q -W --keep-going -n -b html -d docs/_build/doctrees docs docs/_build/html

dist: $(VENV)/.lint-installed
	rm -rf dist
	$(BIN)/python -m build -q -o dist .
	$(BIN)/twine check --strict dist/*

lowest: dist
	PYTHON=$(PYTHON) .ci/lowest

install:
	test -x $(PREFIX)/bin/python || $(PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/pip install -q --disable-pip-version-check .
	$(PREFIX)/bin/python -c "$(PLUGIN_CACHE)"

clean:
	rm -rf $(VENV) .venv-lowest _trial_temp* .trial.log build dist docs/_build *.egg-info

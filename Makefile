# One command to run the quick start, one to run every test. Both set up what they need:
# .venv (the side-car and test tools) and .venv-synapse (a local Synapse, kept apart).
PYTHON ?= python3
VENV := .venv
SYNAPSE_VENV := .venv-synapse
SYNAPSE_VERSION := 1.163.2

.PHONY: run test lint bench setup clean

run: setup
	$(VENV)/bin/python -m demo.run $(ARGS)

test: setup
	$(VENV)/bin/ruff check bot tests bench demo synapse-example integrations
	$(VENV)/bin/ruff format --check bot tests bench demo synapse-example integrations
	ROUTE_SIDECAR_REQUIRE_SYNAPSE=1 SYNAPSE_PYTHON=$(CURDIR)/$(SYNAPSE_VENV)/bin/python \
		$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	SYNAPSE_PYTHON=$(CURDIR)/$(SYNAPSE_VENV)/bin/python $(VENV)/bin/python bench/claims.py $(ARGS)

lint: setup
	$(VENV)/bin/ruff check bot tests bench demo synapse-example integrations
	$(VENV)/bin/ruff format --check bot tests bench demo synapse-example integrations

setup: $(VENV)/.installed $(SYNAPSE_VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

$(SYNAPSE_VENV)/.installed:
	$(PYTHON) -m venv $(SYNAPSE_VENV)
	$(SYNAPSE_VENV)/bin/pip install --quiet --upgrade pip
	$(SYNAPSE_VENV)/bin/pip install --quiet 'matrix-synapse==$(SYNAPSE_VERSION)'
	touch $@

clean:
	rm -rf $(VENV) $(SYNAPSE_VENV) .run .pytest_cache .hypothesis

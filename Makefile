# One command to run the demo, one to run every test. Both set up what they need:
# .venv (the side-car and test tools), .venv-synapse (a local Synapse, kept apart) and,
# for the tests, .venv-hermes and .venv-litellm (each pins its own versions of shared
# libraries).
PYTHON ?= python3
VENV := .venv
SYNAPSE_VENV := .venv-synapse
HERMES_VENV := .venv-hermes
SYNAPSE_VERSION := 1.163.2
HERMES_VERSION := 0.19.0
LITELLM_VENV := .venv-litellm
# The side-car installed as README "Deploying" installs it (not editable), with a Python an
# unprivileged user may run: tests/e2e/test_deploy.py follows those steps as `nobody`.
DEPLOY_VENV := .venv-deploy
DEPLOY_PYTHON ?= $(firstword $(wildcard /usr/bin/python3.11 /usr/local/bin/python3.11) $(PYTHON))
PRODUCT_FILES := pyproject.toml $(wildcard bot/*.py bot/*.json migrations/*.sql)
# litellm.proxy.utils needs fastapi, backoff, redis and orjson; litellm[proxy] pulls a
# package PyPI does not have, so they are pinned here.
LITELLM_PACKAGES := 'litellm==1.110.2' 'fastapi==0.165.0' 'backoff==2.2.1' 'redis==8.1.0' 'orjson==3.13.0'

.PHONY: run test lint bench setup clean

run: $(VENV)/.installed $(SYNAPSE_VENV)/.installed
	$(VENV)/bin/python -m demo.run $(ARGS)

test: setup
	$(VENV)/bin/ruff check bot tests bench demo synapse-example integrations
	$(VENV)/bin/ruff format --check bot tests bench demo synapse-example integrations
	ROUTE_SIDECAR_REQUIRE_SYNAPSE=1 SYNAPSE_PYTHON=$(CURDIR)/$(SYNAPSE_VENV)/bin/python \
		$(VENV)/bin/python -m pytest -q --ignore=tests/test_hermes_plugin.py \
		--ignore=tests/test_litellm_hook.py $(PYTEST_ARGS)
	# Hermes Agent and LiteLLM bring their own dependency pins: each is tested in its venv.
	$(HERMES_VENV)/bin/python -m pytest -q tests/test_hermes_plugin.py
	LITELLM_LOCAL_MODEL_COST_MAP=True $(LITELLM_VENV)/bin/python -m pytest -q tests/test_litellm_hook.py

# Every figure of issue 7 in one table (installs wrk with apt-get if missing); a smoke run
# with `make bench ARGS=--quick`, more options with `ARGS=--help`.
bench: $(VENV)/.installed $(SYNAPSE_VENV)/.installed
	SYNAPSE_PYTHON=$(CURDIR)/$(SYNAPSE_VENV)/bin/python $(VENV)/bin/python -m bench $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check bot tests bench demo synapse-example integrations
	$(VENV)/bin/ruff format --check bot tests bench demo synapse-example integrations

setup: $(VENV)/.installed $(SYNAPSE_VENV)/.installed $(HERMES_VENV)/.installed \
	$(LITELLM_VENV)/.installed $(DEPLOY_VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test,encryption,fuzz]'
	touch $@

$(SYNAPSE_VENV)/.installed:
	$(PYTHON) -m venv $(SYNAPSE_VENV)
	$(SYNAPSE_VENV)/bin/pip install --quiet --upgrade pip
	$(SYNAPSE_VENV)/bin/pip install --quiet 'matrix-synapse==$(SYNAPSE_VERSION)'
	touch $@

$(HERMES_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(HERMES_VENV)
	$(HERMES_VENV)/bin/pip install --quiet --upgrade pip
	$(HERMES_VENV)/bin/pip install --quiet -e '.[test]' 'hermes-agent==$(HERMES_VERSION)'
	touch $@

$(LITELLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install --quiet --upgrade pip
	$(LITELLM_VENV)/bin/pip install --quiet -e '.[test]' $(LITELLM_PACKAGES)
	touch $@

# Reinstalled whenever the product changes: it is a copy, not an editable install.
$(DEPLOY_VENV)/.installed: $(PRODUCT_FILES)
	test -x $(DEPLOY_VENV)/bin/pip || $(DEPLOY_PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/pip install --quiet --upgrade pip
	$(DEPLOY_VENV)/bin/pip install --quiet --force-reinstall --no-deps .
	$(DEPLOY_VENV)/bin/pip install --quiet '.[encryption]'
	rm -rf build
	touch $@

clean:
	rm -rf $(VENV) $(SYNAPSE_VENV) $(HERMES_VENV) $(LITELLM_VENV) $(DEPLOY_VENV) .run \
		.pytest_cache .hypothesis

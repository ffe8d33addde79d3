# One command to run the demo, one to run every test. Both set up what they need:
# .venv (the side-car and test tools), .venv-synapse (a local Synapse, kept apart) and,
# for the tests, .venv-hermes/<version> (one per Hermes Agent version), .venv-litellm,
# .venv-gptbot and .venv-nanobot (each pins its own versions of shared libraries).
PYTHON ?= python3
VENV := .venv
SYNAPSE_VENV := .venv-synapse
HERMES_VENVS := .venv-hermes
SYNAPSE_VERSION := 1.163.2
# The Synapse compatibility matrix (`make test-compat`, part of `make test`): the
# end-to-end routing, encryption and deploy tests also run on each older Synapse below,
# each in its own .venv-synapse-<version>. 1.151.0 is the seed deployment's version.
SYNAPSE_COMPAT_VERSIONS := 1.151.0
SYNAPSE_COMPAT_INSTALLED := $(foreach v,$(SYNAPSE_COMPAT_VERSIONS),.venv-synapse-$(v)/.installed)
SYNAPSE_COMPAT_TESTS := tests/e2e/test_routing.py tests/e2e/test_encryption.py \
	tests/e2e/test_deploy.py
# Every Hermes Agent version the plugin and the side-car are tested with (the same list
# as tests/hermes_support.py): the oldest on PyPI, close to the seed deployment, and the
# current one. Each gets its own venv, $(HERMES_VENVS)/<version>.
HERMES_VERSIONS := 0.13.0 0.19.0
HERMES_INSTALLED := $(foreach v,$(HERMES_VERSIONS),$(HERMES_VENVS)/$(v)/.installed)
# The current version's Matrix gateway really runs in the tests
# (tests/e2e/test_hermes_gateway.py): it needs the `matrix` extra (mautrix[encryption]),
# which Hermes would otherwise try to install from the network when the gateway starts.
HERMES_EXTRAS_0.19.0 := [matrix]
HERMES_TESTS := tests/test_hermes_plugin.py tests/test_hermes_install.py tests/test_hermes_route.py
LITELLM_VENV := .venv-litellm
# The dispatcher's client as a dispatcher author installs it (integrations/client, not
# editable, httpx alone): tests/test_client_install.py checks what it brought and claims
# through it.
CLIENT_VENV := .venv-client
# (Its files are symbolic links to route_sidecar's: make reads their targets' times.)
CLIENT_DIST := $(wildcard integrations/client/*.* integrations/client/core/*.py)
# The side-car installed as README "Deploying" installs it (not editable), with a Python an
# unprivileged user may run: tests/e2e/test_deploy.py follows those steps as `nobody`.
DEPLOY_VENV := .venv-deploy
DEPLOY_PYTHON ?= $(firstword $(wildcard /usr/bin/python3.11 /usr/local/bin/python3.11) $(PYTHON))
PRODUCT_FILES := pyproject.toml $(wildcard route_sidecar/*.py route_sidecar/*/*.py \
	route_sidecar/*.json route_sidecar/migrations/*.sql)
# matrix-gptbot, the second real agent (no plugin; tests/e2e/test_gptbot.py): its own venv.
# geopy and beautifulsoup4 are imported but not declared. Offline it cannot fetch
# tiktoken's encodings: the files litellm ships (named by tiktoken's cache keys) are
# copied into its TIKTOKEN_CACHE_DIR.
GPTBOT_VENV := .venv-gptbot
GPTBOT_PACKAGES := 'matrix-gptbot[openai]==0.3.21' geopy beautifulsoup4
LITELLM_TOKENIZERS = $(LITELLM_VENV)/lib/python3.11/site-packages/litellm/litellm_core_utils/tokenizers
# nanobot, the third real agent (no plugin possible; tests/e2e/test_nanobot.py): its own
# venv, with its Matrix channel's packages (nanobot/channels/matrix/manifest.py) installed
# up front, or its gateway pip-installs them at start; tiktoken's cache as gptbot's.
NANOBOT_VENV := .venv-nanobot
NANOBOT_PACKAGES := 'nanobot-ai==0.3.5' 'matrix-nio[e2e]>=0.25.2,<1' 'aiohttp>=3.9.0,<4.0.0' \
	'mistune>=3.0.0,<4.0.0' 'nh3>=0.2.17,<1.0.0'
# litellm.proxy.utils needs fastapi, backoff, redis and orjson; litellm[proxy] pulls a
# package PyPI does not have, so they are pinned here. langfuse: the SDK LiteLLM's own
# `langfuse` callback logs through (tests/test_litellm_hook.py reads what it exports).
LITELLM_PACKAGES := 'litellm==1.110.2' 'fastapi==0.165.0' 'backoff==2.2.1' 'redis==8.1.0' 'orjson==3.13.0' \
	'langfuse==4.18.0'

# Every venv installs the versions it was tested with: constraints/<venv>.txt, written by
# `make lock` from the venvs as they are (a fresh machine then gets what passed here).
# A Synapse or Hermes version without a file of its own installs unconstrained.
LOCK := constraints
constrained = $(addprefix -c ,$(wildcard $(LOCK)/$(1).txt))
# tiktoken's encodings into venv $(1)'s tiktoken-cache, for an agent that cannot fetch them
# offline (gptbot, nanobot): the files litellm ships, named by tiktoken's cache keys.
tiktoken_cache = mkdir -p $(1)/tiktoken-cache \
	&& find $(LITELLM_TOKENIZERS) -maxdepth 1 -regextype posix-extended \
		-regex '.*/[0-9a-f]{40}' -exec cp {} $(1)/tiktoken-cache/ \; \
	&& test -n "$$(ls $(1)/tiktoken-cache)"
# The client distribution installed as a copy into venv $(1), with pip options $(2); its
# build folder (in the checkout, from the symbolic links) removed after.
install_client = $(1)/bin/pip install --quiet --force-reinstall $(2) ./integrations/client \
	&& rm -rf integrations/client/build

.PHONY: run test test-compat lint bench setup clean lock container-base container-tools

run: $(VENV)/.installed $(SYNAPSE_VENV)/.installed
	$(VENV)/bin/python -m demo.run $(ARGS)

test: setup lint
	ROUTE_SIDECAR_REQUIRE_SYNAPSE=1 SYNAPSE_PYTHON=$(CURDIR)/$(SYNAPSE_VENV)/bin/python \
		$(VENV)/bin/python -m pytest -q $(addprefix --ignore=,$(HERMES_TESTS)) \
		--ignore=tests/test_litellm_hook.py $(PYTEST_ARGS)
	# Hermes Agent and LiteLLM bring their own dependency pins: each is tested in its venv,
	# the Hermes plugin in every Hermes version, through that version's own loader and CLI.
	set -e; for version in $(HERMES_VERSIONS); do \
		$(HERMES_VENVS)/$$version/bin/python -m pytest -q $(HERMES_TESTS); done
	LITELLM_LOCAL_MODEL_COST_MAP=True $(LITELLM_VENV)/bin/python -m pytest -q tests/test_litellm_hook.py
	$(MAKE) --no-print-directory test-compat

# The same end-to-end subset on every Synapse of SYNAPSE_COMPAT_VERSIONS (checks that the
# venv really holds that version).
test-compat: $(VENV)/.installed $(DEPLOY_VENV)/.installed $(SYNAPSE_COMPAT_INSTALLED)
	set -e; for version in $(SYNAPSE_COMPAT_VERSIONS); do \
		python=$(CURDIR)/.venv-synapse-$$version/bin/python; \
		$$python -c "import sys, importlib.metadata as m; v = m.version('matrix-synapse'); sys.exit(v != '$$version' and 'venv has Synapse ' + v)"; \
		echo "Synapse $$version: $(SYNAPSE_COMPAT_TESTS)"; \
		ROUTE_SIDECAR_REQUIRE_SYNAPSE=1 SYNAPSE_PYTHON=$$python \
			$(VENV)/bin/python -m pytest -q $(SYNAPSE_COMPAT_TESTS); done

# Every figure of issue 7 in one table (installs wrk with apt-get if missing); a smoke run
# with `make bench ARGS=--quick`, more options with `ARGS=--help`.
bench: $(VENV)/.installed $(SYNAPSE_VENV)/.installed
	SYNAPSE_PYTHON=$(CURDIR)/$(SYNAPSE_VENV)/bin/python $(VENV)/bin/python -m bench $(ARGS)

# ruff and mypy --strict on everything: the product, its integrations, the tests, the bench
# and the demo (pyproject.toml).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check route_sidecar tests bench demo synapse-example integrations
	$(VENV)/bin/ruff format --check route_sidecar tests bench demo synapse-example integrations
	$(VENV)/bin/mypy

setup: $(VENV)/.installed $(SYNAPSE_VENV)/.installed $(HERMES_INSTALLED) \
	$(LITELLM_VENV)/.installed $(DEPLOY_VENV)/.installed $(GPTBOT_VENV)/.installed \
	$(NANOBOT_VENV)/.installed $(CLIENT_VENV)/.installed

$(VENV)/.installed: pyproject.toml $(wildcard $(LOCK)/sidecar.txt) $(VENV)/.client
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet $(call constrained,sidecar) -e '.[test,encryption,fuzz]'
	touch $@

# The reference dispatcher (demo, tests) imports the client as dispatchers do:
# route_sidecar_client from integrations/client, installed as a copy (mypy reads its
# types from there: an editable install of a folder named otherwise hides them), and
# reinstalled whenever its files change.
$(VENV)/.client: $(CLIENT_DIST)
	test -x $(VENV)/bin/pip || $(PYTHON) -m venv $(VENV)
	$(call install_client,$(VENV),--no-deps)
	touch $@

$(SYNAPSE_VENV)/.installed:
	$(PYTHON) -m venv $(SYNAPSE_VENV)
	$(SYNAPSE_VENV)/bin/pip install --quiet --upgrade pip
	$(SYNAPSE_VENV)/bin/pip install --quiet $(call constrained,synapse-$(SYNAPSE_VERSION)) \
		'matrix-synapse==$(SYNAPSE_VERSION)'
	touch $@

.venv-synapse-%/.installed:
	$(PYTHON) -m venv .venv-synapse-$*
	.venv-synapse-$*/bin/pip install --quiet --upgrade pip
	.venv-synapse-$*/bin/pip install --quiet $(call constrained,synapse-$*) 'matrix-synapse==$*'
	touch $@

# .venv-hermes was one venv (0.19.0) before it held one per version: that layout goes.
$(HERMES_VENVS)/%/.installed: pyproject.toml
	test ! -f $(HERMES_VENVS)/pyvenv.cfg || rm -rf $(addprefix $(HERMES_VENVS)/, \
		bin include lib lib64 share pyvenv.cfg .installed)
	$(PYTHON) -m venv $(HERMES_VENVS)/$*
	$(HERMES_VENVS)/$*/bin/pip install --quiet --upgrade pip
	$(HERMES_VENVS)/$*/bin/pip install --quiet $(call constrained,hermes-$*) -e '.[test]' \
		'hermes-agent$(HERMES_EXTRAS_$*)==$*'
	touch $@

# The side-car itself is there for the tests (they start one); the hook imports only the
# client, route_sidecar_client.
$(LITELLM_VENV)/.installed: pyproject.toml $(CLIENT_DIST)
	$(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install --quiet --upgrade pip
	$(LITELLM_VENV)/bin/pip install --quiet $(call constrained,litellm) -e '.[test]' \
		$(LITELLM_PACKAGES)
	$(call install_client,$(LITELLM_VENV),--no-deps)
	touch $@

# Reinstalled whenever the client's files change: it is a copy, not an editable install.
$(CLIENT_VENV)/.installed: $(CLIENT_DIST)
	test -x $(CLIENT_VENV)/bin/pip || $(PYTHON) -m venv $(CLIENT_VENV)
	$(CLIENT_VENV)/bin/pip install --quiet --upgrade pip
	$(call install_client,$(CLIENT_VENV),$(call constrained,client))
	touch $@

$(GPTBOT_VENV)/.installed: $(LITELLM_VENV)/.installed
	$(PYTHON) -m venv $(GPTBOT_VENV)
	$(GPTBOT_VENV)/bin/pip install --quiet --upgrade pip
	$(GPTBOT_VENV)/bin/pip install --quiet $(call constrained,gptbot) $(GPTBOT_PACKAGES)
	$(call tiktoken_cache,$(GPTBOT_VENV))
	touch $@

$(NANOBOT_VENV)/.installed: $(LITELLM_VENV)/.installed
	$(PYTHON) -m venv $(NANOBOT_VENV)
	$(NANOBOT_VENV)/bin/pip install --quiet --upgrade pip
	$(NANOBOT_VENV)/bin/pip install --quiet $(call constrained,nanobot) $(NANOBOT_PACKAGES)
	$(call tiktoken_cache,$(NANOBOT_VENV))
	touch $@

# Reinstalled whenever the product changes: it is a copy, not an editable install.
$(DEPLOY_VENV)/.installed: $(PRODUCT_FILES)
	test -x $(DEPLOY_VENV)/bin/pip || $(DEPLOY_PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/pip install --quiet --upgrade pip
	$(DEPLOY_VENV)/bin/pip install --quiet --force-reinstall --no-deps .
	$(DEPLOY_VENV)/bin/pip install --quiet $(call constrained,sidecar) '.[encryption]'
	rm -rf build
	touch $@

# The image of the Containerfile, built and run by tests/e2e/test_container.py with podman.
# No registry is reachable from CI: its base is made here instead of pulled, Debian
# bookworm's minbase with what python:3.11-slim has (python3 3.11 with venv, CA
# certificates), imported as $(CONTAINER_BASE); the test builds on it with --build-arg BASE.
# Cached in $(CONTAINER_DIR) (the root file system as a tarball). It needs root (apt-get,
# debootstrap): `make test` as root makes it and requires the container test to run.
CONTAINER_DIR := .container
CONTAINER_BASE := localhost/route-sidecar-base:bookworm
DEBIAN_MIRROR ?= http://deb.debian.org/debian
CONTAINER_TOOLS := podman runc debootstrap
ROOT := $(filter 0,$(shell id -u))
export ROUTE_SIDECAR_REQUIRE_CONTAINER := $(if $(ROOT),1)
test: $(if $(ROOT),container-base)

# Imported again when the tarball is newer than the image, or the image is gone.
container-base: container-tools $(CONTAINER_DIR)/base.tar
	podman image exists $(CONTAINER_BASE) \
		&& test $(CONTAINER_DIR)/base.imported -nt $(CONTAINER_DIR)/base.tar \
		|| { podman import --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' \
		--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
		$(CONTAINER_DIR)/base.tar $(CONTAINER_BASE) && touch $(CONTAINER_DIR)/base.imported; }

container-tools:
	@for tool in $(CONTAINER_TOOLS); do command -v $$tool >/dev/null || missing=1; done; \
		test -z "$$missing" || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq $(CONTAINER_TOOLS); }

$(CONTAINER_DIR)/base.tar: | container-tools
	mkdir -p $(CONTAINER_DIR)
	rm -rf $(CONTAINER_DIR)/rootfs
	debootstrap --variant=minbase --include=python3-venv,ca-certificates bookworm \
		$(CONTAINER_DIR)/rootfs $(DEBIAN_MIRROR)
	rm -rf $(CONTAINER_DIR)/rootfs/var/cache/apt/archives/*.deb \
		$(CONTAINER_DIR)/rootfs/var/lib/apt/lists/*
	tar -C $(CONTAINER_DIR)/rootfs --numeric-owner -cf $@.tmp .
	rm -rf $(CONTAINER_DIR)/rootfs
	mv $@.tmp $@

# Rewrites constraints/ from the venvs as they are now (after an upgrade that passed
# `make test`). The project itself is never pinned.
lock:
	mkdir -p $(LOCK)
	set -e; freeze() { $$1/bin/pip freeze --exclude-editable --all \
		| grep -v -i -E '^(route-sidecar|route-sidecar-client|pip|setuptools|wheel)( @|==)' \
		> $(LOCK)/$$2.txt; }; \
	freeze $(VENV) sidecar; \
	freeze $(SYNAPSE_VENV) synapse-$(SYNAPSE_VERSION); \
	for v in $(SYNAPSE_COMPAT_VERSIONS); do freeze .venv-synapse-$$v synapse-$$v; done; \
	for v in $(HERMES_VERSIONS); do freeze $(HERMES_VENVS)/$$v hermes-$$v; done; \
	freeze $(LITELLM_VENV) litellm; \
	freeze $(GPTBOT_VENV) gptbot; \
	freeze $(NANOBOT_VENV) nanobot; \
	freeze $(CLIENT_VENV) client

clean:
	rm -rf $(VENV) $(SYNAPSE_VENV) $(HERMES_VENVS) $(LITELLM_VENV) $(DEPLOY_VENV) $(GPTBOT_VENV) \
		$(NANOBOT_VENV) $(CLIENT_VENV) .run \
		.pytest_cache .hypothesis
	rm -rf .venv-synapse-*

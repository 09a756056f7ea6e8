# Two commands a newcomer needs: `make run` and `make test`. Both create .venv themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 4000
STRIPE_PORT ?= 12111
export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: run test drills venv test-deps bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## make run: the proxy with meterline on embedded defaults, the offline `demo` model, and the
## local Stripe emulator (a test key, never a real one) so meter events are seen landing.
run: $(STAMP)
	@export LITELLM_MASTER_KEY="$${LITELLM_MASTER_KEY:-sk-meterline-demo-master}" \
	        STRIPE_API_KEY=sk_test_meterline_demo \
	        METERLINE_STRIPE_API_BASE=http://127.0.0.1:$(STRIPE_PORT); \
	$(BIN)/meterline stripe-emulator --port $(STRIPE_PORT) & emulator=$$!; \
	trap 'kill $$emulator 2>/dev/null' EXIT INT TERM; \
	$(BIN)/meterline demo --host $(HOST) --port $(PORT) && \
	$(BIN)/litellm --config litellm_config.yaml --host $(HOST) --port $(PORT)

## What the test-suite runs besides Python: a real redis-server, and Debian's chromium for the usage
## page (installed with apt-get when missing).
test-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; fi

## make test: everything the suite needs, then the whole suite but the long fault drills.
test: $(STAMP) test-deps
	$(BIN)/python -m pytest -q -m "not drill"

## make drills: the long fault drills (a proxy killed mid-load, the fleet's background rebuild as time passes).
drills: $(STAMP) test-deps
	$(BIN)/python -m pytest -q -m drill

bench: $(STAMP)
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/relay.py

clean:
	rm -rf $(VENV) .pytest_cache meterline.db meterline.db-* .meterline-demo-key

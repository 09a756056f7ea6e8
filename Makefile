# Two commands a newcomer needs: `make run` and `make test`. Both create .venv themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 4000
export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: run test venv redis-server bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## make run: the proxy with meterline on embedded defaults and the offline `demo` model.
run: $(STAMP)
	LITELLM_MASTER_KEY=$${LITELLM_MASTER_KEY:-sk-meterline-demo-master} $(BIN)/meterline demo --host $(HOST) --port $(PORT)
	LITELLM_MASTER_KEY=$${LITELLM_MASTER_KEY:-sk-meterline-demo-master} exec $(BIN)/litellm --config litellm_config.yaml --host $(HOST) --port $(PORT)

## redis-server for the test-suite (installed with apt-get when missing).
redis-server:
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null)

## make test: everything the suite needs, then the whole suite.
test: $(STAMP) redis-server
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache meterline.db meterline.db-* .meterline-demo-key

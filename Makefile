# Every target sets up what it needs: a fresh clone runs `make serve` or
# `make test` and nothing else. The venv is rebuilt only when a requirements
# file changes (the stamp), and the demo model only when its builder does.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_MODEL := build/demo-model.tar.gz
PORT ?= 8000

.PHONY: serve test model lint format clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

$(DEMO_MODEL): tools/build_demo_model.py $(STAMP)
	$(BIN)/python tools/build_demo_model.py --output $@

model: $(DEMO_MODEL)

serve: $(STAMP) $(DEMO_MODEL)
	$(BIN)/chalice local --no-autoreload --stage dev --host 127.0.0.1 --port $(PORT)

# The suite runs in a network namespace with only loopback: it sends hostile
# URLs on purpose, and there not one packet can leave the machine.
test: $(STAMP) $(DEMO_MODEL) lint
	tools/isolated_network.sh $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build .pytest_cache .ruff_cache

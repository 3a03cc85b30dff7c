VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup engines demo test lint typecheck unit bench clean

setup:
	@bash scripts/setup.sh

# A real vLLM (CPU build) in a venv of its own, for its test and bench/engines.py.
engines: setup
	@bash scripts/setup-vllm.sh

demo: setup
	$(BIN)/python -m mows.demo

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: setup
	$(BIN)/mypy src/mows

test: setup engines lint typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python bench/crc.py
	$(BIN)/python bench/local.py

clean:
	rm -rf $(VENV) .venv-vllm .venv-vllm.log .venv-vllm.failed .pytest_cache .mypy_cache .ruff_cache .demo

VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup demo test lint typecheck unit bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(BIN)/python -m mows.demo

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: setup
	$(BIN)/mypy src/mows

test: setup lint typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python bench/crc.py
	$(BIN)/python bench/local.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .demo

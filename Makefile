# One task runner. Every target creates .venv and installs the project first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-scale chaos services clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

services:
	scripts/ensure-services rabbitmq postgres compose chromium

demo: $(STAMP)
	scripts/ensure-services rabbitmq
	$(BIN)/trm demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Every core at once, each test file on one worker (its module fixtures are made once);
# then, alone, the tests that restart the broker the others use.
test: $(STAMP) services lint
	$(BIN)/pytest -n auto --dist loadfile -m "not exclusive"
	$(BIN)/pytest -m exclusive

bench: $(STAMP)
	scripts/ensure-services rabbitmq
	$(BIN)/trm bench

bench-scale: $(STAMP)
	scripts/ensure-services rabbitmq
	$(BIN)/trm bench --scale

chaos: $(STAMP) services
	$(BIN)/python -m pip install --quiet -e '.[dev,fuzz]'
	$(BIN)/python -m campaigns --full

clean:
	rm -rf $(VENV) demo-run .pytest_cache .mypy_cache .ruff_cache

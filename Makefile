# Two commands on a fresh machine with only Python:
#   make demo   # set up .venv, then run the main job on embedded defaults (configs/demo.yaml)
#   make test   # set up .venv, then run the test suite (CI runs exactly this via .ci/run)
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
ENV := source scripts/env.sh &&
PYTEST_ARGS ?=

.PHONY: setup demo lint test test-fast bench-quick clean

setup:
	bash scripts/setup_env.sh

demo: setup
	$(ENV) $(PY) trainer/main.py --config configs/demo.yaml $(ARGS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

test: setup
	$(ENV) $(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(ENV) $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench-quick: setup
	$(ENV) for b in bench/*.py; do $(PY) $$b --quick || exit 1; done

clean:
	rm -rf runs .cache/ray .pytest_cache

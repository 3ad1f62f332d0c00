# Entry points, each of which sets up its own virtual environment:
#   make demo       train, quantise, export and verify on sklearn's bundled digits
#   make test       run the test suite (what CI runs; without `extended` tests)
#   make test-all   run every test, the `extended` ones too
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Test files spread over 2 processes, each file kept in one (its module
# fixtures built once); `make test JOBS=` runs them in this process.
JOBS ?= -n 2 --dist loadfile

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,examples]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m examples.quickstart

test: venv
	$(VENV)/bin/ruff check .
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest -q $(JOBS)

# -m "" replaces setup.cfg's -m "not extended": no test is deselected.
test-all: venv
	$(VENV)/bin/ruff check .
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest -q $(JOBS) -m ""

.PHONY: venv demo test test-all

# The README's two commands: `make demo` and `make test`. Both run `make setup` first.
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
export VENV
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup demo test test-python test-r clean

setup:
	@bash tools/setup.sh

demo: setup
	$(PY) demo/run_demo.py

test: setup test-python

test-python:
	$(PY) -m pytest tests/python -v -rs --durations=10

clean:
	rm -rf $(VENV) demo-output .pytest_cache

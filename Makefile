# Two entry points for a newcomer: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("aqua needs Python >= 3.11") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	# The pinned CPU build first, so nothing pulls CUDA wheels on a GPU-less host.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,engine]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/aqua-demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/core.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info

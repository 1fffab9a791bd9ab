# Two commands do everything on a machine that has only Python: `make demo` and `make test`.
# Both create .venv on first use and install the project with what it needs.
# MindSpore 2.10 ships wheels for CPython 3.10-3.12 only: use the newest such interpreter on PATH
# (override with `make PYTHON=/path/to/python3.x`). Empty when there is none; $(STAMP) then stops.
SUPPORTED := 3.10-3.12
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell for p in python3.12 python3.11 python3.10 python3; do \
	  command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))' 2>/dev/null \
	  && { echo $$p; break; }; done)
endif
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cytofuse-installed
DEMO_OUT ?= demo_out

.PHONY: install demo test test-fast bench clean

# What the chosen interpreter is, asked only when .venv has to be made (recursive variables).
comma := ,
PY_VERSION = $(shell $(PYTHON) -c 'import platform; print(platform.python_version())' 2>/dev/null)
PY_MINOR   = $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
PY_OK      = $(shell $(PYTHON) -c 'import sys; print(int((3, 10) <= sys.version_info[:2] <= (3, 12)))' 2>/dev/null)
PY_VENV    = $(shell $(PYTHON) -c 'import venv, ensurepip; print(1)' 2>/dev/null)
SYSTEM_PY3 = $(or $(shell python3 -c 'import platform; print(platform.python_version())' 2>/dev/null),missing)

# Each check stops make with one line naming what to install, instead of pip's "requires a
# different Python" (or a venv without pip) after minutes of work.
$(STAMP): setup.cfg pyproject.toml
	$(if $(PYTHON),,$(error CytoFuse needs Python $(SUPPORTED) for MindSpore but python3 is $(SYSTEM_PY3): install python3.12 and python3.12-venv (e.g. apt-get install python3.12 python3.12-venv) or run make PYTHON=/path/to/python3.12))
	$(if $(filter 1,$(PY_OK)),,$(error PYTHON=$(PYTHON) is Python $(or $(PY_VERSION),(not found)) but CytoFuse needs Python $(SUPPORTED) for MindSpore: install python3.12 or run make PYTHON=/path/to/python3.12))
	$(if $(PY_VENV),,$(error $(PYTHON) has no venv module with pip (ensurepip): install python$(PY_MINOR)-venv (e.g. apt-get install python$(PY_MINOR)-venv)))
	@echo "Creating $(VENV) with $(PYTHON) (Python $(PY_VERSION))."
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel
	@echo "Installing CytoFuse and its dependencies: the first time downloads about 800 MB (MindSpore)$(comma)"
	@echo "fills about 2.5 GB of disk and takes 3-10 minutes depending on the connection."
	$(BIN)/python -m pip install --progress-bar on -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cytofuse demo --out $(DEMO_OUT)

# The full suite, slow tests included: what CI runs.
test: $(STAMP)
	$(BIN)/python -m pytest -q -rs --durations=15

# Only the fast unit tests (seconds).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python -m experiments.benchmarks.run_all

clean:
	rm -rf $(VENV) $(DEMO_OUT) runs *.egg-info

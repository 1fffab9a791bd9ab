# Two commands do everything on a machine that has only Python: `make demo` and `make test`.
# Both create .venv on first use and install the project with what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cytofuse-installed
DEMO_OUT ?= demo_out

.PHONY: install demo test test-fast bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e ".[dev]"
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

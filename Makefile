# One-command entry points for a fresh machine: `make demo` and `make test`.
# Both create (or update) the virtual environment in .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
JOBS   ?= 2

.PHONY: demo test test-slow venv bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision are resolved together from the registry (never pin the local CPU wheel).
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps torchmultimodal-nightly
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m polymodal.demo

test: $(STAMP)
	$(PY) -m pytest -n $(JOBS) -q --durations=15 -m "not slow" tests

# Full-size parity runs (real configurations against the reference libraries): minutes each on 2 cores.
test-slow: $(STAMP)
	$(PY) -m pytest -n $(JOBS) -q --durations=15 -m slow tests

bench: $(STAMP)
	$(PY) benchmarks/run.py $(ARGS)

clean:
	rm -rf $(VENV) .hypothesis

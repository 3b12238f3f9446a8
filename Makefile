# Two commands on a fresh machine: `make demo` runs the main job, `make test` runs the checks.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned: an unpinned resolve pulls a multi-GB CUDA build.
# Every other dependency is pinned by constraints.txt (the versions the test suite passed with;
# refresh with `make constraints` after an upgrade has been tested).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test lint demo clean constraints

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "fedge needs Python >= 3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	$(PY) -m pytest

demo: setup
	$(VENV)/bin/fedge demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

constraints: setup
	$(PY) -m pip freeze --exclude-editable | grep -v '^torch==' > constraints.txt

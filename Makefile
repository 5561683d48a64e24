# magma: two commands do everything. `make test` and `make demo` set up the project-local
# virtual environment (.venv) on first use, so each works on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test test-slow lab export clean-nbs check

$(STAMP): setup.py settings.ini
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m ipykernel install --user --name magma --display-name "Python (magma)" >/dev/null
	touch $(STAMP)

setup: $(STAMP)  ## create .venv, install magma with its pins, register the "magma" Jupyter kernel

test: $(STAMP)  ## the fast suite: every notebook's tests (nbdev_test), then pytest
	$(BIN)/nbdev_test --n_workers 2
	$(BIN)/pytest -q tests

test-slow: $(STAMP)  ## also run the cells flagged #| slow
	$(BIN)/nbdev_test --n_workers 2 --flags slow
	$(BIN)/pytest -q tests

lab: $(STAMP)  ## open the notebooks in JupyterLab
	$(BIN)/jupyter lab nbs

export: $(STAMP)  ## notebooks -> package, then strip notebook noise
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean

check: $(STAMP)  ## notebooks clean and package in sync (what CI checks)
	$(BIN)/nbdev_clean && git diff --quiet -- nbs || { echo "nbdev_clean changed nbs/: run 'make export' and commit"; exit 1; }
	$(BIN)/nbdev_export && git diff --quiet -- magma || { echo "magma/ is out of sync with nbs/: run 'make export' and commit"; exit 1; }

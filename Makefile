# magma: two commands do everything. `make test` and `make demo` set up the project-local
# virtual environment (.venv) on first use, so each works on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test test-slow demo lab export check bench sweep docs docs-check

# settings.ini declares ranges (what `pip install magma-ssl` accepts); constraints.txt pins the versions tested here.
# The project's own environment gets every extra: dev (tests, docs), notebooks (jupyterlab, papermill), figures.
$(STAMP): setup.py settings.ini constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt torch torchvision
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,notebooks,figures]'
	! $(BIN)/python -m pip show -q magma 2>/dev/null || $(BIN)/python -m pip uninstall -y -q magma  # the old distribution name
	$(BIN)/python -m ipykernel install --user --name magma --display-name "Python (magma)" >/dev/null
	touch $(STAMP)

setup: $(STAMP)  ## create .venv, install magma with its pins, register the "magma" Jupyter kernel

# The tests run in TEST_JOBS processes (nbdev_test's workers, then pytest-xdist's), each with ONE OpenMP thread.
# Two processes of two threads on 2 cores oversubscribe them, and OpenMP's waiting threads spin: measured on the 2-core
# AMD EPYC, `nbdev_test --n_workers 2` took 449 s with torch's default threads and 210 s with OMP_NUM_THREADS=1
# (10_train.ipynb alone 350 s against 125 s), and pytest -n 2 took 193-226 s over four runs against 298 s serially.
# TEST_JOBS=1 runs one process at a time.
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n > 8 ? 8 : n )))
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

test: $(STAMP)  ## the fast suite: every notebook's tests (nbdev_test), then pytest (tests marked slow or site skipped)
	$(TEST_ENV) $(BIN)/nbdev_test --n_workers $(TEST_JOBS)
	$(TEST_ENV) $(BIN)/pytest -q -n $(TEST_JOBS) --dist worksteal -m 'not slow and not site' tests

test-slow: $(STAMP)  ## also run the cells flagged #| slow and every pytest test (site ones skip without _docs/)
	$(TEST_ENV) $(BIN)/nbdev_test --n_workers $(TEST_JOBS) --flags slow
	$(TEST_ENV) $(BIN)/pytest -q -n $(TEST_JOBS) --dist worksteal tests

# The demo: M-MAE on the offline synthetic dataset (3,000 generated images of 10 shape/texture classes, 10% held out as
# validation), 3 epochs of ViT-T/4 on CPU, then kNN and linear probes against the random-init floor.
# How it was chosen (validation split only: 300 held-out training images, CLS token, pretrained vs floor; floor kNN 39.0,
# linear 45.7): the old demo (15 epochs, batch 128, lr 1e-3) gave kNN 37.0 / linear 46.3 (kNN below the floor), MAE at
# the same settings 24.0 / 29.3; batch 64, lr 2e-3: 1 epoch 41.7 / 45.7 (linear only equal), 3 epochs 40.3 / 50.7,
# 8 epochs 25.0 / 33.0; 2 epochs of 5,000 images 37.6 / 48.0 (floor 38.2 / 47.0); MAE for 3 epochs 17.7 / 26.0.
# On this data a ViT-T/4 masked autoencoder dips below a random network after ~300 steps and needs far more than a
# 10-minute CPU budget to climb back (the mini profile: 40 epochs of CIFAR-10); 3 epochs (126 steps) was the only
# setting above the floor on both. Details and the measured times: README, "make demo"; results in results/demo/.
DEMO_ARGS ?= -p method m-mae -p profile smoke -p dataset synthetic -p n_per_class 300 -p val_fraction 0.1 -p epochs 3 \
	-p batch_size 64 -p lr 2e-3 -p warmup_epochs 0.5 -p progress False
DEMO_HEADLINE := import json, sys; r = json.load(open(sys.argv[1])); name = dict(knn_acc="kNN", linear_acc="linear"); \
	rows = [(s, m, r[p + m], r[p + "random_" + m]) for s, p in (("test", ""), ("validation", "val_")) for m in name if p + m in r]; \
	[print("%10s %6s CLS: pretrained %5.1f%%, random-init floor %5.1f%%, margin %+5.1f (%s the floor)" % (s, name[m], a, b, a - b, ("NOT above", "above")[a > b])) for s, m, a, b in rows]
demo: $(STAMP)  ## pretrain + evaluate M-MAE on the synthetic dataset through papermill (about 2 minutes on 2 cores)
	mkdir -p runs/demo
	$(BIN)/papermill nbs/pretrain.ipynb runs/demo/m-mae.ipynb $(DEMO_ARGS) -p out_dir $(CURDIR)/runs/demo/m-mae -p overwrite True \
		--cwd nbs --log-output --no-progress-bar 2>&1 | grep -E "^(kNN|linear|DBI|validation|method|results|plots)" || true
	@test -f runs/demo/m-mae/results.json || { echo "demo failed: see runs/demo/m-mae.ipynb"; exit 1; }
	@echo "headline (CLS token), pretrained against the same ViT at random initialisation:"
	@$(BIN)/python -c '$(DEMO_HEADLINE)' runs/demo/m-mae/results.json
	@echo "output notebook: $(CURDIR)/runs/demo/m-mae.ipynb"
	@echo "run directory:   $(CURDIR)/runs/demo/m-mae (results.json, metrics.csv, fig2_training.png, fig4_pacmap.png, fig_reconstruction.png, tb/)"

bench: $(STAMP)  ## every benchmark, printed (see bench/README.md)
	$(BIN)/python bench/manifold_bench.py
	$(BIN)/python bench/data_bench.py
	$(BIN)/python bench/methods_bench.py
	$(BIN)/python bench/train_bench.py
	$(BIN)/python bench/eval_bench.py

# The GPU check in one command, on any CUDA machine with torch, timm, safetensors and pytest (magma itself is imported
# from this checkout; the .venv is not used, so nothing is installed): the GPU tests, then the trainer-step bench within
# BUDGET seconds in all (rows that no longer fit are skipped and say so). One table line per row as it is measured, one
# VERDICT line; the rows in GPU_CHECK_OUT (JSON); exit 1 when a test or an eager row fails. DRY_RUN=1: the plan, the
# time estimate and the JSON schema, at once, on any machine. See bench/README.md.
GPU_CHECK_OUT ?= /tmp/magma-gpu-check.json
BUDGET ?= 480
.PHONY: gpu-check
gpu-check:  ## the GPU tests + the step bench on this machine's GPU (GPU_CHECK_OUT=path BUDGET=seconds DRY_RUN=1)
	$(PYTHON) bench/gpu_check.py --budget $(BUDGET) $(if $(DRY_RUN),--dry-run,--out $(GPU_CHECK_OUT))

sweep: $(STAMP)  ## print the commands that run every paper table on a multi-GPU node (MODE=slurm for a SLURM array)
	$(BIN)/python scripts/sweep_commands.py --mode $(or $(MODE),node)

# The docs site: nbdev processes the notebooks (show_doc, doc links) into _proc/, smalldocs (or Quarto, when a quarto
# binary is on PATH) renders them into _docs/. README.md is hand-written and never touched (settings.ini: readme_nb).
docs: $(STAMP)  ## build the docs site from the notebooks into _docs/ (browse it with `make docs-serve`)
	$(BIN)/python scripts/build_docs.py

.PHONY: docs-serve
docs-serve: docs  ## build the docs, serve _docs/ on http://127.0.0.1:8000 (search needs http; PORT=8001: another)
	@echo "docs: http://127.0.0.1:$(or $(PORT),8000)/  (Ctrl-C stops)"
	$(BIN)/python -m http.server $(or $(PORT),8000) --bind 127.0.0.1 --directory _docs

docs-check: docs  ## build the docs, check them served on 127.0.0.1 in headless Chromium (apt: chromium libjs-katex)
	MAGMA_REQUIRE_DOCS=1 $(BIN)/pytest -q tests/test_docs.py
	@echo "screenshots: $(addprefix $(CURDIR)/_docs/screenshots/,index.png manifold.png table2.png figures.png)"

lab: $(STAMP)  ## open the notebooks in JupyterLab
	$(BIN)/jupyter lab nbs

export: $(STAMP)  ## notebooks -> package, then strip notebook noise
	$(BIN)/nbdev_clean
	$(BIN)/nbdev_export

check: $(STAMP)  ## notebooks clean and package in sync (what CI checks)
	$(BIN)/nbdev_clean && git diff --quiet -- nbs || { echo "nbdev_clean changed nbs/: run 'make export' and commit"; exit 1; }
	$(BIN)/nbdev_export && git diff --quiet -- magma || { echo "magma/ is out of sync with nbs/: run 'make export' and commit"; exit 1; }
	$(BIN)/ruff check --select F magma  # undefined names, unused imports: exported code stands on its own

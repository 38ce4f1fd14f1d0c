# hsc-fast developer entry points. `make demo` and `make test` do all set-up themselves.
#
# The virtual environment lives in a cache folder keyed by the hash of constraints.txt and
# setup.py, and .venv/ at the repo root links to it: a fresh clone (CI) reuses a finished
# environment instead of reinstalling ~5 GB of torch, and any change to the pins builds a new one.
SHELL := /bin/bash
PYTHON_BASE ?= python3
DEPS_HASH := $(shell cat constraints.txt setup.py | sha256sum | cut -c1-16)
VENV_CACHE ?= $(HOME)/.cache/hsc-fast/venv-$(DEPS_HASH)
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup lint test test-fast demo bench ablation docs docs-serve clean-venv

setup:
	@if [ ! -f "$(VENV_CACHE)/.deps-ok" ]; then \
		echo "[setup] creating $(VENV_CACHE) (first time: a few minutes)"; \
		rm -rf "$(VENV_CACHE)" && mkdir -p "$(dir $(VENV_CACHE))" && \
		$(PYTHON_BASE) -m venv "$(VENV_CACHE)" && \
		"$(VENV_CACHE)/bin/pip" install -q -c constraints.txt -e ".[test,docs,lite2]" && \
		touch "$(VENV_CACHE)/.deps-ok" || { echo "[setup] install failed"; exit 1; }; \
	fi
	@if [ "$$(readlink $(VENV) 2>/dev/null)" != "$(VENV_CACHE)" ]; then rm -rf $(VENV); ln -s "$(VENV_CACHE)" $(VENV); fi
	@# Point the editable install at this checkout (cheap; the cache may serve several clones).
	@$(PY) -c "import hsc_fast, pathlib, sys; sys.exit(pathlib.Path(hsc_fast.__file__).resolve().parent.parent != pathlib.Path('.').resolve())" 2>/dev/null \
		|| $(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .

# ruff.toml says which rules; the tests print their 15 slowest (pytest.ini).
lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	OMP_NUM_THREADS=1 TRITON_INTERPRET=1 $(PY) -m pytest -q tests $(PYTEST_ARGS)

# Quick loop for development: skip the multi-process tests.
test-fast: setup
	OMP_NUM_THREADS=1 TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not slow" tests $(PYTEST_ARGS)

# The whole pipeline on the synthetic set, 2 CPU ranks under the DeepSpeed launcher. Rerunning
# skips finished stages (RUN_DIR/stages/*.json); `rm -rf runs/demo` starts over.
DEMO_PORT ?= 29533
demo: setup
	OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu $(VENV)/bin/deepspeed --num_gpus 2 --master_port $(DEMO_PORT) \
		launch/pipeline.py --demo --run-dir runs/demo

bench: setup
	$(PY) benchmarks/bench_loader.py --quick
	$(PY) benchmarks/bench_psc.py --quick
	$(PY) benchmarks/bench_crf.py --quick

ablation: setup
	OMP_NUM_THREADS=1 $(PY) launch/ablation.py --run-dir runs/ablation

# The documentation site (mkdocs.yml, docs/): strict, as tests/test_docs.py builds it in `make test`.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

docs-serve: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

clean-venv:
	rm -rf $(VENV) "$(VENV_CACHE)"

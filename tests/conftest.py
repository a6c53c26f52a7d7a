"""Shared fixtures. Slow tests (marked `slow`) run only with KD_RUN_SLOW=1 (make test-all)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")  # in-process vLLM would otherwise leave torch at 1 thread
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if os.environ.get("KD_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with KD_RUN_SLOW=1 (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> str:
    """A tiny trained Llama teacher + BPE tokenizer saved to disk (transformers- and vLLM-loadable)."""
    import torch

    from assets.synthetic import make_tiny_teacher

    folder = str(tmp_path_factory.mktemp("tiny_teacher"))
    # The same teacher whichever test modules were imported first (test_losses sets torch to 1 thread at import):
    # float results, and so the teacher's weights, depend on the thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        make_tiny_teacher(folder, n_docs=120, steps=30)
    finally:
        torch.set_num_threads(threads)
    return folder


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is faster, and immune to OpenMP spin-waits when the machine is shared."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

"""Material for the demo, the benchmarks and the tests, not part of the store: real text (`corpora`), offline
stand-ins (`synthetic`: corpus, tokenizer, tiny teacher) and the real teacher, SmolLM2 (`smollm2`).

Everything fetched or converted is cached under `default_cache()`.
"""

import os


def default_cache() -> str:
    """$MOEKD_CACHE, else ~/.cache/moekd: where downloads and converted models are kept."""
    return os.path.expanduser(os.environ.get("MOEKD_CACHE", "~/.cache/moekd"))

"""The teacher's tokenizer, carried by the store: what a training node needs to read a store's rows as text (and so
teach a student of another tokenizer), without anything from the teacher's folder.

`kdstore build` saves the tokenizer it encoded the rows with into `STORE/tokenizer/` (`save_tokenizer`) and records
that folder in the manifest (`tokenizer.files`). `load_tokenizer` reads it back on any node, from any filesystem
the store lives on, and checks it against the fingerprint the manifest recorded. A store written before stores
carried their tokenizer falls back to the tokenizer it names (`tokenizer.name_or_path`), used only if it loads here
and has that fingerprint.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import pyarrow.fs as pafs

from . import fs as storefs
from .fingerprint import tokenizer_matches

TOKENIZER_DIR = "tokenizer"


def save_tokenizer(filesystem: pafs.FileSystem, root: str, tokenizer: Any) -> str:
    """Write `tokenizer` (its `save_pretrained` files) into the store's `tokenizer/` folder, each file atomically;
    returns the folder's name, as the manifest records it. Workers of one build write the same files."""
    folder = storefs.join(root, TOKENIZER_DIR)
    filesystem.create_dir(folder, recursive=True)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                storefs.write_atomic(filesystem, storefs.join(folder, name), f.read())
    return TOKENIZER_DIR


def load_tokenizer(store: Any) -> Any:
    """The tokenizer a store (`LogitStore`) was built with: the copy the store carries, else (a store written before
    stores carried one) the tokenizer its manifest names, if it loads here. ValueError if neither can be had, or if
    what loads does not have the fingerprint the manifest records."""
    from transformers import AutoTokenizer

    recorded = store.manifest.tokenizer
    folder = recorded.get("files")
    if folder:
        with tempfile.TemporaryDirectory() as tmp:
            where = storefs.join(store.root, folder)
            for info in store.fs.get_file_info(pafs.FileSelector(where)):
                if info.type == pafs.FileType.File:
                    with open(os.path.join(tmp, info.base_name), "wb") as f:
                        f.write(storefs.read_bytes(store.fs, info.path))
            tokenizer = AutoTokenizer.from_pretrained(tmp)
        source = f"{store.root}/{folder}"
    else:
        name = recorded.get("name_or_path")
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"the store {store.root} does not carry its tokenizer (built before stores did) and the "
                             f"tokenizer it names ({name}) does not load here ({e}): rebuild the store, or make that "
                             "tokenizer available at that path") from None
        source = str(name)
    if not recorded.get("fingerprint") or not tokenizer_matches(tokenizer, recorded):
        raise ValueError(f"the tokenizer loaded from {source} is not the one the store {store.root} records "
                         f"(fingerprint {recorded.get('fingerprint')}): its rows cannot be read as text with it")
    return tokenizer

"""Where a store lives: any filesystem pyarrow.fs reaches natively, or any fsspec filesystem."""

from __future__ import annotations

import hashlib
import os

import pyarrow.fs as pafs

from . import format as storeformat


def resolve(url: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """URL or path -> (pyarrow filesystem, path inside it).

    Local paths, file://, s3://, gs://, hdfs:// use pyarrow's own filesystems; any other scheme that fsspec
    knows (memory://, az://, ...) is wrapped through pyarrow's FSSpecHandler.
    """
    if filesystem is not None:
        return filesystem, url
    if "://" not in url:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(url))
    try:
        return pafs.FileSystem.from_uri(url)
    except (ValueError, OSError):  # pyarrow.ArrowInvalid is a ValueError: a scheme pyarrow lacks
        pass
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def location(path: str, filesystem: pafs.FileSystem | None = None) -> tuple[str, bool]:
    """(where `path` leads, whether it is local), so that two spellings of one place compare equal: local paths
    (and file:// URLs, or any path on a given LocalFileSystem) by real path (`a`, `./a/`, `~/a`, a symlink to it);
    other URLs as written, less a trailing slash."""
    if filesystem is not None:
        local = isinstance(filesystem, pafs.LocalFileSystem)
    else:
        path = path.removeprefix("file://")
        local = "://" not in path
    return (os.path.realpath(os.path.expanduser(path)) if local else path.rstrip("/")), local


def overlap(output: str, source: str) -> str | None:
    """How the place `output` names relates to `source`'s: "is", "is inside", "contains", or None when they are
    apart (a local path and a URL never overlap). Reads nothing: what a writer checks before it could overwrite
    an input."""
    (out, out_local), (src, src_local) = location(output), location(source)
    if out_local != src_local:
        return None
    if out == src:
        return "is"
    if out_local:
        common = os.path.commonpath([out, src])
        inside, contains = common == src, common == out
    else:
        inside, contains = out.startswith(src + "/"), src.startswith(out + "/")
    return "is inside" if inside else "contains" if contains else None


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def temp_name(path: str) -> str:
    """A sibling name no reader looks at (`format.temp_name`): written there first, then renamed over `path`."""
    parent, _, name = path.rpartition("/")
    return f"{parent}/{storeformat.temp_name(name)}"


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` under a temporary name, then rename it to `path` (replacing any old file)."""
    tmp = temp_name(path)
    with fs.open_output_stream(tmp) as out:
        out.write(data)
    fs.move(tmp, path)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


class HashingSink:
    """A file-like sink that hashes (sha256) and counts what passes through to a pyarrow output stream."""

    def __init__(self, stream):
        self.stream = stream
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self.size += view.nbytes
        self.stream.write(view)
        return view.nbytes

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        if not self.closed:
            self.stream.close()
            self.closed = True


def sha256_of(fs: pafs.FileSystem, path: str, chunk: int = 1 << 22) -> tuple[str, int]:
    """(hex sha256, byte size) of a file, streamed."""
    h = hashlib.sha256()
    size = 0
    with fs.open_input_stream(path) as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
            size += len(b)
    return h.hexdigest(), size

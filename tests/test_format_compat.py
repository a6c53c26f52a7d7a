"""Format v1 stays readable: stores written by earlier code (tests/fixtures/, from commit 1201e45) still verify
and decode to exactly the values recorded when they were written."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from fixtures.make_format_v1 import FIELDS, STORES, write

from logit_store import LogitStore

FIXTURES = Path(__file__).parent / "fixtures"


def _assert_decodes_to(store: LogitStore, expected, name: str) -> None:
    rows = list(store)
    assert len(rows) == store.manifest.rows == len({k.split("/")[1] for k in expected.files
                                                     if k.startswith(name + "/")})
    for r, row in enumerate(rows):
        for f in FIELDS:
            want, got = expected[f"{name}/{r}/{f}"], np.asarray(getattr(row, f))
            assert (got.dtype, got.shape) == (want.dtype, want.shape), f"{name} row {r} {f}"
            np.testing.assert_array_equal(got, want, err_msg=f"{name} row {r} {f}")


@pytest.mark.parametrize("name", list(STORES))
def test_committed_v1_store_verifies_and_decodes_unchanged(name):
    store = LogitStore.open(str(FIXTURES / name))
    assert store.manifest.status == "complete"
    assert store.verify() == []
    with np.load(FIXTURES / "v1-expected.npz") as expected:
        _assert_decodes_to(store, expected, name)


def test_todays_writer_writes_the_fixtures_again(tmp_path):
    """The same rows written by today's code: same schema and metadata keys, same decoded values."""
    write(str(tmp_path))
    with np.load(FIXTURES / "v1-expected.npz") as expected:
        for name in STORES:
            old, new = LogitStore.open(str(FIXTURES / name)), LogitStore.open(str(tmp_path / name))
            assert new.verify() == []
            assert [s.file for s in new.manifest.shards] == [s.file for s in old.manifest.shards]
            for s in old.manifest.shards:
                schemas = [pa.ipc.open_file(str(root / name / s.file)).schema for root in (FIXTURES, tmp_path)]
                assert schemas[0].equals(schemas[1], check_metadata=True)
                assert schemas[1].metadata[b"kd.format_version"] == b"1"
            _assert_decodes_to(new, expected, name)

"""The one reader of datastore rows (builder/rows.py), checked against pyarrow reading the shards
directly; the training sample through it keeps its ids and checksum."""
import numpy as np
import pyarrow.parquet as pq
import pytest

from builder.key_shards import COLUMNS, ShardError, decode_keys
from builder.manifest import ManifestError, load_manifest, write_manifest
from builder.rows import RowIdError, iter_key_range, iter_range, read_rows, row_groups
from builder.sample import sample_checksum, sample_keys
from builder.storage import Storage
from builder.synthetic import write_synthetic_datastore

DIM = 32


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """12,000 rows in 7 shards of 1,900 rows max, row groups of 500 (the last of each shard shorter)."""
    root = tmp_path_factory.mktemp("rows") / "ds"
    write_synthetic_datastore(str(root), 12000, DIM, shard_rows=1900, row_group_rows=500, seed=3)
    return str(root)


def arrow_columns(uri: str) -> dict[str, np.ndarray]:
    """Every row, read by pyarrow alone: the shards in manifest order, whole."""
    st = Storage.from_uri(uri)
    m = load_manifest(st)
    tables = [pq.read_table(f"{uri}/{s['path']}") for s in m.shards]
    out = {c: np.concatenate([t.column(c).to_numpy() for t in tables]) for c in ("value", "doc", "pos")}
    out["key"] = np.concatenate([decode_keys(t.column("key"), DIM) for t in tables])
    return out


def test_row_groups_match_the_parquet_footers(synth):
    st = Storage.from_uri(synth)
    m = load_manifest(st)
    rg = row_groups(m)
    footers = [pq.ParquetFile(f"{synth}/{s['path']}").metadata for s in m.shards]
    got = [(int(rg.shard[g]), int(rg.group[g]), int(rg.num_rows[g])) for g in range(len(rg.num_rows))]
    want = [(i, g, f.row_group(g).num_rows) for i, f in enumerate(footers) for g in range(f.num_row_groups)]
    assert got == want
    np.testing.assert_array_equal(rg.first_id, np.concatenate([[0], np.cumsum(rg.num_rows)[:-1]]))
    np.testing.assert_array_equal(rg.of(np.array([0, 499, 500, 1899, 1900, 11999])), [0, 0, 1, 3, 4, len(got) - 1])


def test_read_rows_equals_pyarrow(synth):
    st = Storage.from_uri(synth)
    m = load_manifest(st)
    ref = arrow_columns(synth)
    rng = np.random.default_rng(0)
    ids = np.concatenate([rng.integers(0, m.num_keys, 700), [0, 11999, 1899, 1900, 5, 5]])   # any order, repeats
    for threads in (1, 4):
        got = read_rows(st, m, ids, threads=threads)
        assert set(got) == set(COLUMNS)
        assert got["key"].dtype == np.float16 and got["key"].shape == (len(ids), DIM)
        assert (got["value"].dtype, got["doc"].dtype, got["pos"].dtype) == (np.int32, np.int64, np.int64)
        for c in COLUMNS:
            np.testing.assert_array_equal(got[c], ref[c][ids])
    some = read_rows(st, m, ids[:10], ("doc", "pos"))
    assert set(some) == {"doc", "pos"}
    np.testing.assert_array_equal(some["pos"], ref["pos"][ids[:10]])
    empty = read_rows(st, m, np.zeros(0, np.int64), ("key", "value"))
    assert empty["key"].shape == (0, DIM) and empty["value"].shape == (0,)
    with pytest.raises(RowIdError, match=r"outside the datastore's \[0, 12000\): \[12000, -1\]"):
        read_rows(st, m, np.array([3, 12000, -1]))


def test_iter_range_equals_pyarrow(synth):
    st = Storage.from_uri(synth)
    m = load_manifest(st)
    ref = arrow_columns(synth)
    for first, num in [(0, 12000), (1899, 2), (3333, 4444), (11999, 1), (500, 0)]:
        for prefetch in (True, False):
            batches = list(iter_range(st, m, first, num, COLUMNS, prefetch))
            ids = np.concatenate([b[0] for b in batches]) if batches else np.zeros(0, np.int64)
            np.testing.assert_array_equal(ids, np.arange(first, first + num))
            for c in COLUMNS:
                if batches:
                    np.testing.assert_array_equal(np.concatenate([b[1][c] for b in batches]), ref[c][first:first + num])
            assert all(len(b[0]) <= 500 for b in batches)                   # one row group at a time
    keys = np.concatenate([k for _, k in iter_key_range(st, m, 100, 3000)])
    np.testing.assert_array_equal(keys, ref["key"][100:3100])


def test_reader_checks_the_manifest_layout(synth, tmp_path):
    import shutil
    uri = str(tmp_path / "ds")
    shutil.copytree(synth, uri)
    st = Storage.from_uri(uri)
    m = load_manifest(st)
    m.build["row_group_rows"] = 400                      # not how the shards were written
    m.identity["row_group_rows"] = 400
    write_manifest(st, m)
    with pytest.raises(ShardError, match="row groups differ from the manifest's layout"):
        read_rows(st, load_manifest(st), np.array([10]))
    m.build.pop("row_group_rows"), m.identity.pop("row_group_rows")
    write_manifest(st, m)
    with pytest.raises(ManifestError, match="records no row_group_rows"):
        list(iter_range(st, load_manifest(st), 0, 10))


# sample_checksum of sample_keys on this datastore, as computed before the reader was unified
# (builder/sample.py's own read_sample): the same seed must keep giving the same sample
SAMPLES = {(1500, 5, 2.0): "sha256:ceafc5ed03bccfd423ecd6b903c434563d9530143c2462efd358807bb2d15559",
           (4000, 1, 4.0): "sha256:426cb7de002d0c151fbcc41006f4da6bfad7efee1152fdf3be960c973c65f006",
           (10 ** 6, 0, 4.0): "sha256:46d38ebd9cb8890d51433a1c78a66a652be1b8088c40ca1c485a1ebaf49b85c3"}


@pytest.mark.parametrize("size,seed,read_factor", list(SAMPLES))
def test_sample_is_unchanged_by_the_reader(synth, size, seed, read_factor):
    st = Storage.from_uri(synth)
    m = load_manifest(st)
    ids, keys = sample_keys(st, m, size, seed, read_factor)
    np.testing.assert_array_equal(keys, arrow_columns(synth)["key"][ids])
    assert sample_checksum(ids, keys) == SAMPLES[(size, seed, read_factor)]

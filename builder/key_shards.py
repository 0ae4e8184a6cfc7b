"""Key shards: the schema, encoding a shard to bytes, reading one back.

A shard is a Parquet file with one row per datastore entry:

| column | type | meaning |
|---|---|---|
| key   | fixed_size_binary(2*dim) | the key: dim float16 values, little-endian |
| value | int32 | the token id that follows the key's context |
| doc   | int64 | document index in corpus order (`document` mode) / input file index (`stream` mode) |
| pos   | int64 | position of the value token in its sequence |

Global id of a row = the shard's `first_id` (manifest) + row index.

Why fixed_size_binary and not list<halffloat>: measured here, Parquet wrote a 768-dim
fixed_size_binary key column at ~430 MB/s vs ~28 MB/s for fixed_size_list<halffloat>
(the developers' guide saw 1.9 GB/s vs 40 MB/s on an H100 host). Keys are not
compressed (fp16 noise does not compress); the small columns are zstd-compressed.
Row groups are small (1,024 rows by default, `--row-group-rows`) so that index training, which
reads whole random row groups, draws its sample from many places in the corpus (bench/bench_sample.py).
"""
from __future__ import annotations

import hashlib
import io
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from builder.config import ROW_GROUP_ROWS
from builder.errors import KnnlmError
from builder.storage import NotFound

SHARD_FORMAT = "parquet"
COLUMNS = ("key", "value", "doc", "pos")


def schema(dim: int) -> pa.Schema:
    return pa.schema([("key", pa.binary(2 * dim)), ("value", pa.int32()), ("doc", pa.int64()), ("pos", pa.int64())])


def _le_f16(keys: np.ndarray) -> np.ndarray:
    keys = np.ascontiguousarray(keys, dtype=np.float16)
    if sys.byteorder != "little":
        keys = keys.byteswap()
    return keys


def to_table(keys: np.ndarray, values: np.ndarray, doc: np.ndarray, pos: np.ndarray) -> pa.Table:
    """keys (n, d) float16; values (n,) int32; doc, pos (n,) int64 → Arrow table (zero-copy keys)."""
    n, d = keys.shape
    buf = pa.py_buffer(_le_f16(keys))
    key_col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(2 * d), n, [None, buf])
    return pa.Table.from_arrays(
        [key_col, pa.array(np.asarray(values, np.int32)), pa.array(np.asarray(doc, np.int64)),
         pa.array(np.asarray(pos, np.int64))], schema=schema(d))


def encode_shard(keys: np.ndarray, values: np.ndarray, doc: np.ndarray, pos: np.ndarray,
                 row_group_rows: int = ROW_GROUP_ROWS) -> tuple[bytes, str]:
    """Shard bytes and their checksum ("sha256:<hex>")."""
    table = to_table(keys, values, doc, pos)
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=row_group_rows,
                   compression={"key": "none", "value": "zstd", "doc": "zstd", "pos": "zstd"},
                   use_dictionary=["value", "doc", "pos"], write_statistics=["value", "doc", "pos"],
                   write_page_checksum=True)   # a CRC per page: a ranged read of a row group is checked too
    data = sink.getvalue()
    return data, checksum(data)


def checksum(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def decode_keys(col: pa.Array | pa.ChunkedArray, dim: int) -> np.ndarray:
    """key column → (n, dim) float16 array."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    buf = col.buffers()[1]
    arr = np.frombuffer(buf, dtype="<f2", count=len(col) * dim, offset=col.offset * 2 * dim)
    return arr.reshape(len(col), dim).astype(np.float16, copy=False)


def read_shard(data: bytes, dim: int, columns: tuple[str, ...] = COLUMNS) -> dict[str, np.ndarray]:
    """Shard bytes → dict of numpy arrays (key as (n, dim) float16)."""
    t = pq.read_table(pa.BufferReader(data), columns=list(columns), page_checksum_verification=True)
    out = {}
    for c in columns:
        out[c] = decode_keys(t.column(c), dim) if c == "key" else t.column(c).to_numpy()
    return out


def verify_key_shards(storage, manifest, threads: int = 8) -> list[str]:
    """Problems with a datastore's shards (missing, checksum, row count, key width); [] if none.

    Reads every shard, `threads` at a time."""
    import concurrent.futures as cf


    def check(s: dict) -> str | None:
        try:
            data = storage.read_bytes(s["path"])
        except NotFound:
            return f"{s['path']}: missing"
        if checksum(data) != s["checksum"]:
            return f"{s['path']}: checksum mismatch (corrupted or replaced)"
        try:
            meta = pq.ParquetFile(pa.BufferReader(data)).metadata
            key_type = meta.schema.to_arrow_schema().field("key").type
        except Exception as e:
            return f"{s['path']}: not a readable shard ({e})"
        if meta.num_rows != s["num_rows"]:
            return f"{s['path']}: {meta.num_rows} rows, the manifest says {s['num_rows']}"
        if key_type != pa.binary(2 * manifest.dim):
            return f"{s['path']}: key column is {key_type}, expected fixed_size_binary({2 * manifest.dim})"
        return None

    with cf.ThreadPoolExecutor(threads) as pool:
        return [p for p in pool.map(check, manifest.shards) if p]


# ---------------------------------------------------------------------------------------------
# reading shards for the index stages: checked against the manifest, errors name the shard


class ShardError(KnnlmError, ValueError):
    """A key shard is missing, corrupted or does not match the manifest."""


def _shard_problem(storage, s: dict, what: str) -> ShardError:
    return ShardError(f"key shard {storage.url(s['path'])}: {what}; run `knnlm verify {storage.uri}` "
                      "and restore or rebuild the datastore")


def _check_parquet(pf: pq.ParquetFile, storage, s: dict, dim: int) -> pq.ParquetFile:
    meta = pf.metadata
    if meta.num_rows != s["num_rows"]:
        raise _shard_problem(storage, s, f"{meta.num_rows} rows, the manifest says {s['num_rows']}")
    try:
        key_type = meta.schema.to_arrow_schema().field("key").type
    except (KeyError, pa.ArrowException, OSError, ValueError) as e:
        raise _shard_problem(storage, s, f"not a readable key shard ({type(e).__name__}: {e})") from None
    if key_type != pa.binary(2 * dim):
        raise _shard_problem(storage, s, f"key column is {key_type}, the manifest's dim {dim} needs "
                                         f"fixed_size_binary({2 * dim})")
    return pf


def open_shard(storage, s: dict, dim: int) -> pq.ParquetFile:
    """A shard's Parquet file for reading selected row groups (ranged reads on S3)."""
    try:
        f = storage.open_read(s["path"])
        pf = pq.ParquetFile(pa.PythonFile(f, mode="r"), page_checksum_verification=True)
    except NotFound:
        raise _shard_problem(storage, s, "missing") from None
    except (pa.ArrowException, OSError, ValueError) as e:
        raise _shard_problem(storage, s, f"not a readable Parquet file ({e})") from None
    return _check_parquet(pf, storage, s, dim)


def load_shard(storage, s: dict, dim: int) -> pq.ParquetFile:
    """A whole shard read into memory and checked against its manifest checksum."""
    try:
        data = storage.read_bytes(s["path"])
    except NotFound:
        raise _shard_problem(storage, s, "missing") from None
    if checksum(data) != s["checksum"]:
        raise _shard_problem(storage, s, "checksum mismatch (corrupted or replaced)")
    try:
        pf = pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
    except (pa.ArrowException, OSError) as e:
        raise _shard_problem(storage, s, f"not a readable Parquet file ({e})") from None
    return _check_parquet(pf, storage, s, dim)


def read_row_group(pf: pq.ParquetFile, storage, s: dict, group: int, expect_rows: int, dim: int,
                   columns: tuple[str, ...] = ("key",), as_dict: bool = False):
    """Keys of one row group: (rows, dim) float16; with other `columns` or `as_dict`, {column: array}."""
    meta = pf.metadata
    if group >= meta.num_row_groups or meta.row_group(group).num_rows != expect_rows:
        raise _shard_problem(storage, s, f"its row groups differ from the manifest's layout (row group {group} "
                                         f"should hold {expect_rows} rows)")
    try:
        t = pf.read_row_group(group, columns=list(columns))
    except (pa.ArrowException, OSError, KeyError, ValueError) as e:
        raise _shard_problem(storage, s, f"row group {group} is unreadable ({e})") from None
    if columns == ("key",) and not as_dict:
        return decode_keys(t.column("key"), dim)
    return {c: decode_keys(t.column(c), dim) if c == "key" else t.column(c).to_numpy() for c in columns}

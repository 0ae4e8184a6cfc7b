"""Datastore rows: the one reader of the key shards (the format is in builder/key_shards.py).

A row is (key, value, doc, pos); its global id is its shard's `first_id` (manifest) + its row
index in the shard. Every shard was written in row groups of `row_group_rows` rows (recorded in
the manifest), its last one shorter, so the layout of all row groups follows from the manifest
alone (`row_groups`); each footer is checked against it when a group is read.

Two access patterns, one layout and one row-group read (`builder.key_shards.read_row_group`):

- `iter_range`: every row of an id range, in id order, one row group per batch (`knnlm add`,
  the servers' value/key caches). Key shards are read whole and checked against their manifest
  checksum, the next one prefetched while the current one is consumed.
- `read_rows`: the rows of scattered ids, in any order (the index-training sample, provenance):
  only the row groups that hold them, with ranged reads on S3, shards in parallel.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from builder.errors import KnnlmError
from builder.key_shards import COLUMNS, load_shard, open_shard, read_row_group
from builder.manifest import Manifest, ManifestError
from builder.storage import Storage

log = logging.getLogger(__name__)

# numpy dtype of each scalar column (the key is (n, dim) float16)
COLUMN_DTYPES = {"value": np.int32, "doc": np.int64, "pos": np.int64}


class RowIdError(KnnlmError, ValueError):
    """Ids outside the datastore's [0, num_keys)."""


@dataclass
class RowGroups:
    """The datastore's row groups in id order; each array has one entry per row group."""
    shard: np.ndarray      # (G,) int64 index into manifest.shards
    group: np.ndarray      # (G,) int64 row group index within its shard
    first_id: np.ndarray   # (G,) int64 global id of its first row
    num_rows: np.ndarray   # (G,) int64

    def of(self, ids: np.ndarray) -> np.ndarray:
        """(n,) int64 row group of each global id (ids within the datastore)."""
        return np.searchsorted(self.first_id, ids, side="right") - 1


def row_group_rows(m: Manifest) -> int:
    rgr = m.build.get("row_group_rows") or m.identity.get("row_group_rows")
    if not rgr:
        raise ManifestError("the manifest records no row_group_rows (build.row_group_rows): cannot plan row-group "
                            "reads; was this datastore written by knnlm build?")
    return int(rgr)


def row_groups(m: Manifest) -> RowGroups:
    """Row group layout from the manifest alone: every shard was written with row groups of
    `row_group_rows` rows, its last one shorter (checked against each footer when read)."""
    rgr = row_group_rows(m)
    shard, group, first, rows = [], [], [], []
    for i, s in enumerate(m.shards):
        n = int(s["num_rows"])
        g = -(-n // rgr)
        shard.append(np.full(g, i, np.int64))
        group.append(np.arange(g, dtype=np.int64))
        first.append(s["first_id"] + rgr * np.arange(g, dtype=np.int64))
        rows.append(np.minimum(rgr, n - rgr * np.arange(g, dtype=np.int64)))
    cat = (lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64))
    return RowGroups(cat(shard), cat(group), cat(first), cat(rows))


def _read_group(pf, storage: Storage, m: Manifest, rg: RowGroups, g: int, columns: tuple[str, ...]
                ) -> dict[str, np.ndarray]:
    """Row group g (an index into `rg`) of its open shard: {column: array}, key (rows, dim) float16."""
    s = m.shards[int(rg.shard[g])]
    return read_row_group(pf, storage, s, int(rg.group[g]), int(rg.num_rows[g]), m.dim, columns, as_dict=True)


def iter_range(storage: Storage, m: Manifest, first: int, num: int, columns: tuple[str, ...] = ("key",),
               prefetch: bool = True) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """(ids (b,) int64, {column: array}) batches of one row group each, covering global ids
    [first, first+num) in order. Key shards are read whole, checked against their manifest
    checksum, one ahead of the one being consumed: memory is one or two key shards."""
    rg = row_groups(m)
    last = first + num
    sel = np.flatnonzero((rg.first_id < last) & (rg.first_id + rg.num_rows > first))  # groups, id order
    todo = list(dict.fromkeys(rg.shard[sel].tolist()))     # their shards, in order
    pool = cf.ThreadPoolExecutor(1, thread_name_prefix="knnlm-prefetch") if prefetch else None
    load = (lambda i: load_shard(storage, m.shards[i], m.dim))
    nxt = pool.submit(load, todo[0]) if pool and todo else None
    try:
        for k, i in enumerate(todo):
            pf = nxt.result() if pool else load(i)
            nxt = pool.submit(load, todo[k + 1]) if pool and k + 1 < len(todo) else None
            for g in sel[rg.shard[sel] == i]:
                a, rows = int(rg.first_id[g]), int(rg.num_rows[g])   # global id of its first row, its size
                lo, hi = max(a, first), min(a + rows, last)
                got = _read_group(pf, storage, m, rg, g, columns)
                sl = slice(lo - a, hi - a)
                yield np.arange(lo, hi, dtype=np.int64), {c: v[sl] for c, v in got.items()}
            del pf
    finally:
        if pool:
            pool.shutdown(wait=False, cancel_futures=True)


def iter_key_range(storage: Storage, m: Manifest, first: int, num: int, prefetch: bool = True
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`iter_range` of the keys alone: (ids (b,) int64, keys (b, dim) float16) batches."""
    for ids, cols in iter_range(storage, m, first, num, ("key",), prefetch):
        yield ids, cols["key"]


def _empty(column: str, n: int, dim: int) -> np.ndarray:
    if column == "key":
        return np.empty((n, dim), np.float16)
    return np.empty(n, COLUMN_DTYPES[column])


def read_rows(storage: Storage, m: Manifest, ids: np.ndarray, columns: tuple[str, ...] = COLUMNS,
              threads: int = 16) -> dict[str, np.ndarray]:
    """The rows of these global ids (any order, repeats allowed): {column: (n,) array, key (n, dim)
    float16}, in the order of `ids`. Reads only the row groups that hold them (ranged reads on S3,
    each footer checked against the manifest's layout), `threads` shards at a time."""
    ids = np.asarray(ids, np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= m.num_keys):
        bad = ids[(ids < 0) | (ids >= m.num_keys)]
        raise RowIdError(f"row ids outside the datastore's [0, {m.num_keys}): {bad[:5].tolist()}")
    out = {c: _empty(c, len(ids), m.dim) for c in columns}
    rg = row_groups(m)
    g = rg.of(ids)                                           # (n,) row group of each id
    order = np.argsort(g, kind="stable")                     # positions of ids, grouped by row group
    groups, starts, counts = np.unique(g[order], return_index=True, return_counts=True)
    by_shard: dict[int, list[int]] = {}                      # shard → indices into `groups`
    for j, grp in enumerate(groups):
        by_shard.setdefault(int(rg.shard[grp]), []).append(j)

    def fetch(shard_index: int) -> int:
        pf = open_shard(storage, m.shards[shard_index], m.dim)
        n = 0
        for j in by_shard[shard_index]:
            grp = int(groups[j])
            got = _read_group(pf, storage, m, rg, grp, columns)
            at = order[starts[j]:starts[j] + counts[j]]      # positions in `ids` (disjoint across threads)
            rows = ids[at] - rg.first_id[grp]
            for c in columns:
                out[c][at] = got[c][rows]
            n += int(rg.num_rows[grp])
        return n

    if by_shard:
        with cf.ThreadPoolExecutor(max(1, min(threads, len(by_shard)))) as pool:
            read = sum(pool.map(fetch, sorted(by_shard)))
        log.debug("read %d rows by id from %d row groups (%d rows read)", len(ids), len(groups), read)
    return out

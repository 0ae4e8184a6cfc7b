"""A uniform random sample of a datastore's keys, for index training.

A datastore is in corpus order, so its head is not representative. A row-uniform sample of
1M keys from ~3B would touch nearly every row group, so the sample is two-stage:

1. `plan_sample` (pure) picks row groups at random, each with a probability proportional to
   its size, and rows within them so that every row of the datastore is equally likely to be
   drawn, exactly, whatever its row group's size; the read is about `read_factor` × the sample:
   a small fraction of a large datastore.
2. `read_sample` fetches only those row groups (ranged reads on S3), in parallel.

The sample's ids, and a checksum over its ids and key bytes, are reproducible from the seed.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import logging
from dataclasses import dataclass

import numpy as np

from builder.manifest import Manifest
from builder.shards import open_shard, read_row_group
from builder.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class RowGroups:
    """The datastore's row groups in id order; each array has one entry per row group."""
    shard: np.ndarray      # (G,) int64 index into manifest.shards
    group: np.ndarray      # (G,) int64 row group index within its shard
    first_id: np.ndarray   # (G,) int64 global id of its first row
    num_rows: np.ndarray   # (G,) int64


def row_group_rows(m: Manifest) -> int:
    rgr = m.build.get("row_group_rows") or m.identity.get("row_group_rows")
    if not rgr:
        raise ValueError("the manifest records no row_group_rows (build.row_group_rows): cannot plan row-group "
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


def plan_sample(rg: RowGroups, train_size: int, seed: int, read_factor: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """(row groups to read, sorted global ids of the sample). Pure and seeded.

    `train_size` ≥ the number of keys takes every key. Otherwise, with p slightly above
    train_size / total (a margin of 4σ so that enough rows come out): each row group g of s_g
    rows is read with probability π_g = min(1, max(read_factor · p · s_g / B, p)) (B the full
    group size), independently, and each of its rows is kept with probability p / π_g, so every
    row of the datastore is kept with probability exactly p, whatever its group's size; then
    `train_size` of the kept rows are drawn uniformly. The expected read is read_factor ×
    train_size rows."""
    total = int(rg.num_rows.sum())
    if train_size >= total:
        return np.arange(len(rg.num_rows)), np.arange(total, dtype=np.int64)
    rng = np.random.default_rng(seed)
    p = min(1.0, (train_size + 4.0 * np.sqrt(train_size) + 16.0) / total)
    big = float(rg.num_rows.max())
    pi = np.minimum(1.0, np.maximum(read_factor * p * rg.num_rows / big, p))       # (G,) read probability
    while True:
        take = np.flatnonzero(rng.random(len(pi)) < pi)
        keep = [rg.first_id[g] + np.flatnonzero(rng.random(rg.num_rows[g]) < p / pi[g]) for g in take]
        kept = np.concatenate(keep) if keep else np.zeros(0, np.int64)
        if len(kept) >= train_size:  # fails with probability < 1e-4: draw again
            break
    ids = np.sort(rng.choice(kept, size=train_size, replace=False))
    used = np.unique(np.searchsorted(rg.first_id, ids, side="right") - 1)   # groups holding a sampled id
    return used, ids.astype(np.int64)


def sample_checksum(ids: np.ndarray, keys: np.ndarray) -> str:
    """sha256 over the sample's ids (int64 LE) and keys (float16 LE): the same seed on the same
    datastore gives the same checksum."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(ids, "<i8").tobytes())
    h.update(np.ascontiguousarray(keys, "<f2").tobytes())
    return "sha256:" + h.hexdigest()


def read_sample(storage: Storage, m: Manifest, groups: np.ndarray, ids: np.ndarray, rg: RowGroups,
                threads: int = 16) -> np.ndarray:
    """The keys of `ids` (sorted), reading only the row groups `groups`: (n, dim) float16."""
    out = np.empty((len(ids), m.dim), np.float16)
    # ids are sorted and groups are in id order: each group's ids are one contiguous run
    lo = np.searchsorted(ids, rg.first_id[groups])
    hi = np.searchsorted(ids, rg.first_id[groups] + rg.num_rows[groups])
    by_shard: dict[int, list[int]] = {}
    for j, g in enumerate(groups):
        if hi[j] > lo[j]:
            by_shard.setdefault(int(rg.shard[g]), []).append(j)

    def fetch(shard_index: int) -> int:
        s = m.shards[shard_index]
        pf = open_shard(storage, s, m.dim)
        n = 0
        for j in by_shard[shard_index]:
            g = groups[j]
            keys = read_row_group(pf, storage, s, int(rg.group[g]), int(rg.num_rows[g]), m.dim)
            sel = ids[lo[j]:hi[j]] - rg.first_id[g]
            out[lo[j]:hi[j]] = keys[sel]
            n += len(keys)
        return n

    with cf.ThreadPoolExecutor(max(1, min(threads, len(by_shard)))) as pool:
        read_rows = sum(pool.map(fetch, sorted(by_shard)))
    log.info("sampled %d keys from %d row groups (%d rows read, %.2f%% of the datastore)",
             len(ids), len(groups), read_rows, 100.0 * read_rows / max(m.num_keys, 1))
    return out


def sample_keys(storage: Storage, m: Manifest, train_size: int, seed: int, read_factor: float = 4.0,
                threads: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(sorted ids (n,) int64, keys (n, dim) float16): a uniform random sample of the datastore."""
    rg = row_groups(m)
    groups, ids = plan_sample(rg, train_size, seed, read_factor)
    return ids, read_sample(storage, m, groups, ids, rg, threads)

"""A uniform random sample of a datastore's keys, for index training.

A datastore is in corpus order, so its head is not representative. A row-uniform sample of
1M keys from ~3B would touch nearly every row group, so the sample is two-stage:

1. `plan_sample` (pure) picks row groups at random, each with a probability proportional to
   its size, and rows within them so that every row of the datastore is equally likely to be
   drawn, exactly, whatever its row group's size; the read is about `read_factor` × the sample:
   a small fraction of a large datastore.
2. `builder.rows.read_rows` fetches only those row groups (ranged reads on S3), in parallel.

The sample's ids, and a checksum over its ids and key bytes, are reproducible from the seed.

Every row is equally likely, but the sample is clustered: it comes from about read_factor ×
train_size / row_group_rows row groups, each a run of neighbouring text. With few runs the index
is worse than one trained on a row-uniform sample (bench/bench_sample.py: 16,384 keys of WikiText-2
from ~5 row groups of 16,384 rows, +9% coarse and reconstruction error); hence small row groups
(`--row-group-rows`, 1,024 by default): 1M keys of 3B then come from ~3,900 runs, not ~250.
"""
from __future__ import annotations

import hashlib
import logging

import numpy as np

from builder.manifest import Manifest
from builder.rows import RowGroups, read_rows, row_groups
from builder.storage import Storage

log = logging.getLogger(__name__)


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


def sample_keys(storage: Storage, m: Manifest, train_size: int, seed: int, read_factor: float = 4.0,
                threads: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(sorted ids (n,) int64, keys (n, dim) float16): a uniform random sample of the datastore."""
    rg = row_groups(m)
    groups, ids = plan_sample(rg, train_size, seed, read_factor)
    keys = read_rows(storage, m, ids, ("key",), threads)["key"]       # only the groups holding an id
    read = int(rg.num_rows[groups].sum())
    log.info("sampled %d keys from %d row groups (%d rows read, %.2f%% of the datastore)",
             len(ids), len(groups), read, 100.0 * read / max(m.num_keys, 1))
    return ids, keys

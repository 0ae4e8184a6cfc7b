"""Synthetic datastores in the builder's exact format (shards + manifest), for tests and benchmarks.

Keys are drawn from a seeded mixture of Gaussians (clustered like LM hidden states, so k-means
and IVF behave realistically), shard by shard with bounded memory: shard i depends only on
(seed, i), so a datastore of any size is written in O(shard) memory, in parallel if asked.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging

import numpy as np

from builder.config import ROW_GROUP_ROWS
from builder.key_shards import SHARD_FORMAT, encode_shard
from builder.layout import key_shard_path
from builder.manifest import Manifest, write_manifest
from builder.storage import Storage

log = logging.getLogger(__name__)


def synthetic_keys(n: int, dim: int, seed: int, centers: np.ndarray, spread: float = 0.35) -> np.ndarray:
    """(n, dim) float16 keys around the given (c, dim) centers."""
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(centers), n)
    x = centers[which] + spread * rng.standard_normal((n, dim), dtype=np.float32)
    return x.astype(np.float16)


def write_synthetic_datastore(uri: str, num_keys: int, dim: int, shard_rows: int = 65536,
                              row_group_rows: int = ROW_GROUP_ROWS, seed: int = 0, num_centers: int = 256,
                              vocab: int = 50000, threads: int = 2) -> Manifest:
    """Write `num_keys` synthetic keys under `uri` (local or s3://) and its manifest."""
    storage = Storage.from_uri(uri)
    centers = np.random.default_rng(seed).standard_normal((num_centers, dim), dtype=np.float32)
    n_shards = -(-num_keys // shard_rows)

    def one(i: int) -> dict:
        first = i * shard_rows
        n = min(shard_rows, num_keys - first)
        keys = synthetic_keys(n, dim, seed * 1_000_003 + i + 1, centers)
        rng = np.random.default_rng([seed, i])
        values = rng.integers(0, vocab, n).astype(np.int32)
        pos = np.arange(first + 1, first + n + 1, dtype=np.int64)
        data, digest = encode_shard(keys, values, np.zeros(n, np.int64), pos, row_group_rows=row_group_rows)
        path = key_shard_path(i, 0)                     # the builder's names: unit i, part 0
        storage.write_bytes(path, data)
        return {"path": path, "num_rows": n, "first_id": first, "checksum": digest}

    with cf.ThreadPoolExecutor(max(1, threads)) as pool:
        shards = list(pool.map(one, range(n_shards)))
    m = Manifest(
        num_keys=num_keys, dim=dim, model={"name": "synthetic", "sha256": f"synthetic-seed-{seed}"},
        tokenizer={"name": "synthetic"}, key_layer="synthetic", window=0, min_context=0, mode="stream",
        compute_dtype="float16", corpus={"inputs": [], "synthetic": {"seed": seed, "num_centers": num_centers}},
        shards=shards, identity={"row_group_rows": row_group_rows, "shard_rows": shard_rows},
        build={"row_group_rows": row_group_rows, "shard_rows": shard_rows, "synthetic": True},
        shard_format=SHARD_FORMAT)
    write_manifest(storage, m)
    log.info("wrote a synthetic datastore: %d keys of dim %d in %d shards at %s", num_keys, dim, n_shards, uri)
    return m

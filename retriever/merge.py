"""The single top-k merge primitive (metric-aware), and the padding convention.

Distances are what FAISS returns for the metric: squared L2 for `l2` (smaller is better; the
kNN-LM paper's convention), inner product for `ip` (larger is better). Where fewer than k
results exist, ids and values are -1 and the distance is +inf (l2) or -inf (ip).
"""
from __future__ import annotations

import numpy as np


def worst(metric: str) -> float:
    """The distance of a missing result: +inf for l2, -inf for ip."""
    return np.inf if metric == "l2" else -np.inf


def normalize_missing(dist: np.ndarray, ids: np.ndarray, metric: str) -> np.ndarray:
    """A float32 copy of dist with faiss's ±FLT_MAX padding (id -1) set to ±inf."""
    dist = np.array(dist, dtype=np.float32, copy=True)
    dist[ids < 0] = worst(metric)
    return dist


def merge_topk(dists: list[np.ndarray], ids: list[np.ndarray], values: list[np.ndarray], k: int,
               metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge per-shard top-k lists into the global top-k.

    dists[s], ids[s], values[s]: (n, k_s) float32 / int64 / int32 of shard s (any k_s, missing
    results marked by id -1). Returns (n, k) dist float32, ids int64, values int32, each row sorted
    best first (ascending for l2, descending for ip); ties keep shard order (stable)."""
    if metric not in ("l2", "ip"):
        raise ValueError(f"unknown metric {metric!r}")
    n = dists[0].shape[0]
    if len(dists) == 1 and dists[0].shape[1] == k:   # one shard: already sorted best first
        d = normalize_missing(dists[0], ids[0], metric)
        i = np.asarray(ids[0], dtype=np.int64)
        v = np.array(values[0], dtype=np.int32)
        v[i < 0] = -1
        return d, i, v
    d = np.concatenate([normalize_missing(x, i, metric) for x, i in zip(dists, ids)], axis=1)   # (n, S*k)
    i = np.concatenate(ids, axis=1).astype(np.int64, copy=False)
    v = np.concatenate(values, axis=1).astype(np.int32, copy=False)
    key = d if metric == "l2" else -d
    # each shard's list is sorted best first, so the row is S sorted runs: a stable sort (timsort)
    # merges them in O(S·k·log S), 10x faster here than a partition followed by a sort
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    out_d = np.take_along_axis(d, order, 1)
    out_i = np.take_along_axis(i, order, 1)
    out_v = np.take_along_axis(v, order, 1)
    if out_d.shape[1] < k:  # fewer candidates than k in all: pad
        pad = k - out_d.shape[1]
        out_d = np.concatenate([out_d, np.full((n, pad), worst(metric), np.float32)], 1)
        out_i = np.concatenate([out_i, np.full((n, pad), -1, np.int64)], 1)
        out_v = np.concatenate([out_v, np.full((n, pad), -1, np.int32)], 1)
    out_i[~np.isfinite(out_d)] = -1
    out_v[out_i < 0] = -1
    return out_d.astype(np.float32, copy=False), out_i, out_v

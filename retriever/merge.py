"""The top-k merge and exact-distance primitives (metric-aware), and the padding convention.

Distances are what FAISS returns for the metric: squared L2 for `l2` (smaller is better; the
kNN-LM paper's convention), inner product for `ip` (larger is better). Where fewer than k
results exist, ids and values are -1 and the distance is +inf (l2) or -inf (ip).

Every order here is (distance, id): ties at equal distance go to the smaller global id, so
a result does not depend on how the datastore is split into index shards.
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


def _check_metric(metric: str) -> None:
    if metric not in ("l2", "ip"):
        raise ValueError(f"unknown metric {metric!r}")


def is_sorted(d: np.ndarray, i: np.ndarray, metric: str) -> bool:
    """Whether every row of (n, k) distances d / ids i is in (distance, id) order, best first."""
    key = d if metric == "l2" else -d
    a, b = key[:, :-1], key[:, 1:]
    return bool(np.all((a < b) | ((a == b) & (i[:, :-1] <= i[:, 1:]))))


def sort_topk(d: np.ndarray, i: np.ndarray, v: np.ndarray, k: int, metric: str
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The best k of each row of (n, m) candidates in (distance, id) order, padded to k where m < k;
    missing results (infinite distance) last, with id and value -1."""
    _check_metric(metric)
    n = d.shape[0]
    key = d if metric == "l2" else -d
    # a stable sort by distance merges the rows' sorted runs (one per shard) 10x faster than a
    # lexsort; only rows where it left equal distances out of id order are redone by (distance, id)
    # (only the first k places are checked, plus whether a tie runs past the k-th one)
    order = np.argsort(key, axis=1, kind="stable")                    # (n, m)
    head = order[:, :k + 1]
    sk, si = np.take_along_axis(key, head, 1), np.take_along_axis(i, head, 1)
    wrong = ((sk[:, 1:] == sk[:, :-1]) & (si[:, 1:] < si[:, :-1])).any(axis=1)
    if sk.shape[1] == k + 1:                                          # a tie at the k-th place: redo
        wrong |= sk[:, k] == sk[:, k - 1]
    bad = np.flatnonzero(wrong)
    if bad.size:
        order[bad] = np.lexsort((i[bad], key[bad]), axis=-1)           # the last key is the primary one
    order = order[:, :k]                                              # (n, min(m, k))
    out_d = np.take_along_axis(d, order, 1).astype(np.float32, copy=False)
    out_i = np.take_along_axis(i, order, 1).astype(np.int64, copy=False)
    out_v = np.take_along_axis(v, order, 1).astype(np.int32, copy=False)
    if out_d.shape[1] < k:  # fewer candidates than k in all: pad
        pad = k - out_d.shape[1]
        out_d = np.concatenate([out_d, np.full((n, pad), worst(metric), np.float32)], 1)
        out_i = np.concatenate([out_i, np.full((n, pad), -1, np.int64)], 1)
        out_v = np.concatenate([out_v, np.full((n, pad), -1, np.int32)], 1)
    out_i[~np.isfinite(out_d)] = -1
    out_v[out_i < 0] = -1
    return out_d, out_i, out_v


def merge_topk(dists: list[np.ndarray], ids: list[np.ndarray], values: list[np.ndarray], k: int,
               metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge per-shard top-k lists into the global top-k.

    dists[s], ids[s], values[s]: (n, k_s) float32 / int64 / int32 of shard s (any k_s, missing
    results marked by id -1). Returns (n, k) dist float32, ids int64, values int32, each row sorted
    best first (ascending for l2, descending for ip), ties by the smaller id."""
    _check_metric(metric)
    d = np.concatenate([normalize_missing(x, i, metric) for x, i in zip(dists, ids)], axis=1)   # (n, S*k)
    i = np.concatenate(ids, axis=1).astype(np.int64, copy=False)
    v = np.concatenate(values, axis=1).astype(np.int32, copy=True)
    if len(dists) == 1 and d.shape[1] == k and is_sorted(d, i, metric):   # one shard, already in order
        v[i < 0] = -1
        return d, i, v
    return sort_topk(d, i, v, k, metric)


def exact_distances(q: np.ndarray, keys: np.ndarray, metric: str) -> np.ndarray:
    """(m,) float32 exact distances of m (query, key) pairs: q, keys (m, d) float32.

    Each pair's distance depends on its two rows only, never on the other pairs of the call: the
    elementwise float32 ops are exact IEEE operations, and numpy sums the last axis of a C-contiguous
    float32 array row by row with the same pairwise order (no buffering, no cast), on any machine.
    So every server, in whatever batch, gives the same bits for the same pair."""
    _check_metric(metric)
    q = np.ascontiguousarray(q, dtype=np.float32)
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    if metric == "l2":
        x = keys - q
        x *= x                                                          # (m, d) squared differences
    else:
        x = keys * q
    return x.sum(axis=-1, dtype=np.float32)


def rerank_margin(k: int) -> int:
    """How many approximate candidates beyond k each shard returns for a re-rank. faiss keeps, of the
    candidates tied at its k-th distance, the first it scans (not the smallest ids: fast-scan and
    ties across inverted lists), so a shard's top-k alone could make the merged candidates depend
    on the split; with a margin, its omissions are strictly worse than the merged k-th distance
    unless the ties run past the margin (`boundary_ties`)."""
    return max(16, k // 16)


def boundary_ties(merged: np.ndarray, shard_dists: list[np.ndarray], metric: str) -> np.ndarray:
    """(n,) bool: rows whose merged k-th distance (merged (n, k)) equals the last distance of a shard's
    full list (shard_dists[s] (n, k_s), all k_s results present): that shard may have left out
    candidates tied with it, so the row's candidates may depend on the split."""
    _check_metric(metric)
    cut = merged[:, -1]
    hit = np.zeros(len(cut), bool)
    for d in shard_dists:
        hit |= d[:, -1] == cut
    return hit & np.isfinite(cut)


def shard_of(ids: np.ndarray, ranges: list[tuple[int, int]]) -> np.ndarray:
    """The index shard owning each global id: ids any shape, ranges [(first_id, num_ids)] of the shards
    sorted by first_id. -1 for a missing result (id -1) or an id outside every range."""
    first = np.array([f for f, _ in ranges], np.int64)
    end = first + np.array([n for _, n in ranges], np.int64)
    s = np.searchsorted(first, ids, side="right") - 1                  # the last range starting at or before
    ok = (ids >= 0) & (s >= 0)
    ok[ok] &= ids[ok] < end[s[ok]]
    return np.where(ok, s, -1)

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


def row_sorted(d: np.ndarray, i: np.ndarray, metric: str) -> np.ndarray:
    """(n,) bool: which rows of (n, k) distances d / ids i are in (distance, id) order, best first."""
    key = d if metric == "l2" else -d
    a, b = key[:, :-1], key[:, 1:]
    return ((a < b) | ((a == b) & (i[:, :-1] <= i[:, 1:]))).all(axis=1)


def is_sorted(d: np.ndarray, i: np.ndarray, metric: str) -> bool:
    """Whether every row of (n, k) distances d / ids i is in (distance, id) order, best first."""
    return bool(row_sorted(d, i, metric).all())


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


def merge_topk(dists: list[np.ndarray], ids: list[np.ndarray] | None, values: list[np.ndarray], k: int,
               metric: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Merge per-shard top-k lists into the global top-k.

    dists[s], ids[s], values[s]: (n, k_s) float32 / int64 / int32 of shard s (any k_s, missing
    results marked by id -1). Returns (n, k) dist float32, ids int64, values int32, each row sorted
    best first (ascending for l2, descending for ip), ties by the smaller id.

    Lists of one width, each in (distance, id) order (as faiss returns them), are merged by faiss's
    k-way heap merge (C++, threaded), which takes ties in shard order: that is id order when the shards
    hold increasing id ranges (the index shards do); rows whose result is not then in (distance, id)
    order, or where a candidate left out ties with the k-th, are redone by `sort_topk`. Without ids
    (below) 4x faster than sorting the concatenation (0.14 s against 0.6 s for 8,192 queries x 2
    shards x k = 1024); with ids about as fast (its tie checks).

    `ids=None`: lists without ids (a search that asked for distances and values only): each must be
    in (distance, id) order and the shards in increasing id ranges (the caller's promise); missing
    results have value -1 and the worst distance. The result's ids are None."""
    _check_metric(metric)
    widths = {d.shape[1] for d in dists}
    fast = len(widths) == 1 and min(widths) >= k
    if ids is None:
        if not fast:
            raise ValueError(f"merge_topk without ids needs lists of one width, at least k={k}")
        return _heap_merge_values(dists, values, k, metric)
    if fast and len(dists) > 1 and all(is_sorted(d, i, metric) for d, i in zip(dists, ids)):
        return _heap_merge(dists, ids, values, k, metric)
    d = np.concatenate([normalize_missing(x, i, metric) for x, i in zip(dists, ids)], axis=1)   # (n, S*k)
    i = np.concatenate(ids, axis=1).astype(np.int64, copy=False)
    v = np.concatenate(values, axis=1).astype(np.int32, copy=True)
    if len(dists) == 1 and d.shape[1] == k and is_sorted(d, i, metric):   # one shard, already in order
        v[i < 0] = -1
        return d, i, v
    return sort_topk(d, i, v, k, metric)


def _heap_merge_values(dists, values, k: int, metric: str):
    """merge_topk without ids: faiss's heap merge carries the values as its labels (a missing result,
    value -1, ends its list, as faiss's padding is last)."""
    import faiss
    o = slice(None, None, -1) if metric == "ip" else slice(None)        # see _heap_merge
    d_all = np.stack([np.asarray(x, np.float32)[:, :k] for x in dists][o])                # (S, n, k)
    v_all = np.stack([np.asarray(x)[:, :k] for x in values][o]).astype(np.int64)        # (S, n, k)
    d, v = faiss.merge_knn_results(d_all, v_all, keep_max=metric == "ip")
    d[v < 0] = worst(metric)
    return d, None, v.astype(np.int32)


def _heap_merge(dists, ids, values, k: int, metric: str):
    """merge_topk of S sorted lists of one width w >= k by faiss's heap merge; see merge_topk."""
    import faiss
    S, (n, w) = len(dists), dists[0].shape
    d_all = np.stack([np.asarray(x, np.float32) for x in dists])                       # (S, n, w)
    v_all = np.stack([np.asarray(x, np.int32) for x in values])                         # (S, n, w)
    i_all = np.stack([np.asarray(x, np.int64) for x in ids])
    gone = i_all < 0                                                                    # missing results
    d_all[gone] = worst(metric)
    pos = np.arange(S * n * w, dtype=np.int64).reshape(S, n, w)      # flat positions in the stacked lists
    pos[gone] = -1                                            # faiss stops reading a list at its first -1
    # each list's first k suffice for the top k of their union; faiss's heap takes ties from the first
    # shard for l2 (a min-heap), from the last for ip: the lists go in reversed for ip
    o = slice(None, None, -1) if metric == "ip" else slice(None)
    d, p = faiss.merge_knn_results(np.ascontiguousarray(d_all[o, :, :k]), np.ascontiguousarray(pos[o, :, :k]),
                                   keep_max=metric == "ip")                            # (n, k) each
    ok = p >= 0
    p = np.where(ok, p, 0)
    v = v_all.ravel().take(p)
    v[~ok] = -1
    d[~ok] = worst(metric)
    i = i_all.ravel().take(p)
    i[~ok] = -1
    # ties go by shard here, not by id: redo (full sort) the rows whose result is out of (distance, id)
    # order, or where the next candidate a shard left out ties with the k-th
    from_or_after = [((p >= t * n * w) & ok).sum(axis=1) for t in range(S)] + [np.zeros(n, np.int64)]
    taken = np.stack([from_or_after[t] - from_or_after[t + 1] for t in range(S)], axis=1)   # (n, S)
    nxt = np.take_along_axis(d_all.transpose(1, 0, 2), np.minimum(taken, w - 1)[:, :, None], 2)[:, :, 0]
    tie = ((nxt == d[:, -1:]) & (taken < w) & np.isfinite(nxt)).any(axis=1)
    key = d if metric == "l2" else -d
    redo = np.flatnonzero(tie | ((key[:, 1:] == key[:, :-1]) & (i[:, 1:] < i[:, :-1])).any(axis=1))
    if redo.size:
        cat = [np.concatenate(list(x[:, redo]), axis=1) for x in (d_all, i_all, v_all)]  # (r, S*w) each
        d[redo], i[redo], v[redo] = sort_topk(*cat, k, metric)
    return d, i, v


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

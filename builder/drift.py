"""Drift of an ingestion: how far its keys lie from the trained index's coarse centroids.

The coarse quantizer (IVF centroids) was trained on a sample of the datastore as it was then. New text
from another domain lands far from every centroid: its inverted lists get crowded and its codes coarse,
so retrieval for it degrades. `coarse_error` is the mean squared L2 distance of keys to their nearest
centroid (after the index's pre-transform, OPQ or PCA, as the IVF sees them); an ingestion records it
for a sample of its keys next to that of a same-size sample of the existing keys, and warns when the
ratio exceeds DRIFT_THRESHOLD, suggesting `knnlm train-index --force`. Pure (no storage).
"""
from __future__ import annotations

import numpy as np

from builder.index import apply_pretransform

DRIFT_THRESHOLD = 1.5       # new / existing coarse error above this: the new text is far outside the index
DRIFT_SAMPLE = 20_000       # keys sampled from each side
CHUNK = 2048


def coarse_error(index, keys: np.ndarray) -> float:
    """Mean squared L2 distance of keys (n, d) to the nearest coarse centroid of a trained IVF index."""
    import faiss

    x = np.ascontiguousarray(np.asarray(keys, np.float32))
    if not len(x):
        return float("nan")
    ivf = faiss.extract_index_ivf(index)
    xt = np.ascontiguousarray(apply_pretransform(index, x), dtype=np.float32)
    cent = ivf.quantizer.reconstruct_n(0, ivf.nlist).reshape(ivf.nlist, -1)   # (nlist, d')
    # nearest centroid by L2 whatever the metric (an inner-product quantizer ranks by dot product), in
    # chunks: (rows, nlist) distances at a time
    c2, best = (cent ** 2).sum(1), []
    for a in range(0, len(xt), CHUNK):
        x = xt[a:a + CHUNK]
        best.append(np.maximum(((x ** 2).sum(1)[:, None] - 2 * x @ cent.T + c2[None, :]).min(1), 0))
    return float(np.concatenate(best).astype(np.float64).mean())


def drift_record(index, new_keys: np.ndarray, base_keys: np.ndarray, threshold: float = DRIFT_THRESHOLD) -> dict:
    """{new_coarse_error, base_coarse_error, ratio, sample_new, sample_base, threshold, far}."""
    new, base = coarse_error(index, new_keys), coarse_error(index, base_keys)
    ratio = new / base if base > 0 else float("inf")
    return {"new_coarse_error": round(new, 6), "base_coarse_error": round(base, 6), "ratio": round(ratio, 4),
            "sample_new": int(len(new_keys)), "sample_base": int(len(base_keys)), "threshold": threshold,
            "far": bool(ratio > threshold)}


def sample_ids(num: int, size: int, seed: int) -> np.ndarray:
    """Sorted distinct ids of [0, num): all of them when num <= size, else `size` drawn with `seed`."""
    if num <= size:
        return np.arange(num, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(num, size=size, replace=False)).astype(np.int64)

"""The kNN-LM interpolation (pure numpy, float64, log space).

    p(y) = λ · p_kNN(y) + (1 − λ) · p_LM(y)
    p_kNN(y) ∝ Σ_{neighbours j with value y} exp(−d_j / T)      (l2: d the squared distance FAISS returns)
    p_kNN(y) ∝ Σ_{neighbours j with value y} exp(s_j / T)       (ip: s the inner product)

Everything is a logsumexp: no exp of a large distance underflows to a 0/0, and a target that no
neighbour has gets log p_kNN = −inf, which logaddexp turns into log((1 − λ) p_LM) exactly.
"""
from __future__ import annotations

import numpy as np


def knn_log_probs(dist: np.ndarray, values: np.ndarray, targets: np.ndarray, temperature: float,
                  metric: str = "l2") -> np.ndarray:
    """log p_kNN(target) per row: dist (n, k), values (n, k) (−1 = no neighbour), targets (n,) → (n,) float64.

    −inf where no neighbour carries the target (or a row has no neighbour at all)."""
    if temperature <= 0:
        raise ValueError(f"--temperature must be positive (got {temperature})")
    d = np.asarray(dist, dtype=np.float64)
    scores = (-d if metric == "l2" else d) / float(temperature)           # (n, k)
    valid = (np.asarray(values) >= 0) & np.isfinite(scores)
    scores = np.where(valid, scores, -np.inf)
    top = scores.max(axis=1, keepdims=True)                                 # (n, 1), −inf for an empty row
    top = np.where(np.isfinite(top), top, 0.0)
    w = np.exp(scores - top)                                                # (n, k) in [0, 1]
    norm = w.sum(axis=1)
    hit = w * (np.asarray(values) == np.asarray(targets)[:, None])
    num = hit.sum(axis=1)
    with np.errstate(divide="ignore"):
        return np.where((num > 0) & (norm > 0), np.log(num) - np.log(norm), -np.inf)


def interpolate(lm_logp: np.ndarray, knn_logp: np.ndarray, lam: float) -> np.ndarray:
    """log(λ·p_kNN + (1−λ)·p_LM), elementwise, float64; λ = 0 returns lm_logp exactly."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"--lambda must be in [0, 1] (got {lam})")
    lm = np.asarray(lm_logp, dtype=np.float64)
    if lam == 0.0:
        return lm.copy()
    knn = np.asarray(knn_logp, dtype=np.float64)
    if lam == 1.0:
        return knn.copy()
    return np.logaddexp(np.log(lam) + knn, np.log1p(-lam) + lm)


def perplexity(sum_logp: float, tokens: int) -> float:
    return float(np.exp(-sum_logp / tokens)) if tokens else float("nan")

"""The kNN-LM interpolation (pure numpy, float64, log space).

    p(y) = λ · p_kNN(y) + (1 − λ) · p_LM(y)
    p_kNN(y) ∝ Σ_{neighbours j with value y} exp(−d_j / T)      (l2: d the squared distance FAISS returns)
    p_kNN(y) ∝ Σ_{neighbours j with value y} exp(s_j / T)       (ip: s the inner product)

Everything is a logsumexp: no exp of a large distance underflows to a 0/0, and a target that no
neighbour has gets log p_kNN = −inf, which logaddexp turns into log((1 − λ) p_LM) exactly.

The one formula of the project: `knnlm eval` and `knnlm tune` score each target with
`knn_log_probs`; generation scores the whole vocabulary with `knn_log_probs_vocab`, which is
`knn_log_probs` of every token (the same weights and sums); both mix with `interpolate`.
"""
from __future__ import annotations

import numpy as np

PAPER_LAMBDA, PAPER_TEMPERATURE, PAPER_K = 0.25, 1.0, 1024     # the paper's λ and T; its k


def _weights(dist: np.ndarray, values: np.ndarray, temperature: float, metric: str):
    """The neighbours' weights, shared by both p_kNN functions. Returns
    s (n, k) float32 scores (larger is nearer; −inf for no neighbour), top (n, 1) each row's best
    (0 for an empty row), w (n, k) float32 weights exp((s − top)/T) in [0, 1], norm (n,) float64 Σ w."""
    if temperature <= 0:
        raise ValueError(f"--temperature must be positive (got {temperature})")
    d = np.asarray(dist, dtype=np.float32)
    s = -d if metric == "l2" else d                                          # (n, k): larger is nearer
    s = np.where((values >= 0) & np.isfinite(s), s, -np.inf)
    top = s.max(axis=1, keepdims=True)                                       # (n, 1), −inf for an empty row
    top[~np.isfinite(top)] = 0.0
    w = np.exp((s - top) * np.float32(1.0 / temperature))                    # (n, k) fp32 in [0, 1]
    norm = w.sum(axis=1, dtype=np.float64)
    return s, top, w, norm


def _log_share(s, top, w, norm, match: np.ndarray, temperature: float) -> np.ndarray:
    """log(Σ_{match} w / norm) per row (n,) float64, −inf where no neighbour matches."""
    num = np.where(match, w, 0.0).sum(axis=1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where((num > 0) & (norm > 0), np.log(num) - np.log(norm), -np.inf)
    # rows whose matching weights are all subnormal or 0 in float32 (imprecise or underflowed; rare)
    redo = np.flatnonzero((num < np.finfo(np.float32).tiny) & match.any(axis=1))
    if redo.size:   # float64 logsumexp of the matching scores; norm ≥ 1 (the best weighs exactly 1)
        sm = np.where(match[redo], s[redo].astype(np.float64), -np.inf) / float(temperature)
        mx = sm.max(axis=1)
        out[redo] = mx + np.log(np.exp(sm - mx[:, None]).sum(axis=1)) - top[redo, 0] / float(temperature) \
            - np.log(norm[redo])
    return out


def knn_log_probs(dist: np.ndarray, values: np.ndarray, targets: np.ndarray, temperature: float,
                  metric: str = "l2") -> np.ndarray:
    """log p_kNN(target) per row: dist (n, k), values (n, k) (−1 = no neighbour), targets (n,) → (n,) float64.

    −inf where no neighbour carries the target (or a row has no neighbour at all).

    The weights are float32 (the distances FAISS returns are float32, and this is the hot loop of an
    evaluation: 8M exps per 8k queries at k = 1024): each score is shifted by its row's best before
    the division by T, so exp sees (d_best − d)/T, exact to float32 rounding, in [−∞, 0]. Sums are
    float64. A row whose target weights all fall below float32's normal range (a gap above ~87·T to
    the nearest neighbour) is redone in float64, so the result is −inf only when no neighbour carries the target."""
    values = np.asarray(values)
    targets = np.asarray(targets)
    s, top, w, norm = _weights(dist, values, temperature, metric)
    return _log_share(s, top, w, norm, values == targets[:, None], temperature)      # match (n, k)


def knn_log_probs_vocab(dist: np.ndarray, values: np.ndarray, vocab_size: int, temperature: float,
                        metric: str = "l2") -> np.ndarray:
    """log p_kNN(y) for every y of the vocabulary: dist (n, k), values (n, k) → (n, V) float64, −inf
    for a token no neighbour carries (generation needs the whole distribution).

    Each entry is exactly `knn_log_probs` of that target: the same weights and sums, evaluated per
    row for the row's distinct values only (at most k). A value outside [0, V) counts as no
    neighbour (the LM could not score it)."""
    values = np.asarray(values)
    values = np.where((values >= 0) & (values < vocab_size), values, -1)
    s, top, w, norm = _weights(dist, values, temperature, metric)
    out = np.full((len(values), vocab_size), -np.inf)
    for i in range(len(values)):
        u = np.unique(values[i][values[i] >= 0])                             # (u,) the row's next tokens
        if u.size:
            rep = np.zeros(u.size, np.intp)                                  # row i once per token
            out[i, u] = _log_share(s[i:i + 1][rep], top[i:i + 1][rep], w[i:i + 1][rep], norm[i:i + 1][rep],
                                   values[i][None, :] == u[:, None], temperature)   # match (u, k)
    return out


def neighbour_weights(dist: np.ndarray, values: np.ndarray, temperature: float, metric: str = "l2") -> np.ndarray:
    """Each neighbour's share of p_kNN: w_j / Σ_k w (n, k) float64, from the weights `knn_log_probs` sums
    (0 for a missing neighbour; a row without neighbours is all 0). `knnlm report` shows them."""
    _, _, w, norm = _weights(dist, np.asarray(values), temperature, metric)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(norm[:, None] > 0, w / norm[:, None], 0.0)


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

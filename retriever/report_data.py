"""The pure cores of `knnlm report` (retriever/report.py writes the folder): a chunk's compact per-token
summary, the text's display pieces, and the figures the page plots.

A summary is what the page needs of each scored token, and no more: the target, the base LM's, p_kNN's
and the kNN-LM's log-probabilities, and the first `show` neighbours (distance, share of p_kNN, value,
global id); plus, per chunk, the sums of log p over a grid of λ (at the run's T and k) and of k (at the
run's λ and T), from which the page plots perplexity against λ and k. An evaluation worker summarizes
its chunk where its neighbours are (`knnlm eval --report`); `knnlm report` summarizes a neighbour cache's
chunks with the same function, so both give the same numbers as the evaluation.
"""
from __future__ import annotations

import numpy as np

from retriever.knnlm import interpolate, knn_log_probs, neighbour_weights, perplexity
from retriever.tune import LAMBDAS, grid_sums, k_grid

GAIN_EDGES = tuple(round(x, 2) for x in np.arange(-3.0, 3.01, 0.25))  # nats; the end bins take the tails
FREQ_EDGES = (0, 1, 10, 100, 1_000, 10_000, 100_000)                 # training occurrences of the target


def summarize_chunk(target, lm, dist, values, ids, *, lam: float, temperature: float, k: int, metric: str,
                    show: int, knn=None, lambdas=LAMBDAS, ks=None) -> dict:
    """A chunk's summary (see the module docstring). dist, values (n, ≥k); ids (n, ≥show) int64; `knn`: the
    evaluation's own log p_kNN(target) (n,), else computed here from the first k neighbours (the same
    function). Per token: target (n,) int64, lm, knn, mix (n,) float64, nb_dist (n, show) float32,
    nb_weight (n, show) float64 (each neighbour's share of p_kNN over all k), nb_value (n, show) int32,
    nb_id (n, show) int64 (−1: none); per chunk: by_lambda (len(lambdas),), by_k (len(ks),) sums of log p."""
    target = np.asarray(target, np.int64)
    lm = np.asarray(lm, np.float64)
    d, v = np.asarray(dist)[:, :k], np.asarray(values)[:, :k]
    if knn is None:
        knn = knn_log_probs(d, v, target, temperature, metric)
    mix = interpolate(lm, knn, lam)
    ks = list(ks or k_grid(k))
    # Σ log p at every (k of the grid, λ of the grid and the run's λ): the λ curve is the run's k's row, the k
    # curve the run's λ's column
    sums = grid_sums(lm, d, v, target, temperature, metric, ks, list(lambdas) + [lam], known={k: knn})
    show = min(show, d.shape[1], np.asarray(ids).shape[1])
    # copies, not views: a view of the first columns would keep the chunk's whole (n, k) arrays alive, 8 KB a
    # token at k = 1024 held for every chunk until the report is written
    return {"target": target, "lm": lm, "knn": np.asarray(knn, np.float64), "mix": mix,
            "nb_dist": np.array(d[:, :show], np.float32),
            "nb_weight": np.array(neighbour_weights(d, v, temperature, metric)[:, :show]),
            "nb_value": np.array(v[:, :show], np.int32), "nb_id": np.array(np.asarray(ids)[:, :show], np.int64),
            "by_lambda": sums[ks.index(k), :-1], "by_k": sums[:, -1], "lambdas": list(lambdas), "ks": ks}


def concat(parts: list[dict]) -> dict:
    """The summaries of a run's chunks, in chunk order, as one: per-token arrays concatenated, grid sums
    added."""
    if not parts:
        raise ValueError("no chunk to report")
    out = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]
           if isinstance(parts[0][key], np.ndarray) and key not in ("by_lambda", "by_k")}
    for key in ("by_lambda", "by_k"):
        out[key] = np.sum([p[key] for p in parts], axis=0)
    out["lambdas"], out["ks"] = parts[0]["lambdas"], parts[0]["ks"]
    return out


def curves(s: dict) -> dict:
    """Perplexity of the text against λ and against k (the page's first two plots)."""
    n = len(s["lm"])
    return {"lambda": {"x": list(s["lambdas"]), "ppl": [perplexity(float(x), n) for x in s["by_lambda"]]},
            "k": {"x": list(s["ks"]), "ppl": [perplexity(float(x), n) for x in s["by_k"]]}}


def gain_histogram(gain: np.ndarray, edges=GAIN_EDGES) -> dict:
    """Counts of per-token gains (nats) in the bins between `edges`, the end bins taking the tails."""
    e = np.asarray(edges, np.float64)
    counts = np.bincount(np.clip(np.searchsorted(e, gain, side="right") - 1, 0, len(e) - 2), minlength=len(e) - 1)
    return {"edges": list(e), "counts": counts.tolist()}


def frequency_buckets(freq: np.ndarray, target: np.ndarray, lm: np.ndarray, mix: np.ndarray,
                      edges=FREQ_EDGES) -> list[dict]:
    """Tokens grouped by how often their target occurs in the training text (`freq` (V,), estimated or
    exact): per bucket the tokens, the mean gain and both perplexities."""
    f = np.asarray(freq)[np.clip(target, 0, len(freq) - 1)] if len(freq) else np.zeros(len(target))
    f = np.where((target >= 0) & (target < len(freq)), f, 0)
    out = []
    for lo, hi in zip(edges, list(edges[1:]) + [None]):
        sel = (f >= lo) & (f < hi) if hi is not None else f >= lo
        n = int(sel.sum())
        label = "0" if (lo, hi) == (0, 1) else f"{_short(lo)}+" if hi is None else \
            f"{lo}–{hi - 1}" if hi <= 1000 else f"{_short(lo)}–{_short(hi)}"
        out.append({"label": label, "lo": lo, "hi": hi, "tokens": n,
                    "gain": float(np.mean(mix[sel] - lm[sel])) if n else None,
                    "base_ppl": perplexity(float(np.sum(lm[sel])), n) if n else None,
                    "knnlm_ppl": perplexity(float(np.sum(mix[sel])), n) if n else None})
    return out


def _short(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k" if n >= 1000 else str(n)


def extremes(gain: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(the n tokens of largest gain, largest first; the n of largest loss, largest first); ties by position."""
    order = np.argsort(-gain, kind="stable")
    return order[:n], np.argsort(gain, kind="stable")[:n]


def token_pieces(tok, ids, context: int = 4) -> list[str]:
    """The text of each token as it reads in place: decode(previous tokens + it) minus decode(previous
    tokens), with `context` tokens before. A character split over tokens (byte-level BPE: U+FFFD while
    incomplete) goes to the token that completes it; a tokenizer's leading-space rules apply as in the
    text. Joined, the pieces are the decoded text."""
    return pieces_of_many(tok, [ids], context)[0]


def pieces_of_many(tok, seqs: list, context: int = 4, memo: dict | None = None) -> list[list[str]]:
    """`token_pieces` of several sequences (a report page's training text: thousands of short spans). Where
    the tokens decoded one by one join to the sequence's own decode (byte-level BPE on whole characters: most
    text), those are its pieces; the other sequences go through `_windowed`. `memo`: {token id: its decode},
    kept by the caller across calls."""
    memo = {} if memo is None else memo
    seqs = [[int(x) for x in ids] for ids in seqs]
    new = sorted({i for ids in seqs for i in ids} - memo.keys())
    memo.update(zip(new, _decode_batch(tok, [[i] for i in new])))
    whole = _decode_batch(tok, seqs)
    out: list = [None] * len(seqs)
    slow = []
    for j, (ids, text) in enumerate(zip(seqs, whole)):
        alone = [memo[i] for i in ids]
        if "".join(alone) == text and "\ufffd" not in text:
            out[j] = alone
        else:
            slow.append(j)
    for j, pieces in zip(slow, _windowed(tok, [seqs[j] for j in slow], context)):
        out[j] = pieces
    return out


def _windowed(tok, seqs: list[list[int]], context: int, block: int = 8) -> list[list[str]]:
    """Pieces as decode(window + token) minus decode(window), `context` tokens before. Tokens go in blocks
    that share the start of their windows, `context` tokens before the block, so each token's piece is the
    difference of two consecutive decodes of one growing window (one decode per token, plus one per block)."""
    windows, sizes = [], []
    for ids in seqs:
        for bs in range(0, len(ids), block):
            lo = max(0, bs - context)
            windows += [ids[lo:i] for i in range(bs, min(bs + block, len(ids)) + 1)]    # before the block, then +1
        sizes.append(len(ids))
    text = _decode_batch(tok, windows)
    pieces, w = [], 0
    for n in sizes:
        for bs in range(0, n, block):
            m = min(block, n - bs)
            for x, y in zip(text[w:w + m], text[w + 1:w + m + 1]):
                pieces.append(_difference(x, y))
            w += m + 1
    out, at = [], 0
    for n in sizes:
        out.append(pieces[at:at + n])
        at += n
    return out


def _difference(x: str, y: str) -> str:
    """The text a token adds: decode(window + token) `y` after decode(window) `x`. A window that starts inside
    a character begins with U+FFFDs, which both share except where the token completes a character (then y has
    fewer); a character still incomplete (trailing U+FFFDs) goes to the token that completes it."""
    if x[:1] == "\ufffd":
        lead = min(len(x) - len(x.lstrip("\ufffd")), len(y) - len(y.lstrip("\ufffd")))
        x, y = x[lead:], y[lead:]
    x = x.rstrip("\ufffd")
    n = len(x) if y.startswith(x) else len(_common_prefix(x, y))
    return y[n:].rstrip("\ufffd")


def _decode_batch(tok, lists: list[list[int]]) -> list[str]:
    """tok.decode of each list (special tokens kept, no clean-up of spaces): a fast tokenizer's own batch
    decode (Rust, one call), else one call per list."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return backend.decode_batch(lists, skip_special_tokens=False)
    return tok.batch_decode(lists, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _common_prefix(x: str, y: str) -> str:
    n = 0
    while n < min(len(x), len(y)) and x[n] == y[n]:
        n += 1
    return x[:n]


def merge_windows(docs: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[list[tuple[int, int, int]], np.ndarray]:
    """Token ranges [lo, hi) of documents, merged where they overlap or touch: (the spans (doc, lo, hi),
    the span of each range (n,)). A page reads and stores each span once, not each neighbour's window."""
    n = len(docs)
    span_of = np.zeros(n, np.int64)
    spans: list[tuple[int, int, int]] = []
    for i in np.lexsort((lo, docs)):
        d, a, b = int(docs[i]), int(lo[i]), int(hi[i])
        if spans and spans[-1][0] == d and a <= spans[-1][2]:
            spans[-1] = (d, spans[-1][1], max(spans[-1][2], b))
        else:
            spans.append((d, a, b))
        span_of[i] = len(spans) - 1
    return spans, span_of

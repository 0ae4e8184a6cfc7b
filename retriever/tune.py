"""Cached neighbours (`knnlm eval --save-neighbours URI`) and `knnlm tune` on them.

A cache is a folder (local or s3://) of Parquet files, one per evaluation chunk, in token order:

| column   | type                        | meaning |
|----------|-----------------------------|---------|
| target   | int64                       | the evaluated token id |
| lm_logp  | float64                     | the base LM's log p(target) |
| dist     | fixed_size_list<float32>[k] | distances of the k neighbours, best first (squared L2 / inner product, as FAISS returns them; +inf / -inf where missing) |
| values   | fixed_size_list<int32>[k]   | their values (token ids; -1 where missing) |
| ids      | fixed_size_list<int64>[m]   | the global ids of the first m = min(k, 16) of them (-1 where missing): where `knnlm report` finds their training text |

plus `text.parquet`, the evaluated text (one row per scored sequence: `input`, the index of its file in
the corpus list; `sequence`, its index in that file; `tokens`, list<int32>, its first token unscored and
the others the targets above, in order), and `cache.json` (written last): {metric, k, ids, rerank,
datastore, version, corpus, chunks, lambda, temperature, base_ppl, knnlm_ppl, model, key_layer} and the
evaluation's protocol (`retriever.evaluate.Protocol`: window, min_context, mode, tokens, sequences,
distances, index_factory, nprobe, compute_dtype). Everything `knnlm tune` needs: it searches λ, T and k
(a prefix of the k neighbours) without the LM or the index; its output records each cache's protocol
under `caches`. A cache written before ids and text were kept has neither: tune reads it, a report does not.
"""
from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from builder.config import ConfigError
from builder.layout import NEIGHBOUR_CACHE_META, NEIGHBOUR_CACHE_TEXT, neighbour_chunk_path
from builder.manifest import ManifestError, load_manifest, write_manifest
from builder.storage import NotFound, Storage, StorageError, write_json_file
from retriever.config import CACHE_IDS, TuneConfig
from retriever.knnlm import PAPER_LAMBDA, PAPER_TEMPERATURE, interpolate, knn_log_probs, perplexity

log = logging.getLogger(__name__)


def _fixed(a: np.ndarray, dtype) -> pa.FixedSizeListArray:
    a = np.asarray(a, dtype)                                      # (n, width)
    return pa.FixedSizeListArray.from_arrays(pa.array(a.ravel()), a.shape[1])


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def write_chunk(storage, i: int, target: np.ndarray, lm: np.ndarray, dist: np.ndarray, values: np.ndarray,
                ids: np.ndarray | None = None) -> None:
    """One chunk's file; `ids`: the global ids of its first min(k, CACHE_IDS) neighbours (n, m)."""
    cols = {"target": pa.array(np.asarray(target, np.int64)), "lm_logp": pa.array(np.asarray(lm, np.float64)),
            "dist": _fixed(dist, np.float32), "values": _fixed(values, np.int32)}
    if ids is not None:
        cols["ids"] = _fixed(ids[:, :CACHE_IDS], np.int64)
    storage.write_bytes(neighbour_chunk_path(i), _parquet(pa.table(cols)))


def write_text(storage, sequences: list[tuple[int, int, np.ndarray]]) -> None:
    """text.parquet: the evaluated sequences, (input file index, sequence index in it, tokens) each."""
    storage.write_bytes(NEIGHBOUR_CACHE_TEXT, _parquet(pa.table({
        "input": pa.array([s[0] for s in sequences], pa.int32()),
        "sequence": pa.array([s[1] for s in sequences], pa.int64()),
        "tokens": pa.array([np.asarray(s[2], np.int32) for s in sequences], pa.list_(pa.int32()))})))


def read_text(storage) -> list[tuple[int, int, np.ndarray]]:
    t = pq.read_table(pa.BufferReader(storage.read_bytes(NEIGHBOUR_CACHE_TEXT)))
    toks = t.column("tokens").combine_chunks()
    flat, off = toks.values.to_numpy(), toks.offsets.to_numpy()
    return [(int(a), int(b), flat[off[j]:off[j + 1]]) for j, (a, b) in
            enumerate(zip(t.column("input").to_pylist(), t.column("sequence").to_pylist()))]


@dataclass
class Cache:
    target: np.ndarray      # (n,) int64
    lm: np.ndarray          # (n,) float64
    dist: np.ndarray        # (n, k) float32
    values: np.ndarray      # (n, k) int32
    meta: dict
    ids: np.ndarray | None = None     # (n, m) int64: the first m neighbours' global ids (None: an older cache)


def read_meta(uri: str) -> dict:
    """A cache's cache.json; ValueError when `uri` is not a (finished) cache."""
    st = Storage.from_uri(uri)
    try:
        return json.loads(st.read_text(NEIGHBOUR_CACHE_META))
    except NotFound:
        raise ValueError(f"{st.url(NEIGHBOUR_CACHE_META)} not found: {uri} is not a neighbour cache (write one with "
                         "`knnlm eval ... --save-neighbours URI`)") from None


def iter_chunks(uri: str, meta: dict):
    """Each chunk of a cache in order, as a Cache of its rows (memory: one chunk)."""
    st = Storage.from_uri(uri)
    k = meta["k"]
    for i in range(meta["chunks"]):
        t = pq.read_table(pa.BufferReader(st.read_bytes(neighbour_chunk_path(i))))
        fixed = lambda name, width: t.column(name).combine_chunks().values.to_numpy().reshape(-1, width)  # noqa: E731
        yield Cache(t.column("target").to_numpy(), t.column("lm_logp").to_numpy(), fixed("dist", k),
                    fixed("values", k), meta, fixed("ids", meta["ids"]) if "ids" in t.column_names else None)


def read_cache(uri: str) -> Cache:
    meta = read_meta(uri)
    parts = list(iter_chunks(uri, meta))
    ids = [p.ids for p in parts]
    c = Cache(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("target", "lm", "dist", "values")),
              meta=meta, ids=np.concatenate(ids) if all(i is not None for i in ids) else None)
    if len(c.target) != meta["tokens"]:
        raise ValueError(f"{uri}: {len(c.target)} tokens in its chunks, cache.json says {meta['tokens']}")
    return c


def check_not_stale(meta: dict, flag: str, uri: str) -> None:
    """Refuse a cache made from a datastore version whose neighbours were removed since (`knnlm remove`): its
    distances and values include ids no query returns any more. A cache without a version is of version 1;
    a datastore that cannot be read is not checked."""
    made, where = int(meta.get("version") or 1), meta.get("datastore")
    if not where:
        return
    try:
        m = load_manifest(Storage.from_uri(where))
    except (ManifestError, StorageError):
        return
    later = [r for r in m.removals or [] if int(r.get("version", 0)) > made]
    if later:
        raise ConfigError(f"{flag} {uri}: made from version {made} of {where}, whose documents were removed since "
                          f"(`knnlm remove`, version {later[0]['version']}): its neighbours include removed ids; "
                          "rerun `knnlm eval --save-neighbours` on the current version")


def ppl(c: Cache, lam: float, temperature: float, k: int) -> float:
    """kNN-LM perplexity of a cache with these settings (the same functions `knnlm eval` uses)."""
    knn = knn_log_probs(c.dist[:, :k], c.values[:, :k], c.target, temperature, c.meta["metric"])
    return perplexity(float(np.sum(interpolate(c.lm, knn, lam))), len(c.lm))


LAMBDAS = tuple(round(x, 2) for x in np.arange(0.0, 1.0, 0.05))      # λ = 1 is −inf wherever no neighbour has the target


def k_grid(k: int) -> list[int]:
    """Powers of two below k, then k."""
    return [x for x in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048) if x < k] + [k]


def default_grid(c: Cache) -> dict:
    """λ in steps of 0.05; T log-spaced around the typical nearest distance (distances scale with the
    model: a fixed T = 1 can be far too sharp); k powers of two up to the cache's k."""
    d1 = np.abs(c.dist[:, 0][np.isfinite(c.dist[:, 0])])
    d1 = d1[d1 > 0]                # an exact match (text the datastore holds) is at 0: it gives no scale (T = 0)
    scale = float(np.median(d1)) if d1.size else 1.0
    temps = sorted({1.0} | {float(f"{scale * 2.0 ** e:.4g}") for e in range(-4, 7)})
    return {"lambda": list(LAMBDAS), "temperature": temps, "k": k_grid(c.meta["k"])}


def grid_sums(lm: np.ndarray, dist: np.ndarray, values: np.ndarray, target: np.ndarray, temperature: float,
              metric: str, ks: list[int], lambdas: list[float], known: dict | None = None) -> np.ndarray:
    """Σ log p of the kNN-LM over the rows, for each k (the first k neighbours) and λ, at one T: (len(ks),
    len(lambdas)) float64. `known`: {k: log p_kNN(target) already computed}. `tune`'s grid and the report's
    curves (retriever/report_data.py)."""
    out = np.empty((len(ks), len(lambdas)))
    for i, k in enumerate(ks):
        knn = (known or {}).get(k)
        if knn is None:
            knn = knn_log_probs(dist[:, :k], values[:, :k], target, temperature, metric)
        out[i] = [float(np.sum(interpolate(lm, knn, lam))) for lam in lambdas]
    return out


def tune(valid: Cache, test: Cache | None = None, grid: dict | None = None) -> dict:
    """Pick λ, T, k minimizing the validation perplexity; report them on test."""
    grid = grid or default_grid(valid)
    n = len(valid.lm)
    sums = {T: grid_sums(valid.lm, valid.dist, valid.values, valid.target, T, valid.meta["metric"], grid["k"],
                         grid["lambda"]) for T in grid["temperature"]}
    table = []
    best = None
    for i, k in enumerate(grid["k"]):
        for T in grid["temperature"]:
            for j, lam in enumerate(grid["lambda"]):
                p = perplexity(float(sums[T][i, j]), n)
                table.append({"k": k, "temperature": T, "lambda": lam, "valid_ppl": p})
                if best is None or p < best["valid_ppl"]:
                    best = table[-1]
    out = {"lambda": best["lambda"], "temperature": best["temperature"], "k": best["k"],
           "valid_ppl": best["valid_ppl"], "valid_base_ppl": perplexity(float(valid.lm.sum()), len(valid.lm)),
           "valid_tokens": int(len(valid.lm)), "caches": {"valid": protocol(valid)}, "grid": grid, "table": table}
    if test is not None:
        out.update(test_ppl=ppl(test, best["lambda"], best["temperature"], best["k"]),
                   test_base_ppl=perplexity(float(test.lm.sum()), len(test.lm)), test_tokens=int(len(test.lm)),
                   test_paper_ppl=ppl(test, PAPER_LAMBDA, PAPER_TEMPERATURE, test.meta["k"]))
        out["caches"]["test"] = protocol(test)
    return out


PROTOCOL_KEYS = ("window", "min_context", "mode", "tokens", "sequences", "distances", "index_factory", "nprobe",
                 "compute_dtype")


def protocol(c: Cache) -> dict:
    """The evaluation protocol a cache was made with (see retriever.evaluate.Protocol); a cache written
    before the protocol was recorded gives what it has (distances from its `rerank`)."""
    meta = dict(c.meta)
    meta.setdefault("distances", "exact" if meta.get("rerank") else "approximate")
    return {k: meta.get(k) for k in PROTOCOL_KEYS} | {"datastore": meta.get("datastore")}


def tune_caches(cfg: TuneConfig) -> dict:
    """`knnlm tune` (and the pipeline's tune stage): λ, T, k chosen on the validation cache and reported
    on the test cache (`tune`), then what `cfg` asks for: the plots (listed as `plots`), the JSON file
    and the record in a datastore's manifest. A folder that is not a cache is a ConfigError."""
    try:
        valid = read_cache(cfg.valid)
    except ValueError as e:
        raise ConfigError(f"--valid {cfg.valid}: {e}") from None
    check_not_stale(valid.meta, "--valid", cfg.valid)
    try:
        test = read_cache(cfg.test) if cfg.test else None
    except ValueError as e:
        raise ConfigError(f"--test {cfg.test}: {e}") from None
    if test is not None:
        check_not_stale(test.meta, "--test", cfg.test)
    res = tune(valid, test)
    if cfg.plots:
        res["plots"] = plot(res, cfg.plots)
    if cfg.out:
        write_json_file(cfg.out, res)
    if cfg.record:
        record(cfg.record, res)
    return res


def plot(result: dict, out_dir: str) -> list[str]:
    """ppl against λ for a few T (at the chosen k), and against k (at the chosen λ, T): PNG files."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    rows = result["table"]
    k, T, lam = result["k"], result["temperature"], result["lambda"]
    temps = sorted({r["temperature"] for r in rows})
    show = sorted(set([T] + [t for t in temps if t in (1.0,)] + temps[:: max(1, len(temps) // 4)]))
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in show:
        pts = sorted((r["lambda"], r["valid_ppl"]) for r in rows if r["k"] == k and r["temperature"] == t)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=f"T={t:g}" + (" (chosen)" if t == T else ""))
    ax.axhline(result["valid_base_ppl"], color="gray", ls="--", label="base LM")
    ax.scatter([lam], [result["valid_ppl"]], color="red", zorder=5, label=f"best: λ={lam:g}")
    ax.set_xlabel("λ (weight of p_kNN)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"kNN-LM perplexity vs λ (k={k})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "ppl_vs_lambda.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    pts = sorted((r["k"], r["valid_ppl"]) for r in rows if r["lambda"] == lam and r["temperature"] == T)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
    ax.axhline(result["valid_base_ppl"], color="gray", ls="--", label="base LM")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (neighbours)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"kNN-LM perplexity vs k (λ={lam:g}, T={T:g})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "ppl_vs_k.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def record(datastore: str, result: dict) -> None:
    """Store the chosen λ, T, k in the manifest (`knnlm.tuned`): `knnlm eval`'s defaults from then on."""
    st = Storage.from_uri(datastore)
    m = load_manifest(st)
    keep = {k: result[k] for k in ("lambda", "temperature", "k", "valid_ppl", "valid_base_ppl", "valid_tokens",
                                   "test_ppl", "test_base_ppl", "test_tokens") if k in result}
    m.tuned = keep
    write_manifest(st, m)

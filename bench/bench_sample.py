#!/usr/bin/env python
"""Benchmark: does the row-group sample of `knnlm train-index` train a worse index than a row-uniform one?

The question (issue 14): builder/sample.py `plan_sample` gives every row the same chance, but
reads whole Parquet row groups (16,384 contiguous corpus positions by default) and keeps about
1 / read_factor of each group it reads, so the sample comes from few runs of neighbouring text
(1M keys of a 3B-key datastore: ~250 runs). Does the coarse quantizer or the PQ suffer?

Samplers, each drawing `size` keys of the datastore with the seed, read with builder.rows.read_rows:

- `row-groups` (the baseline, what train-index does): builder.sample.sample_keys
  (plan_sample + read_rows, read_factor 4 by default);
- `uniform`: `size` ids drawn uniformly without replacement over the whole datastore
  (np.random.default_rng(seed).choice), touching nearly every row group;
- `row-groups@B`: plan_sample as if the datastore had been written with `--row-group-rows B`
  (the same keys in smaller row groups: the manifest's row_group_rows replaced), read from the
  real layout: the sample such a datastore would give, without rewriting it.

Each sample trains an index with the product's path (builder.index.train_index, faiss, seeded
with the same seed, as train-index does); every key of the datastore is then added to it. Figures,
per sampler, mean ± std over the seeds:

- coarse: mean squared distance of held-out keys to their IVF centroid
  (builder.index.quantization_error; --qerr-keys fixed random keys of the datastore, less the
  sample's: 131,072 by default, 0 for all keys);
- recon: mean squared distance of the same keys to their decoded PQ code (the same function);
- recall@k: the fraction of the exact top-k (faiss IndexFlatL2 over all keys, fp16 keys as
  stored, widened) found in the index's top-k at --nprobe, averaged over --queries queries: keys
  of the valid split made as `knnlm eval` makes its queries (the datastore's model, key layer,
  window and min_context; retriever.evaluate.plan_chunks + score_windows, rounded to float16),
  from --query-windows windows spread evenly over the split, then drawn at random.

The difference (row-groups − uniform) is printed with its noise, 2 × the standard error of a
difference of two means (sqrt(s_a²/n_a + s_b²/n_b)). The result goes to
bench/results/sample-cpu-<YYYY-MM-DD>.json with the machine and the load average.

    python bench/bench_sample.py --datastore /work/cache/wt2-ds   # 6 runs: ~5 min quiet, ~11 at load 12 on 2 vCPUs
    python bench/bench_sample.py --sizes 32768 --factory IVF512,PQ32 --seeds 0,1,2,3,4
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import faiss  # noqa: E402
import numpy as np  # noqa: E402
from bench_build import machine_info  # noqa: E402
from common import write_result  # noqa: E402

from builder.corpus import detect_format, tokenize_file  # noqa: E402
from builder.index import check_factory, check_train_size, quantization_error, train_index  # noqa: E402
from builder.keys import load_encoder  # noqa: E402
from builder.manifest import Manifest, load_manifest  # noqa: E402
from builder.rows import iter_key_range, read_rows, row_groups  # noqa: E402
from builder.sample import plan_sample, sample_keys  # noqa: E402
from builder.storage import Storage, read_uri  # noqa: E402
from retriever.evaluate import plan_chunks, score_windows  # noqa: E402

log = logging.getLogger("bench_sample")

SAMPLERS = ("row-groups", "uniform")
FIGURES = ("coarse_mse", "reconstruction_mse", "recall")
QERR_BLOCK = 65536  # keys per quantization_error call: bounds the temporaries to ~4 × 65536 × d floats


# ---------------------------------------------------------------------------------------------
# pure cores


def uniform_ids(num_keys: int, size: int, seed: int) -> np.ndarray:
    """(size,) sorted int64 ids drawn uniformly without replacement from [0, num_keys)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_keys, size=min(size, num_keys), replace=False)).astype(np.int64)


def spread(n_items: int, n_pick: int) -> np.ndarray:
    """(≤ n_pick,) indices of [0, n_items) evenly spread (the first and last included)."""
    return np.unique(np.linspace(0, n_items - 1, num=min(n_pick, n_items)).round().astype(np.int64))


def recall_at_k(exact: np.ndarray, approx: np.ndarray) -> float:
    """exact, approx (q, k) ids → mean over queries of |exact ∩ approx| / k (−1 ids never match)."""
    k = exact.shape[1]
    return float(np.mean([np.intersect1d(e, a[a >= 0]).size / k for e, a in zip(exact, approx)]))


def mean_std(v: list[float]) -> tuple[float, float]:
    """(mean, sample std; 0 for one value)."""
    a = np.asarray(v, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def diff_noise(a: list[float], b: list[float]) -> tuple[float, float]:
    """(mean(a) − mean(b), 2 × its standard error): a difference beyond the second is beyond noise."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    return ma - mb, 2.0 * float(np.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b)))


# ---------------------------------------------------------------------------------------------
# data


def all_keys(storage: Storage, m: Manifest) -> np.ndarray:
    """(num_keys, dim) float32: every key of the datastore in id order (fp16 as stored, widened)."""
    out = np.empty((m.num_keys, m.dim), np.float32)
    for ids, keys in iter_key_range(storage, m, 0, m.num_keys):
        out[ids[0]:ids[-1] + 1] = keys
    return out


def valid_queries(model: str, corpus: str, m: Manifest, windows: int, n: int, seed: int) -> np.ndarray:
    """(n, dim) float32 queries: the keys `knnlm eval` would make for `corpus` (stream mode, the
    manifest's window/min_context and key layer, float32 compute, rounded to float16), from
    `windows` of its scoring windows spread evenly over the text, `n` of them drawn at random."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model)
    tok.model_max_length = 1 << 60
    tf = tokenize_file(read_uri(corpus), corpus, detect_format(corpus, "auto"), "stream", tok)
    chunks = plan_chunks([tf.tokens], m.window, m.min_context)
    every = [w for c in chunks for w in c.windows]                      # all scoring windows, in order
    picked = [every[i] for i in spread(len(every), windows)]
    enc = load_encoder(model, m.key_layer, "cpu", "float32")
    q, _, _ = score_windows(picked, enc)                                # (m, dim) float16
    rng = np.random.default_rng(seed)
    sel = np.sort(rng.choice(len(q), size=min(n, len(q)), replace=False))
    log.info("%d queries from %d of %d windows of %s (%d targets)", len(sel), len(picked), len(every), corpus, len(q))
    return np.ascontiguousarray(q[sel], np.float32)


def exact_topk(keys: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(q, k) int64 ids of the exact L2 top-k of every query over all keys."""
    flat = faiss.IndexFlatL2(keys.shape[1])
    flat.add(keys)
    return flat.search(queries, k)[1]


def with_row_groups(m: Manifest, rows: int) -> Manifest:
    """A copy of the manifest that says its shards were written in row groups of `rows` rows: the
    layout `knnlm build --row-group-rows rows` would have given the same keys."""
    return dataclasses.replace(m, build=m.build | {"row_group_rows": rows}, identity=m.identity | {"row_group_rows": rows})


def draw(sampler: str, storage: Storage, m: Manifest, size: int, seed: int, read_factor: float
         ) -> tuple[np.ndarray, np.ndarray]:
    """(sorted ids (n,), keys (n, dim) float32) of one sampler's sample."""
    if sampler == "row-groups":
        ids, keys = sample_keys(storage, m, size, seed, read_factor)
    elif sampler.startswith("row-groups@"):          # plan_sample on a simulated layout, read from the real one
        _, ids = plan_sample(row_groups(with_row_groups(m, int(sampler.split("@")[1]))), size, seed, read_factor)
        keys = read_rows(storage, m, ids, ("key",))["key"]
    elif sampler == "uniform":
        ids = uniform_ids(m.num_keys, size, seed)
        keys = read_rows(storage, m, ids, ("key",))["key"]
    else:
        raise ValueError(f"unknown sampler {sampler!r}")
    return ids, keys.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# measurement


def held_out(num_keys: int, n: int, exclude: np.ndarray, seed: int = 12345) -> np.ndarray:
    """(≤ n,) sorted ids: a fixed random set of n ids (the same for every run), less `exclude`."""
    ids = uniform_ids(num_keys, n, seed) if n and n < num_keys else np.arange(num_keys, dtype=np.int64)
    return ids[~np.isin(ids, exclude)]


def qerr_blocks(index, x: np.ndarray) -> dict:
    """quantization_error of x (n, d) float32, in blocks, weighted by block size."""
    tot = {"coarse_mse": 0.0, "reconstruction_mse": 0.0}
    for i in range(0, len(x), QERR_BLOCK):
        q = quantization_error(index, x[i:i + QERR_BLOCK])
        for name in tot:
            tot[name] += q[name] * len(x[i:i + QERR_BLOCK])
    return {name: v / len(x) for name, v in tot.items()}


def one_run(sampler: str, storage: Storage, m: Manifest, keys: np.ndarray, queries: np.ndarray, exact: np.ndarray,
            size: int, seed: int, a) -> dict:
    """Train on one sample, add every key, measure: the figures of one (sampler, size, seed)."""
    t0 = time.perf_counter()
    ids, x = draw(sampler, storage, m, size, seed, a.read_factor)
    rg = row_groups(with_row_groups(m, int(sampler.split("@")[1])) if "@" in sampler else m)
    groups = np.unique(rg.of(ids))                                   # of the sampler's layout
    index = train_index(x, a.factory, "l2", seed)
    t_train = time.perf_counter()
    q = qerr_blocks(index, keys[held_out(len(keys), a.qerr_keys, ids)])    # keys the index was not trained on
    index.add(keys)
    faiss.extract_index_ivf(index).nprobe = a.nprobe
    approx = index.search(queries, exact.shape[1])[1]
    out = q | {"recall": recall_at_k(exact, approx), "row_groups": int(len(groups)),
               "rows_read": int(rg.num_rows[groups].sum()), "seconds_train": round(t_train - t0, 2),
               "seconds": round(time.perf_counter() - t0, 2)}
    log.info("%s size %d seed %d: %s", sampler, size, seed, out)
    return out


def summarize(runs: dict, baseline: str = "uniform") -> list[dict]:
    """runs {(sampler, size): [figures per seed]} → one row per (size, sampler other than the
    baseline, figure): both samplers' (mean, std) and the difference sampler − baseline with its noise."""
    rows = []
    for (sampler, size), a in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        b = runs.get((baseline, size))
        if sampler == baseline or not b:
            continue
        for f in FIGURES:
            va, vb = [r[f] for r in a], [r[f] for r in b]
            d, noise = diff_noise(va, vb)
            mb = mean_std(vb)[0]
            rows.append({"size": size, "sampler": sampler, "figure": f, "mean_std": mean_std(va),
                         baseline: mean_std(vb), "diff": d, "noise": noise, "beyond_noise": abs(d) > noise,
                         "rel_diff": d / mb if mb else float("nan")})
    return rows


def print_table(rows: list[dict], runs: dict, baseline: str = "uniform") -> None:
    fmt = (lambda ms: f"{ms[0]:.5g} ± {ms[1]:.2g}")
    print(f"{'size':>6} {'sampler':<17} {'figure':<18} {'sampler':>17} {baseline:>17} {'diff':>9} {'2σ noise':>8} "
          f"{'rel':>7}  beyond noise")
    for r in rows:
        print(f"{r['size']:>6} {r['sampler']:<17} {r['figure']:<18} {fmt(r['mean_std']):>17} {fmt(r[baseline]):>17} "
              f"{r['diff']:>+9.3g} {r['noise']:>8.2g} {100 * r['rel_diff']:>+6.2f}%  {'YES' if r['beyond_noise'] else 'no'}")
    for (sampler, size), rs in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"  {size} {sampler}: row groups holding the sample {[r['row_groups'] for r in rs]}, rows read "
              f"{[r['rows_read'] for r in rs]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--datastore", default="/work/cache/wt2-ds", help="a built datastore (read only)")
    ap.add_argument("--model", default=str(REPO.parent / "shared/models/gpt2-wikitext2-small"),
                    help="the datastore's model (checked only through its keys)")
    ap.add_argument("--queries-corpus", default=str(REPO.parent / "shared/data/wikitext-2-splits/valid.txt"))
    ap.add_argument("--sizes", default="16384,32768", help="sample sizes (keys)")
    ap.add_argument("--seeds", default="0,1,2", help="one sample + training per seed and sampler")
    ap.add_argument("--samplers", default=",".join(SAMPLERS),
                    help="row-groups (train-index's), uniform, row-groups@B (plan_sample as if the datastore had "
                         "been written with --row-group-rows B; the same keys)")
    ap.add_argument("--factory", default="IVF256,PQ32")
    ap.add_argument("--read-factor", type=float, default=4.0, help="train-index's --read-factor")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--query-windows", type=int, default=32, help="scoring windows of the split the queries come from")
    ap.add_argument("--qerr-keys", type=int, default=131072,
                    help="held-out keys (a fixed random set less each sample) for the quantization error; 0: all")
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="faiss threads (0: faiss's default)")
    ap.add_argument("--result", default=None, help="result file or directory (default bench/results/)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.threads:
        faiss.omp_set_num_threads(a.threads)
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    machine = machine_info("cpu")
    storage = Storage.from_uri(a.datastore)
    m = load_manifest(storage)
    sizes = [int(s) for s in a.sizes.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]
    info = check_factory(a.factory, m.dim, "l2")
    for size in sizes:
        check_train_size(info, size, m.num_keys)
    model = a.model
    keys = all_keys(storage, m)
    queries = valid_queries(model, a.queries_corpus, m, a.query_windows, a.queries, 0)
    t1 = time.perf_counter()
    exact = exact_topk(keys, queries, a.k)
    log.info("exact top-%d of %d queries over %d keys in %.1fs", a.k, len(queries), len(keys), time.perf_counter() - t1)
    runs: dict = {}
    for size in sizes:
        for seed in seeds:
            for sampler in a.samplers.split(","):
                runs.setdefault((sampler, size), []).append(one_run(sampler, storage, m, keys, queries, exact,
                                                                    size, seed, a))
    rows = summarize(runs)
    print_table(rows, runs)
    rg = row_groups(m)
    params = vars(a) | {"num_keys": m.num_keys, "dim": m.dim, "row_group_rows": int(rg.num_rows.max()),
                        "num_row_groups": len(rg.num_rows), "model": model, "queries_from": "valid split keys"}
    figures = {"table": rows, "runs": {f"{s}/{n}": rs for (s, n), rs in runs.items()},
               "mean_row_groups_holding_sample_200_seeds": {n: float(np.mean([len(plan_sample(rg, n, s, a.read_factor)[0])
                                                          for s in range(200)])) for n in sizes}}
    path, _ = write_result("sample", "cpu", machine, load_before, params, figures, time.perf_counter() - t0, a.result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

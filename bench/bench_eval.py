#!/usr/bin/env python
"""`knnlm eval` throughput: kNN-LM tokens/s against the base LM alone, as a ratio, per index type.

The datastore is WikiText-2's train split keyed by the small GPT-2 trained on it (built here, or
reused with --datastore from `bench/wikitext2_knnlm.py --out DIR`, which leaves DIR/ds). For each
--factory: train the index on a 200k-key sample, add it as one shard, start its server, and run
`knnlm eval` of test.txt (57,211 tokens) with λ, T, k, nprobe fixed (the values tuned on valid by
wikitext2_knnlm.py), on one CPU worker.

The baseline is the base LM alone on the same windows, same model, batch and threads (the same
`score_windows` the evaluation workers run, which returns the LM's log-probabilities), measured in
this run before and after the evaluations; the ratio uses their mean. Two ratios:

  end_to_end   evaluate()'s tokens/s (wall clock: model check, tokenization, worker start,
               forward, search, combine) ÷ the base LM's tokens/s;
  steady       the base LM's seconds ÷ the worker's lm + search + combine seconds (a long
               evaluation, where the fixed start-up cost is amortised, tends to this).

    python bench/bench_eval.py --datastore /tmp/wt2run/ds       # ~5 min on 2 cores
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)
SHARED = REPO.parent / "shared"
FACTORIES = ["IVF4096,PQ32", "IVF4096,PQ64x4fsr", "IVF4096,PQ64x4fs"]


def base_lm_seconds(model: str, corpus: str, window: int, min_context: int, batch: int, threads: int) -> tuple[int, float]:
    """(tokens, seconds) of the base LM alone scoring the evaluation's windows (no search)."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from builder.corpus import tokenize_file
    from builder.keys import load_encoder
    from builder.storage import read_uri
    from retriever.evaluate import plan_chunks, score_windows
    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model)
    tok.model_max_length = 1 << 60
    tf = tokenize_file(read_uri(corpus), corpus, "wikitext", "stream", tok, "text")   # as evaluate() reads it
    seqs = np.split(np.asarray(tf.tokens), np.cumsum(tf.seq_lengths)[:-1])
    chunks = plan_chunks(seqs, window, min_context)
    enc = load_encoder(model, "ffn_input", "cpu", "float32")
    t = time.perf_counter()
    n = sum(len(score_windows(c.windows, enc, batch)[1]) for c in chunks)
    return n, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--datastore", default=None, help="a built WikiText-2 datastore to copy (default: build one)")
    ap.add_argument("--model", default=str(SHARED / "models" / "gpt2-wikitext2-small"))
    ap.add_argument("--splits", default=str(SHARED / "data" / "wikitext-2-splits"))
    ap.add_argument("--factory", nargs="+", default=FACTORIES)
    ap.add_argument("--train-size", type=int, default=200_000)
    ap.add_argument("--lambda", dest="lam", type=float, default=0.35)
    ap.add_argument("--temperature", type=float, default=12.57)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--result", default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("faiss.loader", "builder", "cluster", "retriever", "faiss.contrib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log = logging.getLogger("bench_eval")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")

    import ray
    from bench_build import machine_info
    from common import write_result

    from builder.add import add_stage
    from builder.build import build
    from builder.config import AddConfig, BuildConfig, TrainConfig
    from builder.train import train_stage
    from retriever import start_servers, stop_servers
    from retriever.config import EvalConfig
    from retriever.evaluate import evaluate

    machine = machine_info("cpu")
    load_before = os.getloadavg()
    t_all = time.perf_counter()
    threads = len(os.sched_getaffinity(0))
    root = tempfile.mkdtemp(prefix="knnlm-bench-eval-")
    ds = os.path.join(root, "ds")
    test = os.path.join(a.splits, "test.txt")
    figures: dict = {"indexes": {}}
    try:
        if a.datastore:
            shutil.copytree(a.datastore, ds, ignore=shutil.ignore_patterns("index", "_index"))
        else:
            build(BuildConfig(corpus=[os.path.join(a.splits, "train.txt")], model=a.model, out=ds, format="wikitext",
                              mode="stream", window=512, min_context=256, progress=False))
        from builder.manifest import load_manifest
        from builder.storage import Storage
        m = load_manifest(Storage.from_uri(ds))
        figures["datastore_keys"] = m.num_keys
        base = [base_lm_seconds(a.model, test, m.window, m.min_context, a.batch_size, threads)]
        log.info("base LM: %d tokens in %.2fs", *base[0])
        ray.init(num_cpus=threads, include_dashboard=False, logging_level="WARNING")
        for fac in a.factory:
            t = time.perf_counter()
            train_stage(TrainConfig(datastore=ds, index_factory=fac, train_size=a.train_size, trainer="faiss",
                                    force=True))
            t_train = time.perf_counter() - t
            t = time.perf_counter()
            add_stage(AddConfig(datastore=ds, index_shards=1, encoder="faiss", force=True))
            t_add = time.perf_counter() - t
            start_servers(ds, cache_dir=os.path.join(root, "cache"), detached=False)
            try:
                r = evaluate(EvalConfig(datastore=ds, corpus=[test], format="wikitext", lam=a.lam,
                                        temperature=a.temperature, k=a.k, nprobe=a.nprobe, workers=1,
                                        batch_size=a.batch_size)).to_json()
            finally:
                stop_servers(ds)
            r.update(train_seconds=round(t_train, 2), add_seconds=round(t_add, 2),
                     index_bytes=sum(s["bytes"] for s in load_manifest(Storage.from_uri(ds)).index_shards))
            figures["indexes"][fac] = r
            log.info("%s: kNN-LM ppl %.2f, %.0f tokens/s, split %s", fac, r["knnlm_ppl"], r["tokens_per_s"],
                     r["seconds_split"])
        ray.shutdown()
        base.append(base_lm_seconds(a.model, test, m.window, m.min_context, a.batch_size, threads))
        n = base[0][0]
        base_s = sum(s for _, s in base) / len(base)
        figures["base_lm"] = {"tokens": n, "seconds": [round(s, 3) for _, s in base], "tokens_per_s": n / base_s}
        for fac, r in figures["indexes"].items():
            assert r["tokens"] == n, (r["tokens"], n)
            worker = sum(r["seconds_split"].values())
            r["ratio_end_to_end"] = r["tokens_per_s"] / (n / base_s)
            r["ratio_steady"] = base_s / worker
    finally:
        shutil.rmtree(root, ignore_errors=True)
    path, _ = write_result("eval", "cpu", machine, load_before, vars(a), figures, time.perf_counter() - t_all,
                           a.result)
    b = figures["base_lm"]
    print(f"\nknnlm eval of WikiText-2 test ({b['tokens']:,} tokens), datastore {figures['datastore_keys']:,} keys, "
          f"k={a.k}, nprobe={a.nprobe}, 1 CPU worker, {threads} cores")
    print(f"base LM alone: {b['tokens_per_s']:,.0f} tokens/s (runs {b['seconds']} s)")
    print(f"{'index':<20} {'ppl':>8} {'tokens/s':>9} {'ratio':>6} {'steady':>7}  {'lm / search / combine s':>24}")
    for fac, r in figures["indexes"].items():
        sp = r["seconds_split"]
        print(f"{fac:<20} {r['knnlm_ppl']:>8.2f} {r['tokens_per_s']:>9,.0f} {r['ratio_end_to_end']:>6.2f} "
              f"{r['ratio_steady']:>7.2f}  {sp['lm']:>8.1f} / {sp['search']:>5.1f} / {sp['combine']:>4.1f}")
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

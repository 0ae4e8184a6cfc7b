#!/usr/bin/env python
"""A live datastore on real text: build on part of WikiText-2's train split, ingest the rest, remove
one article, compact; the test perplexity after each step (the README's worked example).

WikiText-2 (../shared/data/wikitext-2-splits) with the small GPT-2 trained on its train split
(../shared/models/gpt2-wikitext2-small), document mode (one document per article), window 512,
min context 256:

1. `knnlm build` of the first 90% of the train articles; `knnlm train-index` (IVF1024,PQ32) and
   `knnlm add` (2 index shards); `knnlm eval` of test.txt;
2. `knnlm ingest --name rest` of the other 10%: its keys/s against the build's, measured in the same
   run; eval;
3. `knnlm remove --docs` of the first ingested article; eval;
4. `knnlm compact`; eval (equal to step 3's: the same keys, the same trained index).

    python bench/bench_ingest.py            # ~15 min on 2 idle cores; --out keeps the datastore
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
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default=str(SHARED / "models" / "gpt2-wikitext2-small"))
    ap.add_argument("--splits", default=str(SHARED / "data" / "wikitext-2-splits"))
    ap.add_argument("--factory", default="IVF1024,PQ32")
    ap.add_argument("--train-size", type=int, default=100_000)
    ap.add_argument("--ingest-fraction", type=float, default=0.1)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--lam", type=float, default=0.4)
    ap.add_argument("--temperature", type=float, default=20.0)
    ap.add_argument("--out", default=None, help="where the corpus parts and the datastore go (default: a temp dir)")
    ap.add_argument("--result", default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("faiss.loader", "builder", "cluster", "retriever", "faiss.contrib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log = logging.getLogger("bench_ingest")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")

    import ray
    from bench_build import machine_info
    from common import write_result

    from builder.add import add_stage
    from builder.build import build
    from builder.compact import compact
    from builder.config import AddConfig, BuildConfig, CompactConfig, IngestConfig, RemoveConfig, TrainConfig
    from builder.ingest import ingest
    from builder.remove import remove
    from builder.train import train_stage
    from cluster.demo import split_articles
    from retriever.config import EvalConfig
    from retriever.evaluate import evaluate

    machine = machine_info("cpu")
    load_before = os.getloadavg()
    t_all = time.perf_counter()
    root = a.out or tempfile.mkdtemp(prefix="knnlm-ingest-")
    ds = os.path.join(root, "ds")
    articles = split_articles(Path(a.splits, "train.txt").read_text(encoding="utf-8"))
    n_b = max(1, round(len(articles) * a.ingest_fraction))
    parts = {"a": os.path.join(root, "train-a.txt"), "b": os.path.join(root, "train-b.txt")}
    os.makedirs(root, exist_ok=True)
    Path(parts["a"]).write_text("".join(articles[:-n_b]), encoding="utf-8")
    Path(parts["b"]).write_text("".join(articles[-n_b:]), encoding="utf-8")
    test = os.path.join(a.splits, "test.txt")
    steps: list[dict] = []
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")

    def score(step: str, seconds: float, **extra) -> None:
        r = evaluate(EvalConfig(datastore=ds, corpus=[test], format="wikitext", lam=a.lam, temperature=a.temperature,
                                k=a.k, nprobe=a.nprobe))
        steps.append({"step": step, "version": r.version, "seconds": round(seconds, 1), "base_ppl": r.base_ppl,
                      "knnlm_ppl": r.knnlm_ppl, "eval_seconds": round(r.seconds, 1), **extra})
        log.info("%s: version %s, kNN-LM test ppl %.4f (base %.4f)", step, r.version, r.knnlm_ppl, r.base_ppl)

    try:
        t = time.perf_counter()
        res = build(BuildConfig(corpus=[parts["a"]], model=a.model, out=ds, format="wikitext", mode="document",
                                window=512, min_context=256, progress=False))
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        train_stage(TrainConfig(datastore=ds, index_factory=a.factory, train_size=a.train_size, trainer="faiss"))
        add_stage(AddConfig(datastore=ds, index_shards=2, encoder="faiss"))
        n_docs_a = res.manifest.corpus["num_documents"]
        score("build A (90% of train) + train-index + add", build_s + time.perf_counter() - t,
              keys=res.manifest.num_keys, documents=n_docs_a, keys_per_s=res.manifest.num_keys / build_s)
        t = time.perf_counter()
        ing = ingest(IngestConfig(datastore=ds, corpus=[parts["b"]], name="rest", progress=False))
        ingest_s = time.perf_counter() - t
        added = ing.manifest.num_keys - res.manifest.num_keys
        drift = ing.manifest.ingestions["rest"].get("drift")
        score("ingest B (the other 10%) --name rest", ingest_s, keys=ing.manifest.num_keys, keys_added=added,
              keys_per_s=added / ingest_s, drift=drift)
        t = time.perf_counter()
        rem = remove(RemoveConfig(datastore=ds, docs=[str(n_docs_a)]))
        score(f"remove --docs {n_docs_a} (B's first article)", time.perf_counter() - t, keys=rem.manifest.num_keys,
              keys_removed=rem.num_keys)
        t = time.perf_counter()
        com = compact(CompactConfig(datastore=ds))
        score("compact", time.perf_counter() - t, keys=com.manifest.num_keys)
    finally:
        if started:
            ray.shutdown()
        if not a.out:
            shutil.rmtree(root, ignore_errors=True)
    figures = {"steps": steps, "articles": len(articles), "ingested_articles": n_b,
               "ingest_vs_build_keys_per_s": steps[1]["keys_per_s"] / steps[0]["keys_per_s"],
               "compact_equals_remove": abs(steps[3]["knnlm_ppl"] - steps[2]["knnlm_ppl"]) <= 1e-9 * steps[2]["knnlm_ppl"]}
    path, _ = write_result("ingest", "cpu", machine, load_before, vars(a), figures, time.perf_counter() - t_all,
                           a.result)
    print(f"\nWikiText-2 train split by article: {len(articles) - n_b} built, {n_b} ingested; test ppl with "
          f"{a.factory}, k {a.k}, nprobe {a.nprobe}, λ {a.lam}, T {a.temperature}")
    print(f"| step | version | keys | seconds | kNN-LM test ppl |\n|---|---|---|---|---|")
    for s in steps:
        print(f"| {s['step']} | {s['version']} | {s['keys']:,} | {s['seconds']:.1f} | {s['knnlm_ppl']:.4f} |")
    print(f"base LM test ppl {steps[0]['base_ppl']:.4f}; ingestion ran at {figures['ingest_vs_build_keys_per_s']:.2f}x "
          f"the build's keys/s (same run); compact equals remove: {figures['compact_equals_remove']}")
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

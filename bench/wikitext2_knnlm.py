#!/usr/bin/env python
"""The kNN-LM on real text, end to end: the table in the README comes from this script.

WikiText-2 (../shared/data/wikitext-2-splits) with the small GPT-2 trained on its train split
(../shared/models/gpt2-wikitext2-small, 4 layers, 256 dims):

1. `knnlm build` of train.txt (stream mode, window 512, min context 256: 467,808 keys);
2. `knnlm train-index` (--factory, default IVF1024,PQ32) and `knnlm add` (2 index shards);
3. index servers with exact re-ranking available; `knnlm eval` of valid.txt and test.txt with the
   paper's λ = 0.25, T = 1, k = 1024, nprobe = 32, saving the neighbours;
4. `knnlm tune` on the valid cache; the chosen λ, T, k evaluated on test with IVF-PQ distances and
   with exact re-ranking;
5. throughput: the evaluation's tokens/s against the base LM alone (scoring the same windows
   with the same model and batch, no search), in the same run.

    python bench/wikitext2_knnlm.py                 # ~10 min on 2 cores; --out keeps the datastore
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
    ap.add_argument("--train-size", type=int, default=200_000)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--out", default=None, help="where the datastore and caches go (default: a temp dir)")
    ap.add_argument("--result", default=None)
    ap.add_argument("--eval-fraction", type=float, default=1.0,
                    help="evaluate and tune on the first FRACTION of valid.txt's and test.txt's lines (a quicker run)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("faiss.loader", "builder", "cluster", "retriever.router", "retriever.server", "faiss.contrib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log = logging.getLogger("wikitext2")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")

    import numpy as np
    import ray
    from bench_build import machine_info
    from common import write_result

    from builder.add import add_stage
    from builder.build import build
    from builder.config import AddConfig, BuildConfig, TrainConfig
    from builder.keys import load_encoder
    from builder.train import train_stage
    from retriever import start_servers, stop_servers
    from retriever.config import EvalConfig
    from retriever.evaluate import evaluate, plan_chunks, score_windows
    from retriever.tune import read_cache, tune

    machine = machine_info("cpu")
    load_before = os.getloadavg()
    t_all = time.perf_counter()
    root = a.out or tempfile.mkdtemp(prefix="knnlm-wt2-")
    ds = os.path.join(root, "ds")
    figures: dict = {}
    split = {s: os.path.join(a.splits, f"{s}.txt") for s in ("train", "valid", "test")}
    if not 0 < a.eval_fraction <= 1:
        ap.error(f"--eval-fraction must be in (0, 1], got {a.eval_fraction}")
    try:
        if a.eval_fraction < 1:           # the first lines of valid and test, as files of their own
            os.makedirs(root, exist_ok=True)
            for s in ("valid", "test"):
                with open(split[s], encoding="utf-8") as f:
                    lines = f.readlines()
                split[s] = os.path.join(root, f"{s}-head.txt")
                with open(split[s], "w", encoding="utf-8") as f:
                    f.writelines(lines[:max(1, int(len(lines) * a.eval_fraction))])
        t = time.perf_counter()
        res = build(BuildConfig(corpus=[split["train"]], model=a.model, out=ds, format="wikitext", mode="stream",
                                window=512, min_context=256, progress=False))
        figures["build"] = {"keys": res.manifest.num_keys, "seconds": time.perf_counter() - t}
        t = time.perf_counter()
        train_stage(TrainConfig(datastore=ds, index_factory=a.factory, train_size=a.train_size, trainer="faiss"))
        figures["train_index_seconds"] = time.perf_counter() - t
        started = not ray.is_initialized()           # reuse a running Ray (e.g. a test session's)
        if started:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
        t = time.perf_counter()
        add_stage(AddConfig(datastore=ds, index_shards=2, encoder="faiss"))
        figures["add_seconds"] = time.perf_counter() - t
        start_servers(ds, rerank=True, cache_dir=os.path.join(root, "cache"), detached=False)
        evals = {}
        for s in ("valid", "test"):
            r = evaluate(EvalConfig(datastore=ds, corpus=[split[s]], format="wikitext", lam=0.25, temperature=1.0,
                                    k=a.k, nprobe=a.nprobe, save_neighbours=os.path.join(root, f"{s}-cache")))
            evals[s] = r.to_json()
            log.info("%s with the paper's settings: base %.2f, kNN-LM %.2f", s, r.base_ppl, r.knnlm_ppl)
        tuned = tune(read_cache(os.path.join(root, "valid-cache")), read_cache(os.path.join(root, "test-cache")))
        tuned.pop("table")
        log.info("tuned on valid: lambda %g, T %g, k %d", tuned["lambda"], tuned["temperature"], tuned["k"])
        final = {}
        for name, rerank in (("ivfpq", False), ("exact_rerank", True)):
            r = evaluate(EvalConfig(datastore=ds, corpus=[split["test"]], format="wikitext", lam=tuned["lambda"],
                                    temperature=tuned["temperature"], k=tuned["k"], nprobe=a.nprobe, rerank=rerank))
            final[name] = r.to_json()
            log.info("test, tuned, %s: base %.2f, kNN-LM %.2f", name, r.base_ppl, r.knnlm_ppl)
        # the base LM alone on the same windows, same model, batch and threads: the throughput baseline
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(a.model)
        tok.model_max_length = 1 << 60
        ids = np.array(tok(open(split["test"], encoding="utf-8").read())["input_ids"], dtype=np.int32)
        chunks = plan_chunks([ids], 512, 256)
        enc = load_encoder(a.model, "ffn_input", "cpu", "float32")
        t = time.perf_counter()
        n = sum(len(score_windows(c.windows, enc, 8)[1]) for c in chunks)
        base_s = time.perf_counter() - t
        stop_servers(ds)
        if started:
            ray.shutdown()
        figures.update(paper_settings=evals, tuned=tuned, test_tuned=final,
                       throughput={"base_lm_tokens_per_s": n / base_s,
                                   "knnlm_tokens_per_s": final["ivfpq"]["tokens_per_s"],
                                   "ratio": final["ivfpq"]["tokens_per_s"] / (n / base_s),
                                   "knnlm_seconds_split": final["ivfpq"]["seconds_split"]})
    finally:
        if not a.out:
            shutil.rmtree(root, ignore_errors=True)
    path, _ = write_result("wikitext2-knnlm", "cpu", machine, load_before, vars(a), figures,
                           time.perf_counter() - t_all, a.result)
    p, t = figures["paper_settings"], figures["test_tuned"]
    tu = figures["tuned"]
    print(f"\nWikiText-2, gpt2-wikitext2-small, datastore = train ({figures['build']['keys']:,} keys), {a.factory}, "
          f"nprobe {a.nprobe}")
    print(f"{'setting':<44} {'valid ppl':>10} {'test ppl':>10}")
    print(f"{'base LM':<44} {p['valid']['base_ppl']:>10.2f} {p['test']['base_ppl']:>10.2f}")
    paper = f"kNN-LM, paper (λ=0.25, T=1, k={a.k})"
    print(f"{paper:<44} {p['valid']['knnlm_ppl']:>10.2f} {p['test']['knnlm_ppl']:>10.2f}")
    lab = f"kNN-LM, tuned (λ={tu['lambda']:g}, T={tu['temperature']:g}, k={tu['k']})"
    print(f"{lab:<44} {tu['valid_ppl']:>10.2f} {t['ivfpq']['knnlm_ppl']:>10.2f}")
    print(f"{'  + exact re-rank':<44} {'':>10} {t['exact_rerank']['knnlm_ppl']:>10.2f}")
    th = figures["throughput"]
    print(f"\nthroughput: kNN-LM {th['knnlm_tokens_per_s']:,.0f} tokens/s vs base LM {th['base_lm_tokens_per_s']:,.0f}: "
          f"{th['ratio']:.3f} (split: {th['knnlm_seconds_split']})")
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

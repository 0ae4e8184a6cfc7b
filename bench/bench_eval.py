#!/usr/bin/env python
"""`knnlm eval` against the machine's floor, on the paper's index: a profile by stage and two ratios.

Setting (issue 18): the shared small GPT-2's WikiText-2 train datastore (`knnlm build --mode stream
--window 512 --min-context 256`, `knnlm train-index --index-factory IVF4096,PQ64`, `knnlm add
--index-shards 2`; built here, or --datastore DIR), `knnlm eval` of test.txt (57,211 tokens) with
--lambda 0.4 --temperature 20 --k 1024 --nprobe 32, run as the command a user types (a fresh process:
its wall clock includes Python's start and imports).

The floor, timed in the same run: a plain Hugging Face forward over the same windows (512 tokens, 256
new each, batch 8, all cores) that also captures the queries at the key layer and the targets'
log-probs, plus a single-process faiss search of those queries on the same two index shard files (k
1024, nprobe 32, all cores, one shard after the other). Rounds are interleaved (floor, `knnlm eval`
without --address ("embedded": the LM and the index shards in the eval process, no Ray), `knnlm eval
--address auto` against a running `knnlm serve`, which hands it to its warm evaluator), the medians of
--rounds (3) give

  warm_ratio       warm eval wall ÷ floor               (goal ≤ 1.05)
  embedded_excess  embedded eval wall − floor, seconds  (goal ≤ 6)

The profile is the eval JSON's: evaluate()'s marks (Ray up where there is Ray, model checked, text
tokenized, servers up or shards loaded, first chunk, scored), the LM forward, the router's calls (wait: after the forward; merge), the
combine, and each index shard's own search seconds. Then one embedded run each with the fast-scan
index (IVF4096,PQ64x4fs, trained on a copy of the datastore) and with `--rerank exact`, for the table.

    python bench/bench_eval.py --datastore /tmp/ds     # ~20 min on 2 cores (a build adds ~6)
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
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
FASTSCAN = "IVF4096,PQ64x4fs"
log = logging.getLogger("bench_eval")


def knnlm(*args: str, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=REPO, text=True, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def build_datastore(ds: str, model: str, splits: str, factory: str = "IVF4096,PQ64") -> None:
    """The issue's setting, with the CLI (what `ds` has already is kept)."""
    from builder.manifest import load_manifest
    from builder.storage import Storage
    if os.path.exists(os.path.join(ds, "manifest.json")):
        m = load_manifest(Storage.from_uri(ds))
        if (m.index or {}).get("factory") == factory and len(m.index_shards or []) == 2:
            return
    for cmd in (["build", "--out", ds, "--corpus", os.path.join(splits, "train.txt"), "--format", "wikitext",
                 "--model", model, "--mode", "stream", "--window", "512", "--min-context", "256", "--no-progress"],
                ["train-index", ds, "--index-factory", factory, "--force"],
                ["add", ds, "--index-shards", "2", "--force"]):
        if cmd[0] == "build" and os.path.exists(os.path.join(ds, "manifest.json")):
            continue
        r = knnlm(*cmd)
        if r.returncode:
            raise SystemExit(f"knnlm {' '.join(cmd)} failed:\n{r.stdout[-3000:]}")


def floor(ds: str, model: str, corpus: str, threads: int) -> dict:
    """The plain forward (queries and log-probs) and faiss's own search of the same queries, seconds each."""
    import faiss
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from builder.corpus import tokenize_file
    from builder.keys import find_key_module
    from builder.manifest import load_manifest
    from builder.storage import Storage, read_uri
    from retriever.evaluate import plan_chunks
    torch.set_num_threads(threads)
    m = load_manifest(Storage.from_uri(ds))
    tok = AutoTokenizer.from_pretrained(model)
    tok.model_max_length = 1 << 60
    tf = tokenize_file(read_uri(corpus), corpus, "wikitext", "stream", tok, "text")   # as evaluate() reads it
    seqs = np.split(np.asarray(tf.tokens), np.cumsum(tf.seq_lengths)[:-1])
    windows = [w for c in plan_chunks(seqs, m.window, m.min_context) for w in c.windows]
    lm = AutoModelForCausalLM.from_pretrained(model).eval()
    cap = {}
    find_key_module(lm, m.key_layer)[1].register_forward_pre_hook(lambda mod, a: cap.__setitem__("x", a[0]))
    queries, lps = [], []
    t = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(windows), 8):
            ws = windows[b:b + 8]
            ids = np.zeros((len(ws), max(len(w[0]) for w in ws)), np.int64)
            for r, (toks, _, _) in enumerate(ws):
                ids[r, :len(toks)] = toks
            logits = lm(input_ids=torch.from_numpy(ids)).logits                     # (B, T, V)
            for r, (toks, a, e) in enumerate(ws):
                queries.append(cap["x"][r, a - 1:e - 1].to(torch.float16).numpy())  # (e - a, d) as keys are
                lp = torch.log_softmax(logits[r, a - 1:e - 1], -1)
                lps.append(lp.gather(1, torch.from_numpy(toks[a:e].astype(np.int64))[:, None])[:, 0].double().numpy())
    lm_s = time.perf_counter() - t
    q = np.concatenate(queries).astype(np.float32)
    faiss.omp_set_num_threads(threads)
    search_s = 0.0
    for path in sorted(glob.glob(os.path.join(ds, "index", "shards", "*.faiss"))):
        index = faiss.read_index(path)
        t = time.perf_counter()
        for a in range(0, len(q), 8192):
            index.search(q[a:a + 8192], 1024, params=faiss.SearchParametersIVF(nprobe=32))
        search_s += time.perf_counter() - t
        del index
    return {"tokens": len(q), "lm_seconds": round(lm_s, 3), "search_seconds": round(search_s, 3),
            "seconds": round(lm_s + search_s, 3), "base_ppl": float(np.exp(-np.concatenate(lps).mean()))}


def run_eval(ds: str, corpus: str, out: str, *extra: str) -> dict:
    t = time.perf_counter()
    r = knnlm("eval", ds, "--corpus", corpus, "--format", "wikitext", "--mode", "stream", "--lambda", "0.4",
              "--temperature", "20", "--k", "1024", "--nprobe", "32", "--out", out, *extra)
    wall = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"knnlm eval {' '.join(extra)} failed:\n{r.stdout[-3000:]}")
    res = json.loads(Path(out).read_text())
    return {"wall": round(wall, 3), "base_ppl": res["base_ppl"], "knnlm_ppl": res["knnlm_ppl"],
            "seconds": res["seconds"], "seconds_split": res["seconds_split"], "profile": res["profile"],
            "tokens": res["tokens"], "hint": [ln for ln in r.stdout.splitlines() if "knnlm serve" in ln][:1]}


class Serve:
    """`knnlm serve DS` (an embedded Ray, which --address auto reaches) for the block."""

    def __init__(self, ds: str, tmp: str, *extra: str):
        self.args, self.tmp = [sys.executable, "-m", "cluster.cli", "serve", ds, *extra], tmp

    def __enter__(self):
        self.log = open(os.path.join(self.tmp, "serve.log"), "w")
        self.proc = subprocess.Popen(self.args, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + 300
        while "Ctrl-C stops" not in Path(self.log.name).read_text():
            if self.proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"knnlm serve did not start:\n{Path(self.log.name).read_text()[-3000:]}")
            time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)     # (a background process ignores SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--datastore", default=None, help="the setting's datastore, built and indexed (default: build "
                                                      "one, ~6 min)")
    ap.add_argument("--model", default=str(SHARED / "models" / "gpt2-wikitext2-small"))
    ap.add_argument("--splits", default=str(SHARED / "data" / "wikitext-2-splits"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-extra", action="store_true", help="skip the fast-scan and --rerank exact rows")
    ap.add_argument("--result", default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from bench_build import machine_info
    from common import write_result

    machine, load_before, t_all = machine_info("cpu"), os.getloadavg(), time.perf_counter()
    threads = len(os.sched_getaffinity(0))
    root = tempfile.mkdtemp(prefix="knnlm-bench-eval-")
    corpus = os.path.join(a.splits, "test.txt")
    ds = a.datastore or os.path.join(root, "ds")
    figures: dict = {"rounds": []}
    try:
        build_datastore(ds, a.model, a.splits)
        for i in range(a.rounds):                  # interleaved: the machine's drift hits every kind alike
            rnd = {"floor": floor(ds, a.model, corpus, threads)}
            log.info("round %d floor: %s", i, rnd["floor"])
            rnd["embedded"] = run_eval(ds, corpus, os.path.join(root, "e.json"))
            log.info("round %d embedded: %.1fs", i, rnd["embedded"]["wall"])
            with Serve(ds, root):
                rnd["warm"] = run_eval(ds, corpus, os.path.join(root, "w.json"), "--address", "auto")
            log.info("round %d warm: %.1fs", i, rnd["warm"]["wall"])
            figures["rounds"].append(rnd)
        med = {kind: statistics.median(r[kind]["seconds" if kind == "floor" else "wall"] for r in figures["rounds"])
               for kind in ("floor", "embedded", "warm")}
        figures["median_seconds"] = med
        figures["warm_ratio"] = med["warm"] / med["floor"]
        figures["embedded_excess_seconds"] = med["embedded"] - med["floor"]
        ppl = {(r[k]["base_ppl"], r[k]["knnlm_ppl"]) for r in figures["rounds"] for k in ("embedded", "warm")}
        figures["perplexities"] = sorted(ppl)
        if not a.no_extra:
            fs = os.path.join(root, "ds-fastscan")
            shutil.copytree(ds, fs, ignore=shutil.ignore_patterns("index", "_index", "eval"))
            build_datastore(fs, a.model, a.splits, FASTSCAN)
            figures["fastscan"] = run_eval(fs, corpus, os.path.join(root, "f.json"))
            figures["rerank_exact"] = run_eval(ds, corpus, os.path.join(root, "r.json"), "--rerank", "exact")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    path, _ = write_result("eval", "cpu", machine, load_before, vars(a), figures, time.perf_counter() - t_all,
                           a.result)
    med = figures["median_seconds"]
    last = figures["rounds"][-1]
    print(f"\nknnlm eval of WikiText-2 test ({last['floor']['tokens']:,} tokens), IVF4096,PQ64 in 2 shards, k 1024, "
          f"nprobe 32, {threads} cores; medians of {a.rounds} interleaved rounds")
    print(f"floor (plain forward {statistics.median(r['floor']['lm_seconds'] for r in figures['rounds']):.1f}s + "
          f"faiss search {statistics.median(r['floor']['search_seconds'] for r in figures['rounds']):.1f}s): "
          f"{med['floor']:.1f}s")
    print(f"warm (knnlm serve running, --address auto): {med['warm']:.1f}s  = {figures['warm_ratio']:.3f} x floor "
          "(goal <= 1.05)")
    print(f"embedded (no --address): {med['embedded']:.1f}s  = floor + {figures['embedded_excess_seconds']:.1f}s "
          "(goal <= 6)")
    for name in ("embedded", "warm"):
        p = last[name]["profile"]["marks"]
        s = last[name]["seconds_split"]
        print(f"  {name:<9} marks {p}  lm {s['lm']:.1f} search {s['search']:.1f} (wait {s['wait']:.1f}, merge "
              f"{s['merge']:.1f}) combine {s['combine']:.1f}; servers "
              f"{ {k: v['seconds'] for k, v in last[name]['profile']['servers'].items()} }")
    print(f"perplexities (base, kNN-LM) of every run: {figures['perplexities']}")
    for name in ("fastscan", "rerank_exact"):
        if name in figures:
            r = figures[name]
            print(f"{name:<13} wall {r['wall']:.1f}s  kNN-LM ppl {r['knnlm_ppl']:.3f}")
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

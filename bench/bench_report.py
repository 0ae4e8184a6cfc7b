#!/usr/bin/env python
"""`knnlm report` and `knnlm eval --report` against the evaluation they report on: time, folder size and
memory, and how they grow when the evaluated text grows 10x.

Setting: bench_eval.py's (the shared small GPT-2's WikiText-2 train datastore, stream mode, 512/256,
IVF4096,PQ64 in 2 index shards; `knnlm eval` of test.txt, 57,211 tokens, with --lambda 0.4 --temperature 20
--k 1024 --nprobe 32), each command a fresh process as a user runs it. Interleaved rounds of

  eval           `knnlm eval` alone: the baseline
  eval_report    `knnlm eval --report DIR`: the report made from the workers' summaries
  eval_cache     `knnlm eval --save-neighbours CACHE`: the neighbour cache with the neighbours' ids
  report         `knnlm report DS --cache CACHE --out DIR`

give (medians) eval_report / eval, eval_cache / eval and report / eval. Then `knnlm report` on that cache
tiled 10 times (the same chunks and text again: 572,110 tokens, the same perplexities) against the 1x
cache: wall, folder bytes and peak RSS of the report process, as ratios 10x / 1x (linear: 10 for bytes).

    python bench/bench_report.py --datastore /tmp/ds     # ~10 min on 2 cores (a build adds ~6)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
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
from bench_eval import SHARED, build_datastore, knnlm, run_eval  # noqa: E402 - bench/ on the path first

log = logging.getLogger("bench_report")

# the report in a child process that prints its peak RSS (VmHWM: see common.peak_rss_mb)
CHILD = """
import json, sys
sys.path[:0] = [{repo!r}, {bench!r}]
from common import peak_rss_mb
from retriever.config import ReportConfig
from retriever.report import report_from_cache
info = report_from_cache(ReportConfig(datastore={ds!r}, cache={cache!r}, out={out!r}))
print("RESULT " + json.dumps(dict(info, peak_rss_mb=peak_rss_mb())))
"""


def timed_report(ds: str, cache: str, out: str) -> float:
    """`knnlm report`'s wall, a fresh process."""
    t = time.perf_counter()
    r = knnlm("report", ds, "--cache", cache, "--out", out)
    if r.returncode:
        raise SystemExit(f"knnlm report failed:\n{r.stdout[-3000:]}")
    return time.perf_counter() - t


def report_child(ds: str, cache: str, out: str) -> dict:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO), bench=str(HERE), ds=ds, cache=cache,
                                                            out=out)],
                       cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"the report failed:\n{r.stdout[-3000:]}")
    got = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    return dict(got, wall=time.perf_counter() - t)


def tile_cache(src: str, dst: str, times: int) -> None:
    """`src` repeated `times` times: its chunks again (renumbered), its text again (sequence indices moved on),
    cache.json's counts multiplied. The same neighbours, so the same perplexities."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from builder.layout import NEIGHBOUR_CACHE_META, NEIGHBOUR_CACHE_TEXT, neighbour_chunk_path
    os.makedirs(dst, exist_ok=True)
    meta = json.loads(Path(src, NEIGHBOUR_CACHE_META).read_text())
    n = meta["chunks"]
    for r in range(times):
        for i in range(n):
            shutil.copyfile(os.path.join(src, neighbour_chunk_path(i)), os.path.join(dst, neighbour_chunk_path(r * n + i)))
    t = pq.read_table(os.path.join(src, NEIGHBOUR_CACHE_TEXT))
    seqs = t.num_rows
    parts = [t.set_column(1, "sequence", pa.array([x + r * seqs for x in t.column("sequence").to_pylist()], pa.int64()))
             for r in range(times)]
    pq.write_table(pa.concat_tables(parts), os.path.join(dst, NEIGHBOUR_CACHE_TEXT), compression="zstd")
    meta.update(chunks=n * times, tokens=meta["tokens"] * times, sequences=meta["sequences"] * times)
    Path(dst, NEIGHBOUR_CACHE_META).write_text(json.dumps(meta))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datastore", default=None, help="the bench datastore (built there when missing)")
    ap.add_argument("--model", default=str(SHARED / "models" / "gpt2-wikitext2-small"))
    ap.add_argument("--splits", default=str(SHARED / "data" / "wikitext-2-splits"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--times", type=int, default=10, help="the growth of the text for the memory and size figures")
    ap.add_argument("--result", default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from bench_build import machine_info
    from common import write_result

    machine, load_before, t_all = machine_info("cpu"), os.getloadavg(), time.perf_counter()
    root = tempfile.mkdtemp(prefix="knnlm-bench-report-")
    corpus = os.path.join(a.splits, "test.txt")
    ds = a.datastore or os.path.join(root, "ds")
    figures: dict = {"rounds": []}
    try:
        build_datastore(ds, a.model, a.splits)
        cache = os.path.join(root, "cache")
        for i in range(a.rounds):                        # interleaved: the machine's drift hits every kind alike
            for d in ("cache", "r1", "r2"):
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)
            e = os.path.join(root, "e.json")          # bench_eval's run: its setting, a fresh process, its wall
            rnd = {"eval": run_eval(ds, corpus, e)["wall"],
                   "eval_report": run_eval(ds, corpus, e, "--report", os.path.join(root, "r1"))["wall"],
                   "eval_cache": run_eval(ds, corpus, e, "--save-neighbours", cache)["wall"],
                   "report": timed_report(ds, cache, os.path.join(root, "r2"))}
            log.info("round %d: %s", i, {k: round(v, 1) for k, v in rnd.items()})
            figures["rounds"].append(rnd)
        med = {k: statistics.median(r[k] for r in figures["rounds"]) for k in figures["rounds"][0]}
        figures["median_seconds"] = med
        figures.update(eval_report_ratio=med["eval_report"] / med["eval"], eval_cache_ratio=med["eval_cache"] / med["eval"],
                       report_ratio=med["report"] / med["eval"])
        # growth: the same cache, 1x and tiled
        big = os.path.join(root, f"cache-x{a.times}")
        tile_cache(cache, big, a.times)
        one = report_child(ds, cache, os.path.join(root, "g1"))
        many = report_child(ds, big, os.path.join(root, "g10"))
        figures["growth"] = {"x1": one, f"x{a.times}": many,
                             "wall_ratio": many["wall"] / one["wall"], "bytes_ratio": many["bytes"] / one["bytes"],
                             "peak_rss_ratio": many["peak_rss_mb"] / one["peak_rss_mb"]}
        log.info("growth x%d: %s", a.times, {k: v for k, v in figures["growth"].items() if k.endswith("ratio")})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    params = {"datastore": ds, "model": a.model, "corpus": corpus, "eval": "bench_eval.run_eval's settings",
              "rounds": a.rounds, "times": a.times}
    path, _ = write_result("report", "cpu", machine, load_before, params, figures, time.perf_counter() - t_all,
                           a.result)
    g = figures["growth"]
    print(f"eval {med['eval']:.1f}s; eval --report {figures['eval_report_ratio']:.3f}x; eval --save-neighbours "
          f"{figures['eval_cache_ratio']:.3f}x; knnlm report {figures['report_ratio']:.3f}x of the eval")
    print(f"report of {g['x1']['tokens']:,} tokens: {g['x1']['bytes'] / 1e6:.1f} MB, {g['x1']['wall']:.1f}s, peak RSS "
          f"{g['x1']['peak_rss_mb']:.0f} MB; x{a.times}: bytes {g['bytes_ratio']:.2f}x, wall {g['wall_ratio']:.2f}x, "
          f"peak RSS {g['peak_rss_ratio']:.2f}x")
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

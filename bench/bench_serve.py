#!/usr/bin/env python
"""Benchmark of sharded serving (`knnlm serve` + the router) against one faiss index searched directly.

For each number of index shards (--shards, default 1,2,4) and batch size (--batches, default
1,64,1024), with k=1024 and nprobe=32:

- baseline: the monolithic index (the same trained index holding every key) searched directly in
  this process with `index.search(q, k, params=SearchParametersIVF(nprobe))`, every core;
- router: `Retriever.search` over the datastore's index servers (Ray actors on an embedded Ray,
  one per shard), which fans each batch out, merges the per-shard top-k and looks up values.

Printed: queries/s and p50/p99 latency per call for both, and the router's throughput as a
fraction of the direct search (the figure). The same query batches are used for both, in
alternating order. The datastore is synthetic (builder/synthetic.py) in the builder's format.
Results: bench/results/serve-<device>-<YYYY-MM-DD>.json.

    python bench/bench_serve.py                        # 200k keys x 256 dims, IVF1024,PQ32: ~5 min on 2 cores
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

import numpy as np  # noqa: E402

log = logging.getLogger("bench_serve")


def run_calls(fn, batches: list[np.ndarray], min_seconds: float, min_calls: int) -> list[float]:
    """Latency of each call, cycling over the batches, until both minimums are met."""
    lat = []
    t0 = time.perf_counter()
    i = 0
    while len(lat) < min_calls or time.perf_counter() - t0 < min_seconds:
        q = batches[i % len(batches)]
        t = time.perf_counter()
        fn(q)
        lat.append(time.perf_counter() - t)
        i += 1
    return lat


def stats(lat: list[float], batch: int) -> dict:
    a = np.array(lat)
    return {"calls": len(a), "queries_per_s": batch * len(a) / a.sum(), "p50_ms": 1000 * float(np.percentile(a, 50)),
            "p99_ms": 1000 * float(np.percentile(a, 99))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--num-keys", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--factory", default="IVF1024,PQ32")
    ap.add_argument("--train-size", type=int, default=60_000)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--shards", default="1,2,4")
    ap.add_argument("--batches", default="1,64,1024")
    ap.add_argument("--seconds", type=float, default=4.0, help="minimum time per measurement")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--result", default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("faiss.loader", "builder", "cluster", "retriever", "faiss.contrib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")

    import faiss
    import ray
    from bench_build import machine_info

    from builder.add import add_stage
    from builder.config import AddConfig, TrainConfig
    from builder.index import add_batches
    from builder.manifest import load_manifest
    from builder.rows import iter_key_range
    from builder.storage import Storage
    from builder.synthetic import synthetic_keys, write_synthetic_datastore
    from builder.train import load_trained_index, train_stage
    from retriever import Retriever, start_servers, stop_servers

    machine = machine_info("cpu")
    machine["faiss"] = faiss.__version__
    load_before = os.getloadavg()
    t_all = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="knnlm-bench-serve-")
    shard_counts = [int(x) for x in a.shards.split(",")]
    batch_sizes = [int(x) for x in a.batches.split(",")]
    figures: dict = {}
    try:
        uri = os.path.join(tmp, "ds")
        write_synthetic_datastore(uri, a.num_keys, a.dim, shard_rows=65536, seed=a.seed, threads=2)
        train_stage(TrainConfig(datastore=uri, index_factory=a.factory, train_size=a.train_size, trainer="faiss"))
        st = Storage.from_uri(uri)
        m = load_manifest(st)
        keys = np.concatenate([k for _, k in iter_key_range(st, m, 0, m.num_keys)]).astype(np.float32)
        mono = add_batches(load_trained_index(st, m), [(np.arange(m.num_keys), keys)])
        del keys
        params = faiss.SearchParametersIVF(nprobe=a.nprobe)
        centers = np.random.default_rng(a.seed).standard_normal((256, a.dim), dtype=np.float32)  # as the datastore
        queries = synthetic_keys(8192, a.dim, a.seed + 99, centers).astype(np.float32)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
        for shards in shard_counts:
            add_stage(AddConfig(datastore=uri, index_shards=shards, encoder="faiss", force=True))
            start_servers(uri, cache_dir=os.path.join(tmp, "cache"), detached=False)
            r = Retriever.connect(uri)
            for b in batch_sizes:
                batches = [queries[i:i + b] for i in range(0, min(len(queries), b * 8), b)]
                direct = lambda q: mono.search(q, a.k, params=params)            # noqa: E731
                routed = lambda q: r.search(q, k=a.k, nprobe=a.nprobe)           # noqa: E731
                routed(batches[0]), direct(batches[0])                             # warm-up
                min_calls = max(5, 200 // b)
                half = a.seconds / 2
                ld, lr = [], []
                for _ in range(2):                                                 # alternate: drift hits both
                    ld += run_calls(direct, batches, half, min_calls // 2)
                    lr += run_calls(routed, batches, half, min_calls // 2)
                d, rt = stats(ld, b), stats(lr, b)
                key = f"{shards}_shards_batch_{b}"
                figures[key] = {"shards": shards, "batch": b, "direct": d, "router": rt,
                                "ratio_qps": rt["queries_per_s"] / d["queries_per_s"]}
                log.info("%d shards, batch %4d: direct %8.0f q/s (p50 %.1f ms), router %8.0f q/s (p50 %.1f ms, "
                         "p99 %.1f ms): %.3f", shards, b, d["queries_per_s"], d["p50_ms"], rt["queries_per_s"],
                         rt["p50_ms"], rt["p99_ms"], figures[key]["ratio_qps"])
            stop_servers(uri)
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    total_s = time.perf_counter() - t_all
    from common import write_result
    path, result = write_result("serve", "cpu", machine, load_before, vars(a), figures, total_s, a.result)
    print(f"\n{machine['hostname']}: {machine['nproc']} CPUs ({machine['cpu_model']}), faiss {faiss.__version__}; "
          f"load {load_before[0]:.2f} before, {result['load_average_after'][0]:.2f} after")
    print(f"{a.num_keys:,} synthetic keys x {a.dim} dims, {a.factory}, k={a.k}, nprobe={a.nprobe}")
    print(f"{'shards':>6} {'batch':>5} {'direct q/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'router q/s':>11} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'router/direct':>13}")
    for f in figures.values():
        d, rt = f["direct"], f["router"]
        print(f"{f['shards']:>6} {f['batch']:>5} {d['queries_per_s']:>11,.0f} {d['p50_ms']:>8.1f} {d['p99_ms']:>8.1f} "
              f"{rt['queries_per_s']:>11,.0f} {rt['p50_ms']:>8.1f} {rt['p99_ms']:>8.1f} {f['ratio_qps']:>13.3f}")
    print(f"\nresult: {path} (bench took {total_s:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

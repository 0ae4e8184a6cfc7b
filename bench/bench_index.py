#!/usr/bin/env python
"""Benchmark of the index stages (`knnlm train-index`, `knnlm add`) against faiss's own calls.

Every figure is a ratio against a baseline measured in the same run on the same keys (these
machines are noisy); absolute figures go to bench/results/index-<device>-<YYYY-MM-DD>.json with
the machine, the parameters and the load average before and after.

A synthetic datastore (builder/synthetic.py: a mixture of Gaussians, in the builder's exact
shard format) of --num-keys keys of --dim dims is written to a temporary local directory. Then:

1. Sample: `builder.sample.sample_keys` of --train-size keys (ranged row-group reads, uniform).
2. Train. Baseline: faiss-cpu's own `index.train` on the sample (all cores). Against it: our
   trainers on the same sample and seed (`builder.index.train_index` with `faiss`, and with
   `torch` on --device); seconds, and the quantization error of each (coarse and
   reconstruction MSE on 20k sampled keys) to show they train equally good indexes.
3. Add. Baseline: faiss-cpu's own `add_with_ids` of every key, already in memory as float32,
   into a copy of the trained index (all cores). Against it:
   - the core path without Ray (`builder.add.encode_range`: key shards read and checked
     against their sha256, decoded from float16, added in batches), in this process;
   - `knnlm add`'s stage (`builder.add.add_stage`) on an embedded Ray with 1 worker using every
     core, and with 2 workers sharing them (index shards written to storage, manifest committed);
   - the torch encoder (`builder.torch_encoder.encode_torch`) on --device: codes only, and the
     share of codes identical to faiss's `sa_encode` of the same keys.
4. Projection: hours to add 3B keys at this dim from the measured rate per worker core.

    python bench/bench_index.py                           # dim 1024, IVF1024,PQ64: ~8 min on 2 cores
    python bench/bench_index.py --num-keys 100000 --train-size 50000 --dim 256 --factory IVF1024,PQ32
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

log = logging.getLogger("bench_index")
WIKI3B = 3_000_000_000


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--num-keys", type=int, default=300_000, help="keys in the synthetic datastore")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--train-size", type=int, default=100_000, help="sampled keys to train on")
    ap.add_argument("--factory", default="IVF1024,PQ64")
    ap.add_argument("--metric", default="l2", choices=("l2", "ip"))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device of the torch trainer/encoder")
    ap.add_argument("--trainers", default="faiss,torch", help="our trainers to time against faiss's own")
    ap.add_argument("--skip-torch-encode", action="store_true", help="no torch encoder timing")
    ap.add_argument("--skip-ray", action="store_true", help="no `knnlm add` stage runs (a machine without Ray)")
    ap.add_argument("--workers", default="1,2", help="worker counts for the `knnlm add` runs")
    ap.add_argument("--repeats", type=int, default=2, help="train timings: best of N, order alternated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--result", default=None, help="result file or directory (default bench/results/)")
    ap.add_argument("--workdir", default=None, help="where the synthetic datastore goes (default: a temp dir)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("faiss.loader", "builder", "cluster", "faiss.contrib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")

    import faiss
    from bench_build import machine_info

    from builder.add import encode_range
    from builder.index import ivf_contents, new_index, quantization_error, train_index
    from builder.key_shards import read_shard
    from builder.manifest import load_manifest
    from builder.sample import sample_keys
    from builder.storage import Storage
    from builder.synthetic import write_synthetic_datastore

    machine = machine_info(a.device)
    machine["faiss"] = faiss.__version__
    load_before = os.getloadavg()
    nproc = machine["nproc"]
    t_all = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="knnlm-bench-index-", dir=a.workdir)
    figures: dict = {}
    params = vars(a) | {"threads": nproc}
    try:
        uri = os.path.join(tmp, "ds")
        _, t = timed(write_synthetic_datastore, uri, a.num_keys, a.dim, shard_rows=65536, row_group_rows=16384,
                     seed=a.seed, threads=nproc)
        log.info("wrote %d synthetic keys (dim %d) in %.1fs", a.num_keys, a.dim, t)
        st = Storage.from_uri(uri)
        m = load_manifest(st)

        # ---- 1: sample --------------------------------------------------------------------
        (ids, keys16), t_sample = timed(sample_keys, st, m, a.train_size, a.seed)
        x = keys16.astype(np.float32)
        figures["sample"] = {"keys": len(ids), "seconds": t_sample, "keys_per_s": len(ids) / t_sample}
        log.info("sampled %d keys in %.1fs", len(ids), t_sample)

        # ---- 2: train ---------------------------------------------------------------------
        qx = x[:: max(1, len(x) // 20000)][:20000]
        warm = new_index(a.factory.split(",PQ")[0] + ",Flat" if "IVF" in a.factory else a.factory, a.dim, a.metric, 0)
        warm.train(x[:min(len(x), 50000)])                    # thread pools and BLAS up before any timing
        names = [t for t in a.trainers.split(",") if t]
        times: dict[str, list[float]] = {"baseline": []}
        made: dict = {}
        for r in range(a.repeats):                            # alternate the order: drift hits all alike
            order = ["baseline"] + names if r % 2 == 0 else names[::-1] + ["baseline"]
            for name in order:
                if name == "baseline":                        # faiss's own call, nothing of ours around it
                    idx = new_index(a.factory, a.dim, a.metric, a.seed)
                    _, t = timed(idx.train, x)
                else:
                    dev = a.device if name == "torch" else "cpu"
                    idx, t = timed(train_index, x, a.factory, a.metric, a.seed, name, dev)
                times.setdefault(name, []).append(t)
                made[name] = idx
                log.info("train %s (repeat %d): %.1fs", name, r + 1, t)
        t_base = min(times["baseline"])
        trained = made["baseline"]
        train = {"baseline_faiss_train_s": t_base, "baseline_quantization": quantization_error(trained, qx),
                 "repeats": a.repeats, "all_seconds": times, "ours": {}}
        for name in names:
            dev = a.device if name == "torch" else "cpu"
            t = min(times[name])
            train["ours"][f"{name}-{dev}"] = {"seconds": t, "speedup_vs_faiss": t_base / t,
                                              "quantization": quantization_error(made[name], qx)}
        figures["train"] = train
        del x

        # ---- 3: add -----------------------------------------------------------------------
        allk = np.concatenate([read_shard(st.read_bytes(s["path"]), m.dim, ("key",))["key"] for s in m.shards])
        xall = allk.astype(np.float32)                                 # (N, d) fp32 in memory
        del allk
        all_ids = np.arange(len(xall), dtype=np.int64)
        faiss.omp_set_num_threads(nproc)
        clone = faiss.clone_index(trained)
        _, t_add = timed(clone.add_with_ids, xall, all_ids)
        base_vps = len(xall) / t_add
        add = {"baseline_faiss_add_with_ids": {"seconds": t_add, "vectors_per_s": base_vps, "threads": nproc}}
        log.info("faiss add_with_ids (baseline): %.1fs, %.0f vectors/s", t_add, base_vps)
        idx, t = timed(encode_range, st, m, trained, 0, m.num_keys, "faiss", "cpu")
        add["core_path_no_ray"] = {"seconds": t, "vectors_per_s": m.num_keys / t, "ratio_vs_faiss": t_add / t}
        same = all(np.array_equal(a_[0], b_[0]) for a_, b_ in zip(ivf_contents(idx).values(),
                                                                   ivf_contents(clone).values()))
        add["core_path_no_ray"]["same_contents_as_baseline"] = bool(same)
        log.info("core path (read + check + decode + add): %.0f vectors/s (%.3f of faiss)", m.num_keys / t, t_add / t)
        del idx, clone

        if not a.skip_torch_encode:
            from builder.torch_encoder import encode_torch
            encode_torch(trained, xall[:1000], device=a.device)          # warm-up (CUDA init)
            codes, t = timed(encode_torch, trained, xall, device=a.device)
            ref = trained.sa_encode(xall)
            match = float(np.mean(np.all(codes == ref, axis=1)))
            add["torch_encode_codes_only"] = {"device": a.device, "seconds": t, "vectors_per_s": len(xall) / t,
                                              "ratio_vs_faiss": t_add / t, "codes_identical_to_faiss": match}
            log.info("torch encode on %s: %.0f vectors/s (%.3f of faiss add), %.4f%% codes identical",
                     a.device, len(xall) / t, t_add / t, 100 * match)
        del xall

        if not a.skip_ray:
            import ray

            from builder.add import add_stage
            from builder.config import AddConfig, TrainConfig
            from builder.train import train_stage
            train_stage(TrainConfig(datastore=uri, train_size=a.train_size, index_factory=a.factory,
                                    metric=a.metric, seed=a.seed, trainer="faiss"))
            ray.init(num_cpus=nproc, include_dashboard=False, logging_level="WARNING")
            try:
                runs = {}
                for w in [int(v) for v in a.workers.split(",")]:
                    threads = max(1, nproc // w)
                    res, t = timed(add_stage, AddConfig(datastore=uri, index_shards=max(2, w), workers=w,
                                                        threads=threads, encoder="faiss", force=True))
                    runs[f"{w}_workers"] = {"workers": w, "threads_per_worker": threads, "seconds": t,
                                            "vectors_per_s": m.num_keys / t,
                                            "vectors_per_s_per_worker": m.num_keys / t / w,
                                            "ratio_vs_faiss": t_add / t}
                    log.info("knnlm add, %d workers x %d threads: %.1fs, %.0f vectors/s (%.3f of faiss)", w, threads,
                             t, m.num_keys / t, t_add / t)
                add["knnlm_add"] = runs
            finally:
                ray.shutdown()
        figures["add"] = add

        # ---- 4: projection ----------------------------------------------------------------
        per_core = add["core_path_no_ray"]["vectors_per_s"] / nproc
        figures["projection_3B"] = {
            "basis": f"core path, {per_core:,.0f} vectors/s per core at dim {a.dim} ({a.factory}) on this machine; "
                     "add scales with cores (faiss add is parallel over vectors)",
            "vectors_per_s_per_core": per_core,
            "hours": {f"{w}x{c}_cores": WIKI3B / (per_core * c * w) / 3600 for w, c in ((1, 16), (8, 16), (32, 16))}}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    total_s = time.perf_counter() - t_all
    from common import write_result
    path, result = write_result("index", a.device, machine, load_before, params, figures, total_s, a.result)

    print(f"\n{machine['hostname']}: {nproc} CPUs ({machine['cpu_model']}), faiss {faiss.__version__}"
          + (f", {machine['gpu']}" if machine["gpu"] else "")
          + f"; load {load_before[0]:.2f} before, {result['load_average_after'][0]:.2f} after")
    print(f"{a.num_keys:,} synthetic keys x {a.dim} dims, {a.factory} ({a.metric}), trained on {a.train_size:,}")
    tr = figures["train"]
    print(f"\ntrain {'':<26} {'seconds':>9} {'vs faiss':>9}  coarse MSE / reconstruction MSE")
    q = tr["baseline_quantization"]
    print(f"{'faiss index.train (baseline)':<32} {tr['baseline_faiss_train_s']:>9.1f} {1.0:>9.2f}  "
          f"{q['coarse_mse']:.4g} / {q['reconstruction_mse']:.4g}")
    for k, v in tr["ours"].items():
        q = v["quantization"]
        print(f"{'ours: ' + k:<32} {v['seconds']:>9.1f} {v['speedup_vs_faiss']:>9.2f}  "
              f"{q['coarse_mse']:.4g} / {q['reconstruction_mse']:.4g}")
    ad = figures["add"]
    print(f"\nadd {'':<28} {'vectors/s':>10} {'vs faiss':>9}  note")
    print(f"{'faiss add_with_ids (baseline)':<32} {ad['baseline_faiss_add_with_ids']['vectors_per_s']:>10,.0f} "
          f"{1.0:>9.3f}  keys in memory, {nproc} threads")
    c = ad["core_path_no_ray"]
    print(f"{'core path, no Ray':<32} {c['vectors_per_s']:>10,.0f} {c['ratio_vs_faiss']:>9.3f}  read, sha256, "
          f"decode, add; same lists: {c['same_contents_as_baseline']}")
    for k, v in ad.get("knnlm_add", {}).items():
        print(f"{'knnlm add, ' + k.replace('_', ' '):<32} {v['vectors_per_s']:>10,.0f} {v['ratio_vs_faiss']:>9.3f}  "
              f"{v['vectors_per_s_per_worker']:,.0f}/worker, {v['threads_per_worker']} threads each, {v['seconds']:.1f}s")
    if "torch_encode_codes_only" in ad:
        v = ad["torch_encode_codes_only"]
        print(f"{'torch encode on ' + v['device']:<32} {v['vectors_per_s']:>10,.0f} {v['ratio_vs_faiss']:>9.3f}  "
              f"codes only; {100 * v['codes_identical_to_faiss']:.3f}% identical to faiss sa_encode")
    pr = figures["projection_3B"]
    print(f"\n3B keys at dim {a.dim}: " + ", ".join(f"{h:,.1f} h on {k.replace('_', ' ')}" for k, h in pr["hours"].items())
          + f" ({pr['basis']})")
    print(f"\nresult: {path} (bench took {total_s:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

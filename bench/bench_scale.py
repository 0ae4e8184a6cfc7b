#!/usr/bin/env python
"""Scale benchmark: index 1M, 10M (and 100M) synthetic keys through the real distributed path, with memory peaks.

For each datastore size in --sizes (default 1M and 10M keys of --dim 64), in a fresh driver
process of its own (so that its peaks are its own), this runs the stages the CLI runs:

1. ray:    `ray.init(num_cpus=--cpus)`, an embedded local Ray (what the commands start without
           --address).
2. write:  `builder.synthetic.write_synthetic_datastore`: the builder's exact shard format
           (Parquet, fixed_size_binary fp16 keys, sha256 in the manifest), 65,536-row shards,
           a seeded mixture of Gaussians, written by --cpus threads of the driver into object
           storage: a local directory URI by default, or with --s3 a local S3 server (moto in
           server mode on 127.0.0.1, as the tests' s3_server fixture) and s3://bucket/prefix URIs.
3. train:  `builder.train.train_stage` (`knnlm train-index`): a uniform sample of --train-size
           keys, faiss on the CPU, --factory (IVF1024,PQ16 by default: 16-byte codes for 64 dims).
4. add:    `builder.add.add_stage` (`knnlm add --index-shards`, or with --ids-per-shard N
           `knnlm add --shard-size N`: index shards of N ids, so that sizes from N on compare
           at equal ids per shard) on the embedded Ray: Ray tasks stream their range's key
           shards from storage and write index shards back.
5. serve:  `retriever.start_servers(uri, detached=False)`: one index-server actor per shard.
6. query:  `Retriever.connect(uri).search(q, k=--k, nprobe=--nprobe)` over --queries queries in
           batches of --batch (cold: the first pass after the servers started).
7. compare (the baselines, same run, alternating rounds): the router again (warm) against faiss
           searching the same index shard files directly in a helper process (memory-mapped like
           the servers), one shard alone and every shard in turn + `merge_topk`; and the add stage
           against a plain single-process faiss `add_with_ids` of the first min(1M, N) keys (already
           in memory as float32) into the trained index with every core, run just before and just
           after the add stage (the mean is the baseline).
8. add-fixed: only where it differs from step 4's layout: `add_stage` again with --force and
           fixed-size index shards (`--shard-size` = --fixed-shard-size, default N1/4 = 250k ids),
           the production layout (`knnlm add` defaults to 50M-id shards): more shards as the
           datastore grows, not bigger ones.

Memory. The driver reads /proc: before each stage it resets the high-water mark (VmHWM, via
/proc/<pid>/clear_refs) of itself and of every process under it (Ray's raylet, GCS, workers,
moto), samples their titles and VmRSS every --sample-interval s while the stage runs, and at its
end reads each one's VmHWM: a process's peak during the stage, not a sample. Processes are
grouped by their title: the driver, add workers (`ray::add_shard`), index servers
(`ray::IndexServerImpl*`), Ray's own processes, the S3 server. The baselines run in a helper
process of their own (spawned), outside every peak. The figures the benchmark exists for are the
ratios N2/N1 of those peaks: what bounded memory means is that the driver and an add worker (at a
fixed index-shard size) stay flat while the datastore grows 10x; an index server holds its shard
(its codes and ids, memory-mapped, plus its values), so it grows with the shard: reported as a
ratio and in MiB per million ids, split into file-backed and anonymous memory.

Time per stage per million keys, the peaks and ratios are printed as a table, and go with the
machine, the parameters and the load average before and after to
bench/results/scale-cpu-<YYYY-MM-DD>.json (`--result` picks another file or directory).

    python bench/bench_scale.py                         # 1M and 10M keys x 64 dims: 3-8 min on 2 cores
    python bench/bench_scale.py --sizes 1000000,2000000 --queries 1024
    python bench/bench_scale.py --s3 --sizes 200000,2000000   # through a local moto S3 server
    python bench/bench_scale.py --sizes 1000000,10000000,100000000 --ids-per-shard 10000000 \
        --queries 2048 --batch 256                         # 100M keys: ~15 min, ~16 GB of disk

Local storage is the default: a 10M x 64 fp16 datastore is 1.3 GB of keys, which moto keeps in its
own process's memory (and serves more slowly than a disk); --s3 runs the same path through S3's API.
The work directory (--workdir, default a temporary one) is removed at the end unless --keep.
Linux only (/proc).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402
from common import descendants, proc_status, proc_title, reset_hwm  # noqa: E402

log = logging.getLogger("bench_scale")
MB = 1 << 20
# the stages of the path under test (the driver's peak is taken over them)
PIPELINE = ("ray", "write", "train", "add", "serve", "query", "add_fixed")


# ---------------------------------------------------------------------------------------------
# /proc: process tree, titles, memory


def classify(title: str) -> str | None:
    """The role of a process under the driver, from its title; None for idle workers and helpers."""
    if title.startswith("ray::"):
        t = title[5:]
        if t.startswith("IDLE"):
            return None
        if t.startswith("add_shard"):
            return "add_worker"
        if t.startswith("IndexServerImpl"):
            return "index_server"
        if t.startswith(("DashboardAgent", "RuntimeEnvAgent")):
            return "ray_system"
        return "other_ray_worker"
    if "moto.server" in title:
        return "s3_server"
    if any(s in title for s in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env",
                                "ray/_private", "ray_client_server")):
        return "ray_system"
    return None


class MemWatch:
    """Per-stage memory peaks of this process (the driver) and of the processes under it."""

    def __init__(self, interval: float = 0.2):
        self.pid = os.getpid()
        self.interval = interval
        self.lock = threading.Lock()
        self.stage: str | None = None
        self.seen: dict[int, dict] = {}          # pid -> {role, title, max_rss} during the stage
        self.driver_max = 0.0
        self.results: dict[str, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memwatch", daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.wait(self.interval):
            with self.lock:
                if self.stage is not None:
                    self._sample()

    def _sample(self):
        st = proc_status(self.pid)
        if st:
            self.driver_max = max(self.driver_max, st["VmRSS"])
        for pid in descendants(self.pid):
            role = classify(proc_title(pid))
            if role is None:
                continue
            st = proc_status(pid)
            if not st:
                continue
            rec = self.seen.setdefault(pid, {"role": role, "max_rss": 0.0})
            if role != "other_ray_worker":        # the most specific role seen wins
                rec["role"] = role
            rec["max_rss"] = max(rec["max_rss"], st["VmRSS"])

    def begin(self, stage: str) -> None:
        with self.lock:
            for pid in [self.pid] + descendants(self.pid):
                reset_hwm(pid)
            self.stage, self.seen, self.driver_max = stage, {}, 0.0
            self.t0 = time.perf_counter()
            self._sample()

    def end(self, **extra) -> dict:
        """The stage's seconds and peaks: the driver's VmHWM, and per role every process's VmHWM
        (the larger of it and the sampled VmRSS), with its RSS split (anon / file / shmem) at the end."""
        with self.lock:
            seconds = time.perf_counter() - self.t0
            self._sample()
            st = proc_status(self.pid)
            out = {"seconds": seconds, "load_average_end": os.getloadavg(),
                   "driver": {"peak_mb": max(st["VmHWM"], self.driver_max),
                                                  "rss_end_mb": st["VmRSS"], "anon_end_mb": st["RssAnon"]}}
            roles: dict[str, list] = {}
            for pid, rec in self.seen.items():
                st = proc_status(pid)
                peak = max(rec["max_rss"], st["VmHWM"] if st else 0.0)
                row = {"pid": pid, "peak_mb": peak}
                if st:
                    row.update(rss_end_mb=st["VmRSS"], anon_end_mb=st["RssAnon"], file_end_mb=st["RssFile"],
                               shmem_end_mb=st["RssShmem"])
                roles.setdefault(rec["role"], []).append(row)
            for role, rows in roles.items():
                rows.sort(key=lambda r: r["pid"])
                out[role] = {"processes": len(rows), "peak_mb_max": max(r["peak_mb"] for r in rows),
                             "peak_mb_sum": sum(r["peak_mb"] for r in rows), "each": rows}
            out.update(extra)
            self.results[self.stage] = out
            self.stage = None
            return out

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)


# ---------------------------------------------------------------------------------------------
# S3 (moto in server mode, as tests/conftest.py's s3_server fixture)


def start_moto() -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench-key-id",
                       "AWS_SECRET_ACCESS_KEY": "bench-secret-never-logged", "AWS_REGION": "us-east-1",
                       "AWS_DEFAULT_REGION": "us-east-1"})   # before Ray starts: its workers inherit them
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the moto S3 server did not start (pip install 'moto[server]')")
            time.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# one datastore size, in a driver process of its own


def run_calls(fn, batches: list[np.ndarray]) -> list[float]:
    lat = []
    for q in batches:
        t = time.perf_counter()
        fn(q)
        lat.append(time.perf_counter() - t)
    return lat


def qstats(lat: list[float], batch: int, num_keys: int) -> dict:
    a = np.array(lat)
    qps = batch * len(a) / a.sum()
    return {"calls": len(a), "batch": batch, "queries_per_s": qps, "ms_per_query": 1000 / qps,
            "ms_per_query_per_million_keys": 1000 / qps / (num_keys / 1e6),
            "p50_ms": 1000 * float(np.percentile(a, 50)), "p99_ms": 1000 * float(np.percentile(a, 99))}


# the baselines, in a helper process of their own (spawned): they never touch the driver's memory

_DIRECT: dict = {}


def helper_add(uri: str, num: int, threads: int) -> float:
    """Seconds of a plain faiss `add_with_ids` of the first `num` keys (already in memory as float32)
    into a copy of the trained index, `threads` OpenMP threads."""
    import faiss

    from builder.manifest import load_manifest
    from builder.rows import iter_key_range
    from builder.storage import Storage
    from builder.train import load_trained_index
    st = Storage.from_uri(uri)
    m = load_manifest(st)
    trained = load_trained_index(st, m)
    keys = np.concatenate([k for _, k in iter_key_range(st, m, 0, num)]).astype(np.float32)
    faiss.omp_set_num_threads(threads)
    idx = faiss.clone_index(trained)
    t = time.perf_counter()
    idx.add_with_ids(keys, np.arange(num, dtype=np.int64))
    return time.perf_counter() - t


def helper_open(files: list[str], k: int, nprobe: int, threads: int) -> int:
    """Open the index shard files memory-mapped, as the servers do; returns the IVF's nlist."""
    import faiss
    _DIRECT.update(indexes=[faiss.read_index(f, faiss.IO_FLAG_MMAP) for f in files], k=k, threads=threads,
                   params=faiss.SearchParametersIVF(nprobe=nprobe))
    return faiss.extract_index_ivf(_DIRECT["indexes"][0]).nlist


def helper_search(q: np.ndarray, which: str) -> float:
    """Seconds of one direct faiss search of `q`: shard 0 alone ("one"), or every shard in turn and
    their top-k merged with the router's own `merge_topk` ("every")."""
    import faiss

    from retriever.merge import merge_topk
    d = _DIRECT
    faiss.omp_set_num_threads(d["threads"])
    t = time.perf_counter()
    if which == "one":
        d["indexes"][0].search(q, d["k"], params=d["params"])
    else:
        dist, ids = zip(*(ix.search(q, d["k"], params=d["params"]) for ix in d["indexes"]))
        merge_topk(list(dist), list(ids), [x.astype(np.int32) for x in ids], d["k"], "l2")
    return time.perf_counter() - t


def run_size(a, n: int, out_path: str) -> None:
    import multiprocessing as mp

    import ray

    from builder.add import add_stage
    from builder.config import AddConfig, TrainConfig
    from builder.manifest import load_manifest
    from builder.storage import Storage, local_path
    from builder.synthetic import synthetic_keys, write_synthetic_datastore
    from builder.train import train_stage
    from retriever import Retriever, start_servers, stop_servers

    fixed = a.ids_per_shard or a.fixed_shard_size or max(1, a.sizes_list[0] // a.index_shards)
    layout = {"shard_size": a.ids_per_shard} if a.ids_per_shard else {"index_shards": a.index_shards}
    work = os.path.join(a.workdir, f"n{n}")
    os.makedirs(work, exist_ok=True)
    moto = start_moto() if a.s3 else None
    helper = None
    watch = MemWatch(a.sample_interval)
    res: dict = {"num_keys": n, "dim": a.dim, "stages": {}, "storage": "s3 (moto on 127.0.0.1)" if a.s3 else "local"}
    try:
        if a.s3:
            import boto3
            bucket = "knnlm-bench-scale"
            boto3.client("s3").create_bucket(Bucket=bucket)
            uri = f"s3://{bucket}/ds-{n}"
        else:
            uri = os.path.join(work, "ds")
        res["uri"] = uri
        st = Storage.from_uri(uri)

        watch.begin("ray")
        ray.init(num_cpus=a.cpus, object_store_memory=a.object_store_mb * MB, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=True)
        watch.end()

        watch.begin("write")
        write_synthetic_datastore(uri, n, a.dim, shard_rows=a.shard_rows, seed=a.seed, threads=a.cpus)
        m = load_manifest(st)
        key_bytes = sum(st.size(s["path"]) for s in m.shards)
        watch.end(key_shards=len(m.shards), key_shard_bytes=key_bytes)
        log.info("%s keys: wrote %d key shards, %.0f MB, in %.1fs", f"{n:,}", len(m.shards), key_bytes / 1e6,
                 watch.results["write"]["seconds"])

        watch.begin("train")
        tr = train_stage(TrainConfig(datastore=uri, train_size=min(a.train_size, n), index_factory=a.factory,
                                     trainer="faiss", threads=a.cpus))
        watch.end(train_size=tr.manifest.index["train_size"], sample_s=tr.manifest.index["seconds"]["sample"],
                  train_s=tr.manifest.index["seconds"]["train"], quantization=tr.manifest.index["quantization"])
        log.info("trained %s in %.1fs", a.factory, watch.results["train"]["seconds"])

        helper = mp.get_context("spawn").Pool(1)       # the baselines' process (not counted in any peak)
        nb = min(a.baseline_keys, n)

        def baseline_add() -> float:
            """Plain faiss add_with_ids in one process, run just before and just after the add stage
            (the mean is the baseline: load drifts on shared machines)."""
            base_s = helper.apply(helper_add, (uri, nb, a.cpus))
            log.info("baseline: faiss add_with_ids of %s keys in %.1fs (%.0f vectors/s)", f"{nb:,}", base_s,
                     nb / base_s)
            return nb / base_s

        before = baseline_add()
        watch.begin("add")
        ar = add_stage(AddConfig(datastore=uri, workers=a.add_workers, threads=a.add_threads, encoder="faiss",
                                 **layout))
        shards = ar.manifest.index_shards
        watch.end(index_shards=len(shards), ids_per_shard=[s["num_ids"] for s in shards],
                  index_bytes=sum(s["bytes"] for s in shards), vectors_per_s=n / ar.seconds,
                  stage_seconds=ar.seconds)
        log.info("added %s ids into %d shards in %.1fs (%.0f vectors/s)", f"{n:,}", len(shards), ar.seconds,
                 n / ar.seconds)
        after = baseline_add()
        res["baseline_add_vectors_per_s"] = {"before": before, "after": after, "mean": (before + after) / 2,
                                             "keys": nb, "threads": a.cpus}

        watch.begin("serve")
        start_servers(uri, cache_dir=os.path.join(work, "cache"), detached=False)
        watch.end()
        log.info("%d index servers up in %.1fs", len(shards), watch.results["serve"]["seconds"])

        centers = np.random.default_rng(a.seed).standard_normal((256, a.dim), dtype=np.float32)  # the datastore's
        queries = synthetic_keys(a.queries, a.dim, 1_000_000_007 + a.seed, centers).astype(np.float32)
        batches = [queries[i:i + a.batch] for i in range(0, len(queries), a.batch)]
        watch.begin("query")
        r = Retriever.connect(uri)
        lat = run_calls(lambda q: r.search(q, k=a.k, nprobe=a.nprobe), batches)
        watch.end(**qstats(lat, a.batch, n))
        log.info("router, cold: %.0f queries/s", watch.results["query"]["queries_per_s"])

        # baselines: the same index shard files searched directly by faiss in the helper process
        watch.begin("compare")
        files = []
        for s in shards:
            if a.s3:
                files.append(os.path.join(work, "direct-" + os.path.basename(s["path"])))
                st.download_file(s["path"], files[-1])
            else:
                files.append(os.path.join(local_path(uri), s["path"]))
        nlist = helper.apply(helper_open, (files, a.k, a.nprobe, a.cpus))
        one = (lambda: [helper.apply(helper_search, (q, "one")) for q in batches])        # noqa: E731
        every = (lambda: [helper.apply(helper_search, (q, "every")) for q in batches])    # noqa: E731
        routed = (lambda q: r.search(q, k=a.k, nprobe=a.nprobe))       # noqa: E731
        lr, la, lo = [], [], []
        for _ in range(a.rounds):                                        # alternating: drift hits all three
            lr += run_calls(routed, batches)
            la += every()
            lo += one()
        cmp = {"router": qstats(lr, a.batch, n), "direct_every_shard": qstats(la, a.batch, n),
               "direct_one_shard": qstats(lo, a.batch, shards[0]["num_ids"]), "rounds": a.rounds}
        cmp["router_vs_direct_every_shard"] = (cmp["router"]["queries_per_s"]
                                               / cmp["direct_every_shard"]["queries_per_s"])
        cmp["router_vs_direct_one_shard"] = cmp["router"]["queries_per_s"] / cmp["direct_one_shard"]["queries_per_s"]
        codes = a.nprobe / nlist * n                                     # codes scanned per query, all shards
        cmp["codes_scanned_per_query"] = codes
        cmp["direct_codes_per_s"] = codes * cmp["direct_every_shard"]["queries_per_s"]
        helper.close()
        helper.join()
        watch.end(**cmp)
        log.info("warm: router %.0f q/s, faiss direct every shard %.0f q/s (%.2f), one shard %.0f q/s",
                 cmp["router"]["queries_per_s"], cmp["direct_every_shard"]["queries_per_s"],
                 cmp["router_vs_direct_every_shard"], cmp["direct_one_shard"]["queries_per_s"])
        stop_servers(uri)
        deadline = time.time() + 30                     # let them exit before the next stage's peaks
        while time.time() < deadline and any(classify(proc_title(p)) == "index_server"
                                             for p in descendants(os.getpid())):
            time.sleep(0.2)

        if -(-n // fixed) != len(shards) or any(s["num_ids"] != fixed for s in shards[:-1]):
            watch.begin("add_fixed")
            ar2 = add_stage(AddConfig(datastore=uri, shard_size=fixed, workers=a.add_workers, threads=a.add_threads,
                                      encoder="faiss", force=True))
            s2 = ar2.manifest.index_shards
            watch.end(index_shards=len(s2), shard_size=fixed, index_bytes=sum(s["bytes"] for s in s2),
                      vectors_per_s=n / ar2.seconds, stage_seconds=ar2.seconds)
            log.info("fixed-size layout: %d shards of %s ids in %.1fs", len(s2), f"{fixed:,}", ar2.seconds)
        else:
            res["add_fixed_is_add"] = f"{len(shards)} shards of {fixed:,} ids: the same layout as the add stage"
        ray.shutdown()
    finally:
        watch.close()
        if helper is not None:
            helper.terminate()
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=10)
    res["stages"] = watch.results
    Path(out_path).write_text(json.dumps(res, indent=1))


# ---------------------------------------------------------------------------------------------
# the report


def _mean_end(row: dict, field: str) -> float:
    """Mean of the index servers' `field` (MiB) at the end of the compare stage."""
    each = [e[field] for e in row["serve"]["server_end"] if field in e]
    return sum(each) / max(1, len(each))


def summarize(runs: list[dict], a) -> dict:
    """Per size: seconds and seconds per million keys of each stage, the peaks; ratios last/first size."""
    out: dict = {"sizes": {}, "ratios": {}}
    for run in runs:
        n, S = run["num_keys"], run["stages"]
        per_m = n / 1e6
        row = {"seconds": {k: v["seconds"] for k, v in S.items()},
               "seconds_per_million_keys": {k: S[k]["seconds"] / per_m
                                            for k in ("write", "train", "add", "serve", "add_fixed") if k in S},
               "query_ms_per_query": S["compare"]["router"]["ms_per_query"],
               "query_ms_per_query_per_million_keys": S["compare"]["router"]["ms_per_query_per_million_keys"],
               "driver_peak_mb": {k: v["driver"]["peak_mb"] for k, v in S.items() if k in PIPELINE},
               "add": {"index_shards": S["add"]["index_shards"], "ids_per_shard": S["add"]["ids_per_shard"][0],
                       "vectors_per_s": S["add"]["vectors_per_s"],
                       "baseline_faiss_vectors_per_s": run["baseline_add_vectors_per_s"]["mean"],
                       "baseline_faiss_before_after": [run["baseline_add_vectors_per_s"]["before"],
                                                       run["baseline_add_vectors_per_s"]["after"]],
                       "ratio_vs_faiss": S["add"]["vectors_per_s"] / run["baseline_add_vectors_per_s"]["mean"],
                       "worker_peak_mb": S["add"].get("add_worker", {}).get("peak_mb_max"),
                       "workers": S["add"].get("add_worker", {}).get("processes")},
               "serve": {"servers": S["serve"].get("index_server", {}).get("processes"),
                         "server_peak_mb": max(S[k].get("index_server", {}).get("peak_mb_max", 0)
                                               for k in ("serve", "query", "compare")),
                         "server_end": S["compare"].get("index_server", {}).get("each", [])},
               "query": {k: S["compare"][k] for k in ("router", "direct_every_shard", "direct_one_shard",
                                                      "router_vs_direct_every_shard", "router_vs_direct_one_shard",
                                                      "codes_scanned_per_query", "direct_codes_per_s")},
               "query_cold": {k: S["query"][k] for k in ("queries_per_s", "p50_ms", "p99_ms")},
               "ray_system_peak_mb_sum": max(v.get("ray_system", {}).get("peak_mb_sum", 0) for v in S.values()),
               "key_shard_bytes": S["write"]["key_shard_bytes"], "index_bytes": S["add"]["index_bytes"]}
        fx = S.get("add_fixed") or S["add"]
        row["add_fixed"] = {"index_shards": fx["index_shards"], "ids_per_shard": fx.get("shard_size",
                                                                                      S["add"]["ids_per_shard"][0]),
                            "worker_peak_mb": fx.get("add_worker", {}).get("peak_mb_max"),
                            "vectors_per_s": fx["vectors_per_s"], "same_as_add": "add_fixed" not in S}
        row["driver_peak_mb_max"] = max(row["driver_peak_mb"].values())
        if "s3_server" in S["write"]:
            row["s3_server_peak_mb"] = max(v.get("s3_server", {}).get("peak_mb_max", 0) for v in S.values())
        out["sizes"][str(n)] = row
    if len(runs) >= 2:
        out["ratios"] = size_ratios(out["sizes"], runs[0]["num_keys"], runs[-1]["num_keys"])
        # each size against the one before it: with --ids-per-shard, 10M -> 100M compares processes that
        # hold the same ids (one 10M-id shard against ten)
        keys = [r["num_keys"] for r in runs]
        out["ratios_by_step"] = {f"{n1}->{n2}": size_ratios(out["sizes"], n1, n2) for n1, n2 in zip(keys, keys[1:])}
    return out


def size_ratios(sizes: dict, n1: int, n2: int) -> dict:
    """Size n2 against size n1: the driver's, add workers' and index servers' peaks, and per million ids."""
    r1, r2 = sizes[str(n1)], sizes[str(n2)]
    ratio = (lambda x, y: (y / x) if x else None)                          # noqa: E731
    same_ids = r1["add"]["ids_per_shard"] == r2["add"]["ids_per_shard"]
    per_id = (lambda d: d / ((r2["add"]["ids_per_shard"] - r1["add"]["ids_per_shard"]) / 1e6)  # noqa: E731
              if not same_ids else None)
    return {
        "keys": n2 / n1,
        "driver_peak": ratio(r1["driver_peak_mb_max"], r2["driver_peak_mb_max"]),
        "driver_peak_per_stage": {k: ratio(r1["driver_peak_mb"][k], r2["driver_peak_mb"][k])
                                  for k in r1["driver_peak_mb"] if k in r2["driver_peak_mb"]},
        "add_worker_peak_fixed_shard_size": ratio(r1["add_fixed"]["worker_peak_mb"],
                                                  r2["add_fixed"]["worker_peak_mb"]),
        "add_worker_peak_fixed_shard_count": ratio(r1["add"]["worker_peak_mb"], r2["add"]["worker_peak_mb"]),
        "index_server_peak": ratio(r1["serve"]["server_peak_mb"], r2["serve"]["server_peak_mb"]),
        "index_server_ids": r2["add"]["ids_per_shard"] / r1["add"]["ids_per_shard"],
        "index_server_mb_per_million_ids": per_id(r2["serve"]["server_peak_mb"] - r1["serve"]["server_peak_mb"]),
        "index_server_file_backed_mb_per_million_ids": per_id(_mean_end(r2, "file_end_mb")
                                                              - _mean_end(r1, "file_end_mb")),
        "index_server_anon_mb_per_million_ids": per_id(_mean_end(r2, "anon_end_mb") - _mean_end(r1, "anon_end_mb")),
        "add_worker_mb_per_million_ids_fixed_count": per_id((r2["add"]["worker_peak_mb"] or 0)
                                                            - (r1["add"]["worker_peak_mb"] or 0)),
        "query_ms_per_query": ratio(r1["query_ms_per_query"], r2["query_ms_per_query"]),
    }


def print_report(summary: dict, a, machine: dict, load_before, load_after, total_s: float, path) -> None:
    sizes = list(summary["sizes"])
    rows = [summary["sizes"][s] for s in sizes]
    print(f"\n{machine['hostname']}: {machine['nproc']} CPUs ({machine['cpu_model']}), faiss {machine.get('faiss')}, "
          f"ray {machine.get('ray')}; load {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    shards = f"index shards of {a.ids_per_shard:,} ids" if a.ids_per_shard else f"{a.index_shards} index shards"
    print(f"dim {a.dim}, {a.factory}, train {a.train_size:,}, {shards}, k={a.k}, "
          f"nprobe={a.nprobe}, {a.queries} queries in batches of {a.batch}; storage "
          f"{'S3 (moto)' if a.s3 else 'local directory'}; {a.cpus} Ray CPUs")
    w = 14
    head = f"{'':40}" + "".join(f"{int(s):>{w},}" for s in sizes)
    print("\nseconds per million keys")
    print(head)
    for k, label in (("write", "write (synthesize + Parquet + sha256)"), ("train", "train-index (sample + faiss)"),
                     ("add", "add (Ray tasks, fixed shard count)"), ("add_fixed", "add (fixed shard size)"),
                     ("serve", "serve start (actors, fetch, values)")):
        spm = [r["seconds_per_million_keys"].get(k, r["seconds_per_million_keys"]["add"]) for r in rows]
        print(f"{label:40}" + "".join(f"{x:>{w}.2f}" for x in spm))
    print(f"{'query, router, ms/query':40}" + "".join(f"{r['query_ms_per_query']:>{w}.2f}" for r in rows))
    print(f"{'query, ms/query per million keys':40}"
          + "".join(f"{r['query_ms_per_query_per_million_keys']:>{w}.3f}" for r in rows))
    print(f"{'ray.init (fixed, s)':40}" + "".join(f"{r['seconds']['ray']:>{w}.1f}" for r in rows))
    print("\nagainst baselines measured in the same run")
    print(f"{'faiss add_with_ids, 1 process, mean (v/s)':40}"
          + "".join(f"{r['add']['baseline_faiss_vectors_per_s']:>{w},.0f}" for r in rows))
    print(f"{'knnlm add (v/s)':40}" + "".join(f"{r['add']['vectors_per_s']:>{w},.0f}" for r in rows))
    print(f"{'  ratio':40}" + "".join(f"{r['add']['ratio_vs_faiss']:>{w}.2f}" for r in rows))
    print(f"{'faiss direct, every shard + merge (q/s)':40}"
          + "".join(f"{r['query']['direct_every_shard']['queries_per_s']:>{w},.0f}" for r in rows))
    print(f"{'faiss direct, one shard (q/s)':40}"
          + "".join(f"{r['query']['direct_one_shard']['queries_per_s']:>{w},.0f}" for r in rows))
    print(f"{'router (q/s)':40}" + "".join(f"{r['query']['router']['queries_per_s']:>{w},.0f}" for r in rows))
    print(f"{'  ratio vs every shard':40}"
          + "".join(f"{r['query']['router_vs_direct_every_shard']:>{w}.2f}" for r in rows))
    print(f"{'  ratio vs one shard':40}"
          + "".join(f"{r['query']['router_vs_direct_one_shard']:>{w}.2f}" for r in rows))
    print("\npeak memory (MiB, VmHWM)")
    print(head)
    print(f"{'driver (max over the stages)':40}" + "".join(f"{r['driver_peak_mb_max']:>{w},.0f}" for r in rows))
    for k in rows[0]["driver_peak_mb"]:
        print(f"{'  driver, ' + k:40}" + "".join(f"{r['driver_peak_mb'].get(k, float('nan')):>{w},.0f}"
                                                 for r in rows))
    print(f"{'add worker, fixed shard size':40}" + "".join(
        f"{(r['add_fixed']['worker_peak_mb'] or 0):>{w - 12},.0f} ({r['add_fixed']['ids_per_shard'] / 1e6:.2f}M ids)"
        for r in rows))
    print(f"{'add worker, fixed shard count':40}" + "".join(
        f"{(r['add']['worker_peak_mb'] or 0):>{w - 12},.0f} ({r['add']['ids_per_shard'] / 1e6:.2f}M ids)" for r in rows))
    print(f"{'index server (each)':40}" + "".join(
        f"{r['serve']['server_peak_mb']:>{w - 12},.0f} ({r['add']['ids_per_shard'] / 1e6:.2f}M ids)" for r in rows))
    print(f"{'Ray system processes (sum)':40}" + "".join(f"{r['ray_system_peak_mb_sum']:>{w},.0f}" for r in rows))
    if "s3_server_peak_mb" in rows[0]:
        print(f"{'S3 server (moto)':40}" + "".join(f"{r.get('s3_server_peak_mb', 0):>{w},.0f}" for r in rows))
    pairs = [(sizes[0], sizes[-1], summary.get("ratios"))]            # the whole range, then each step of it
    if len(sizes) > 2:
        pairs += [(s1, s2, summary["ratios_by_step"][f"{s1}->{s2}"]) for s1, s2 in zip(sizes, sizes[1:])]
    for s1, s2, rt in pairs:
        if not rt:
            continue
        print(f"\nratios, {int(s2):,} vs {int(s1):,} keys ({rt['keys']:.0f}x):")
        mb = (lambda x: "-" if x is None else f"{x:.0f}")                 # noqa: E731  (None: same ids)
        print(f"  driver peak {rt['driver_peak']:.2f}; add worker peak {rt['add_worker_peak_fixed_shard_size']:.2f} "
              f"at a fixed shard size, {rt['add_worker_peak_fixed_shard_count']:.2f} in the add stage's layout "
              f"({mb(rt['add_worker_mb_per_million_ids_fixed_count'])} MiB per million ids of its shard)")
        print(f"  index server peak {rt['index_server_peak']:.2f} for {rt['index_server_ids']:.1f}x the ids per shard "
              f"({mb(rt['index_server_mb_per_million_ids'])} MiB per million ids of its shard; file-backed "
              f"{mb(rt['index_server_file_backed_mb_per_million_ids'])}, anonymous "
              f"{mb(rt['index_server_anon_mb_per_million_ids'])}); router ms/query {rt['query_ms_per_query']:.2f}x")
    print(f"\nresult: {path} (bench took {total_s:.0f}s)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000,10000000", help="datastore sizes (keys), smallest first")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--factory", default="IVF1024,PQ16", help="index factory")
    ap.add_argument("--train-size", type=int, default=200_000)
    ap.add_argument("--index-shards", type=int, default=4, help="index shards of the add/serve stages")
    ap.add_argument("--ids-per-shard", type=int, default=None,
                    help="instead of --index-shards: index shards of this many ids in the add/serve stages (knnlm add "
                         "--shard-size), so that sizes compare processes holding the same ids")
    ap.add_argument("--fixed-shard-size", type=int, default=None,
                    help="ids per index shard of the add-fixed stage (default: smallest size / --index-shards)")
    ap.add_argument("--add-workers", type=int, default=None, help="concurrent add tasks (default: knnlm add's)")
    ap.add_argument("--add-threads", type=int, default=None, help="threads per add task (default: knnlm add's)")
    ap.add_argument("--shard-rows", type=int, default=65536, help="rows per key shard")
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--queries", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1024, help="queries per search call")
    ap.add_argument("--rounds", type=int, default=2, help="alternating router/direct rounds")
    ap.add_argument("--baseline-keys", type=int, default=1_000_000, help="keys of the plain faiss add baseline")
    ap.add_argument("--cpus", type=int, default=len(os.sched_getaffinity(0)), help="Ray CPUs and faiss threads")
    ap.add_argument("--object-store-mb", type=int, default=2048)
    ap.add_argument("--s3", action="store_true", help="store the datastore on a local moto S3 server")
    ap.add_argument("--malloc-arena-max", type=int, default=None,
                    help="run each size's driver, and so Ray and its workers, with MALLOC_ARENA_MAX=N (glibc): "
                         "an experiment on the add workers' memory creep (see bench/README.md); off by default")
    ap.add_argument("--sample-interval", type=float, default=0.2, help="seconds between process samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where datastores go (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--result", default=None, help="result file or directory (default bench/results/)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.sizes_list = [int(x) for x in a.sizes.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("faiss.loader", "builder", "cluster", "retriever", "faiss.contrib", "botocore", "boto3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")

    if a.child is not None:                          # one size, in this (fresh) driver process
        run_size(a, a.child, a.child_out)
        return 0

    import faiss
    from bench_build import machine_info
    from common import write_result
    machine = machine_info("cpu")
    machine["faiss"] = faiss.__version__
    load_before = os.getloadavg()
    t_all = time.perf_counter()
    own_workdir = a.workdir is None
    a.workdir = a.workdir or tempfile.mkdtemp(prefix="knnlm-bench-scale-")
    os.makedirs(a.workdir, exist_ok=True)
    passthrough = [x for x in (argv if argv is not None else sys.argv[1:])]
    if "--workdir" not in passthrough:
        passthrough += ["--workdir", a.workdir]
    runs = []
    try:
        for n in a.sizes_list:
            out = os.path.join(a.workdir, f"result-{n}.json")
            t = time.perf_counter()
            log.info("=== %s keys: a driver process of its own", f"{n:,}")
            env = dict(os.environ)
            if a.malloc_arena_max:
                env["MALLOC_ARENA_MAX"] = str(a.malloc_arena_max)   # read by glibc at start: set before exec
            subprocess.run([sys.executable, str(Path(__file__).resolve()), *passthrough, "--child", str(n),
                            "--child-out", out], check=True, env=env)
            runs.append(json.loads(Path(out).read_text()))
            log.info("=== %s keys done in %.0fs", f"{n:,}", time.perf_counter() - t)
            if not a.keep:
                shutil.rmtree(os.path.join(a.workdir, f"n{n}"), ignore_errors=True)
    finally:
        if not a.keep and own_workdir:
            shutil.rmtree(a.workdir, ignore_errors=True)
    total_s = time.perf_counter() - t_all
    summary = summarize(runs, a)
    params = {k: v for k, v in vars(a).items() if k not in ("child", "child_out")}
    figures = {"summary": summary, "runs": runs}
    path, result = write_result("scale", "cpu", machine, load_before, params, figures, total_s, a.result)
    print_report(summary, a, machine, load_before, result["load_average_after"], total_s, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Bookkeeping at scale: the manifest, the units' commit records and the resume scan at 250, 2,500 and
25,000 key shards (a WIKI-3B datastore has about 23,000), on local storage and on S3 (moto in server mode).

No keys are computed. Each synthetic datastore has N units of one key shard each, written with the real
formats: the unit commit records under _build/units/ as `builder.unit.run_unit` writes them, one tiny real
Parquet shard (the same bytes under every shard name, so `knnlm verify` passes), and the manifest
`builder.build_manifest.assemble_manifest` makes from those records (with realistic paths, checksums and
first_id). The shards' rows are few; the manifest's entries are as many and as long as a real build's.

Per N and storage (times in seconds, each the best of --repeat runs unless it changes the datastore):

  resume scan (a rerun of a build that died just before its commit, in the order build.py runs it):
    list_records     storage.list("_build/units/"): which units are committed (S3: pages of 1,000)
    read_records     build_manifest.read_unit_records: every committed unit's record
    assemble         build_manifest.assemble_manifest: the manifest from the records
    commit           build_manifest.commit_manifest: manifest.json, then the clean-up of _build/
  manifest:
    serialize        Manifest.to_json (with its checksum), and its bytes
    parse_validate   manifest.parse_manifest (JSON, checksum, paths, contiguous ids)
    write_manifest   manifest.write_manifest (what train-index/add do to add their sections)
    publish          versions.publish of the next version (an ingestion, removal or compaction)
    load_manifest    manifest.load_manifest (read and check)
    info, verify     `knnlm info`, `knnlm verify` (which reads every shard's bytes) in this process; on S3
                   above --s3-verify-max shards no shard file is written (setup time) and verify is skipped

With S3 the requests each step sends are counted (botocore's before-send events on the one client
the storage uses: every HTTP request, retries included). The table gives each time and its ratio to the
previous N (10x the shards: ~10x is linear, ~100x quadratic). The result goes to
bench/results/bookkeeping-<date>.json.

    PYTHONPATH=. python bench/bench_bookkeeping.py                  # 250, 2,500, 25,000; local and S3
    PYTHONPATH=. python bench/bench_bookkeeping.py --sizes 250 2500 --storage local
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import contextlib
import datetime
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from builder.build_manifest import assemble_manifest, commit_manifest, read_unit_records  # noqa: E402
from builder.config import BuildConfig, InfoConfig, VerifyConfig  # noqa: E402
from builder.key_shards import encode_shard  # noqa: E402
from builder.layout import MANIFEST, UNITS_DIR, key_shard_path, unit_record_id, unit_record_path  # noqa: E402
from builder.lease import Lease  # noqa: E402
from builder.manifest import load_manifest, parse_manifest, write_manifest  # noqa: E402
from builder.modelinfo import ModelInfo  # noqa: E402
from builder.storage import Storage  # noqa: E402
from builder.unit import UnitSpan  # noqa: E402
from builder.versions import publish  # noqa: E402
from bench_scale import start_moto  # noqa: E402  (moto on a free port, AWS_* set for it)

ROWS = 64                # rows of the one tiny shard every shard name holds
DIM = 8
UNITS_PER_FILE = 250     # input files = N / 250 (stream mode: one sequence per file)
ORDER = ("list_records", "read_records", "assemble", "commit", "serialize", "parse_validate", "write_manifest",
         "publish", "load_manifest", "info", "verify")


# ---------------------------------------------------------------------------------------------
# S3: moto in server mode, and a count of the requests sent


class RequestCount:
    """HTTP requests sent by the storage's S3 client, by operation (ListObjectsV2, GetObject, ...)."""

    def __init__(self):
        from builder.storage_s3 import s3_client
        self.counts: collections.Counter = collections.Counter()
        s3_client().meta.events.register("before-send.s3", self._hook)

    def _hook(self, event_name: str = "", **_):
        self.counts[event_name.rsplit(".", 1)[-1]] += 1

    @contextlib.contextmanager
    def measure(self, into: dict):
        before = collections.Counter(self.counts)
        yield
        into.update({k: v for k, v in (self.counts - before).items() if v})


# ---------------------------------------------------------------------------------------------
# the synthetic datastore


def synthetic(n: int, uri: str, shard_digest: str, shard_bytes: int):
    """(cfg, info, ident, metas, units, records) of a build of n units, one shard each."""
    files = max(1, n // UNITS_PER_FILE)
    per_file = [n // files + (1 if f < n % files else 0) for f in range(files)]
    inputs = [f"s3://corpus-bucket/wiki/part-{f:05d}.txt" for f in range(files)]
    cfg = BuildConfig(corpus=inputs, model="gpt2-xl", out=uri, mode="stream", format="text")
    info = ModelInfo(name="gpt2-xl", path="/models/gpt2-xl", sha256="sha256:" + "ab" * 32, model_class="GPT2LMHeadModel",
                     model_type="gpt2", hidden_size=DIM, num_layers=48, max_positions=1024, key_module="transformer.h.47.mlp",
                     tokenizer_sha256="sha256:" + "cd" * 32, tokenizer_class="GPT2TokenizerFast", vocab_size=50257,
                     adds_special_tokens=False, bos_token_id=50256)
    ident = {"model_sha256": info.sha256, "tokenizer_sha256": info.tokenizer_sha256, "key_layer": cfg.key_layer,
             "window": 1024, "min_context": 512, "mode": cfg.mode, "format": cfg.format, "text_field": cfg.text_field,
             "inputs": inputs, "shard_rows": cfg.shard_rows, "unit_tokens": cfg.unit_tokens,
             "row_group_rows": cfg.row_group_rows, "compute_dtype": "float16"}
    metas, units, records = [], [], {}
    for f, k in enumerate(per_file):
        length = k * ROWS + 1                                    # one stream sequence: k * ROWS targets
        metas.append({"uri": inputs[f], "format": "text", "bytes": 4 * length, "sha256": "sha256:" + f"{f:064x}",
                      "num_records": 1000, "num_tokens": length, "tokens": f"tokens/{f:06d}.bin",
                      "num_sequences": 1, "num_targets": length - 1, "num_skipped": 0, "skipped": []})
        for j in range(k):
            u = len(units)
            units.append(UnitSpan(u, f, 0, j * ROWS + 1, 0, (j + 1) * ROWS + 1, 0, ROWS))
            # what builder.unit.run_unit writes as the unit's commit record
            records[u] = {"unit": u, "file": f, "num_rows": ROWS,
                          "shards": [{"path": key_shard_path(u, 0), "num_rows": ROWS, "checksum": shard_digest,
                                      "bytes": shard_bytes}], "seconds": round(9.5 + (u % 97) / 10, 3)}
    return cfg, info, ident, metas, units, records


def make_manifest(cfg, info, ident, metas, units, records):
    return assemble_manifest(cfg, info, ident, metas, units, records, window=1024, min_context=512,
                             compute_dtype="float16", device="cuda", num_skipped=0,
                             stage_ends={"ray_up": 3.2, "tokenized": 812.5, "keys": 80000.0})


def write_all(storage: Storage, items: list[tuple[str, bytes]], threads: int) -> None:
    with cf.ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(lambda it: storage.write_bytes(*it), items, chunksize=64):
            pass


def populate(storage: Storage, records: dict, shard: bytes, threads: int, shards: bool = True) -> None:
    """The shard files (unless not `shards`) and commit records, as a build that died just before its
    commit left them."""
    items = [(s["path"], shard) for r in records.values() for s in r["shards"]] if shards else []
    items += [(unit_record_path(u), json.dumps(r).encode()) for u, r in records.items()]
    write_all(storage, items, threads)


# ---------------------------------------------------------------------------------------------
# measuring


def timed(fn, repeat: int = 1):
    """(best seconds, last result)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def run_size(n: int, kind: str, root: str, reqs: RequestCount | None, threads: int, repeat: int,
             do_verify: bool) -> dict:
    from cluster.stage_commands import info as info_cmd, verify as verify_cmd
    keys = np.random.default_rng(n).standard_normal((ROWS, DIM)).astype(np.float16)
    shard, digest = encode_shard(keys, np.arange(ROWS, dtype=np.int32), np.zeros(ROWS, np.int64),
                                 np.arange(ROWS, dtype=np.int64), row_group_rows=ROWS)
    storage = Storage.from_uri(root)
    cfg, info, ident, metas, units, records = synthetic(n, storage.uri, digest, len(shard))
    t = time.perf_counter()
    populate(storage, records, shard, threads, shards=do_verify)
    row: dict = {"num_shards": n, "storage": kind, "setup_seconds": round(time.perf_counter() - t, 1),
                 "seconds": {}, "requests": {}}
    sec, req = row["seconds"], row["requests"]

    def step(name: str, fn, rep: int = 1):
        into: dict = {}
        with (reqs.measure(into) if reqs else contextlib.nullcontext()):
            sec[name], out = timed(fn, rep)
        if reqs:
            req[name] = {k: v // rep for k, v in into.items()}
        return out

    # ---- the resume scan, as build.py's rerun runs it once the key stage finds nothing pending
    listed = step("list_records", lambda: storage.list(UNITS_DIR), repeat)
    committed = {unit_record_id(p) for p in listed}
    assert committed == set(records), (len(committed), len(records))
    got = step("read_records", lambda: _read_all(storage, units), repeat)
    assert got == records
    m = step("assemble", lambda: make_manifest(cfg, info, ident, metas, units, got), repeat)
    lease = Lease(storage, 60.0)
    lease.acquire()
    try:
        step("commit", lambda: commit_manifest(storage, lease, m))
        left = storage.list(UNITS_DIR)
        assert not left, f"{len(left)} unit records left after the commit"

        # ---- the manifest
        text = step("serialize", m.to_json, repeat)
        row["manifest_bytes"] = len(text.encode())
        raw = text.encode()
        step("parse_validate", lambda: parse_manifest(raw, storage.url(MANIFEST)), repeat)
        step("write_manifest", lambda: write_manifest(storage, m), repeat)
        base = load_manifest(storage)
        new = load_manifest(storage)
        step("publish", lambda: publish(storage, lease, base, new, {"kind": "ingest", "name": "bench"}))
    finally:
        lease.release()
    step("load_manifest", lambda: load_manifest(storage), repeat)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        step("info", lambda: info_cmd(InfoConfig(datastore=storage.uri)), repeat)
    row["info_num_keys"] = json.JSONDecoder().raw_decode(out.getvalue())[0]["num_keys"]   # the first run's
    if do_verify:
        with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
            rc = step("verify", lambda: verify_cmd(VerifyConfig(datastore=storage.uri, threads=8)))
        assert rc == 0, err.getvalue()[-2000:]
        row["verify_output"] = out.getvalue().strip()
    return row


def _read_all(storage: Storage, units: list[UnitSpan]) -> dict:
    records: dict = {}
    read_unit_records(storage, units, records)
    return records


# ---------------------------------------------------------------------------------------------
# report


def machine_info() -> dict:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.lower().startswith("model name")), "")
    import importlib.metadata as md
    out = {"hostname": socket.gethostname(), "nproc": len(os.sched_getaffinity(0)), "cpu_model": cpu,
           "python": platform.python_version()}
    for pkg in ("boto3", "moto", "pyarrow"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def table(rows: list[dict]) -> str:
    lines = []
    for kind in dict.fromkeys(r["storage"] for r in rows):
        rs = sorted((r for r in rows if r["storage"] == kind), key=lambda r: r["num_shards"])
        lines.append(f"\n{kind}: seconds (x ratio to the previous N; 10x the shards: ~10 linear, ~100 quadratic)")
        lines.append(f"{'step':16s}" + "".join(f"{r['num_shards']:>22,d}" for r in rs))
        for name in ORDER:
            if not any(name in r["seconds"] for r in rs):
                continue
            cells, prev = [], None
            for r in rs:
                v = r["seconds"].get(name)
                ratio = f"(x{v / prev:5.1f})" if v is not None and prev else " " * 8
                cells.append(f"{'-' if v is None else f'{v:.4f}':>13s} {ratio}")
                prev = v
            lines.append(f"{name:16s}" + "".join(cells))
        lines.append(f"{'manifest bytes':16s}" + "".join(f"{r.get('manifest_bytes', 0):>13,d}         " for r in rs))
        if any(r["requests"] for r in rs):
            lines.append("S3 requests per step:")
            for name in ORDER:
                if any(r["requests"].get(name) for r in rs):
                    lines.append(f"  {name:14s}" + "  ".join(
                        f"{r['num_shards']:,}: " + ", ".join(f"{k} {v:,}" for k, v in r["requests"].get(name, {}).items())
                        for r in rs))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[250, 2500, 25000])
    ap.add_argument("--storage", nargs="+", choices=("local", "s3"), default=["local", "s3"])
    ap.add_argument("--threads", type=int, default=8, help="writers of the setup (not measured)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each step that does not change the datastore")
    ap.add_argument("--no-verify", action="store_true", help="skip `knnlm verify` (reads every shard)")
    ap.add_argument("--s3-verify-max", type=int, default=2500,
                    help="on S3, larger datastores get no shard files (their setup is 2x the PUTs) and no verify")
    ap.add_argument("--out", default=None, help="result file (default bench/results/bookkeeping-<date>.json)")
    a = ap.parse_args(argv)
    t0, load_before = time.perf_counter(), os.getloadavg()
    rows, moto, tmp = [], None, tempfile.mkdtemp(prefix="knnlm-bookkeeping-")
    try:
        reqs = None
        if "s3" in a.storage:
            moto = start_moto()
            import boto3
            boto3.client("s3").create_bucket(Bucket="bench")
            reqs = RequestCount()
        for kind in a.storage:
            for n in a.sizes:
                root = os.path.join(tmp, f"ds-{n}") if kind == "local" else f"s3://bench/ds-{n}-{uuid.uuid4().hex[:6]}"
                print(f"{kind} {n:,} shards ...", flush=True)
                verify = not a.no_verify and (kind == "local" or n <= a.s3_verify_max)
                r = run_size(n, kind, root, reqs if kind == "s3" else None, a.threads, a.repeat, verify)
                print(json.dumps(r["seconds"]), flush=True)
                rows.append(r)
                if kind == "local":
                    shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=10)
    print(table(rows))
    result = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine_info(),
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "parameters": {"sizes": a.sizes, "storage": a.storage, "rows_per_shard": ROWS, "dim": DIM,
                             "units_per_file": UNITS_PER_FILE, "repeat": a.repeat, "setup_threads": a.threads,
                             "s3_verify_max": a.s3_verify_max},
              "runs": rows, "bench_seconds": round(time.perf_counter() - t0, 1), "argv": sys.argv}
    path = Path(a.out) if a.out else HERE / "results" / f"bookkeeping-{datetime.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

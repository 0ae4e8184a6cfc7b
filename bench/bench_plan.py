#!/usr/bin/env python
"""The build driver's memory and time from the tokens metas to the plan, at 1M, 10M and 100M documents.

No text is tokenized and no key computed: each size is a synthetic tokenized corpus (document mode) of
seeded-random sequence lengths (2..64 tokens; records with gaps, as skipped documents leave) in files of
--docs-per-file documents, written under a temporary folder in the build's own formats: tokens/<i>.seqs
(builder/seqs.py) and tokens/<i>.json, beside sparse input files of the size the metas record. Then, in a
fresh process per size, the driver's real code path runs: `build_tokens.tokenize_corpus` (which reads the
committed metas back: nothing to tokenize) and `build.plan_build` (totals, the streamed plan, the committed
units, the log line "N keys in M units"). Its peak RSS and seconds are reported: the peak is the child's
VmHWM (/proc/self/status: the high-water mark of its own address space since its exec), with ru_maxrss
beside it (on Linux ru_maxrss also counts the RSS of the process it was forked from, so the corpora are
written by a separate process too and the parent that forks the children stays small).

The baseline, measured in the same run: the driver before the sequence tables (commit ff5f857), i.e. metas
holding the sequences as JSON lists, their totals by count_targets and the in-memory planner (one Segment per
document; copied below), at the --baseline-sizes (1M; 10M if asked: ~2 minutes and several GB). At the
smallest baseline size both plans are compared unit for unit (a digest of their cuts).

    PYTHONPATH=. python bench/bench_plan.py                           # 1M, 10M, 100M; baseline at 1M
    PYTHONPATH=. python bench/bench_plan.py --sizes 1e6 1e7 --baseline-sizes 1e6 1e7

The figure: peak RSS at the largest size over that at the smallest (the issue's check: <= 1.2), and each
size's peak against the baseline's at the smallest. Result: bench/results/plan-<date>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from common import write_result  # noqa: E402

from builder.corpus import MAX_SKIPPED  # noqa: E402
from builder.layout import tokens_meta_path, tokens_path, tokens_seqs_path  # noqa: E402
from builder.seqs import TableWriter  # noqa: E402

WINDOW, MIN_CONTEXT = 1024, 512            # a 1024-position model's defaults
GEN_ROWS = 1 << 20                         # rows generated at once


def machine_info() -> dict:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.lower().startswith("model name")), "")
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("MemTotal")), "")
    return {"hostname": socket.gethostname(), "nproc": len(os.sched_getaffinity(0)), "cpu_model": cpu,
            "memory": mem, "python": platform.python_version()}


# ---------------------------------------------------------------------------------------------
# the synthetic corpus


def write_corpus(root: Path, n_docs: int, per_file: int, seed: int, old_format: bool) -> list[str]:
    """tokens/<i>.seqs + .json (or, `old_format`, only a .json with the lists, as before the tables) under
    root/ds, and sparse inputs under root/in; returns the inputs. About 1% of the records are skipped."""
    rng = np.random.default_rng(seed)
    (root / "ds" / "tokens").mkdir(parents=True, exist_ok=True)
    (root / "in").mkdir(parents=True, exist_ok=True)
    inputs = []
    for i, a in enumerate(range(0, n_docs, per_file)):
        n = min(per_file, n_docs - a)
        path = root / "in" / f"{i:05d}.jsonl"
        lists, record = [], 0
        with open(root / "ds" / tokens_seqs_path(i), "wb") as f:
            w = TableWriter(f)
            for b in range(0, n, GEN_ROWS):
                k = min(GEN_ROWS, n - b)
                lengths = rng.integers(2, 65, k)
                records = record + np.cumsum(1 + (rng.random(k) < 0.01)) - 1     # a gap: a skipped record
                record = int(records[-1]) + 1
                w.add(lengths, records)
                if old_format or b == 0:
                    lists.append((lengths, records))
        lengths, records = (np.concatenate(x) for x in zip(*lists))
        gone = np.ones(record if old_format else int(records[-1]) + 1, bool)
        gone[records] = False
        skipped = [{"record": int(r), "where": f"line {r + 1}", "reason": "empty document"}
                   for r in np.flatnonzero(gone)]
        meta = {"uri": str(path), "format": "jsonl", "bytes": 64 * record, "sha256": "sha256:" + "0" * 64,
                "num_records": record, "num_tokens": w.tokens}
        if old_format:                                  # TokenizedFile.meta() of commit ff5f857
            os.remove(root / "ds" / tokens_seqs_path(i))
            meta |= {"seq_lengths": lengths.tolist(), "seq_records": records.tolist(), "skipped": skipped}
        else:
            meta |= {"num_sequences": w.rows, "num_targets": w.targets, "num_skipped": record - w.rows,
                     "skipped": skipped[:MAX_SKIPPED]}
        meta |= {"tokens": tokens_path(i), "ranges": 1}
        (root / "ds" / tokens_meta_path(i)).write_text(json.dumps(meta))
        with open(path, "wb") as f:
            f.truncate(meta["bytes"])                     # sparse: the driver checks only the size
        inputs.append(str(path))
    return inputs


# ---------------------------------------------------------------------------------------------
# the child processes

PEAK = r"""
import resource
from common import peak_rss_mb as peak_mb          # VmHWM: this process's own high-water mark since its exec

def rusage_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

NEW = r"""import hashlib, json, logging, resource, sys, time
from builder.build import plan_build
from builder.build_tokens import tokenize_corpus
from builder.config import BuildConfig
from builder.storage import Storage
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
root, inputs = sys.argv[1], json.loads(sys.argv[2])
unit_tokens, W, C = (int(x) for x in sys.argv[3:6])
rss0 = peak_mb()
t = time.perf_counter()
cfg = BuildConfig(corpus=inputs, model="bench", out=root, mode="document", window=W, min_context=C,
                  unit_tokens=unit_tokens, progress=False)
storage = Storage.from_uri(root)
metas = tokenize_corpus(cfg, storage, None, None, inputs, ["jsonl"] * len(inputs))
t_metas = time.perf_counter() - t
plan = plan_build(cfg, storage, inputs, metas, W, C)
s = time.perf_counter() - t
cuts = hashlib.sha256(json.dumps([[u.id, u.file, u.first, u.t0, u.last, u.t1] for u in plan.units]).encode())
print(json.dumps({"keys": plan.total, "units": len(plan.units), "seconds": s, "metas_seconds": t_metas,
                  "peak_rss_mb": peak_mb(), "ru_maxrss_mb": rusage_mb(), "rss_after_imports_mb": rss0,
                  "cuts_sha256": cuts.hexdigest()}))
"""

OLD = r"""
import hashlib, json, resource, sys, time
import numpy as np
from builder.corpus import count_targets
import builder.build                                 # the driver's imports, as in the new case

from plan_reference import naive_plan_units as plan_units   # builder.unit.plan_units of commit ff5f857

root, inputs = sys.argv[1], json.loads(sys.argv[2])
unit_tokens, W, C = (int(x) for x in sys.argv[3:6])
rss0 = peak_mb()
t = time.perf_counter()
metas = [json.load(open(f"{root}/tokens/{i:06d}.json")) for i in range(len(inputs))]
t_metas = time.perf_counter() - t
skipped = [(inputs[i], s) for i, m in enumerate(metas) for s in m["skipped"]]
total = sum(count_targets(m["seq_lengths"]) for m in metas)
doc_base = np.concatenate([[0], np.cumsum([m["num_records"] for m in metas])]).tolist()
units = plan_units([(m["seq_lengths"], m["seq_records"]) for m in metas], W, C, unit_tokens)
s = time.perf_counter() - t
cuts = hashlib.sha256(json.dumps([[u.id, u.file, u.segments[0].seq, u.segments[0].t0, u.segments[-1].seq,
                                   u.segments[-1].t1] for u in units]).encode())
print(json.dumps({"keys": total, "units": len(units), "seconds": s, "metas_seconds": t_metas,
                  "peak_rss_mb": peak_mb(), "ru_maxrss_mb": rusage_mb(), "rss_after_imports_mb": rss0,
                  "cuts_sha256": cuts.hexdigest()}))
"""


def write_in_child(root: Path, n_docs: int, per_file: int, seed: int, old_format: bool) -> list[str]:
    """`write_corpus` in a process of its own (the old format's lists take GBs at 10M documents)."""
    job = json.dumps([str(root), n_docs, per_file, seed, old_format])
    r = subprocess.run([sys.executable, __file__, "--write", job],
                       env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"writing the corpus failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_child(code: str, root: Path, inputs: list[str], unit_tokens: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join((str(REPO), str(HERE))))    # builder, plan_reference
    r = subprocess.run([sys.executable, "-c", PEAK + code, str(root / "ds"), json.dumps(inputs), str(unit_tokens),
                        str(WINDOW), str(MIN_CONTEXT)], env=env, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"the child failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["log"] = [ln for ln in r.stderr.splitlines() if "keys in" in ln]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8], help="documents")
    ap.add_argument("--baseline-sizes", type=float, nargs="*", default=[1e6])
    ap.add_argument("--docs-per-file", type=int, default=10_000_000)
    ap.add_argument("--unit-tokens", type=int, default=262144)
    ap.add_argument("--dir", default=None, help="where the synthetic corpora go (default: a temporary folder)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--write", default=None, help=argparse.SUPPRESS)     # the corpus writer's own process
    a = ap.parse_args(argv)
    if a.write:
        root, n_docs, per_file, seed, old_format = json.loads(a.write)
        print(json.dumps(write_corpus(Path(root), n_docs, per_file, seed, old_format)))
        return 0
    load, t0 = os.getloadavg(), time.perf_counter()
    figures: dict = {"new": {}, "baseline": {}}
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        for kind, sizes in (("baseline", a.baseline_sizes), ("new", a.sizes)):
            for size in sorted(int(s) for s in sizes):
                root = Path(d) / f"{kind}-{size}"
                t = time.perf_counter()
                inputs = write_in_child(root, size, a.docs_per_file, seed=size, old_format=kind == "baseline")
                setup = time.perf_counter() - t
                f = run_child(OLD if kind == "baseline" else NEW, root, inputs, a.unit_tokens)
                f |= {"documents": size, "files": len(inputs), "setup_seconds": setup}
                figures[kind][str(size)] = f
                print(f"{kind:<9} {size:>11,} documents in {len(inputs):>3} files: {f['keys']:>14,} keys in "
                      f"{f['units']:>6,} units, plan {f['seconds']:7.1f} s, peak RSS {f['peak_rss_mb']:7.0f} MB "
                      f"({f['rss_after_imports_mb']:.0f} MB after imports; ru_maxrss {f['ru_maxrss_mb']:.0f} MB)",
                      flush=True)
                shutil.rmtree(root)
    new, base = figures["new"], figures["baseline"]
    lo, hi = min(new, key=int), max(new, key=int)
    ratio = new[hi]["peak_rss_mb"] / new[lo]["peak_rss_mb"]
    figures["peak_ratio_largest_vs_smallest"] = ratio
    print(f"peak RSS at {int(hi):,} documents / at {int(lo):,}: x{ratio:.3f} (the check: <= 1.2)")
    if base:
        b = min(base, key=int)
        for size, f in new.items():
            f["peak_vs_baseline_smallest"] = f["peak_rss_mb"] / base[b]["peak_rss_mb"]
            print(f"{int(size):>11,} documents: peak RSS x{f['peak_vs_baseline_smallest']:.2f}, plan time "
                  f"x{f['seconds'] / base[b]['seconds']:.2f} of the baseline at {int(b):,}")
        for size, f in base.items():
            f["peak_vs_baseline_smallest"] = f["peak_rss_mb"] / base[b]["peak_rss_mb"]
        if b in new:
            same = new[b]["cuts_sha256"] == base[b]["cuts_sha256"] and new[b]["keys"] == base[b]["keys"]
            figures["same_plan_as_baseline"] = same
            print(f"same units as the baseline at {int(b):,} documents: {same}")
    path, _ = write_result("plan", "cpu", machine_info(), load,
                           {"sizes": a.sizes, "baseline_sizes": a.baseline_sizes, "docs_per_file": a.docs_per_file,
                            "unit_tokens": a.unit_tokens, "window": WINDOW, "min_context": MIN_CONTEXT,
                            "lengths": "uniform 2..64", "mode": "document"}, figures, time.perf_counter() - t0,
                           a.out or str(HERE / "results" / f"plan-{datetime.date.today().isoformat()}.json"))
    print(f"wrote {path}")
    return 0 if ratio <= 1.2 and figures.get("same_plan_as_baseline", True) else 1


if __name__ == "__main__":
    sys.exit(main())

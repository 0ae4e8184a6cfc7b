#!/usr/bin/env python
"""Same bytes before and after a change: one pipeline run, fingerprinted.

Runs, through the `knnlm` command line of the checkout given by --repo (as a fresh process with
that checkout first on PYTHONPATH), on the shared WikiText-2 train split and model:

    knnlm build  (stream mode, window 512, min-context 256)
    knnlm train-index --index-factory IVF4096,PQ64
    knnlm add --index-shards 2
    knnlm eval  (test split, λ 0.4, T 20, k 1024, nprobe 32)

and prints one JSON object: a sha256 of the datastore's rows in global-id order, column by column
(key, value, doc, pos), the trained index's and each index shard's sha256, and eval's two
perplexities. It reads the files with pyarrow and hashlib only (no project import), so the same
script fingerprints any two versions of the code:

    python bench/fingerprint.py --repo /tmp/before --out /tmp/fp-before.json
    python bench/fingerprint.py --repo .           --out /tmp/fp-after.json
    python bench/fingerprint.py --compare /tmp/fp-before.json /tmp/fp-after.json

~8 min on 2 cores.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def knnlm(repo: Path, *args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(repo), RAY_DEDUP_LOGS="1")
    cmd = [sys.executable, "-m", "cluster.cli", *args]
    print("$ knnlm", " ".join(args), flush=True)
    subprocess.run(cmd, env=env, cwd=str(repo), check=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(ds: Path, eval_json: Path) -> dict:
    import pyarrow.parquet as pq

    m = json.loads((ds / "manifest.json").read_text())
    cols = {c: hashlib.sha256() for c in ("key", "value", "doc", "pos")}
    next_id = 0
    for s in sorted(m["shards"], key=lambda s: s["first_id"]):
        assert s["first_id"] == next_id, f"gap before {s['path']}"
        t = pq.read_table(ds / s["path"])
        for c, h in cols.items():
            arr = t.column(c).combine_chunks()
            h.update(arr.buffers()[1].to_pybytes()[: len(arr) * (arr.type.byte_width)])
        next_id += t.num_rows
    index = {"trained": sha256_file(ds / m["index"]["path"])}
    for p in sorted((ds / "index" / "shards").glob("*.faiss")):
        index[p.name] = sha256_file(p)
    ev = json.loads(eval_json.read_text())
    return {"num_keys": next_id, "rows": {c: h.hexdigest() for c, h in cols.items()}, "index": index,
            "eval": {k: ev[k] for k in ("base_ppl", "knnlm_ppl", "tokens") if k in ev},
            "eval_full": {k: v for k, v in ev.items() if isinstance(v, (int, float))}}


def compare(a: dict, b: dict) -> int:
    bad = []
    for key in ("num_keys", "rows", "index"):
        if a[key] != b[key]:
            bad.append(f"{key}: {a[key]} != {b[key]}")
    for k in ("base_ppl", "knnlm_ppl"):
        if abs(a["eval"][k] - b["eval"][k]) > 1e-6:
            bad.append(f"eval.{k}: {a['eval'][k]!r} != {b['eval'][k]!r}")
    print("\n".join(bad) if bad else f"same bytes: {a['num_keys']:,} keys, {len(a['index'])} index files, "
          f"perplexities {a['eval']['base_ppl']!r} / {a['eval']['knnlm_ppl']!r}")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", default=str(REPO), help="the checkout whose `knnlm` runs")
    ap.add_argument("--model", default=str(SHARED / "models" / "gpt2-wikitext2-small"))
    ap.add_argument("--splits", default=str(SHARED / "data" / "wikitext-2-splits"))
    ap.add_argument("--work", default=None, help="where the datastore goes (default: a temp dir)")
    ap.add_argument("--out", default=None, help="write the fingerprint JSON here")
    ap.add_argument("--compare", nargs=2, metavar="JSON", help="compare two fingerprints; exit 1 if they differ")
    a = ap.parse_args(argv)
    if a.compare:
        return compare(*(json.loads(Path(p).read_text()) for p in a.compare))
    repo = Path(a.repo).resolve()
    work = Path(a.work or tempfile.mkdtemp(prefix="knnlm-fp-")).resolve()
    ds, ev = work / "ds", work / "eval.json"
    t = time.perf_counter()
    knnlm(repo, "build", "--corpus", f"{a.splits}/train.txt", "--format", "wikitext", "--mode", "stream",
          "--model", a.model, "--window", "512", "--min-context", "256", "--out", str(ds), "--no-progress")
    knnlm(repo, "train-index", str(ds), "--index-factory", "IVF4096,PQ64")
    knnlm(repo, "add", str(ds), "--index-shards", "2")
    knnlm(repo, "eval", str(ds), "--corpus", f"{a.splits}/test.txt", "--format", "wikitext", "--lambda", "0.4",
          "--temperature", "20", "--k", "1024", "--nprobe", "32", "--out", str(ev))
    fp = fingerprint(ds, ev)
    fp["seconds"] = round(time.perf_counter() - t, 1)
    text = json.dumps(fp, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Tokenization of one large stream-mode text file: one pass (today's `tokenize_file`) against ranges
(builder/corpus_ranges.py), with the real GPT-2 tokenizer of ../shared. Each case runs as a fresh process
(as a Ray task would), on one core; its tokens/s and peak RSS (VmHWM, common.peak_rss_mb) are reported.

    python bench/bench_tokenize.py --mb 200          # the text: WikiText-2's train split repeated

- one pass: the build's task with no range limit (tokenize_file) on the first --baseline-mb of the file
  (its memory grows ~160 bytes per byte of text: a whole 200 MB file would need ~30 GB);
- range task: one range of RANGE_BYTES (the middle one) tokenized as a build task does it (tokenize_part),
  its peak is what every task of a ranged build needs, whatever the file size;
- ranged, all ranges: the whole file in ranges one after the other in one process, joined (tokenize_input).
The ratios are against the one pass measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from common import write_result  # noqa: E402

CHILD = r"""
import json, sys, tempfile, time
from builder import build_tokens
from common import peak_rss_mb
from builder import corpus_ranges as cr
path, tok, case, range_bytes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cr.RANGE_BYTES = range_bytes
t = time.perf_counter()
with tempfile.TemporaryDirectory() as out:
    if case == "range task":
        import os
        bounds, ranges = cr.chunk_grid(path, os.path.getsize(path), "text", "stream")
        k = len(ranges) // 2
        part = build_tokens.tokenize_part(0, k, path, "text", "stream", "text", tok, out, bounds, *ranges[k])
        n, nbytes, nranges = part["num_tokens"], part["end"] - part["start"], len(ranges)
    else:
        meta = build_tokens.tokenize_input(0, path, "text", "stream", "text", tok, out)
        n, nbytes, nranges = meta["num_tokens"], meta["bytes"], meta["ranges"]
s = time.perf_counter() - t
print(json.dumps({"tokens": n, "bytes": nbytes, "ranges": nranges, "seconds": s,
                  "peak_rss_mb": peak_rss_mb()}))
"""


def run_case(path: str, tok: str, case: str, range_bytes: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join((str(REPO), str(HERE))), TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-c", CHILD, path, tok, case, str(range_bytes)], env=env,
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"{case} failed:\n{r.stderr[-3000:]}")
    out = __import__("json").loads(r.stdout.strip().splitlines()[-1])
    out["tokens_per_s"] = out["tokens"] / out["seconds"]
    out["mb_per_s"] = out["bytes"] / out["seconds"] / 1e6
    return out


def main(argv=None) -> int:
    from builder import corpus_ranges as cr
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=200, help="size of the generated text file (MB)")
    ap.add_argument("--range-mb", type=float, default=cr.RANGE_BYTES / (1 << 20))
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--cases", default="one pass,range task,all ranges in one process")
    ap.add_argument("--baseline-mb", type=float, default=20,
                    help="the one pass runs on the first MB of the file only: it needs ~160 bytes of memory per byte")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    tok = os.path.join(a.shared, "models", "gpt2-wikitext2-small")
    train = Path(a.shared, "data", "wikitext-2-splits", "train.txt").read_bytes()
    load, t0 = os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "big.txt")
        with open(path, "wb") as f:
            for _ in range(int(a.mb * 1e6) // len(train) + 1):
                f.write(train)
        size = os.path.getsize(path)
        base_path = os.path.join(d, "baseline.txt")
        with open(path, "rb") as f, open(base_path, "wb") as g:
            g.write(f.read(min(size, int(a.baseline_mb * 1e6))))
        base_size = os.path.getsize(base_path)
        range_bytes = int(a.range_mb * (1 << 20))
        figures = {}
        for case in a.cases.split(","):
            figures[case] = run_case(base_path if case == "one pass" else path, tok, case,
                                     1 << 50 if case == "one pass" else range_bytes)
            f = figures[case]
            print(f"{case:<30} {f['bytes'] / 1e6:7.1f} MB {f['tokens_per_s'] / 1e3:8.0f}k tokens/s  {f['mb_per_s']:6.2f} MB/s  "
                  f"peak RSS {f['peak_rss_mb']:7.0f} MB  ({f['ranges']} ranges)", flush=True)
        base = figures.get("one pass")
        if base:
            for case, f in figures.items():
                f["speed_vs_one_pass"] = f["tokens_per_s"] / base["tokens_per_s"]
                f["peak_rss_vs_one_pass"] = f["peak_rss_mb"] / base["peak_rss_mb"]
                print(f"{case:<30} speed x{f['speed_vs_one_pass']:.2f}, peak RSS x{f['peak_rss_vs_one_pass']:.2f} "
                      "of one pass")
    path, _ = write_result("tokenize", "cpu", {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, load,
                           {"file_bytes": size, "baseline_bytes": base_size, "range_bytes": range_bytes,
                            "chunk_bytes": cr.CHUNK_BYTES,
                            "margin_bytes": cr.MARGIN_BYTES, "mode": "stream", "tokenizer": tok}, figures,
                           time.perf_counter() - t0, a.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

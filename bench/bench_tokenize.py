#!/usr/bin/env python
"""Tokenization of one large text file: one pass (the old `tokenize_file`) against ranges
(builder/corpus_ranges.py), with the real GPT-2 tokenizer of ../shared. Each case runs as a fresh process
(as a Ray task would), on one core; its tokens/s and peak RSS (VmHWM, common.peak_rss_mb) are reported.

    python bench/bench_tokenize.py --mb 200          # the text: WikiText-2's train split repeated
    python bench/bench_tokenize.py --mb 2000 --mode document --cases "range task"
    python bench/bench_tokenize.py --mb 400 --cases "knnlm build"

- one pass: the whole text decoded and tokenized at once (tokenize_file, what a build task did with a file of
  one range until 2026-12-02) on the first --baseline-mb of the file (its memory grows ~160 bytes per byte of
  text: a whole 200 MB file would need ~30 GB);
- range task: one range of RANGE_BYTES (the middle one) tokenized as a build task does it (tokenize_part),
  its peak is what every task of a ranged build needs, whatever the file size;
- ranged, all ranges: the whole file in ranges one after the other in one process, joined (tokenize_input);
- knnlm build: `knnlm build --corpus <file> --model <the shared model> --mode <mode>` as a user runs it,
  watched through tokenization and planning: every process under it (the CLI's driver, Ray's own processes,
  the workers running the tokenize tasks) is sampled every 0.2 s (VmRSS, and VmHWM: its peak between
  samples); once the log has its line "N keys in M units" the build is interrupted (SIGINT; a rerun would
  resume it at the key stage). Reports each process's peak, whether all stayed under --limit-gb, and the
  tokens/s of the whole tokenization (from the log line "tokenizing ... on Ray workers" to the plan).
--mode stream generates big.txt (format text: cut at any line); --mode document big.tokens (format wikitext:
WikiText-2's " = Title = " lines start its articles, where ranges are cut). The ratios are against the one
pass measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from common import descendants, proc_status, proc_title, write_result  # noqa: E402

CHILD = r"""
import json, sys, tempfile, time
from builder import build_tokens
from common import peak_rss_mb
from builder import corpus_ranges as cr
path, tok, case, range_bytes, fmt, mode = sys.argv[1:4] + [int(sys.argv[4])] + sys.argv[5:7]
cr.RANGE_BYTES = range_bytes
t = time.perf_counter()
with tempfile.TemporaryDirectory() as out:
    if case == "range task":
        import os
        bounds, ranges = cr.chunk_grid(path, os.path.getsize(path), fmt, mode)
        k = len(ranges) // 2
        part = build_tokens.tokenize_part(0, k, path, fmt, mode, "text", tok, out, bounds, *ranges[k])
        n, nbytes, nranges = part["num_tokens"], part["end"] - part["start"], len(ranges)
    elif case == "one pass":         # the whole file decoded and tokenized at once (tokenize_file)
        from builder.storage import read_uri
        tf = build_tokens.tokenize_file(read_uri(path), path, fmt, mode, build_tokens._tokenizer(tok), "text")
        n, nbytes, nranges = len(tf.tokens), tf.meta()["bytes"], 1
    else:
        meta = build_tokens.tokenize_input(0, path, fmt, mode, "text", tok, out)
        n, nbytes, nranges = meta["num_tokens"], meta["bytes"], meta["ranges"]
s = time.perf_counter() - t
print(json.dumps({"tokens": n, "bytes": nbytes, "ranges": nranges, "seconds": s,
                  "peak_rss_mb": peak_rss_mb()}))
"""


def run_case(path: str, tok: str, case: str, range_bytes: int, fmt: str, mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join((str(REPO), str(HERE))), TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-c", CHILD, path, tok, case, str(range_bytes), fmt, mode], env=env,
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"{case} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


PLANNED = re.compile(r"([\d,]+) keys in ([\d,]+) units")


SYSTEM_ACTORS = ("ray::Dashboard", "ray::RuntimeEnv")


def role(is_driver: bool, titles: list[str]) -> str:
    """driver, ray worker (a process that ran tasks or actors: ray::tokenize_part, ray::KeyWorkerImpl, ...), ray
    system (GCS, raylet, dashboard, agents) or other; from every title the process had (a worker's first one is
    its command line, before Ray renames it)."""
    if is_driver:
        return "driver"
    if any(t.startswith("ray::") and not t.startswith(SYSTEM_ACTORS) for t in titles):
        return "ray worker"
    return "ray system" if any("ray" in t or "gcs_server" in t for t in titles) else "other"


def knnlm_build(path: str, model: str, mode: str, work: str, interval: float, limit_mb: float) -> dict:
    """`knnlm build` of `path` through tokenization and planning, every process under it watched."""
    out, log_path = os.path.join(work, "ds"), os.path.join(work, "build.log")
    exe = shutil.which("knnlm", path=os.path.dirname(sys.executable)) or shutil.which("knnlm")
    cmd = [exe, "build", "--corpus", path, "--model", model, "--out", out, "--mode", mode, "--no-progress"]
    env = dict(os.environ, RAY_DEDUP_LOGS="1")
    procs: dict[int, dict] = {}                                  # pid -> role, titles, peak_mb

    def sample(pids: list[int]) -> None:
        for pid in pids:
            st, title = proc_status(pid), proc_title(pid)
            if not st:
                continue
            rec = procs.setdefault(pid, {"role": "", "titles": [], "peak_mb": 0.0})
            name = title.split(" ")[0] if title.startswith("ray::") else title[:80]
            if name and name not in rec["titles"] and not name.startswith("ray::IDLE"):
                rec["titles"].append(name)
            rec["peak_mb"] = max(rec["peak_mb"], st["VmRSS"], st["VmHWM"])

    t0 = time.perf_counter()
    with open(log_path, "w") as logf:
        p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    marks: dict[str, float] = {}
    try:
        while True:
            sample([p.pid] + descendants(p.pid))
            text = Path(log_path).read_text(errors="replace")
            if "tokenize_start" not in marks and re.search(r"tokenizing \d+ input files", text):
                marks["tokenize_start"] = time.perf_counter() - t0
            m = PLANNED.search(text)
            if m:
                marks["planned"] = time.perf_counter() - t0
                sample([p.pid] + descendants(p.pid))
                break
            if p.poll() is not None:
                raise SystemExit(f"knnlm build exited ({p.returncode}) before planning:\n{text[-3000:]}")
            time.sleep(interval)
    finally:
        everyone = [p.pid] + descendants(p.pid)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGINT)                   # as a user's Ctrl-C: Ray shuts down with it
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for pid in everyone:                                 # Ray's processes outlive a killed driver
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    meta = json.loads(Path(out, "tokens", "000000.json").read_text())
    seconds = marks["planned"] - marks.get("tokenize_start", 0.0)
    for pid, rec in procs.items():
        rec["role"] = role(pid == p.pid, rec["titles"])
    rows = sorted(({"pid": pid, **rec} for pid, rec in procs.items()), key=lambda r: -r["peak_mb"])
    roles = {}
    for r in rows:
        d = roles.setdefault(r["role"], {"processes": 0, "peak_mb_max": 0.0})
        d["processes"] += 1
        d["peak_mb_max"] = max(d["peak_mb_max"], r["peak_mb"])
    return {"tokens": meta["num_tokens"], "bytes": os.path.getsize(path), "ranges": meta.get("ranges", 1),
            "seconds": seconds, "seconds_to_plan": marks["planned"], "log_line": m.group(0),
            "peak_rss_mb": rows[0]["peak_mb"], "largest_process": rows[0], "roles": roles, "processes": rows,
            "limit_mb": limit_mb, "every_process_below_limit": all(r["peak_mb"] < limit_mb for r in rows)}


def main(argv=None) -> int:
    from builder import corpus_ranges as cr
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=200, help="size of the generated text file (MB)")
    ap.add_argument("--range-mb", type=float, default=cr.RANGE_BYTES / (1 << 20))
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--cases", default="one pass,range task,all ranges in one process")
    ap.add_argument("--baseline-mb", type=float, default=20,
                    help="the one pass runs on the first MB of the file only: it needs ~160 bytes of memory per byte")
    ap.add_argument("--mode", choices=("stream", "document"), default="stream")
    ap.add_argument("--limit-gb", type=float, default=1.5, help="knnlm build: the bound every process must stay under")
    ap.add_argument("--workdir", default=None, help="where the generated file goes (default: a temporary directory)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    fmt, name = ("text", "big.txt") if a.mode == "stream" else ("wikitext", "big.tokens")
    tok = os.path.join(a.shared, "models", "gpt2-wikitext2-small")
    train = Path(a.shared, "data", "wikitext-2-splits", "train.txt").read_bytes()
    load, t0 = os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory(dir=a.workdir) as d:
        path = os.path.join(d, name)
        with open(path, "wb") as f:
            for _ in range(int(a.mb * 1e6) // len(train) + 1):
                f.write(train)
        size = os.path.getsize(path)
        base_path = os.path.join(d, "baseline" + os.path.splitext(name)[1])
        with open(path, "rb") as f, open(base_path, "wb") as g:
            g.write(f.read(min(size, int(a.baseline_mb * 1e6))))
        base_size = os.path.getsize(base_path)
        range_bytes = int(a.range_mb * (1 << 20))
        figures = {}
        for case in a.cases.split(","):
            if case == "knnlm build":
                work = tempfile.mkdtemp(dir=d)
                figures[case] = knnlm_build(path, tok, a.mode, work, 0.2, a.limit_gb * 1e9 / (1 << 20))
                shutil.rmtree(work, ignore_errors=True)
            else:
                figures[case] = run_case(base_path if case == "one pass" else path, tok, case, range_bytes, fmt,
                                         a.mode)
            f = figures[case]
            f["tokens_per_s"] = f["tokens"] / f["seconds"]
            f["mb_per_s"] = f["bytes"] / f["seconds"] / 1e6
            print(f"{case:<30} {f['bytes'] / 1e6:7.1f} MB {f['tokens_per_s'] / 1e3:8.0f}k tokens/s  {f['mb_per_s']:6.2f} MB/s  "
                  f"peak RSS {f['peak_rss_mb']:7.0f} MB  ({f['ranges']} ranges)", flush=True)
            if case == "knnlm build":
                for r in f["processes"]:
                    named = [t for t in r["titles"] if t.startswith("ray::")] or r["titles"]
                    print(f"    {r['role']:<11} pid {r['pid']:>7}  peak {r['peak_mb']:7.0f} MB  {' '.join(named)[:90]}")
                print(f"    {f['log_line']!r} after {f['seconds_to_plan']:.0f}s; every process below "
                      f"{a.limit_gb} GB: {f['every_process_below_limit']}", flush=True)
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
                            "margin_bytes": cr.MARGIN_BYTES, "mode": a.mode, "format": fmt, "tokenizer": tok}, figures,
                           time.perf_counter() - t0, a.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

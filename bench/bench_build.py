#!/usr/bin/env python
"""Benchmark of the datastore build (`knnlm build`): how close it runs to the bare forward pass.

Every throughput is printed as a ratio against a baseline measured in the same run, because
the machines this runs on are shared and noisy; absolute figures go to the JSON result file
(bench/results/build-<device>-<YYYY-MM-DD>.json) with the machine, the parameters and the load
average before and after.

Figures (keys/s = keys written, i.e. corpus targets, per second):

1. Bare forward (the baseline). The corpus is tokenized and planned exactly as the build does
   (`builder.corpus.tokenize_file`, `builder.unit.plan_units`, `unit_jobs`) and its windows are
   batched exactly as `builder.unit.compute_unit` + `builder.keys.compute_keys` batch them
   (longest-first within chunks of batch_size*16 windows, right-padded with id 0). Only
   `encoder(input_ids)` of a `builder.keys.KeyEncoder` is timed, over those batches, with the
   torch thread count of the build's key worker (all cores on CPU, 1 on CUDA). The windows'
   overlap (each window re-reads `min_context` tokens) is therefore part of the baseline, not
   of the "overhead". The full LM forward (`model(input_ids)`, LM head included) runs on the
   same batches, interleaved with the bare one, to give the speed-up of stopping at the key
   layer.
2. Core path without Ray: `builder.unit.run_unit` on every unit (tokens -> `compute_unit` ->
   `encode_shard` on the background writer thread -> shard bytes) with an in-memory storage,
   in this process. This is what runs inside a key worker, minus the disk; it needs torch but
   not Ray, so a GPU machine without Ray can run it (`--core-only`).
3. End to end: `knnlm build ... --no-progress` as a subprocess (a fresh process starting its
   own embedded Ray) on a fresh temporary --out, wall clock from launch to exit; and
   `builder.build.build(BuildConfig(...))` in this process with Ray already initialised, so
   that Ray's start-up is separated from the steady-state overhead (the in-process figure still
   includes starting the key-worker actor and loading the model there).
4. Shard writer: `builder.key_shards.encode_shard` (Parquet, fixed_size_binary key column, sha256)
   on a 65536 x dim float16 key block (dim of the model, and 1024), against a Parquet write of
   the same rows with a fixed_size_list<halffloat> key column and an Arrow IPC write of the
   same table; MB/s of key bytes, ratios against the Arrow IPC write.

Run `python bench/bench_build.py --help` for the options; bench/README.md has examples.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import logging
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # run from a checkout where the package is not installed (e.g. a GPU box)
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_MODEL = REPO.parent / "shared" / "models" / "gpt2-wikitext2-small"
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "wikitext-2-splits" / "train.txt"
SHARD_BLOCK_ROWS = 65536
# default --max-tokens per (shape, device): ~3 minutes in all on a 2-core CPU machine; 0 = whole corpus
DEFAULT_MAX_TOKENS = {("model", "cpu"): 40000, ("gpt2-small", "cpu"): 6000,
                      ("model", "cuda"): 0, ("gpt2-small", "cuda"): 0}

log = logging.getLogger("bench")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# arguments


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark the kNN-LM datastore build against the bare key-layer forward pass "
                    "(see the module docstring and bench/README.md for what each figure means).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="HF causal LM directory (with --shape gpt2-small only its tokenizer is used)")
    p.add_argument("--shape", choices=("model", "gpt2-small"), default="model",
                   help="model: benchmark --model itself; gpt2-small: a seeded random GPT-2-small-shaped model "
                        "(12 layers, 768 dims, 12 heads, 1024 positions, 50257-row LM head) saved to a temp dir "
                        "with --model's tokenizer (nothing is downloaded)")
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="corpus file (read as format wikitext, mode stream)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="truncate the corpus at the first line boundary at or after N tokens (0: whole corpus; "
                        f"default: {DEFAULT_MAX_TOKENS[('model', 'cpu')]} (model) / "
                        f"{DEFAULT_MAX_TOKENS[('gpt2-small', 'cpu')]} (gpt2-small) on CPU, whole corpus on CUDA)")
    p.add_argument("--window", type=int, default=None,
                   help="tokens per window (default: the model's positions capped at 1024: 512 for the shared "
                        "model, 1024 for gpt2-small)")
    p.add_argument("--min-context", type=int, default=None, help="context re-read per window (default: window/2)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward (default: the build's, 8)")
    p.add_argument("--unit-tokens", type=int, default=None, help="keys per work unit (default: the build's)")
    p.add_argument("--key-layer", choices=("ffn_input", "final_hidden"), default="ffn_input")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--compute-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="auto: as the build (float32 on CPU, bfloat16/float16 on CUDA)")
    p.add_argument("--core-only", action="store_true",
                   help="skip the parts that need Ray (end to end, in-process build): for a GPU machine without Ray")
    p.add_argument("--skip-writer", action="store_true", help="skip the shard-writer figures")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each short timing (bare/full forward, core path, shard writes); the best is "
                        "reported, all are in the JSON")
    p.add_argument("--repeat-budget", type=float, default=100.0,
                   help="stop repeating the forward/core timings once they have taken this many seconds "
                        "(at least one repeat always runs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random gpt2-small weights and writer data")
    p.add_argument("--result", default=None,
                   help="JSON result file, or a directory to write build-<device>-<YYYY-MM-DD>.json into "
                        "(default: bench/results/)")
    a = p.parse_args(argv)
    if a.repeats < 1:
        p.error("--repeats must be at least 1")
    if a.max_tokens is None:
        a.max_tokens = DEFAULT_MAX_TOKENS[(a.shape, a.device)]
    return a


# ---------------------------------------------------------------------------------------------
# machine


def machine_info(device: str) -> dict:
    import torch
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip())
    except Exception:
        nproc = len(os.sched_getaffinity(0))
    info = {"hostname": socket.gethostname(), "nproc": nproc, "cpu_count": os.cpu_count(), "cpu_model": cpu_model,
            "python": platform.python_version(), "torch": torch.__version__, "gpu": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    import importlib.metadata as md
    for pkg in ("transformers", "tokenizers", "pyarrow", "ray", "numpy"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    return info


# ---------------------------------------------------------------------------------------------
# model and corpus


def make_gpt2_small(tokenizer_src: str, out_dir: str, seed: int) -> str:
    """A GPT-2-small-shaped model with seeded random weights and the shared model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    tok = AutoTokenizer.from_pretrained(tokenizer_src)
    cfg = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def truncate_corpus(data: bytes, tok, max_tokens: int) -> bytes:
    """The corpus cut at the first line boundary where its lines hold >= max_tokens tokens."""
    lines = data.splitlines(keepends=True)  # bytes: splits at \n, \r\n, \r only
    counts = tok([ln.decode("utf-8", "replace") for ln in lines], add_special_tokens=False,
                 verbose=False)["input_ids"]
    total = 0
    for i, ids in enumerate(counts):
        total += len(ids)
        if total >= max_tokens:
            return b"".join(lines[:i + 1])
    return data


def plan_batches(units, tokens, window: int, min_context: int, batch_size: int, pad_id: int = 0):
    """The forward batches of the build, in its order: list of (ids (B, T) int64, keys in the batch).

    Mirrors builder.unit.compute_unit (chunks of batch_size*16 windows of unit_jobs) and
    builder.keys.compute_keys (stable longest-first sort, right padding with pad_id)."""
    import numpy as np

    from builder.unit import unit_jobs
    batches = []
    stats = {"windows": 0, "forward_tokens": 0, "padded_tokens": 0}
    for u in units:
        jobs = unit_jobs(u, window, min_context)
        chunk = max(1, batch_size) * 16
        for c in range(0, len(jobs), chunk):
            wins = []
            for (si, s, a, b) in jobs[c:c + chunk]:
                seg = u.segments[si]
                wins.append((tokens[seg.offset + s:seg.offset + b], b - a))
            order = sorted(range(len(wins)), key=lambda i: -len(wins[i][0]))
            for b0 in range(0, len(order), batch_size):
                idx = order[b0:b0 + batch_size]
                T = len(wins[idx[0]][0])
                ids = np.full((len(idx), T), pad_id, dtype=np.int64)
                for r, i in enumerate(idx):
                    ids[r, :len(wins[i][0])] = wins[i][0]
                batches.append((ids, sum(wins[i][1] for i in idx)))
                stats["windows"] += len(idx)
                stats["forward_tokens"] += sum(len(wins[i][0]) for i in idx)
                stats["padded_tokens"] += ids.size
    return batches, stats


# ---------------------------------------------------------------------------------------------
# timings


def sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def time_forward(fn, batches_dev, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    for ids in batches_dev:
        fn(ids)
    sync(device)
    return time.perf_counter() - t


class MemStorage:
    """Just what builder.unit.run_unit touches of a Storage, in memory (shards are kept as bytes)."""

    def __init__(self, files: dict[str, bytes]):
        self.uri = "mem://bench"
        self.files = dict(files)

    def url(self, rel: str) -> str:
        return f"{self.uri}/{rel}"

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        return self.files[rel][start:end]

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.files[rel] = bytes(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))


def best(xs: list[float]) -> float:
    return min(xs)


def run_core(units, tokens_bytes: bytes, encoder, params_for, device: str) -> tuple[float, int, int]:
    """run_unit over every unit with an in-memory storage: (seconds, rows, shard bytes)."""
    from builder.layout import tokens_path
    from builder.unit import UnitParams, run_unit
    st = MemStorage({tokens_path(0): tokens_bytes})
    sync(device)
    t = time.perf_counter()
    rows = 0
    for u in units:
        rec = run_unit(u, st, encoder, UnitParams(**params_for(u)))
        rows += rec["num_rows"]
    sync(device)
    dt = time.perf_counter() - t
    nbytes = sum(len(v) for k, v in st.files.items() if k.startswith("shards/"))
    return dt, rows, nbytes


SUMMARY_RE = re.compile(r"built ([\d,]+) keys in (\d+) shards in ([\d.]+)s \(([\d,]+) keys/s")


def knnlm_command() -> list[str]:
    exe = Path(sys.executable).parent / "knnlm"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("knnlm")
    return [found] if found else [sys.executable, "-m", "cluster.cli"]


def build_args(a, corpus: str, model: str, out: str, window: int, min_context: int) -> list[str]:
    return ["build", "--corpus", corpus, "--model", model, "--out", out, "--format", "wikitext", "--mode", "stream",
            "--window", str(window), "--min-context", str(min_context), "--batch-size", str(a.batch_size),
            "--unit-tokens", str(a.unit_tokens), "--key-layer", a.key_layer, "--device", a.device,
            "--compute-dtype", a.compute_dtype, "--no-progress"]


# ---------------------------------------------------------------------------------------------
# shard writer


def bench_writer(dims: list[int], repeats: int, seed: int, row_group_rows: int, vocab: int) -> dict:
    import hashlib

    import numpy as np
    import pyarrow as pa
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    from builder.key_shards import encode_shard, to_table

    def timed(fn, budget_s: float = 20.0) -> list[float]:
        ts: list[float] = []
        while len(ts) < repeats and sum(ts) < budget_s:
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return ts

    out = {}
    rng = np.random.default_rng(seed)
    n = SHARD_BLOCK_ROWS
    for dim in dims:
        keys = rng.standard_normal((n, dim), dtype=np.float32).astype(np.float16)
        values = rng.integers(0, vocab, n, dtype=np.int32)
        doc = np.zeros(n, np.int64)
        pos = np.arange(n, dtype=np.int64)
        key_mb = keys.nbytes / 1e6
        table = to_table(keys, values, doc, pos)
        fsl = pa.FixedSizeListArray.from_arrays(pa.array(keys.reshape(-1)), dim)
        table_fsl = pa.Table.from_arrays([fsl, table.column("value"), table.column("doc"), table.column("pos")],
                                         names=["key", "value", "doc", "pos"])
        small = {"value": "zstd", "doc": "zstd", "pos": "zstd"}
        sizes = {}

        def w_encode_shard():
            data, _ = encode_shard(keys, values, doc, pos, row_group_rows=row_group_rows)
            sizes["encode_shard"] = len(data)

        def w_parquet_fsl():
            sink = io.BytesIO()
            pq.write_table(table_fsl, sink, row_group_size=row_group_rows, compression={"key": "none", **small},
                           use_dictionary=["value", "doc", "pos"], write_statistics=["value", "doc", "pos"])
            sizes["parquet_fsl_halffloat"] = len(sink.getvalue())

        def w_ipc():
            sink = pa.BufferOutputStream()
            with ipc.new_file(sink, table.schema) as w:
                w.write_table(table)
            sizes["arrow_ipc"] = sink.getvalue().size

        def w_sha256():
            hashlib.sha256(memoryview(keys).cast("B")).hexdigest()  # no copy, as checksum() hashes bytes

        res = {}
        for name, fn in (("arrow_ipc", w_ipc), ("encode_shard", w_encode_shard),
                         ("parquet_fsl_halffloat", w_parquet_fsl), ("sha256_of_keys", w_sha256)):
            ts = timed(fn)
            res[name] = {"seconds": ts, "best_s": best(ts), "mb_per_s": key_mb / best(ts), "bytes": sizes.get(name)}
        base = res["arrow_ipc"]["mb_per_s"]
        for r in res.values():
            r["ratio_vs_arrow_ipc"] = r["mb_per_s"] / base
        out[str(dim)] = {"rows": n, "dim": dim, "key_mb": key_mb, "methods": res}
        say(f"shard writer dim {dim}: " + ", ".join(f"{k} {v['mb_per_s']:.0f} MB/s" for k, v in res.items()))
    return out


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    a = parse_args(argv)
    t_all = time.perf_counter()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from builder.config import BuildConfig
    from builder.corpus import count_targets, tokenize_file
    from builder.keys import load_encoder, resolve_dtype
    from builder.unit import plan_units

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    defaults = BuildConfig.__dataclass_fields__
    if a.batch_size is None:
        a.batch_size = defaults["batch_size"].default
    if a.unit_tokens is None:
        a.unit_tokens = defaults["unit_tokens"].default
    shard_rows = defaults["shard_rows"].default
    row_group_rows = defaults["row_group_rows"].default
    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench_build: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2

    machine = machine_info(a.device)
    load_before = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="knnlm-bench-")
    try:
        # ---- model ----------------------------------------------------------------------------
        model_path = os.path.abspath(a.model)
        if a.shape == "gpt2-small":
            say("building a random GPT-2-small-shaped model (seeded) ...")
            model_path = make_gpt2_small(model_path, os.path.join(tmp, "gpt2-small"), a.seed)
        cfg = transformers.AutoConfig.from_pretrained(model_path)
        max_pos = (getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
                   or getattr(cfg, "n_ctx", None))
        window, min_context = BuildConfig(corpus=["x"], model="x", out="x", window=a.window,
                                          min_context=a.min_context).resolve_window(max_pos)
        dim = int(cfg.hidden_size)

        # ---- corpus ---------------------------------------------------------------------------
        tok = AutoTokenizer.from_pretrained(model_path)
        tok.model_max_length = 1 << 60  # as the build's tokenize stage
        data = Path(a.corpus).read_bytes()
        if a.max_tokens:
            data = truncate_corpus(data, tok, a.max_tokens)
        corpus_path = os.path.join(tmp, "corpus.txt")
        Path(corpus_path).write_bytes(data)
        tf = tokenize_file(data, corpus_path, "wikitext", "stream", tok)
        units = plan_units([(tf.seq_lengths, tf.seq_records)], window, min_context, a.unit_tokens)
        n_keys = count_targets(tf.seq_lengths)
        assert n_keys == sum(u.num_targets for u in units)
        batches, bstats = plan_batches(units, tf.tokens, window, min_context, a.batch_size)
        assert sum(k for _, k in batches) == n_keys
        say(f"corpus: {len(data):,} bytes, {tf.tokens.size:,} tokens, {n_keys:,} keys, {len(units)} units, "
            f"{len(batches)} batches; window {window}, min_context {min_context}, batch {a.batch_size}")

        params = {"shape": a.shape, "model": os.path.abspath(a.model), "model_dim": dim,
                  "model_layers": int(getattr(cfg, "num_hidden_layers", 0)), "vocab_size": int(cfg.vocab_size),
                  "corpus": os.path.abspath(a.corpus), "format": "wikitext", "mode": "stream",
                  "max_tokens": a.max_tokens, "corpus_bytes": len(data), "tokens": int(tf.tokens.size),
                  "keys": n_keys, "units": len(units), "batches": len(batches), **bstats,
                  "window": window, "min_context": min_context, "batch_size": a.batch_size,
                  "unit_tokens": a.unit_tokens, "shard_rows": shard_rows, "row_group_rows": row_group_rows,
                  "key_layer": a.key_layer, "device": a.device, "repeats": a.repeats, "seed": a.seed,
                  "core_only": a.core_only}

        # ---- 1+2: bare forward, full forward, core path (interleaved per repeat) ------------------
        # the build's key worker: all CPUs of the (local) Ray cluster on CPU, one thread on CUDA
        threads = 1 if a.device == "cuda" else max(1, os.cpu_count() or 1)
        torch.set_num_threads(threads)
        dtype = resolve_dtype(a.device, a.compute_dtype)
        compute_dtype = str(dtype).replace("torch.", "")
        params.update(threads=threads, compute_dtype=compute_dtype)
        encoder = load_encoder(model_path, a.key_layer, a.device, compute_dtype)
        full = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(a.device).eval()
        dev_batches = [torch.from_numpy(ids).to(a.device) for ids, _ in batches]

        @torch.inference_mode()
        def full_fwd(ids):
            return full(input_ids=ids, use_cache=False).logits

        def bare_fwd(ids):
            return encoder(ids)

        # warm-up (allocator, kernels, lazy init) on the longest batch
        bare_fwd(dev_batches[0])
        full_fwd(dev_batches[0])
        sync(a.device)

        def params_for(u):
            return dict(window=window, min_context=min_context, mode="stream", batch_size=a.batch_size,
                        shard_rows=shard_rows, row_group_rows=row_group_rows, file_uri=corpus_path,
                        doc_base=u.file, pad_id=0,
                        writer_threads=4 if a.device == "cuda" else 1)  # as builder/build.py

        tokens_bytes = tf.tokens.astype("<i4").tobytes()
        t_bare, t_full, t_core = [], [], []
        core_rows = core_bytes = 0
        t_rep = time.perf_counter()
        for r in range(a.repeats):
            if r and time.perf_counter() - t_rep > a.repeat_budget:
                say(f"--repeat-budget {a.repeat_budget:.0f}s used up after {r} repeats")
                break
            t_bare.append(time_forward(bare_fwd, dev_batches, a.device))
            t_full.append(time_forward(full_fwd, dev_batches, a.device))
            dt, core_rows, core_bytes = run_core(units, tokens_bytes, encoder, params_for, a.device)
            t_core.append(dt)
            say(f"repeat {r + 1}/{a.repeats}: bare forward {n_keys / t_bare[-1]:,.0f} keys/s, "
                f"full forward {n_keys / t_full[-1]:,.0f} keys/s, core path {n_keys / t_core[-1]:,.0f} keys/s")
        assert core_rows == n_keys, (core_rows, n_keys)
        params["repeats_done"] = len(t_bare)
        del dev_batches, full
        bare_kps = n_keys / best(t_bare)
        figures = {
            "bare_forward": {"seconds": t_bare, "best_s": best(t_bare), "keys_per_s": bare_kps,
                             "median_s": statistics.median(t_bare),
                             "forward_tokens_per_s": bstats["forward_tokens"] / best(t_bare)},
            "full_forward": {"seconds": t_full, "best_s": best(t_full), "keys_per_s": n_keys / best(t_full),
                             "median_s": statistics.median(t_full)},
            "core_path": {"seconds": t_core, "best_s": best(t_core), "keys_per_s": n_keys / best(t_core),
                          "median_s": statistics.median(t_core), "shard_bytes": core_bytes},
        }
        figures["full_forward"]["ratio_vs_bare"] = figures["full_forward"]["keys_per_s"] / bare_kps
        figures["key_layer_speedup_vs_full"] = best(t_full) / best(t_bare)
        figures["core_path"]["ratio_vs_bare"] = figures["core_path"]["keys_per_s"] / bare_kps

        # ---- 3: end to end with Ray -----------------------------------------------------------
        if not a.core_only:
            out1 = os.path.join(tmp, "out-subprocess")
            cmd = knnlm_command() + build_args(a, corpus_path, model_path, out1, window, min_context)
            say("end to end: " + " ".join(cmd))
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t
            if proc.returncode != 0:
                print(proc.stdout + proc.stderr, file=sys.stderr)
                raise SystemExit(f"bench_build: knnlm build failed (exit {proc.returncode})")
            m = SUMMARY_RE.search(proc.stdout)
            core_s = best(t_core)  # the keys' own share of a build, measured above
            e2e = {"command": cmd, "wall_s": wall, "keys_per_s": n_keys / wall, "ratio_vs_bare": n_keys / wall / bare_kps,
                   "fixed_s_estimate": wall - core_s,
                   "summary_line": proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""}
            if m:
                keys_built = int(m.group(1).replace(",", ""))
                assert keys_built == n_keys, (keys_built, n_keys)
                e2e.update(summary_build_s=float(m.group(3)), summary_keys_per_s=int(m.group(4).replace(",", "")),
                           process_overhead_s=wall - float(m.group(3)))
            figures["end_to_end_subprocess"] = e2e
            say(f"end to end: {wall:.1f}s wall, {n_keys / wall:,.0f} keys/s ({e2e['summary_line']})")
            shutil.rmtree(out1, ignore_errors=True)

            import ray

            from builder.build import build
            from builder.runtime import cluster_resources
            t = time.perf_counter()
            ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
            ray_init_s = time.perf_counter() - t
            try:
                cpus, gpus = cluster_resources()
                out2 = os.path.join(tmp, "out-inprocess")
                bcfg = BuildConfig(corpus=[corpus_path], model=model_path, out=out2, key_layer=a.key_layer,
                                   window=window, min_context=min_context, mode="stream", format="wikitext",
                                   unit_tokens=a.unit_tokens, batch_size=a.batch_size, device=a.device,
                                   compute_dtype=a.compute_dtype, progress=False)
                t = time.perf_counter()
                res = build(bcfg)
                build_s = time.perf_counter() - t
            finally:
                ray.shutdown()
            assert res.manifest.num_keys == n_keys
            figures["in_process_build"] = {
                "ray_init_s": ray_init_s, "ray_cpus": cpus, "ray_gpus": gpus, "build_s": build_s,
                "keys_per_s": n_keys / build_s, "ratio_vs_bare": n_keys / build_s / bare_kps,
                "fixed_s_estimate": build_s - core_s,
                "result_seconds": res.seconds, "summary_line": res.summary()}
            say(f"in-process build (Ray up in {ray_init_s:.1f}s): {build_s:.1f}s, {n_keys / build_s:,.0f} keys/s")
            shutil.rmtree(out2, ignore_errors=True)

        # ---- 4: shard writer ------------------------------------------------------------------
        if not a.skip_writer:
            dims = sorted({dim, 1024})
            figures["shard_writer"] = bench_writer(dims, a.repeats, a.seed, row_group_rows, int(cfg.vocab_size))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # ---- report -----------------------------------------------------------------------------
    total_s = time.perf_counter() - t_all
    result = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine,
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "parameters": params,
              "figures": figures, "bench_seconds": total_s, "argv": sys.argv}
    name = f"build-{a.device}-{datetime.date.today().isoformat()}.json"
    result_path = HERE / "results" / name
    if a.result:
        result_path = Path(a.result) / name if Path(a.result).is_dir() else Path(a.result)
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=1) + "\n")

    print()
    print(f"{machine['hostname']}: {machine['nproc']} CPUs ({machine['cpu_model']}), torch {machine['torch']}"
          + (f", {machine['gpu']}" if machine["gpu"] else "")
          + f"; load average {load_before[0]:.2f} before, {result['load_average_after'][0]:.2f} after")
    print(f"{a.shape} (dim {dim}, {params['model_layers']} layers) on {a.device} ({compute_dtype}, {threads} threads): "
          f"{n_keys:,} keys, window {window}/{min_context}, batch {a.batch_size}, "
          f"{bstats['forward_tokens'] / n_keys:.2f} forward tokens per key; best of {len(t_bare)}")
    rows = [("bare forward (baseline)", bare_kps, 1.0, f"{figures['bare_forward']['forward_tokens_per_s']:,.0f} fwd tok/s"),
            ("full LM forward", figures["full_forward"]["keys_per_s"], figures["full_forward"]["ratio_vs_bare"],
             f"key layer is {figures['key_layer_speedup_vs_full']:.2f}x faster"),
            ("core path, no Ray", figures["core_path"]["keys_per_s"], figures["core_path"]["ratio_vs_bare"],
             "run_unit, in-memory storage")]
    if "end_to_end_subprocess" in figures:
        e = figures["end_to_end_subprocess"]
        note = f"{e['wall_s']:.1f}s wall, ~{e['fixed_s_estimate']:.0f}s beyond the core path"
        if "summary_build_s" in e:
            note += f"; summary: {e['summary_build_s']:.1f}s, {e['summary_keys_per_s']:,} keys/s"
        rows.append(("end to end `knnlm build`", e["keys_per_s"], e["ratio_vs_bare"], note))
        b = figures["in_process_build"]
        rows.append(("in-process build(), Ray up", b["keys_per_s"], b["ratio_vs_bare"],
                     f"{b['build_s']:.1f}s, ~{b['fixed_s_estimate']:.0f}s beyond the core path; "
                     f"ray.init {b['ray_init_s']:.1f}s"))
    print(f"{'figure':<30} {'keys/s':>10} {'vs bare':>8}  note")
    for name, kps, ratio, note in rows:
        print(f"{name:<30} {kps:>10,.0f} {ratio:>8.3f}  {note}")
    if "shard_writer" in figures:
        print(f"\nshard writer, {SHARD_BLOCK_ROWS} rows, MB/s of float16 key bytes (ratio vs Arrow IPC write)")
        names = list(next(iter(figures["shard_writer"].values()))["methods"])
        print(f"{'dim':>6} " + " ".join(f"{n:>24}" for n in names))
        for d, w in figures["shard_writer"].items():
            print(f"{d:>6} " + " ".join(
                f"{w['methods'][n]['mb_per_s']:>13,.0f} ({w['methods'][n]['ratio_vs_arrow_ipc']:>6.3f}x)"
                for n in names))
    print(f"\nresult: {result_path} (bench took {total_s:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

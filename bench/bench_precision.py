#!/usr/bin/env python
"""Benchmark: how much precision do the keys lose in float16 and bfloat16, and what does it cost the kNN-LM?

The question (which `--compute-dtype auto` on a GPU, builder/keys.py default_compute_dtype): for each
compute dtype (float32, float16, bfloat16), on the shared small GPT-2 (../shared/models/
gpt2-wikitext2-small, 4 layers, 256 dims) and WikiText-2 (stream mode, window 512, min context 256,
key layer ffn_input, as the real datastore is built):

- key error: per key, ‖k_dtype − k_fp32‖ / ‖k_fp32‖ (mean, p99, max), of the compute dtype's raw keys
  and of the keys as stored (rounded to float16); `float32` is then the storage's own error;
- perplexity: the base LM (LM head in float32 on the dtype's hidden states, as `knnlm eval` does)
  and the kNN-LM with exact brute-force search (faiss IndexFlatL2, k=1024, the paper's λ=0.25 and
  T=1, retriever/knnlm.py) where the keys (stored float16) and the queries (rounded to float16, as
  the evaluation does) both come from that dtype.

Sizes (flags): the keys of the first --keys tokens of train.txt (default 100,000), the queries
of the first --queries tokens of valid.txt (default 10,000): 24 minutes at load average 7-13
on 2 shared cores (the float32 pass alone: ~4 minutes).

CPU: the model is loaded with dtype=torch.float16/bfloat16 (torch 2.13 runs it), but this CPU
(AVX2, no AVX512-BF16/FP16) runs half-precision GEMMs about 20x slower than float32. So, inside
`HalfGemmsInFp32`, every matrix product (addmm, mm, matmul, bmm, linear) of half-precision
operands is computed as a float32 GEMM of those (exactly converted) operands and rounded once to
the half dtype, which is what a GPU's half GEMM does (exact products, float32 accumulation, one
rounding); everything else (layer norms, GELU, attention, residual adds) runs natively in the
half dtype. The result records how far this is from the plain half-precision model on the first
window (`emulation_check`: only the summation order differs).

    python bench/bench_precision.py                          # 24 min on 2 busy cores
    python bench/bench_precision.py --keys 200000 --queries 20000
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_build import machine_info  # noqa: E402
from common import write_result  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from builder.corpus import tokenize_file  # noqa: E402
from builder.keys import KeyEncoder  # noqa: E402
from retriever.evaluate import plan_chunks, score_windows  # noqa: E402
from retriever.knnlm import PAPER_LAMBDA, PAPER_TEMPERATURE, interpolate, knn_log_probs, perplexity  # noqa: E402

SHARED = REPO.parent / "shared"
HALF = (torch.float16, torch.bfloat16)


class HalfGemmsInFp32(TorchFunctionMode):
    """Matrix products of half-precision tensors as float32 GEMMs rounded once to the half dtype."""
    OPS = {torch.addmm, torch.mm, torch.matmul, torch.bmm, torch.baddbmm, torch.nn.functional.linear,
           torch.Tensor.__matmul__, torch.Tensor.matmul}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.OPS:
            dt = next((a.dtype for a in args if isinstance(a, torch.Tensor)), None)
            if dt in HALF:
                up = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
                return func(*up, **kwargs).to(dt)
        return func(*args, **kwargs)


def tokens_of(path: Path, tok, n: int) -> np.ndarray:
    """The first n + 1 tokens of a WikiText file read as one stream (as `knnlm build --mode stream`)."""
    tf = tokenize_file(path.read_bytes(), str(path), "wikitext", "stream", tok)
    if len(tf.tokens) < n + 1:
        raise SystemExit(f"{path}: {len(tf.tokens)} tokens, fewer than {n + 1}")
    return np.asarray(tf.tokens[:n + 1], dtype=np.int64)


def raw_keys(windows: list, enc: KeyEncoder, batch_size: int) -> np.ndarray:
    """(m, d) float32 copies of the compute dtype's keys (not rounded to float16) of the windows' targets,
    in order, from the build's forward stopped at the key layer (one window per row, longest first)."""
    out = []
    for b in range(0, len(windows), batch_size):
        ws = windows[b:b + batch_size]
        T = max(len(t) for t, _, _ in ws)
        ids = torch.zeros((len(ws), T), dtype=torch.long)
        for r, (t, _, _) in enumerate(ws):
            ids[r, :len(t)] = torch.from_numpy(t)
        h = enc(ids)                                                    # (B, T, d) compute dtype
        out += [h[r, a - 1:b_ - 1].float().numpy() for r, (_, a, b_) in enumerate(ws)]
    return np.concatenate(out)


def rel_error(x: np.ndarray, ref: np.ndarray) -> dict:
    """Per row ‖x − ref‖ / ‖ref‖: mean, p99, max."""
    e = np.linalg.norm(x.astype(np.float64) - ref, axis=1) / np.linalg.norm(ref.astype(np.float64), axis=1)
    return {"mean": float(e.mean()), "p99": float(np.percentile(e, 99)), "max": float(e.max())}


def knn_ppl(keys16: np.ndarray, values: np.ndarray, q16: np.ndarray, lm: np.ndarray, tgt: np.ndarray,
            k: int) -> float:
    """kNN-LM perplexity with exact L2 search over all keys (faiss IndexFlatL2, float32 of the fp16 keys)."""
    index = faiss.IndexFlatL2(keys16.shape[1])
    index.add(keys16.astype(np.float32))
    dist, ids = index.search(q16.astype(np.float32), k)
    knn = knn_log_probs(dist, values[ids], tgt, PAPER_TEMPERATURE, "l2")
    mix = interpolate(lm, knn, PAPER_LAMBDA)
    return perplexity(float(mix.sum()), len(mix))


def emulation_check(model_path: str, dtype: torch.dtype, window: tuple, emulated: np.ndarray) -> dict:
    """Relative difference of the emulated keys of one window to the plain half-precision model's."""
    from transformers import AutoModelForCausalLM
    enc = KeyEncoder(AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype), "ffn_input")
    native = raw_keys([window], enc, 1)
    return rel_error(emulated[:len(native)], native)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "gpt2-wikitext2-small"))
    ap.add_argument("--splits", default=str(SHARED / "data" / "wikitext-2-splits"))
    ap.add_argument("--keys", type=int, default=100_000, help="datastore keys: the first tokens of train.txt")
    ap.add_argument("--queries", type=int, default=10_000, help="queries: the first tokens of valid.txt")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--min-context", type=int, default=256)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="result file or directory (default bench/results/)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if a.threads:
        torch.set_num_threads(a.threads)
        faiss.omp_set_num_threads(a.threads)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(a.model)
    tok.model_max_length = 1 << 60
    train = tokens_of(Path(a.splits) / "train.txt", tok, a.keys)
    valid = tokens_of(Path(a.splits) / "valid.txt", tok, a.queries)
    key_windows = [w for c in plan_chunks([train], a.window, a.min_context) for w in c.windows]
    query_windows = [w for c in plan_chunks([valid], a.window, a.min_context) for w in c.windows]
    values = train[1:].astype(np.int64)                                  # the next token of each key

    raw, figures = {}, {}
    for name in a.dtypes.split(","):
        dtype = getattr(torch, name)
        t0 = time.perf_counter()
        enc = KeyEncoder(AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype), "ffn_input")
        with HalfGemmsInFp32() if dtype in HALF else torch.inference_mode():
            raw[name] = raw_keys(key_windows, enc, a.batch_size)         # (keys, d) fp32 copies
            t1 = time.perf_counter()
            q16, lm, tgt = score_windows(query_windows, enc, a.batch_size)
        t2 = time.perf_counter()
        keys16 = raw[name].astype(np.float16)                            # as stored
        f = {"base_ppl": perplexity(float(lm.sum()), len(lm)),
             "knnlm_ppl": knn_ppl(keys16, values, q16, lm, tgt, a.k),
             "seconds": {"keys": round(t1 - t0, 1), "queries": round(t2 - t1, 1),
                         "search": round(time.perf_counter() - t2, 1)}}
        if dtype in HALF:
            f["emulation_check"] = emulation_check(a.model, dtype, key_windows[0], raw[name])
        figures[name] = f
        print(f"{name}: base ppl {f['base_ppl']:.4f}, kNN-LM ppl {f['knnlm_ppl']:.4f} {f['seconds']}", flush=True)
    ref = raw.get("float32")
    if ref is not None:
        for name in raw:
            figures[name]["key_rel_error"] = {"compute": rel_error(raw[name], ref),
                                              "stored_fp16": rel_error(raw[name].astype(np.float16), ref)}
            print(f"{name}: key error {figures[name]['key_rel_error']}")
        for name in raw:
            figures[name]["knnlm_ppl_rel_to_float32"] = figures[name]["knnlm_ppl"] / figures["float32"]["knnlm_ppl"] - 1
            figures[name]["base_ppl_rel_to_float32"] = figures[name]["base_ppl"] / figures["float32"]["base_ppl"] - 1
    params = {"model": a.model, "keys": a.keys, "queries": a.queries, "key_source": "train.txt first tokens",
              "query_source": "valid.txt first tokens", "mode": "stream", "window": a.window,
              "min_context": a.min_context, "key_layer": "ffn_input", "k": a.k, "lambda": PAPER_LAMBDA,
              "temperature": PAPER_TEMPERATURE, "index": "IndexFlatL2 (exact)", "batch_size": a.batch_size,
              "half_gemms": "float32 GEMM of half operands, rounded once (HalfGemmsInFp32)",
              "threads": torch.get_num_threads()}
    path, _ = write_result("precision", "cpu", machine_info("cpu"), load_before, params, figures,
                           round(time.perf_counter() - t_start, 1), a.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

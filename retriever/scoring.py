"""Scoring a chunk of evaluation windows, the pure cores of `knnlm eval` (retriever/evaluate.py): the
windows (`plan_chunks`), the LM's queries and log-probs (`score_windows`, the build's forward), the
model and dtype the queries must use, and `score_and_search`, the forward and the search of its
queries; `EvalWorkerImpl` is the worker around them (a Ray actor, or in the eval process)."""
from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from builder.corpus import plan_windows
from builder.errors import KnnlmError
from builder.faults import maybe_fault
from builder.keys import ComputeDtypeError, KeyLayerError, WindowJob, forward, load_encoder, load_model
from builder.modelinfo import ModelError, inspect_model
from builder.storage import Storage
from retriever.knnlm import PAPER_K, PAPER_LAMBDA, PAPER_TEMPERATURE, interpolate, knn_log_probs
from retriever.report_data import summarize_chunk
from retriever.router import Retriever
from retriever.tune import CACHE_IDS, write_chunk


class EvalError(KnnlmError, RuntimeError):
    """The evaluation cannot run as asked (mismatched model, empty text, no index ...)."""


# ---------------------------------------------------------------------------------------------
# pure cores


@dataclass
class Chunk:
    """Windows to score: (the window's tokens (L,), first target, end target) each, targets as
    positions in the window (the first target is at least 1: its query is the state before it)."""
    id: int
    windows: list[tuple[np.ndarray, int, int]] = field(default_factory=list)

    @property
    def num_targets(self) -> int:
        return sum(b - a for _, a, b in self.windows)


def plan_chunks(sequences: list[np.ndarray], window: int, min_context: int, chunk_targets: int = 8192) -> list[Chunk]:
    """The scoring windows of every sequence (as the builder plans them), cut into chunks of about
    `chunk_targets` targets. Depends only on the text and the manifest, not on the workers."""
    chunks = [Chunk(0)]
    for seq in sequences:
        if len(seq) < 2:
            continue
        for (s, e, a, b) in plan_windows(len(seq), window, min_context):
            if chunks[-1].num_targets >= chunk_targets:
                chunks.append(Chunk(len(chunks)))
            chunks[-1].windows.append((seq[s:e], a - s, b - s))
    return [c for c in chunks if c.windows]


def score_windows(windows: list[tuple[np.ndarray, int, int]], encoder, batch_size: int = 8,
                  pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(queries (m, d) float16, LM log p(target) (m,) float64, targets (m,) int64) for the windows'
    targets in order, from the build's forward (`builder.keys.forward`, one full pass per window):
    the query of target t is the key-layer state at t−1 (as the datastore's key of that target
    would be), its log-prob the LM's at t−1."""
    jobs = [WindowJob(toks, a - 1, b - 1) for toks, a, b in windows]          # positions t−1 of targets [a, b)
    q, lm = forward(jobs, encoder, batch_size, pad_id, logprobs=True)
    tgt = [toks[a:b].astype(np.int64) for toks, a, b in windows]
    return np.concatenate(q), np.concatenate(lm), np.concatenate(tgt)


def query_dtype(asked: str | None, m) -> str:
    """The compute dtype of the queries: the manifest's (the dtype its keys were computed in); `asked`
    (--compute-dtype) only when it is that one."""
    if asked is not None and asked != m.compute_dtype:
        raise EvalError(f"--compute-dtype {asked}: the datastore's keys were computed in {m.compute_dtype} (its "
                        "manifest's compute_dtype); queries must be computed in the same dtype")
    return m.compute_dtype


def _dtype_source(compute_dtype: str) -> str:
    return (f"the datastore's keys were computed in {compute_dtype} (its manifest's compute_dtype) and its "
            "queries must be too")


def load_query_model(model_path: str, compute_dtype: str, device: str):
    """The LM in the datastore's compute dtype (the manifest's) on `device` (generation); a device that
    cannot run that dtype is an EvalError naming both."""
    try:
        return load_model(model_path, device, compute_dtype, _dtype_source(compute_dtype))
    except ComputeDtypeError as e:
        raise EvalError(str(e)) from None


def load_query_encoder(model_path: str, key_layer: str, compute_dtype: str, device: str):
    """The LM that computes queries as the datastore's keys were: its key layer, in its compute dtype (the
    manifest's) on `device`; a device that cannot run that dtype is an EvalError naming both."""
    try:
        return load_encoder(model_path, key_layer, device, compute_dtype, _dtype_source(compute_dtype))
    except (ComputeDtypeError, KeyLayerError) as e:
        raise EvalError(str(e)) from None


def check_model(model: str | None, m) -> "object":
    """The ModelInfo of `model` (default: the manifest's), refused unless it is the model, tokenizer and
    key module that built the datastore."""
    model = model or m.model.get("path") or m.model["name"]
    try:
        info = inspect_model(model, m.key_layer)
    except ModelError as e:
        raise EvalError(str(e)) from None
    if info.sha256 != m.model["sha256"]:
        raise EvalError(f"--model {model} (weights sha256 {info.sha256[:12]}) is not the model that built the datastore "
                        f"({m.model['name']}, sha256 {m.model['sha256'][:12]}): queries must come from the same model")
    if info.tokenizer_sha256 != m.tokenizer.get("sha256"):
        raise EvalError(f"--model {model}: its tokenizer (sha256 {info.tokenizer_sha256[:12]}) differs from the "
                        f"datastore's ({str(m.tokenizer.get('sha256'))[:12]})")
    if info.key_module != m.key_module:
        raise EvalError(f"--model {model}: key module {info.key_module}, the datastore's keys come from {m.key_module}")
    return info


@functools.lru_cache(maxsize=4)
def tokenizer_of(model_path: str, sha256: str):
    """The model's tokenizer, kept per (folder, hash of its files): the warm evaluator loads it once."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_path)
    tok.model_max_length = 1 << 60
    return tok


def knnlm_settings(m, lam: float | None, temperature: float | None, k: int | None) -> tuple[float, float, int]:
    """(λ, T, k): each as given, else what `knnlm tune --record` stored in the manifest, else the paper's."""
    tuned = m.tuned or {}
    return (lam if lam is not None else tuned.get("lambda", PAPER_LAMBDA),
            temperature if temperature is not None else tuned.get("temperature", PAPER_TEMPERATURE),
            k or tuned.get("k", PAPER_K))


# ---------------------------------------------------------------------------------------------
# the worker


class EvalWorkerImpl:
    """Body of the evaluation worker actor: the LM (for queries and log-probs) and a Retriever."""

    def __init__(self, model_path: str, key_layer: str, device: str, compute_dtype: str, datastore: str,
                 threads: int | None):
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        self.threads = threads
        if threads:
            torch.set_num_threads(threads)
        # a refused dtype is kept and raised by `run`: an actor whose constructor raises dies with a Ray
        # traceback, a method's error reaches the driver as itself (unwrap_task_error)
        self.encoder, self.error = None, None
        try:
            self.encoder = load_query_encoder(model_path, key_layer, compute_dtype, device)
        except EvalError as e:
            self.error = e
        self.datastore, self._retriever = datastore, None
        # the retriever's maker; `evaluate` gives the in-process LM its own: one that waits until the embedded
        # servers answer, or the shards loaded in this process (retriever/local.py)
        self.connect = lambda: Retriever.connect(self.datastore)

    @property
    def retriever(self):
        """Connected on first use: the worker starts before the servers are up (see `evaluate`)."""
        if self._retriever is None:
            self._retriever = self.connect()
        return self._retriever

    def ping(self) -> bool:
        return True

    def run(self, chunk_id: int, windows: list, k: int, nprobe: int, rerank: bool, lam: float, temperature: float,
            batch_size: int, search_batch: int, save_uri: str | None = None, report: dict | None = None) -> dict:
        """The chunk's log-probs (LM and kNN-LM) in order; with `save_uri` its neighbour cache file is written,
        with `report` ({"show": neighbours shown}) its summary for `knnlm report` is returned too."""
        if self.error is not None:
            raise self.error
        maybe_fault("eval", chunk_id)    # tests: the worker dies here once; Ray restarts it, the chunk runs again
        if self.threads:
            # again in the calling thread: OpenMP's thread count is per thread, and a threaded actor (the warm
            # evaluator) calls from another thread than the one that made this worker, one whose count is Ray's
            # OMP_NUM_THREADS=1 (its forward measured 15% slower)
            import torch
            torch.set_num_threads(self.threads)
        started = time.time()
        out = score_and_search(windows, self.encoder, lambda: self.retriever, k, nprobe, rerank, temperature, batch_size,
                               search_batch, keep=bool(save_uri or report))
        t = time.perf_counter()
        mix = interpolate(out.lm, out.knn, lam)
        out.seconds["combine"] += time.perf_counter() - t
        if save_uri:
            write_chunk(Storage.from_uri(save_uri), chunk_id, out.targets, out.lm, out.dists, out.values, out.ids)
        summary = summarize_chunk(out.targets, out.lm, out.dists, out.values, out.ids, lam=lam, temperature=temperature,
                                  k=k, metric=out.metric, show=report["show"], knn=out.knn) if report else None
        return {"lm": out.lm, "knnlm": mix, "tokens": len(out.lm), "versions": sorted(out.versions),
                "started": started, "seconds": out.seconds, "report": summary}


@dataclass
class Scored:
    """A chunk's targets scored: LM and kNN log-probs (m,) float64, targets (m,) int64, and with `keep`
    the neighbours' distances and values (m, k) and the first min(k, CACHE_IDS) neighbours' global ids;
    `seconds`: see `score_and_search`; `metric`: the index's."""
    lm: np.ndarray
    knn: np.ndarray
    targets: np.ndarray
    dists: np.ndarray | None
    values: np.ndarray | None
    versions: set
    seconds: dict
    ids: np.ndarray | None = None
    metric: str = "l2"


def score_and_search(windows: list, encoder, connect, k: int, nprobe: int, rerank: bool, temperature: float,
                     batch_size: int, search_batch: int, keep: bool = False, overlap: bool | None = None) -> Scored:
    """The LM forward of the windows (`score_windows`'s, the same batches) and the search of their
    queries, `search_batch` at a time, two router calls in flight (the servers search one batch while
    this process merges the last one and computes its p_kNN). Each target's numbers depend on how the
    queries are grouped only through faiss's rounding (its coarse distances come from a GEMM over the
    batch: 1e-7 of the perplexity between batches of 1,024 and 4,096).

    On a GPU (or `overlap`) the searches start as each forward batch is done, overlapping the forward. On CPUs they
    start after the forward: the LM and the servers then share the cores, and overlapping them measured
    slower (54 s against 44 s on the 2-core bench: each slowed the other by more than it gained).

    `keep`: also the neighbours (distances, values, and the first CACHE_IDS ids), for a neighbour cache or a
    report; the router then merges with ids, slower than its values-only merge.

    seconds: lm (the forward), search (the router's calls: the servers' answers and their merge), wait
    (the time from the forward's end to the last answer), merge (the router's merge of the shards'
    top-k), combine (p_kNN and the mix)."""
    jobs = [WindowJob(toks, a - 1, b - 1) for toks, a, b in windows]      # positions t−1 of targets [a, b)
    off = np.concatenate([[0], np.cumsum([b - a for _, a, b in windows])]).astype(np.int64)
    n = int(off[-1])
    tgt = np.concatenate([toks[a:b] for toks, a, b in windows]).astype(np.int64)
    lm, knn = np.empty(n), np.empty(n)
    dists = np.empty((n, k), np.float32) if keep else None
    values = np.empty((n, k), np.int32) if keep else None
    ids = np.empty((n, min(k, CACHE_IDS)), np.int64) if keep else None
    sec = {"lm": 0.0, "search": 0.0, "wait": 0.0, "merge": 0.0, "combine": 0.0}
    versions: set = set()
    ready: list[tuple[np.ndarray, np.ndarray]] = []          # (rows, queries) of forward batches not yet searched
    if overlap is None:
        overlap = getattr(encoder.device, "type", "cpu") == "cuda"
    retriever, merge0, lock = None, 0.0, threading.Lock()

    def search(r: np.ndarray, q: np.ndarray) -> None:
        nonlocal retriever, merge0
        import faiss
        faiss.omp_set_num_threads(1)        # this thread's merges: one core (OpenMP's count is per thread); the
        with lock:                          # servers' searches have the others
            if retriever is None:                     # (the first search: the servers may be starting until then)
                retriever = connect()
                merge0 = retriever.timings["merge"]
        ts = time.perf_counter()
        res = retriever.search(q.astype(np.float32), k=k, nprobe=nprobe, rerank=rerank, ids=keep)
        tc = time.perf_counter()
        knn[r] = knn_log_probs(res.dist, res.values, tgt[r], temperature, retriever.metric)
        if keep:
            dists[r], values[r], ids[r] = res.dist, res.values, res.ids[:, :ids.shape[1]]
        with lock:                          # (two search threads: `+=` on a dict is not atomic)
            versions.add(res.version)
            sec["search"] += tc - ts
            sec["combine"] += time.perf_counter() - tc

    with ThreadPoolExecutor(2, thread_name_prefix="knnlm-search") as pool:
        pending = []

        def flush(least: int) -> None:
            """Send the ready queries, search_batch at a time, once at least `least` are ready."""
            if not ready or sum(len(r) for r, _ in ready) < least:
                return
            rows = np.concatenate([r for r, _ in ready])
            q = np.concatenate([x for _, x in ready])
            ready.clear()
            for a in range(0, len(rows), search_batch):
                pending.append(pool.submit(search, rows[a:a + search_batch], q[a:a + search_batch]))

        def on_batch(idx, keys, lps) -> None:
            for i, q, lp in zip(idx, keys, lps):
                rows = np.arange(off[i], off[i + 1])
                lm[rows] = lp
                ready.append((rows, q))
            if overlap:
                flush(search_batch)

        t0 = time.perf_counter()
        forward(jobs, encoder, batch_size, 0, logprobs=True, on_batch=on_batch)
        t1 = time.perf_counter()
        flush(1)
        for f in pending:
            f.result()                   # a search's error is raised here, as itself
        sec["wait"] = time.perf_counter() - t1
        sec["lm"] = t1 - t0
    sec["merge"] = retriever.timings["merge"] - merge0 if retriever is not None else 0.0
    return Scored(lm, knn, tgt, dists, values, versions, sec, ids, retriever.metric if retriever else "l2")

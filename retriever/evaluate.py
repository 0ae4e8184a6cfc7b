"""`knnlm eval`: base LM and kNN-LM perplexity of evaluation text, on Ray evaluation workers.

The queries are made exactly as the datastore's keys were: the same model (`check_model`) and
tokenizer, the same compute dtype (the manifest's `compute_dtype`, on any device: `query_dtype`),
the same key module, hook and batched forward (`builder.keys.forward`, one full pass per window
that also gives the LM's log-probabilities, its LM head in float32), rounded to float16 as keys are
stored. The windows are `builder.corpus.plan_windows`'s with the manifest's window and min_context
unless `--window` / `--min-context` ask for another protocol: the paper builds with 3072/1536 but
evaluates 3072-token windows that score 512 new tokens each (`--window 3072 --min-context 2560`).
Every token that would get a key is scored: in `document` mode every token after the first of each
document (the first has no context: no query); in `stream` mode every token after the first of each
file. The result records the protocol (window, min_context, mode, scored tokens, sequences whose
first token is not scored, approximate or exact distances, index factory, nprobe).

Work is cut into chunks of whole windows, independent of the number of workers; each worker
(a Ray actor holding the LM and a `Retriever`) returns the per-token log-probabilities of its
chunk, and the driver sums them in chunk order, so the result does not depend on how many
workers ran. A worker that dies (any number of times: a preemptible cluster) is restarted by Ray
and its chunk redone by the next free worker.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np

from builder.corpus import detect_format, plan_windows, tokenize_file
from builder.dispatch import dispatch
from builder.errors import KnnlmError
from builder.faults import maybe_fault
from builder.keys import ComputeDtypeError, KeyLayerError, WindowJob, forward, load_encoder, load_model
from builder.layout import NEIGHBOUR_CACHE_META
from builder.manifest import load_manifest, require_index_shards
from builder.modelinfo import ModelError, inspect_model
from builder.runtime import cluster_resources, ray_session, unwrap_task_error
from builder.storage import Storage, expand_inputs, read_uri, write_json_file
from retriever.config import EvalConfig
from retriever.knnlm import PAPER_K, PAPER_LAMBDA, PAPER_TEMPERATURE, interpolate, knn_log_probs, perplexity
from retriever.router import Retriever, RetrieverError, find_all, serving
from retriever.server import RequestError
from retriever.tune import write_chunk

log = logging.getLogger(__name__)


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
        self.servers_up = None       # in-process: waits until the embedded servers answer (see `evaluate`)

    @property
    def retriever(self):
        """Connected on first use: the worker starts before the servers are up (see `evaluate`)."""
        if self._retriever is None:
            if self.servers_up is not None:
                self.servers_up()
            self._retriever = Retriever.connect(self.datastore)
        return self._retriever

    def ping(self) -> bool:
        return True

    def run(self, chunk_id: int, windows: list, k: int, nprobe: int, rerank: bool, lam: float, temperature: float,
            batch_size: int, search_batch: int, save_uri: str | None = None) -> dict:
        if self.error is not None:
            raise self.error
        maybe_fault("eval", chunk_id)    # tests: the worker dies here once; Ray restarts it, the chunk runs again
        started = time.time()
        out = score_and_search(windows, self.encoder, lambda: self.retriever, k, nprobe, rerank, temperature, batch_size,
                               search_batch, keep=bool(save_uri))
        t = time.perf_counter()
        mix = interpolate(out.lm, out.knn, lam)
        out.seconds["combine"] += time.perf_counter() - t
        if save_uri:
            write_chunk(Storage.from_uri(save_uri), chunk_id, out.targets, out.lm, out.dists, out.values)
        return {"lm": out.lm, "knnlm": mix, "tokens": len(out.lm), "versions": sorted(out.versions),
                "started": started, "seconds": out.seconds}


@dataclass
class Scored:
    """A chunk's targets scored: LM and kNN log-probs (m,) float64, targets (m,) int64, and with `keep`
    the neighbours' distances and values (m, k); `seconds`: see `score_and_search`."""
    lm: np.ndarray
    knn: np.ndarray
    targets: np.ndarray
    dists: np.ndarray | None
    values: np.ndarray | None
    versions: set
    seconds: dict


def score_and_search(windows: list, encoder, connect, k: int, nprobe: int, rerank: bool, temperature: float,
                     batch_size: int, search_batch: int, keep: bool = False, overlap: bool | None = None) -> Scored:
    """The LM forward of the windows (`score_windows`'s, the same batches) and the search of their
    queries, `search_batch` at a time, two router calls in flight (the servers search one batch while
    this process merges the last one and computes its p_kNN). Each target's numbers do not depend on
    how the queries are grouped.

    On a GPU (or `overlap`) the searches start as each forward batch is done, overlapping the forward. On CPUs they
    start after the forward: the LM and the servers then share the cores, and overlapping them measured
    slower (54 s against 44 s on the 2-core bench: each slowed the other by more than it gained).

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
        res = retriever.search(q.astype(np.float32), k=k, nprobe=nprobe, rerank=rerank, ids=False)
        tc = time.perf_counter()
        versions.add(res.version)
        knn[r] = knn_log_probs(res.dist, res.values, tgt[r], temperature, retriever.metric)
        if keep:
            dists[r], values[r] = res.dist, res.values
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
    return Scored(lm, knn, tgt, dists, values, versions, sec)


# ---------------------------------------------------------------------------------------------
# the stage


@dataclass
class Protocol:
    """What a perplexity was computed on and how: recorded beside every number (eval JSON, the
    neighbour cache's cache.json, tune's output)."""
    window: int
    min_context: int
    mode: str
    tokens: int                  # scored
    sequences: int               # documents (document mode) or files (stream) whose first token is not scored
    distances: str               # "approximate" (the index's) or "exact" (re-ranked)
    index_factory: str
    nprobe: int
    compute_dtype: str           # of the queries: the keys' own (the manifest's)

    def to_json(self) -> dict:
        return dict(vars(self))


def distances_name(rerank: bool) -> str:
    return "exact" if rerank else "approximate"


@dataclass
class EvalResult:
    tokens: int
    base_ppl: float
    knnlm_ppl: float
    lam: float
    temperature: float
    k: int
    nprobe: int
    rerank: bool
    seconds: float
    split: dict
    protocol: Protocol
    version: int | list = 1      # the datastore version whose servers answered (a list: several did)
    profile: dict = field(default_factory=dict)   # where the time went: `evaluate`'s marks, the servers' search

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "base_ppl": self.base_ppl, "knnlm_ppl": self.knnlm_ppl,
                "relative_change": self.knnlm_ppl / self.base_ppl - 1, "lambda": self.lam,
                "temperature": self.temperature, "k": self.k, "nprobe": self.nprobe, "rerank": self.rerank,
                **self.protocol.to_json(),
                "tokens_per_s": self.tokens / self.seconds if self.seconds else None, "seconds": self.seconds,
                "seconds_split": self.split, "version": self.version, "profile": self.profile}

    def table(self) -> str:
        j = self.to_json()
        p = self.protocol
        rows = [("tokens", f"{self.tokens:,}"), ("base ppl", f"{self.base_ppl:.3f}"),
                ("kNN-LM ppl", f"{self.knnlm_ppl:.3f}"), ("relative change", f"{100 * j['relative_change']:+.2f}%"),
                ("lambda", f"{self.lam:g}"), ("temperature", f"{self.temperature:g}"), ("k", f"{self.k}"),
                ("nprobe", f"{self.nprobe}"), ("distances", p.distances), ("index", p.index_factory),
                ("window", f"{p.window} ({p.min_context} context)"), ("mode", p.mode),
                ("tokens/s", f"{j['tokens_per_s']:,.0f}")]
        return "\n".join(f"{a:<16} {b:>12}" for a, b in rows)


def eval_windows(cfg: EvalConfig, m) -> tuple[int, int]:
    """(window, min_context) of the evaluation: as asked, else the manifest's; refused when the model
    cannot take the window."""
    window, min_context = cfg.window or m.window, cfg.min_context or m.min_context
    if cfg.window and not cfg.min_context and min_context >= window:
        min_context = window // 2
    if not 1 <= min_context < window:
        raise EvalError(f"--min-context {min_context} must be smaller than --window {window}")
    max_pos = (m.model or {}).get("max_positions")
    if max_pos and window > max_pos:
        raise EvalError(f"--window {window}: the model ({m.model.get('name')}) takes at most {max_pos} positions")
    return window, min_context


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


def evaluate(cfg: EvalConfig) -> EvalResult:
    """Run the evaluation (see the module docstring).

    The workers are started first: their start (importing torch and transformers, loading the LM)
    overlaps the driver's model check and tokenization, a fixed cost that otherwise dominates a
    small evaluation. A failed check kills them before any work."""
    import ray

    t0, wall0 = time.perf_counter(), time.time()
    marks: dict[str, float] = {}
    st = Storage.from_uri(cfg.datastore)
    m = load_manifest(st)
    compute_dtype = query_dtype(cfg.compute_dtype, m)
    require_index_shards(m, st.uri, EvalError)
    mode = cfg.mode or m.mode
    if mode != m.mode:
        raise EvalError(f"--mode {mode}: the datastore's keys were built in {m.mode} mode (contexts "
                        f"{'cross' if m.mode == 'stream' else 'do not cross'} documents); evaluate in the same mode")
    lam, temperature, k = knnlm_settings(m, cfg.lam, cfg.temperature, cfg.k)
    window, min_context = eval_windows(cfg, m)
    model = cfg.model or m.model.get("path") or m.model["name"]
    with ray_session(cfg.address):
        marks["ray"] = time.perf_counter() - t0
        cpus, gpus = cluster_resources()
        use_gpu = cfg.device in ("auto", "cuda") and gpus > 0
        local = cfg.workers is None and not use_gpu        # the LM in this process: no worker to start
        workers = cfg.workers or (gpus if use_gpu else 1)
        threads = cfg.threads or (len(os.sched_getaffinity(0)) if local else max(1, cpus // workers))
        pool: list = []
        before: dict = {}
        with ThreadPoolExecutor(3, thread_name_prefix="knnlm-eval-start") as ex, ExitStack() as stack:
            # the LM loads (or the workers start), the model is checked and the text tokenized while embedded
            # servers start; in this process the first forward runs meanwhile too (searches wait for them)
            if local:
                here = ex.submit(EvalWorkerImpl, model, m.key_layer, "cpu", compute_dtype, st.uri, threads)
            else:
                actor = ray.remote(EvalWorkerImpl).options(num_cpus=0 if not use_gpu else 1,
                                                           num_gpus=1 if use_gpu else 0, max_restarts=-1,
                                                           max_task_retries=0)
                pool = [actor.remote(model, m.key_layer, "cuda" if use_gpu else "cpu", compute_dtype, st.uri,
                                     threads) for _ in range(workers)]
            planned = ex.submit(_check_and_plan, cfg, m, model, mode, window, min_context, marks, t0)

            def servers() -> None:
                stack.enter_context(serving(st.uri, cfg.address, cfg.rerank, cfg.cache_dir))
                marks["servers_up"] = time.perf_counter() - t0
                before.update(server_stats(st.uri))
            up = ex.submit(servers)
            try:
                chunks, inputs, sequences = planned.result()
                if local:
                    worker = here.result()
                    worker.servers_up = up.result
                    results = {c.id: worker.run(c.id, c.windows, k, cfg.nprobe, cfg.rerank, lam, temperature,
                                                cfg.batch_size, cfg.search_batch, cfg.save_neighbours)
                               for c in chunks}
                else:
                    up.result()
                    results = _run_chunks(pool[:len(chunks)], chunks, k, cfg, lam, temperature)
                marks["scored"] = time.perf_counter() - t0
                after = server_stats(st.uri)
            finally:
                for w in pool:
                    ray.kill(w)
                wait([up])                       # started or failed: the stack then stops what it started
    marks["done"] = time.perf_counter() - t0
    order = sorted(results)
    lm = np.concatenate([results[i]["lm"] for i in order])          # in corpus order: exact, worker-independent
    mix = np.concatenate([results[i]["knnlm"] for i in order])
    split = {k: round(sum(results[i]["seconds"][k] for i in order), 3)
             for k in ("lm", "search", "wait", "merge", "combine")}
    marks["first_chunk"] = min(results[i]["started"] for i in order) - wall0
    profile = {"marks": {k: round(v, 3) for k, v in marks.items()},
               "servers": {s: {"queries": after[s]["queries"] - before.get(s, {}).get("queries", 0),
                               "seconds": round(after[s]["seconds"] - before.get(s, {}).get("seconds", 0.0), 3)}
                           for s in after}}
    n = int(lm.size)
    protocol = Protocol(window, min_context, mode, n, sequences, distances_name(cfg.rerank), m.index["factory"],
                        cfg.nprobe, compute_dtype)
    versions = sorted({v for i in order for v in results[i].get("versions", [])})
    res = EvalResult(n, perplexity(float(np.sum(lm)), n), perplexity(float(np.sum(mix)), n), lam, temperature, k,
                     cfg.nprobe, cfg.rerank, time.perf_counter() - t0, split, protocol,
                     versions[0] if len(versions) == 1 else versions or m.version, profile)
    if cfg.save_neighbours:  # written last: a cache is complete when cache.json exists
        Storage.from_uri(cfg.save_neighbours).write_text(NEIGHBOUR_CACHE_META, json.dumps(
            {"metric": m.index["metric"], "k": k, "rerank": cfg.rerank, "datastore": st.uri,
             "version": min(versions or [m.version]),   # the oldest that answered: tune checks removals since
             "corpus": inputs, "chunks": len(chunks), **protocol.to_json()}))
    log.info("evaluated %d tokens: base ppl %.3f, kNN-LM ppl %.3f", n, res.base_ppl, res.knnlm_ppl)
    return res


def _check_and_plan(cfg: EvalConfig, m, model: str, mode: str, window: int, min_context: int, marks: dict,
                    t0: float) -> tuple[list[Chunk], list[str], int]:
    """`check_model`, then `_plan` (marks: when each was done)."""
    info = check_model(model, m)
    marks["model_checked"] = time.perf_counter() - t0
    out = _plan(cfg, m, mode, info.path, window, min_context)
    marks["tokenized"] = time.perf_counter() - t0
    return out


def _plan(cfg: EvalConfig, m, mode: str, model_path: str, window: int, min_context: int
          ) -> tuple[list[Chunk], list[str], int]:
    """The evaluation text tokenized as the datastore's corpus was, cut into chunks; refuses empty text.
    (chunks, inputs, sequences scored: each one's first token is not)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.model_max_length = 1 << 60
    try:
        inputs = expand_inputs(cfg.corpus)
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(str(e)) from None
    built = {f.get("sha256"): f.get("uri") for f in m.corpus.get("files", [])}
    sequences = []
    for uri in inputs:
        tf = tokenize_file(read_uri(uri), uri, detect_format(uri, cfg.format), mode, tok, cfg.text_field)
        if tf.sha256 in built or uri in built.values():
            log.warning("%s is also in the datastore's corpus (%s): its tokens will retrieve themselves and the "
                        "perplexity will look better than it is", uri, built.get(tf.sha256, uri))
        off = 0
        for n in tf.seq_lengths:
            sequences.append(tf.tokens[off:off + n])
            off += n
    chunks = plan_chunks(sequences, window, min_context, cfg.chunk_targets)
    if not chunks:
        raise EvalError(f"--corpus {', '.join(cfg.corpus)}: no token to score (empty text, or documents shorter "
                        "than 2 tokens)")
    return chunks, inputs, sum(1 for s in sequences if len(s) >= 2)


def _run_chunks(pool: list, chunks: list[Chunk], k: int, cfg: EvalConfig, lam: float, temperature: float
                ) -> dict[int, dict]:
    """Each chunk on the next free worker, one at a time each; {chunk id: its result}. A worker that dies
    (preempted, killed: any number of times) is restarted by Ray; its chunk goes back to the head of
    the queue (the next free worker runs it), and the worker gets work again once it answers a ping."""
    import ray.exceptions as rex
    results: dict[int, dict] = {}
    alive = set(range(len(pool)))

    def revive(w: int, e: BaseException):
        """A ping of restarting worker w, or None when it cannot start (its constructor failed)."""
        if isinstance(e, rex.ActorDiedError) and not isinstance(e, rex.ActorUnavailableError) and \
                getattr(e, "cause", None) is not None:
            alive.discard(w)
            if not alive:
                raise unwrap_task_error(e, "starting the evaluation workers", (EvalError, ValueError),
                                        EvalError) from None
            return None
        return pool[w].ping.remote()

    def done(c: Chunk, res: dict) -> None:
        results[c.id] = res

    dispatch(chunks, lambda c, w: pool[w].run.remote(c.id, c.windows, k, cfg.nprobe, cfg.rerank, lam, temperature,
                                                     cfg.batch_size, cfg.search_batch, cfg.save_neighbours),
             done, lambda c, e: unwrap_task_error(e, f"evaluation chunk {c.id}",
                                                  (EvalError, RetrieverError, RequestError, ValueError),
                                                  EvalError),
             workers=len(pool), revive=revive, name="evaluation worker", what=lambda c: f"chunk {c.id}")
    return results


def server_stats(uri: str, timeout: float = 10.0) -> dict[int, dict]:
    """{shard: the searches, queries and seconds of its servers (all replicas, every version) so far}; a
    server that does not answer is left out (the figures are a profile, not a result)."""
    import ray
    refs = {h.stats.remote(): s for shards in find_all(uri).values() for s, reps in shards.items()
            for h in reps.values()}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout) if refs else ([], [])
    out: dict[int, dict] = {}
    for ref in ready:
        try:
            got = ray.get(ref)
        except Exception:  # noqa: BLE001 - a restarting server: no figures
            continue
        o = out.setdefault(refs[ref], {"queries": 0, "seconds": 0.0})
        o["queries"] += got["queries"]
        o["seconds"] += got["seconds"]
    return out


def write_json(res: EvalResult, path: str) -> None:
    write_json_file(path, res.to_json())

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
import time
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np

from builder.corpus import detect_format, tokenize_file
from builder.dispatch import dispatch
from builder.layout import NEIGHBOUR_CACHE_META
from builder.manifest import load_manifest, require_index_shards
from builder.runtime import cluster_resources, ray_session, unwrap_task_error
from builder.storage import Storage, expand_inputs, read_uri, write_json_file
from retriever.config import CACHE_IDS, EvalConfig
from retriever.knnlm import perplexity
from retriever.local import LocalRetriever
from retriever.report import ReportOptions, run_header, write_report
from retriever.report_data import concat
from retriever.router import Retriever, RetrieverError, find_all, serving
from retriever.scoring import (  # noqa: F401 - the cores, names of this module's API too
    Chunk,
    EvalError,
    EvalWorkerImpl,
    Scored,
    check_model,
    knnlm_settings,
    load_query_encoder,
    load_query_model,
    plan_chunks,
    query_dtype,
    score_and_search,
    score_windows,
    tokenizer_of,
)
from retriever.server import RequestError
from retriever.tune import write_text

log = logging.getLogger(__name__)


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
    report: dict | None = None   # `--report`: where the page is, its files and bytes (retriever/report.py)

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "base_ppl": self.base_ppl, "knnlm_ppl": self.knnlm_ppl,
                "relative_change": self.knnlm_ppl / self.base_ppl - 1, "lambda": self.lam,
                "temperature": self.temperature, "k": self.k, "nprobe": self.nprobe, "rerank": self.rerank,
                **self.protocol.to_json(),
                "tokens_per_s": self.tokens / self.seconds if self.seconds else None, "seconds": self.seconds,
                "seconds_split": self.split, "version": self.version, "profile": self.profile,
                **({"report": self.report} if self.report else {})}

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


def evaluate(cfg: EvalConfig, make_worker=EvalWorkerImpl, shards=None) -> EvalResult:
    """Run the evaluation (see the module docstring). `make_worker` makes the in-process LM; `shards`
    gives the index shards loaded in this process, kept by the caller (the warm evaluator keeps both
    across calls: retriever/warm.py).

    Start-up overlaps itself: the model's check and the tokenization run while Ray starts, the LM
    loads (in this process, or the workers start) while the servers start, and the first forward runs
    before they are up. Those fixed costs otherwise dominate a small evaluation. A failed check kills
    the workers before any work."""
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
    threads_here = cfg.threads or len(os.sched_getaffinity(0))
    # no cluster to use (no --address, --workers or GPU): no Ray either, the index shards are searched here
    in_process = shards is not None or (cfg.address is None and cfg.workers is None and cfg.device != "cuda"
                                        and not _cuda_here())
    load = shards or (lambda: _load_shards(st.uri, cfg))
    pool: list = []
    before: dict = {}
    with ThreadPoolExecutor(3, thread_name_prefix="knnlm-eval-start") as ex, ExitStack() as stack:
        # the model's check and the tokenization need no Ray: they run while it starts (an embedded one: 4 s);
        # in a process with no cluster to use (no Ray at all), so does the LM's load
        planned = ex.submit(_check_and_plan, cfg, m, model, mode, window, min_context, marks, t0)
        here = ex.submit(make_worker, model, m.key_layer, "cpu", compute_dtype, st.uri, threads_here) \
            if in_process else None
        if in_process:
            local, use_gpu = True, False
        else:
            import ray
            stack.enter_context(ray_session(cfg.address))
            marks["ray"] = time.perf_counter() - t0
            cpus, gpus = cluster_resources()
            use_gpu = cfg.device in ("auto", "cuda") and gpus > 0
            local = cfg.workers is None and not use_gpu        # the LM in this process: no worker to start
        workers = cfg.workers or (gpus if use_gpu else 1)
        threads = threads_here if local else cfg.threads or max(1, cpus // workers)
        # the LM loads (or the workers start) while the servers start (or the shards load); in this process
        # the first forward runs meanwhile too (searches wait for them)
        if local and here is None:
            here = ex.submit(make_worker, model, m.key_layer, "cpu", compute_dtype, st.uri, threads)
        elif not local:
            actor = ray.remote(EvalWorkerImpl).options(num_cpus=0 if not use_gpu else 1,
                                                       num_gpus=1 if use_gpu else 0, max_restarts=-1,
                                                       max_task_retries=0)
            pool = [actor.remote(model, m.key_layer, "cuda" if use_gpu else "cpu", compute_dtype, st.uri,
                                 threads) for _ in range(workers)]

        def servers():
            got = load() if in_process else \
                stack.enter_context(serving(st.uri, cfg.address, cfg.rerank, cfg.cache_dir))
            marks["servers_up"] = time.perf_counter() - t0
            before.update(got.stats() if in_process else server_stats(st.uri))
            return got
        up = ex.submit(servers)
        try:
            chunks, inputs, seqs, tok = planned.result()
            report_opts = ReportOptions()
            report = {"show": report_opts.show} if cfg.report else None
            if local:
                worker = here.result()
                worker.connect = up.result if in_process else lambda: _connect_when(up, st.uri)
                worker._retriever = None
                results = {c.id: worker.run(c.id, c.windows, k, cfg.nprobe, cfg.rerank, lam, temperature,
                                            cfg.batch_size, cfg.search_batch, cfg.save_neighbours, report)
                           for c in chunks}
            else:
                up.result()
                results = _run_chunks(pool[:len(chunks)], chunks, k, cfg, lam, temperature, report)
            marks["scored"] = time.perf_counter() - t0
            after = up.result().stats() if in_process else server_stats(st.uri)
        finally:
            for w in pool:
                ray.kill(w)
            wait([up])                           # started or failed: the stack then stops what it started
            if in_process and shards is None and not up.exception():
                up.result().close()
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
    protocol = Protocol(window, min_context, mode, n, len(seqs), distances_name(cfg.rerank), m.index["factory"],
                        cfg.nprobe, compute_dtype)
    versions = sorted({v for i in order for v in results[i].get("versions", [])})
    res = EvalResult(n, perplexity(float(np.sum(lm)), n), perplexity(float(np.sum(mix)), n), lam, temperature, k,
                     cfg.nprobe, cfg.rerank, time.perf_counter() - t0, split, protocol,
                     versions[0] if len(versions) == 1 else versions or m.version, profile)
    if cfg.save_neighbours:  # cache.json last: a cache is complete when it exists
        cache = Storage.from_uri(cfg.save_neighbours)
        write_text(cache, seqs)
        cache.write_text(NEIGHBOUR_CACHE_META, json.dumps(
            {"metric": m.index["metric"], "k": k, "ids": min(k, CACHE_IDS), "rerank": cfg.rerank, "datastore": st.uri,
             "version": min(versions or [m.version]),   # the oldest that answered: tune checks removals since
             "corpus": inputs, "chunks": len(chunks), "lambda": lam, "temperature": temperature,
             "base_ppl": res.base_ppl, "knnlm_ppl": res.knnlm_ppl, "model": m.model.get("name"),
             "model_sha256": m.model.get("sha256"), "key_layer": m.key_layer, **protocol.to_json()}))
    if cfg.report:
        res.report = write_report(cfg.report, run_header(st.uri, m, res.to_json(), inputs),
                                  concat([results[i]["report"] for i in order]), seqs, st, m, tok, report_opts)
    log.info("evaluated %d tokens: base ppl %.3f, kNN-LM ppl %.3f", n, res.base_ppl, res.knnlm_ppl)
    return res


def _load_shards(uri: str, cfg: EvalConfig):
    """The index shards of `uri` loaded in this process, with the hint `serving` gives for embedded servers."""
    r = LocalRetriever.open(uri, cfg.rerank, cfg.cache_dir)
    log.info("loaded %d index shards of %s in this process (%.1fs); `knnlm serve %s%s` keeps them running, and "
             "`--address auto` then reuses them and a warm LM", r.num_shards, uri, r.load_seconds, uri,
             " --rerank" if cfg.rerank else "")
    return r


def _connect_when(up, uri: str):
    """The Retriever of `uri` once `up` (the embedded servers' start) is done."""
    up.result()
    return Retriever.connect(uri)


def _cuda_here() -> bool:
    import torch
    return torch.cuda.is_available()


def _check_and_plan(cfg: EvalConfig, m, model: str, mode: str, window: int, min_context: int, marks: dict,
                    t0: float) -> tuple[list[Chunk], list[str], list, object]:
    """`check_model`, then `_plan` (marks: when each was done); its tokenizer last."""
    info = check_model(model, m)
    marks["model_checked"] = time.perf_counter() - t0
    tok = tokenizer_of(info.path, info.tokenizer_sha256)
    out = _plan(cfg, m, mode, tok, window, min_context)
    marks["tokenized"] = time.perf_counter() - t0
    return (*out, tok)


def _plan(cfg: EvalConfig, m, mode: str, tok, window: int, min_context: int) -> tuple[list[Chunk], list[str], list]:
    """The evaluation text tokenized as the datastore's corpus was, cut into chunks; refuses empty text.
    (chunks, inputs, the scored sequences as (input index, sequence index in it, tokens): each one's first
    token is not scored)."""
    try:
        inputs = expand_inputs(cfg.corpus)
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(str(e)) from None
    built = {f.get("sha256"): f.get("uri") for f in m.corpus.get("files", [])}
    sequences = []
    for i, uri in enumerate(inputs):
        tf = tokenize_file(read_uri(uri), uri, detect_format(uri, cfg.format), mode, tok, cfg.text_field)
        if tf.sha256 in built or uri in built.values():
            log.warning("%s is also in the datastore's corpus (%s): its tokens will retrieve themselves and the "
                        "perplexity will look better than it is", uri, built.get(tf.sha256, uri))
        off = 0
        for j, n in enumerate(tf.seq_lengths):
            if n >= 2:                   # (a one-token sequence has nothing to score)
                sequences.append((i, j, tf.tokens[off:off + n]))
            off += n
    chunks = plan_chunks([q for _, _, q in sequences], window, min_context, cfg.chunk_targets)
    if not chunks:
        raise EvalError(f"--corpus {', '.join(cfg.corpus)}: no token to score (empty text, or documents shorter "
                        "than 2 tokens)")
    return chunks, inputs, sequences


def _run_chunks(pool: list, chunks: list[Chunk], k: int, cfg: EvalConfig, lam: float, temperature: float,
                report: dict | None) -> dict[int, dict]:
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
                                                     cfg.batch_size, cfg.search_batch, cfg.save_neighbours, report),
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

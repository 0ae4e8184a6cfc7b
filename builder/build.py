"""Build orchestration: corpus → tokens → plan → key workers → shards → manifest.

Stages read only artifacts under the datastore root, so a killed driver or worker
loses at most the units in flight:

    tokens/<file>.bin|.json     tokenized inputs (int32 LE tokens + sequence lengths)
    shards/<unit>-<part>.parquet key shards (deterministic names)
    _build/request.json         the identity of the build in progress
    _build/units/<unit>.json    a unit's commit record (its shards, rows, checksums)
    _build/lease.json           the build lease
    manifest.json               written last; lists every shard with first_id
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import ray

from builder.config import BuildConfig, ConfigError
from builder.corpus import (
    InputError,
    Unit,
    UnitError,
    count_targets,
    detect_format,
    plan_units,
    tokenize_file,
)
from builder.errors import KnnlmError
from builder.keys import load_encoder
from builder.layout import tokens_meta_path, tokens_path, unit_record_path
from builder.lease import Lease, LeaseError
from builder.manifest import (
    MANIFEST,
    REQUEST,
    Manifest,
    ManifestError,
    compare_identity,
    load_manifest,
    package_versions,
)
from builder.modelinfo import (
    ModelError,
    ModelInfo,
    config_max_positions,
    inspect_model,
    resolve_model_dir,
)
from builder.runtime import (
    cluster_resources,
    max_node_cpus,
    ray_session,
    unwrap_task_error,
)
from builder.shards import SHARD_FORMAT
from builder.storage import (
    NotFound,
    Storage,
    StorageError,
    expand_inputs,
    is_s3,
    local_path,
    read_uri,
    size_uri,
)
from builder.unit import UnitParams, run_unit

log = logging.getLogger(__name__)
MAX_UNIT_ATTEMPTS = 3
PROGRESS_LOG_SECONDS = 30.0
PROGRESS_POLL_SECONDS = 2.0
DRIVER_TOKENIZE_BYTES = 32 << 20  # a local corpus this small is tokenized on the driver
SHOW_SKIPPED = 20


class BuildError(KnnlmError, RuntimeError):
    """A build failed for a reason stated in the message; nothing partial was committed."""


# errors whose message is the whole story (KeyLayerError and the config errors are ValueErrors)
USER_ERRORS = (ConfigError, InputError, UnitError, StorageError, ModelError, ManifestError, LeaseError,
               FileNotFoundError, ValueError)


# ---------------------------------------------------------------------------------------------
# tokenize stage (core + task body)


def tokenize_input(file_index: int, uri: str, fmt: str, mode: str, text_field: str, tokenizer_path: str,
                   root_uri: str) -> dict:
    """Tokenize one input file and commit tokens/<i>.bin then tokens/<i>.json; return the meta."""
    from transformers import AutoTokenizer

    storage = Storage.from_uri(root_uri)
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    tok.model_max_length = 1 << 60  # sequences are windowed later; silence the length warning
    tf = tokenize_file(read_uri(uri), uri, fmt, mode, tok, text_field)
    storage.write_bytes(tokens_path(file_index), tf.tokens.astype("<i4").tobytes())
    meta = tf.meta()
    meta["tokens"] = tokens_path(file_index)
    storage.write_text(tokens_meta_path(file_index), json.dumps(meta))
    return meta


def _tokenize_stage(cfg, storage, lease, info, inputs, formats, todo, metas) -> None:
    """Tokenize the inputs in `todo` into `metas`: on Ray tasks, or here for a small local corpus
    (a Ray task's process would spend seconds importing transformers to save milliseconds)."""

    local = not any(is_s3(inputs[i]) for i in todo)
    local_bytes = sum(os.path.getsize(local_path(inputs[i])) for i in todo) if local else 0
    if local and local_bytes <= DRIVER_TOKENIZE_BYTES:
        log.info("tokenizing %d input files (%.1f MB) on the driver", len(todo), local_bytes / 1e6)
        for i in todo:
            metas[i] = tokenize_input(i, inputs[i], formats[i], cfg.mode, cfg.text_field, info.path, storage.uri)
        return
    log.info("tokenizing %d input files on Ray workers", len(todo))
    task = ray.remote(num_cpus=1, max_retries=2)(tokenize_input)
    refs = {task.remote(i, inputs[i], formats[i], cfg.mode, cfg.text_field, info.path, storage.uri): i
            for i in todo}
    while refs:
        done, _ = ray.wait(list(refs), num_returns=1)
        i = refs.pop(done[0])
        try:
            metas[i] = ray.get(done[0])
        except Exception as e:
            for r in refs:
                ray.cancel(r)
            raise _unwrap(e, f"tokenizing {inputs[i]}") from None
        lease.ensure()


class KeyWorkerImpl:
    """Body of the key worker actor: holds the model, runs units.

    Two concurrency groups: `compute` runs one unit at a time; `control` answers pings and
    progress queries while a unit runs."""

    def __init__(self, model_path: str, key_layer: str, device: str, compute_dtype: str, threads: int,
                 root_uri: str):
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        torch.set_num_threads(threads)
        self.storage = Storage.from_uri(root_uri)
        self.encoder = load_encoder(model_path, key_layer, device, compute_dtype)
        self.unit_rows: tuple[int, int] = (-1, 0)  # (unit id, rows computed so far)

    @ray.method(concurrency_group="control")
    def ping(self) -> bool:
        return True

    @ray.method(concurrency_group="control")
    def progress(self) -> tuple[int, int]:
        return self.unit_rows

    @ray.method(concurrency_group="compute")
    def run(self, unit: dict, params: dict) -> dict:
        u = Unit.from_dict(unit)
        self.unit_rows = (u.id, 0)

        def on_rows(n: int) -> None:
            self.unit_rows = (u.id, self.unit_rows[1] + n)
        return run_unit(u, self.storage, self.encoder, UnitParams(**params), on_rows)


WORKER_CONCURRENCY = {"compute": 1, "control": 1}


# ---------------------------------------------------------------------------------------------


@dataclass
class BuildResult:
    manifest: Manifest
    already_complete: bool = False
    seconds: float = 0.0
    units_run: int = 0
    units_skipped: int = 0
    keys_written: int = 0
    skipped_documents: int = 0
    stats: dict = field(default_factory=dict)

    def summary(self) -> str:
        m = self.manifest
        if self.already_complete:
            return f"datastore is already complete: {m.num_keys:,} keys in {len(m.shards)} shards; nothing to do"
        rate = self.keys_written / self.seconds if self.seconds > 0 else 0.0
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in self.stats.items())
        return (f"built {m.num_keys:,} keys in {len(m.shards)} shards in {self.seconds:.1f}s "
                f"({rate:,.0f} keys/s this run; {self.units_run} units run, {self.units_skipped} already committed; "
                f"{self.skipped_documents} documents skipped)" + (f"\nstage ends: {stages}" if stages else ""))


def _identity(cfg: BuildConfig, info: ModelInfo, window: int, min_context: int, inputs: list[str],
              compute_dtype: str | None) -> dict:
    ident = {"model_sha256": info.sha256, "tokenizer_sha256": info.tokenizer_sha256, "key_layer": cfg.key_layer,
             "window": window, "min_context": min_context, "mode": cfg.mode, "format": cfg.format,
             "text_field": cfg.text_field, "inputs": inputs, "shard_rows": cfg.shard_rows,
             "unit_tokens": cfg.unit_tokens, "row_group_rows": cfg.row_group_rows}
    if compute_dtype is not None:
        ident["compute_dtype"] = compute_dtype
    return ident


def _explicit_dtype(cfg: BuildConfig) -> str | None:
    """The compute dtype when it does not depend on the cluster's hardware."""
    if cfg.compute_dtype != "auto":
        return cfg.compute_dtype
    if cfg.device == "cpu":
        return "float32"
    return None


def _unwrap(e: BaseException, what: str) -> BuildError:
    return unwrap_task_error(e, what, USER_ERRORS, BuildError)


def _retryable(e: BaseException) -> bool:
    import ray.exceptions as rex
    cause = getattr(e, "cause", None)
    if isinstance(cause, (UnitError, InputError, ModelError, ValueError)):
        return False
    return isinstance(e, (rex.RayActorError, rex.WorkerCrashedError, rex.ObjectLostError,
                          rex.OutOfMemoryError)) or isinstance(cause, StorageError)


def build(cfg: BuildConfig) -> BuildResult:
    """Run (or resume) a build. Raises BuildError with an actionable message on bad input.

    Start-up is overlapped: the model is inspected (config, tokenizer, weight hash) while
    Ray starts, and the key workers load the model while the driver takes the lease and
    tokenizes the corpus."""
    t0 = time.perf_counter()
    try:
        inputs = expand_inputs(cfg.corpus)
        formats = [detect_format(u, cfg.format) for u in inputs]
        model_dir = resolve_model_dir(cfg.model)
        # from config.json alone (no torch import): flag errors before anything is written
        window, min_context = cfg.resolve_window(config_max_positions(model_dir))
        storage = Storage.from_uri(cfg.out)
        finished = storage.exists(MANIFEST)
        if not finished:
            storage.check_writable()
    except USER_ERRORS as e:
        raise BuildError(str(e)) from None

    def inspect() -> ModelInfo:
        return inspect_model(model_dir, cfg.key_layer, name=cfg.model)

    if finished:  # nothing to do (or a clear refusal), without starting Ray
        try:
            info = inspect()
            m = load_manifest(storage)
            compare_identity(m.identity, _identity(cfg, info, window, min_context, inputs, _explicit_dtype(cfg)),
                             storage.uri)
        except USER_ERRORS as e:
            raise BuildError(str(e)) from None
        log.info("%s is already complete (%d keys); nothing to do", storage.uri, m.num_keys)
        return BuildResult(m, already_complete=True)

    with cf.ThreadPoolExecutor(1, thread_name_prefix="knnlm-inspect") as pool:
        inspecting = pool.submit(inspect)
        with ray_session(cfg.address) as ray:
            marks = {"t0": t0, "ray_up": time.perf_counter() - t0}
            cpus, gpus = cluster_resources()
            use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)
            if cfg.device == "cuda" and gpus == 0:
                raise BuildError("--device cuda: the Ray cluster has no GPUs (use --device cpu or auto)")
            compute_dtype = (cfg.compute_dtype if cfg.compute_dtype != "auto"
                             else ("bfloat16" if use_cuda else "float32"))
            actors = []
            lease = None
            try:
                actors = _start_workers(cfg, storage, model_dir, use_cuda, cpus, max_node_cpus(), gpus,
                                        compute_dtype)
                info = inspecting.result()
                ident = _identity(cfg, info, window, min_context, inputs, compute_dtype)
                marks["model_inspected"] = time.perf_counter() - t0
                lease = Lease(storage, cfg.lease_ttl)
                lease.acquire()
                marks["lease"] = time.perf_counter() - t0
                return _build_locked(cfg, storage, lease, actors, info, ident, inputs, formats, window,
                                     min_context, use_cuda, compute_dtype, marks)
            except USER_ERRORS as e:
                raise BuildError(str(e)) from None
            finally:
                for a in actors:
                    ray.kill(a)
                if lease is not None:
                    lease.release()


def _build_locked(cfg, storage: Storage, lease: Lease, actors: list, info: ModelInfo, ident: dict,
                  inputs: list[str], formats: list[str], window: int, min_context: int, use_cuda: bool,
                  compute_dtype: str, marks: dict) -> BuildResult:
    try:
        have = json.loads(storage.read_text(REQUEST))
        compare_identity(have, ident, storage.uri + " (an unfinished build)")
        log.info("resuming the unfinished build in %s", storage.uri)
    except NotFound:
        storage.write_text(REQUEST, json.dumps(ident))
    n_clean = storage.cleanup_incomplete()
    if n_clean:
        log.info("cleaned up %d incomplete writes of an earlier attempt", n_clean)

    # ---- tokenize -------------------------------------------------------------------------
    metas: list[dict | None] = [None] * len(inputs)
    todo = []
    for i in range(len(inputs)):
        try:
            metas[i] = json.loads(storage.read_text(tokens_meta_path(i)))
        except NotFound:
            todo.append(i)
            continue
        size = size_uri(inputs[i])
        if size != metas[i]["bytes"]:
            raise BuildError(f"--corpus {inputs[i]} changed since this unfinished build tokenized it "
                             f"({metas[i]['bytes']} bytes then, {size} now); rerun with a new --out")
    if todo:
        _tokenize_stage(cfg, storage, lease, info, inputs, formats, todo, metas)
    marks["tokenized"] = time.perf_counter() - marks["t0"]

    skipped = [(inputs[i], s) for i, m in enumerate(metas) for s in m["skipped"]]
    for uri, s in skipped[:SHOW_SKIPPED]:
        log.warning("skipped %s %s: %s", uri, s["where"], s["reason"])
    if len(skipped) > SHOW_SKIPPED:
        log.warning("... and %d more skipped documents", len(skipped) - SHOW_SKIPPED)
    total = sum(count_targets(m["seq_lengths"]) for m in metas)
    if total == 0:
        # nothing to resume: forget the tokenized inputs so a rerun after fixing the corpus reads it again
        storage.delete_prefix("tokens/")
        storage.delete(REQUEST)
        first = f"; first: {skipped[0][0]} {skipped[0][1]['where']}: {skipped[0][1]['reason']}" if skipped else ""
        raise BuildError(f"the corpus ({len(inputs)} input files) has no usable document: "
                         f"{len(skipped)} skipped (empty, undecodable, without the text field or shorter than "
                         f"2 tokens){first}; check --corpus, --format and --text-field")

    # ---- plan -----------------------------------------------------------------------------
    doc_base = np.concatenate([[0], np.cumsum([m["num_records"] for m in metas])]).tolist()
    units = plan_units([(m["seq_lengths"], m["seq_records"]) for m in metas], window, min_context,
                       cfg.unit_tokens)
    committed = {int(p.rsplit("/", 1)[-1].split(".")[0]) for p in storage.list("_build/units/")}
    pending_units = [u for u in units if u.id not in committed]
    log.info("%d keys in %d units (%d already committed)", total, len(units), len(units) - len(pending_units))

    def params(u: Unit) -> dict:  # builder.unit.UnitParams
        return dict(window=window, min_context=min_context, mode=cfg.mode, batch_size=cfg.batch_size,
                    shard_rows=cfg.shard_rows, row_group_rows=cfg.row_group_rows, file_uri=inputs[u.file],
                    doc_base=doc_base[u.file] if cfg.mode == "document" else u.file, pad_id=0,
                    writer_threads=4 if use_cuda else 1)

    records: dict[int, dict] = {}
    keys_written = 0
    if pending_units:
        keys_written = _run_key_stage(cfg, lease, actors, pending_units, params, records, total,
                                      total - sum(u.num_targets for u in pending_units), marks)
    marks["keys"] = time.perf_counter() - marks["t0"]

    # ---- commit the manifest --------------------------------------------------------------
    missing = [u.id for u in units if u.id not in records]  # committed by an earlier run
    with cf.ThreadPoolExecutor(16) as pool:  # thousands of small GETs: in parallel
        for uid, text in zip(missing, pool.map(lambda i: storage.read_text(unit_record_path(i)), missing)):
            records[uid] = json.loads(text)
    shards, first_id = [], 0
    for u in units:
        rec = records[u.id]
        for s in rec["shards"]:
            shards.append({"path": s["path"], "num_rows": s["num_rows"], "first_id": first_id,
                           "checksum": s["checksum"]})
            first_id += s["num_rows"]
    if first_id != total:
        raise BuildError(f"internal error: shards hold {first_id} rows, the plan has {total} targets")
    files = []
    for i, m in enumerate(metas):
        files.append({k: m[k] for k in ("uri", "format", "bytes", "sha256", "num_records", "num_tokens", "tokens")}
                     | {"num_sequences": len(m["seq_lengths"]), "num_keys": count_targets(m["seq_lengths"]),
                        "skipped": len(m["skipped"])})
    stage_ends = {k: v for k, v in marks.items() if k != "t0"}
    manifest = Manifest(
        num_keys=total, dim=info.hidden_size, model=info.model_dict(), tokenizer=info.tokenizer_dict(),
        key_layer=cfg.key_layer, key_module=info.key_module, window=window, min_context=min_context, mode=cfg.mode,
        compute_dtype=compute_dtype,
        corpus={"inputs": cfg.corpus, "format": cfg.format, "text_field": cfg.text_field, "files": files,
                "num_documents": int(doc_base[-1]) if cfg.mode == "document" else len(inputs),
                "skipped_documents": len(skipped),
                "stream_record_separator": "\\n\\n" if cfg.mode == "stream" else None},
        shards=shards, identity=ident, shard_format=SHARD_FORMAT,
        build={"shard_rows": cfg.shard_rows, "unit_tokens": cfg.unit_tokens, "row_group_rows": cfg.row_group_rows,
               "num_units": len(units), "device": "cuda" if use_cuda else "cpu",
               "stage_end_seconds": {k: round(v, 2) for k, v in stage_ends.items()},
               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": _versions()})
    manifest.validate()
    lease.check()  # fencing: only the lease holder commits
    storage.write_text(MANIFEST, manifest.to_json())
    # the manifest is the truth now: drop progress records and shards no manifest lists
    listed = {s["path"] for s in shards}
    for p in storage.list("shards/"):
        if p not in listed:
            storage.delete(p)
    storage.delete_prefix("_build/units/")
    storage.delete(REQUEST)
    storage.cleanup_incomplete()  # uploads abandoned by workers that died during this run
    stage_ends["committed"] = time.perf_counter() - marks["t0"]
    return BuildResult(manifest, seconds=stage_ends["committed"], stats=stage_ends, units_run=len(pending_units),
                       units_skipped=len(units) - len(pending_units), keys_written=keys_written,
                       skipped_documents=len(skipped))


def _start_workers(cfg, storage, model_dir, use_cuda, cpus, node_cpus, gpus, compute_dtype) -> list:
    """Key worker actors; they load the model while the driver tokenizes the corpus."""

    n_workers = cfg.workers or (gpus if use_cuda else 1)
    # torch threads per CPU worker: its share of the cluster, never more than one node has
    threads = 1 if use_cuda else max(1, min(node_cpus, cpus // n_workers))
    # CPU workers reserve one logical CPU each (not `threads`) so tokenize tasks can run beside them
    Actor = ray.remote(concurrency_groups=WORKER_CONCURRENCY)(KeyWorkerImpl).options(
        num_gpus=1 if use_cuda else 0, num_cpus=1, max_restarts=-1, max_task_retries=0)
    device = "cuda" if use_cuda else "cpu"
    log.info("%d key workers (%s, %s%s)", n_workers, device, compute_dtype,
             "" if use_cuda else f", {threads} threads each")
    return [Actor.remote(model_dir, cfg.key_layer, device, compute_dtype, threads, storage.uri)
            for _ in range(n_workers)]


def _run_key_stage(cfg, lease, actors, units, params, records, total, done_before, marks) -> int:
    """Dispatch units to the worker actors with backpressure; redo the units of dead workers.

    A worker that dies is restarted by Ray; until a ping answers, nothing is sent to it.
    A unit lost with its worker is requeued (at most MAX_UNIT_ATTEMPTS times when the
    failure came from the unit itself); a worker that cannot start ends the build with
    its own error."""
    import ray.exceptions as rex
    from tqdm import tqdm

    queue = collections.deque(units)
    attempts: collections.Counter = collections.Counter()
    inflight: dict = {}                  # ref -> (unit, actor index)
    pings: dict = {}                     # ref -> actor index (a restarting worker)
    alive = set(range(len(actors)))
    healthy = set(alive)
    load = [0] * len(actors)
    written = 0
    # one key per token: the rate reads as tokens/s, the count as keys written
    bar = tqdm(total=total, initial=done_before, unit="tok", unit_scale=True, disable=not cfg.progress,
               desc="keys", smoothing=0.1, dynamic_ncols=True)
    t_stage = last_log = last_poll = time.monotonic()
    n_shards = 0

    def show(rows: int) -> None:
        """Progress: rows written this run, plus those computed by units still running."""
        nonlocal last_log
        bar.update(done_before + rows - bar.n)
        if not cfg.progress and time.monotonic() - last_log >= PROGRESS_LOG_SECONDS:
            last_log = time.monotonic()
            _log_progress(done_before + rows, total, rows, last_log - t_stage)

    def worker_down(a: int, e: BaseException) -> None:
        healthy.discard(a)
        if isinstance(e, rex.ActorDiedError) and not isinstance(e, rex.ActorUnavailableError) and \
                getattr(e, "cause", None) is not None:
            alive.discard(a)  # its constructor failed: it will not come back
            if not alive:
                raise _unwrap(e, "starting the key workers") from None
        elif a not in pings.values():
            pings[actors[a].ping.remote()] = a

    try:
        while queue or inflight:
            # backpressure: at most 2 units per worker (one running, one queued behind it)
            for a in sorted(healthy, key=lambda j: load[j]):
                while queue and load[a] < 2:
                    u = queue.popleft()
                    inflight[actors[a].run.remote(u.to_dict(), params(u))] = (u, a)
                    load[a] += 1
            if not inflight and not pings:
                raise BuildError("no key worker is available")
            ready, _ = ray.wait(list(inflight) + list(pings), num_returns=1, timeout=PROGRESS_POLL_SECONDS)
            lease.ensure()
            if time.monotonic() - last_poll >= PROGRESS_POLL_SECONDS:
                last_poll = time.monotonic()
                show(written + _rows_in_flight([actors[a] for a in healthy if load[a] > 0], records))
            for ref in ready:
                if ref in pings:
                    a = pings.pop(ref)
                    try:
                        ray.get(ref)
                        healthy.add(a)
                        log.info("key worker %d is back", a)
                    except Exception as e:
                        time.sleep(0.5)
                        worker_down(a, e)
                    continue
                u, a = inflight.pop(ref)
                load[a] -= 1
                try:
                    rec = ray.get(ref)
                except (rex.RayActorError, rex.WorkerCrashedError) as e:
                    # the worker died (or was restarting): the unit is redone elsewhere
                    log.warning("key worker %d died during unit %d (%s); the unit will run again", a, u.id,
                                type(e).__name__)
                    queue.appendleft(u)
                    worker_down(a, e)
                    continue
                except Exception as e:
                    attempts[u.id] += 1
                    if _retryable(e) and attempts[u.id] < MAX_UNIT_ATTEMPTS:
                        log.warning("unit %d failed on worker %d (%s); retrying (attempt %d of %d)", u.id, a,
                                    type(e).__name__, attempts[u.id] + 1, MAX_UNIT_ATTEMPTS)
                        queue.appendleft(u)
                        continue
                    raise _unwrap(e, f"unit {u.id} ({params(u)['file_uri']})") from None
                records[u.id] = rec
                marks.setdefault("first_unit", time.perf_counter() - marks["t0"])
                written += rec["num_rows"]
                n_shards += len(rec["shards"])
                bar.set_postfix(shards=n_shards, refresh=False)
                show(written)
    finally:
        bar.close()
        for ref in inflight:
            ray.cancel(ref, force=False)
    return written


def _rows_in_flight(actors: list, records: dict) -> int:
    """Rows computed so far by the units the given workers are running (best effort)."""
    refs = [a.progress.remote() for a in actors]
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=1.0)
    rows = 0
    for r in done:
        try:
            uid, n = ray.get(r)
        except Exception:  # a worker that just died: its unit runs again
            continue
        if uid >= 0 and uid not in records:
            rows += n
    return rows


def _log_progress(done: int, total: int, written: int, seconds: float) -> None:
    """The progress bar's content as a log line (no terminal: CI, Ray jobs, nohup)."""
    rate = written / seconds if seconds > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else float("inf")
    log.info("keys %s/%s (%.0f%%), %s keys/s, ETA %s", f"{done:,}", f"{total:,}", 100.0 * done / max(total, 1),
             f"{rate:,.0f}", time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "?")


def _versions() -> dict:
    return package_versions(("knnlm-datastore", "torch", "transformers", "tokenizers", "pyarrow", "ray"))

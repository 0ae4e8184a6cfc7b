"""Build orchestration: corpus → tokens → plan → key workers → shards → manifest.

Stages read only artifacts under the datastore root (builder/layout.py), so a killed driver or
worker loses at most the units in flight:

    tokens/<file>.bin|.seqs|.json  tokenized inputs (int32 LE tokens, sequence table, counts)
    shards/<unit>-<part>.parquet key shards (deterministic names)
    _build/request.json         the identity of the build in progress
    _build/units/<unit>.json    a unit's commit record (its shards, rows, checksums)
    _build/lease.json           the build lease
    manifest.json               written last; lists every shard with first_id

The stages: builder/build_tokens.py (tokenize), builder/unit.py (plan), builder/build_keys.py
(key workers), builder/build_manifest.py (the manifest and its commit).
"""
from __future__ import annotations

import concurrent.futures as cf
import itertools
import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from builder.build_errors import USER_ERRORS, BuildError
from builder.build_keys import run_key_stage, start_workers
from builder.build_manifest import assemble_manifest, commit_manifest, read_unit_records
from builder.build_tokens import tokenize_corpus
from builder.config import BuildConfig
from builder.corpus import detect_format
from builder.layout import BUILD_REQUEST, MANIFEST, TOKENS_DIR, UNITS_DIR, unit_record_id
from builder.keys import default_compute_dtype
from builder.lease import Lease
from builder.manifest import Manifest, compare_identity, load_manifest
from builder.model_dir import config_dtype
from builder.modelinfo import ModelInfo, config_max_positions, inspect_model, resolve_model_dir
from builder.runtime import check_reachable, cluster_resources, max_node_cpus, ray_session
from builder.seqs import SeqTable
from builder.storage import NotFound, Storage, StorageError, expand_inputs
from builder.unit import UnitSpan, stream_units

log = logging.getLogger(__name__)
SHOW_SKIPPED = 20


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


def build(cfg: BuildConfig, lease: Lease | None = None, doc_offset: int = 0) -> BuildResult:
    """Run (or resume) a build. Raises BuildError with an actionable message on bad input.

    An ingestion (builder/ingest.py) runs a build rooted at its own folder under the datastore with
    `lease`, the datastore's build lease it holds (none is taken or released here), and `doc_offset`,
    added to every row's `doc` (the datastore's documents, or input files in stream mode, before it).

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
        if cfg.address:
            check_reachable(cfg.address)   # before --out is touched
        storage = Storage.from_uri(cfg.out)
        try:
            finished = storage.exists(MANIFEST)
        except StorageError as e:
            raise StorageError(f"--out {cfg.out}: {e}") from None
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
                             else default_compute_dtype(use_cuda, config_dtype(model_dir)))
            actors = []
            own_lease = lease is None
            try:
                actors = start_workers(cfg, storage, model_dir, use_cuda, cpus, max_node_cpus(), gpus,
                                       compute_dtype)
                info = inspecting.result()
                ident = _identity(cfg, info, window, min_context, inputs, compute_dtype)
                marks["model_inspected"] = time.perf_counter() - t0
                if own_lease:
                    lease = Lease(storage, cfg.lease_ttl)
                    lease.acquire()
                marks["lease"] = time.perf_counter() - t0
                return _build_locked(cfg, storage, lease, actors, info, ident, inputs, formats, window,
                                     min_context, use_cuda, compute_dtype, marks, doc_offset)
            except USER_ERRORS as e:
                raise BuildError(str(e)) from None
            finally:
                for a in actors:
                    ray.kill(a)
                if own_lease and lease is not None:
                    lease.release()


def _build_locked(cfg, storage: Storage, lease: Lease, actors: list, info: ModelInfo, ident: dict,
                  inputs: list[str], formats: list[str], window: int, min_context: int, use_cuda: bool,
                  compute_dtype: str, marks: dict, doc_offset: int = 0) -> BuildResult:
    try:
        have = json.loads(storage.read_text(BUILD_REQUEST))
        compare_identity(have, ident, storage.uri + " (an unfinished build)")
        log.info("resuming the unfinished build in %s", storage.uri)
    except NotFound:
        storage.write_text(BUILD_REQUEST, json.dumps(ident))
    n_clean = storage.cleanup_incomplete()
    if n_clean:
        log.info("cleaned up %d incomplete writes of an earlier attempt", n_clean)

    # ---- tokenize, plan --------------------------------------------------------------------
    metas = tokenize_corpus(cfg, storage, lease, info, inputs, formats)
    marks["tokenized"] = time.perf_counter() - marks["t0"]
    plan = plan_build(cfg, storage, inputs, metas, window, min_context)
    total, units, pending_units = plan.total, plan.units, plan.pending

    def params(u: UnitSpan) -> dict:  # builder.unit.UnitParams
        return dict(window=window, min_context=min_context, mode=cfg.mode, batch_size=cfg.batch_size,
                    shard_rows=cfg.shard_rows, row_group_rows=cfg.row_group_rows, file_uri=inputs[u.file],
                    doc_base=doc_offset + (plan.doc_base[u.file] if cfg.mode == "document" else u.file), pad_id=0,
                    writer_threads=4 if use_cuda else 1)

    # ---- keys -----------------------------------------------------------------------------
    records: dict[int, dict] = {}
    keys_written = 0
    if pending_units:
        keys_written = run_key_stage(cfg, lease, actors, pending_units, params, records, total,
                                     total - sum(u.num_targets for u in pending_units), marks)
    marks["keys"] = time.perf_counter() - marks["t0"]

    # ---- commit the manifest --------------------------------------------------------------
    read_unit_records(storage, units, records)            # those committed by an earlier run
    stage_ends = {k: v for k, v in marks.items() if k != "t0"}
    manifest = assemble_manifest(cfg, info, ident, metas, units, records, window=window, min_context=min_context,
                                 compute_dtype=compute_dtype, device="cuda" if use_cuda else "cpu",
                                 num_skipped=plan.num_skipped, stage_ends=stage_ends)
    commit_manifest(storage, lease, manifest)
    stage_ends["committed"] = time.perf_counter() - marks["t0"]
    return BuildResult(manifest, seconds=stage_ends["committed"], stats=stage_ends, units_run=len(pending_units),
                       units_skipped=len(units) - len(pending_units), keys_written=keys_written,
                       skipped_documents=plan.num_skipped)


@dataclass
class Plan:
    """What the driver holds of the corpus for the key stage: counts and compact units, O(files + units)."""
    total: int                  # keys (targets) of the corpus
    units: list[UnitSpan]
    pending: list[UnitSpan]     # those no earlier run committed
    doc_base: list[int]         # (files + 1,) the first document index of each file (document mode)
    num_skipped: int            # skipped documents


def plan_build(cfg, storage: Storage, inputs: list[str], metas: list[dict], window: int, min_context: int) -> Plan:
    """The build's plan from the tokens metas' counts and the sequence tables (read in chunks of
    builder.seqs.CHUNK_ROWS rows: the driver's memory does not grow with the documents); logs the first
    skipped documents and "N keys in M units (K already committed)". A corpus without a usable document
    is refused (its tokens forgotten, so a rerun after fixing it reads it again)."""
    num_skipped = sum(m["num_skipped"] for m in metas)
    shown = list(itertools.islice(((inputs[i], s) for i, m in enumerate(metas) for s in m["skipped"]), SHOW_SKIPPED))
    for uri, s in shown:
        log.warning("skipped %s %s: %s", uri, s["where"], s["reason"])
    if num_skipped > len(shown):
        log.warning("... and %d more skipped documents", num_skipped - len(shown))
    total = sum(m["num_targets"] for m in metas)
    if total == 0:
        storage.delete_prefix(TOKENS_DIR)
        storage.delete(BUILD_REQUEST)
        first = f"; first: {shown[0][0]} {shown[0][1]['where']}: {shown[0][1]['reason']}" if shown else ""
        raise BuildError(f"the corpus ({len(inputs)} input files) has no usable document: "
                         f"{num_skipped} skipped (empty, undecodable, without the text field or shorter than "
                         f"2 tokens){first}; check --corpus, --format and --text-field")
    doc_base = np.concatenate([[0], np.cumsum([m["num_records"] for m in metas])]).tolist()
    tables = [SeqTable(storage, m["tokens"], m) for m in metas]
    units = list(stream_units((t.chunks() for t in tables), window, min_context, cfg.unit_tokens))
    committed = {unit_record_id(p) for p in storage.list(UNITS_DIR)}
    pending = [u for u in units if u.id not in committed]
    log.info("%d keys in %d units (%d already committed)", total, len(units), len(units) - len(pending))
    return Plan(total, units, pending, doc_base, num_skipped)

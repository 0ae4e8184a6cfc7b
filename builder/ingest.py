"""`knnlm ingest DATASTORE_URI --corpus ... --name NAME`: a new corpus into a finished datastore,
published as its next version (builder/versions.py).

    ingest/<name>/                         a build rooted here (builder/build.py) with the datastore's model,
                                           key layer, windows, mode, compute dtype and shard layout: tokens/,
                                           shards/, _build/ while it runs, manifest.json once its keys are done
    ingest/<name>/staged.json              the current version + these keys (ids after the existing ones):
                                           what the add tasks read (builder/add.py add_shard)
    ingest/<name>/index/<i>-of-<n>.faiss   the new keys encoded with the existing trained index
    ingest/<name>/_index/                  that add's request and its per-shard commit records

Everything runs under the datastore's build lease and index lease: another ingestion (of any name), a
build, an add or a train-index is refused while one runs, so ids never interleave. The steps: keys
(resumed as a build resumes), index shards (resumed per shard; redone when another version, e.g. a
compaction, was published meanwhile), drift (builder/drift.py), publish (one atomic write of
manifest.json), clean-up. Killed anywhere, a rerun resumes; until the publish, readers see the previous
version, whole, and nothing partial is ever published. A name is ingested once: a rerun of a published
ingestion does nothing (without starting Ray); another corpus under a used name is refused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass

from builder.add import plan_ranges, run_add_tasks
from builder.build import build
from builder.build_errors import USER_ERRORS as BUILD_USER_ERRORS
from builder.config import AddConfig, BuildConfig, IngestConfig
from builder.corpus import detect_format
from builder.drift import DRIFT_SAMPLE, drift_record, sample_ids
from builder.errors import KnnlmError
from builder.faults import maybe_fault
from builder.index import is_fastscan
from builder.layout import (
    BUILD_LEASE,
    BUILD_REQUEST,
    INDEX_LEASE,
    MANIFEST,
    ingest_index_dir,
    ingest_index_record_path,
    ingest_index_request_path,
    ingest_index_shard_path,
    ingest_root,
    ingest_staged_path,
)
from builder.lease import Lease, LeaseError
from builder.manifest import Manifest, load_manifest
from builder.modelinfo import inspect_model
from builder.rows import read_rows
from builder.runtime import check_reachable, ray_session
from builder.storage import NotFound, Storage, expand_inputs, local_path, read_uri, size_uri
from builder.train import IndexBuildError, load_trained_index
from builder.versions import is_removed, now, publish, removed_ranges

log = logging.getLogger(__name__)
USER_ERRORS = BUILD_USER_ERRORS + (IndexBuildError,)
DRIFT_SEED = 0


class IngestError(KnnlmError, RuntimeError):
    """An ingestion refused or failed for a reason stated in the message; nothing was published."""


@dataclass
class IngestResult:
    manifest: Manifest
    name: str
    already_done: bool = False
    version: int = 0
    keys_added: int = 0
    first_id: int = 0
    files: int = 0
    index_shards_added: int = 0
    drift: dict | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        if self.already_done:
            return (f"{self.name} is already ingested in version {self.version} ({self.keys_added:,} keys); "
                    "nothing to do")
        shards = (f"; {self.index_shards_added} new index shards" if self.index_shards_added else
                  "; no index shards yet (`knnlm add` encodes every key)")
        d = self.drift
        drift = (f"; coarse quantization error {d['new_coarse_error']:.4g} (existing keys "
                 f"{d['base_coarse_error']:.4g}, ratio {d['ratio']:.2f})" if d else "")
        return (f"ingested {self.name}: {self.keys_added:,} keys (ids {self.first_id:,}.."
                f"{self.first_id + self.keys_added - 1:,}) from {self.files} files as version {self.version} in "
                f"{self.seconds:.1f}s{shards}{drift}")


# ---------------------------------------------------------------------------------------------
# checks before any work


def _describe(files: list) -> str:
    return f"{len(files)} files starting {[f[0] for f in files[:2]]}"


def check_once(m: Manifest, name: str, files: list[dict]) -> dict | None:
    """The record of ingestion `name` if it was published from these files (uri, bytes); None if the name
    is new; an IngestError naming both corpora if it was published from others."""
    rec = (m.ingestions or {}).get(name)
    if rec is None:
        return None
    have = [(f["uri"], f["bytes"]) for f in rec["files"]]
    want = [(f["uri"], f["bytes"]) for f in files]
    if have == want:
        return rec
    raise IngestError(f"--name {name}: already ingested in version {rec['version']} from {_describe(have)}; this "
                      f"--corpus is {_describe(want)}: use another --name for another corpus")


def check_unfinished(storage: Storage, name: str, inputs: list[str]) -> None:
    """Refuse another corpus under the name of an unfinished (killed) ingestion, naming both corpora."""
    sub = Storage.from_uri(storage.url(ingest_root(name)))
    try:
        have = json.loads(sub.read_text(BUILD_REQUEST)).get("inputs")
    except NotFound:
        try:
            have = json.loads(sub.read_text(MANIFEST)).get("identity", {}).get("inputs")
        except NotFound:
            return
    if have is not None and have != inputs:
        raise IngestError(f"--name {name}: an unfinished ingestion of {_describe([(u,) for u in have])} is in "
                          f"{sub.uri}; this --corpus is {_describe([(u,) for u in inputs])}: rerun with its corpus to "
                          "finish it, or use another --name")


def removed_sources(m: Manifest) -> dict[str, dict]:
    """{source URI or file sha256: its removal} of the recorded removals by --source."""
    out: dict[str, dict] = {}
    for r in m.removals or []:
        srcs = r.get("source")
        if not srcs:
            continue
        for s in [srcs] if isinstance(srcs, str) else list(srcs):
            out[s] = r
            full = s if "://" in s else local_path(s)
            out[full] = r
            for f in m.corpus.get("files", []):
                if f.get("uri") in (s, full) and f.get("sha256"):
                    out[f["sha256"]] = r
        for digest in [r["sha256"]] if isinstance(r.get("sha256"), str) else list(r.get("sha256") or []):
            out[digest] = r
    return out


def check_removals(m: Manifest, uri: str, inputs: list[str], readd: bool) -> None:
    """Refuse a corpus file that a recorded removal took out (same URI or same content), unless --readd."""
    removed = removed_sources(m)
    if not removed or readd:
        return
    by_content = any(k.startswith("sha256:") for k in removed)
    for u in inputs:
        r = removed.get(u)
        if r is None and by_content:
            r = removed.get("sha256:" + hashlib.sha256(read_uri(u)).hexdigest())
        if r is not None:
            raise IngestError(f"--corpus {u}: it is the source {r.get('source')!r} that a removal took out of {uri} "
                              f"in version {r.get('version')}; a removal is never undone silently: add --readd to "
                              "ingest it again")


def resolve_model(cfg: IngestConfig, m: Manifest):
    """The model to run (--model, else the manifest's path or name), refused unless its weights and tokenizer
    are the datastore's."""
    model = cfg.model
    if not model:
        path = m.model.get("path")
        model = path if path and os.path.isdir(path) else m.model["name"]
    info = inspect_model(model, m.key_layer, name=m.model.get("name"))
    for what, have, want in (("weights", info.sha256, m.model.get("sha256")),
                             ("tokenizer", info.tokenizer_sha256, m.tokenizer.get("sha256"))):
        if want and have != want:
            raise IngestError(f"--model {model}: its {what} ({have}) are not the datastore's ({want}, "
                              f"{m.model.get('name')}); ingest with the model that built the datastore")
    return model


def ingest_format(cfg: IngestConfig, m: Manifest) -> str:
    """--format, else the datastore's own (a WikiText datastore ingests WikiText, not one text document)."""
    return cfg.format or (m.corpus or {}).get("format") or "auto"


def sub_build_config(cfg: IngestConfig, m: Manifest, model: str, root: str) -> BuildConfig:
    """The build of the new corpus: every setting that shapes a key or a shard is the datastore's."""
    ident, b = m.identity or {}, m.build or {}
    return BuildConfig(corpus=cfg.corpus, model=model, out=root, key_layer=m.key_layer, window=m.window,
                       min_context=m.min_context, mode=m.mode, format=ingest_format(cfg, m), text_field=cfg.text_field,
                       shard_rows=ident.get("shard_rows") or b["shard_rows"],
                       unit_tokens=ident.get("unit_tokens") or b["unit_tokens"],
                       row_group_rows=ident.get("row_group_rows") or b["row_group_rows"], workers=cfg.workers,
                       address=cfg.address, device=cfg.device, compute_dtype=m.compute_dtype,
                       batch_size=cfg.batch_size, lease_ttl=cfg.lease_ttl, progress=cfg.progress)


# ---------------------------------------------------------------------------------------------
# the stage


def ingest(cfg: IngestConfig) -> IngestResult:
    """Run (or resume, or find done) ingestion `cfg.name`; see the module docstring."""
    t0 = time.perf_counter()
    try:
        storage = Storage.from_uri(cfg.datastore)
        m = load_manifest(storage)
        inputs = expand_inputs(cfg.corpus)
        files = [{"uri": u, "bytes": size_uri(u)} for u in inputs]
        rec = check_once(m, cfg.name, files)
        if rec is not None:
            log.info("%s: %s is already ingested in version %d; nothing to do", storage.uri, cfg.name, rec["version"])
            _finish_cleanup(storage, cfg.name, cfg.lease_ttl)
            return IngestResult(m, cfg.name, already_done=True, version=rec["version"], keys_added=rec["num_keys"],
                                first_id=rec["first_id"], files=len(rec["files"]), drift=rec.get("drift"))
        check_unfinished(storage, cfg.name, inputs)
        for u in inputs:
            detect_format(u, ingest_format(cfg, m))
        check_removals(m, storage.uri, inputs, cfg.readd)
        model = resolve_model(cfg, m)
        if cfg.address:
            check_reachable(cfg.address)
    except USER_ERRORS as e:
        raise IngestError(str(e)) from None

    build_lease = Lease(storage, cfg.lease_ttl, BUILD_LEASE, "build or ingestion")
    index_lease = Lease(storage, cfg.lease_ttl, INDEX_LEASE, "index build or ingestion")
    try:
        build_lease.acquire()
        index_lease.acquire()
        with ray_session(cfg.address):
            return _ingest_locked(cfg, storage, build_lease, index_lease, model, files, t0)
    except USER_ERRORS as e:
        raise IngestError(str(e)) from None
    finally:
        index_lease.release()
        build_lease.release()


def _ingest_locked(cfg: IngestConfig, storage: Storage, build_lease: Lease, index_lease: Lease, model: str,
                   files: list[dict], t0: float) -> IngestResult:
    m = load_manifest(storage)                      # as of now, under the leases
    rec = check_once(m, cfg.name, files)            # published while this run waited for the lease
    if rec is not None:
        return IngestResult(m, cfg.name, already_done=True, version=rec["version"], keys_added=rec["num_keys"],
                            first_id=rec["first_id"], files=len(rec["files"]), drift=rec.get("drift"))
    sub = Storage.from_uri(storage.url(ingest_root(cfg.name)))
    doc_offset = m.corpus["num_documents"] if m.mode == "document" else len(m.corpus["files"])
    res = build(sub_build_config(cfg, m, model, sub.uri), lease=build_lease, doc_offset=doc_offset)
    sm = res.manifest
    if (sm.dim, sm.key_module, sm.compute_dtype) != (m.dim, m.key_module, m.compute_dtype):
        raise IngestError(f"{sub.uri}: its keys (dim {sm.dim}, {sm.key_module}, {sm.compute_dtype}) are not the "
                          f"datastore's (dim {m.dim}, {m.key_module}, {m.compute_dtype}); delete {sub.uri} and rerun")
    new = combine(m, sm, cfg.name)
    added = index_new_keys(cfg, storage, index_lease, m, new)
    drift = measure_drift(storage, sub, m, sm)
    warn_drift(cfg.name, drift, storage.uri)
    version = m.version + 1
    new.ingestions = dict(m.ingestions or {}) | {cfg.name: {
        "version": version, "inputs": list(cfg.corpus),
        "files": [{k: f[k] for k in ("uri", "bytes", "sha256")} for f in sm.corpus["files"]],
        "first_id": m.num_keys, "num_keys": sm.num_keys, "num_documents": sm.corpus["num_documents"],
        "index_shards": len(added), "drift": drift, "finished_at": now()} | ({"readd": True} if cfg.readd else {})}
    event = {"kind": "ingest", "name": cfg.name, "keys_added": sm.num_keys, "first_id": m.num_keys,
             "files": len(sm.corpus["files"]), "documents_added": sm.corpus["num_documents"],
             "index_shards_added": len(added)}
    maybe_fault("ingest", 0)                        # tests: the driver dies just before the publish
    index_lease.check()
    new = publish(storage, build_lease, m, new, event)
    maybe_fault("ingest", 1)                        # tests: ... just after it, before the clean-up
    cleanup(storage, cfg.name, new)
    log.info("published version %d of %s: %s keys (+%s from %s)", new.version, storage.uri, f"{new.num_keys:,}",
             f"{sm.num_keys:,}", cfg.name)
    return IngestResult(new, cfg.name, version=new.version, keys_added=sm.num_keys, first_id=m.num_keys,
                        files=len(sm.corpus["files"]), index_shards_added=len(added), drift=drift,
                        seconds=time.perf_counter() - t0)


def combine(m: Manifest, sm: Manifest, name: str) -> Manifest:
    """The next version: `m` plus the ingestion's key shards (ids after m's) and corpus files (paths under
    ingest/<name>/). `identity` stays the original build's; index shards are added by index_new_keys."""
    new = Manifest.from_dict(json.loads(m.to_json()))
    root, n_old = ingest_root(name) + "/", m.num_keys
    new.shards = [dict(s) for s in m.shards] + [
        {"path": root + s["path"], "num_rows": s["num_rows"], "first_id": n_old + s["first_id"],
         "checksum": s["checksum"]} for s in sm.shards]
    new.num_keys = n_old + sm.num_keys
    c, sc = m.corpus, sm.corpus
    new.corpus = dict(c, inputs=list(c.get("inputs", [])) + list(sc.get("inputs", [])),
                      files=list(c.get("files", [])) + [f | {"tokens": root + f["tokens"], "ingestion": name}
                                                         for f in sc["files"]],
                      num_documents=c["num_documents"] + sc["num_documents"],
                      skipped_documents=(c.get("skipped_documents") or 0) + (sc.get("skipped_documents") or 0))
    new.index_merged = None
    new.validate()
    return new


def index_new_keys(cfg: IngestConfig, storage: Storage, lease: Lease, base: Manifest, new: Manifest) -> list[dict]:
    """Encode the new keys [base.num_keys, new.num_keys) with the existing trained index into index shards of
    their own (Ray tasks of builder/add.py, resumable per shard), list them in `new`; return them. Without
    index shards yet, only the keys are added (a later `knnlm add` encodes them all)."""
    name = cfg.name
    if not base.index or not base.index_shards:
        log.info("%s has no index shards yet: only the keys are added (`knnlm add` encodes them all)", storage.uri)
        new.index_shards = None
        return []
    if base.index_merged:
        log.warning("the merged index %s does not hold the new keys and is dropped from this version: rerun "
                    "`knnlm add %s --merge` to merge again", base.index_merged["path"], storage.uri)
    n_old, n_new = base.num_keys, new.num_keys - base.num_keys
    size = cfg.shard_size
    if size is None and cfg.index_shards is None:
        size = max(1, round(sum(s["num_ids"] for s in base.index_shards) / len(base.index_shards)))
    ranges = [[n_old + a, k] for a, k in plan_ranges(n_new, cfg.index_shards, size)]
    n = len(ranges)
    want = {"base_version": base.version, "base_num_keys": n_old, "index_checksum": base.index["checksum"],
            "keys": [s["checksum"] for s in new.shards[len(base.shards):]], "ranges": ranges}
    try:
        have = json.loads(storage.read_text(ingest_index_request_path(name)))
    except NotFound:
        have = None
    records: dict[int, dict] = {}
    if have != want:
        if have is not None:
            log.info("ingestion %s: its index shards were made for version %s (%s keys); encoding them again on "
                     "version %d (%s keys)", name, have.get("base_version"), have.get("base_num_keys"),
                     base.version, n_old)
        storage.delete_prefix(ingest_index_dir(name))
        storage.delete_prefix(ingest_index_request_path(name).rsplit("/", 1)[0] + "/")
        staged = Manifest.from_dict(json.loads(new.to_json()))
        staged.index_shards = None
        storage.write_text(ingest_staged_path(name), staged.to_json())
        storage.write_text(ingest_index_request_path(name), json.dumps(want))
    else:
        for i, (first, num) in enumerate(ranges):
            try:
                rec = json.loads(storage.read_text(ingest_index_record_path(name, i)))
            except NotFound:
                continue
            if rec["index_checksum"] == want["index_checksum"] and [rec["first_id"], rec["num_ids"]] == [first, num] \
                    and storage.exists(rec["path"]):
                records[i] = rec
    pending = [i for i in range(n) if i not in records]
    log.info("ingestion %s: %d index shards over ids [%d, %d) (%d already committed)", name, n, n_old,
             new.num_keys, n - len(pending))
    if pending:
        acfg = AddConfig(datastore=storage.uri, device=cfg.device, address=cfg.address, lease_ttl=cfg.lease_ttl)
        fastscan = is_fastscan(load_trained_index(storage, base))
        paths = {i: {"manifest_path": ingest_staged_path(name), "path": ingest_index_shard_path(name, i, n),
                     "record_path": ingest_index_record_path(name, i)} for i in range(n)}
        run_add_tasks(acfg, storage, lease, [tuple(r) for r in ranges], pending, records, fastscan, paths)
    added = [{k: records[i][k] for k in ("path", "first_id", "num_ids", "bytes", "checksum")} for i in range(n)]
    if sum(s["num_ids"] for s in added) != n_new:
        raise IndexBuildError(f"internal error: the index shards of ingestion {name} do not cover its keys")
    new.index_shards = [dict(s) for s in base.index_shards] + added
    return added


def measure_drift(storage: Storage, sub: Storage, base: Manifest, sm: Manifest) -> dict | None:
    """builder/drift.py's record for the ingestion's keys (a seeded sample) next to a same-size sample of the
    datastore's existing keys (removed ones left out); None without a trained index."""
    if not base.index:
        return None
    index = load_trained_index(storage, base)
    new_keys = read_rows(sub, sm, sample_ids(sm.num_keys, DRIFT_SAMPLE, DRIFT_SEED), ("key",))["key"]
    ids = sample_ids(base.num_keys, len(new_keys), DRIFT_SEED + 1)
    ids = ids[~is_removed(ids, removed_ranges(base))]
    base_keys = read_rows(storage, base, ids, ("key",))["key"]
    return drift_record(index, new_keys, base_keys)


def warn_drift(name: str, drift: dict | None, uri: str) -> None:
    """A warning with both numbers when the ingestion's keys lie far outside the trained index."""
    if drift and drift["far"]:
        log.warning("ingestion %s: its keys lie far from the trained index's coarse centroids: coarse quantization "
                    "error %.4g vs %.4g for the existing keys (ratio %.2f > %.2f); retrieval for the new text will "
                    "be poor until `knnlm train-index %s --force` (then `knnlm add`)", name,
                    drift["new_coarse_error"], drift["base_coarse_error"], drift["ratio"], drift["threshold"], uri)


def _finish_cleanup(storage: Storage, name: str, ttl: float) -> None:
    """A published ingestion whose driver died before its clean-up: do it now (under the build lease; skipped
    while another run holds it)."""
    if not storage.exists(ingest_staged_path(name)) and not storage.exists(f"{ingest_root(name)}/{MANIFEST}"):
        return
    lease = Lease(storage, ttl, BUILD_LEASE, "build or ingestion")
    try:
        lease.acquire()
    except LeaseError as e:
        log.info("left the clean-up of ingestion %s for later: %s", name, e)
        return
    try:
        cleanup(storage, name, load_manifest(storage))
    finally:
        lease.release()


def cleanup(storage: Storage, name: str, m: Manifest) -> None:
    """After the publish: drop what only the unfinished ingestion needed (its staging, records, the
    sub-build's manifest and index files no version lists)."""
    storage.delete(ingest_staged_path(name))
    storage.delete_prefix(ingest_index_request_path(name).rsplit("/", 1)[0] + "/")
    storage.delete(f"{ingest_root(name)}/{MANIFEST}")
    listed = {s["path"] for s in m.index_shards or []}
    for p in storage.list(ingest_index_dir(name)):
        if p not in listed:
            storage.delete(p)

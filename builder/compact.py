"""`knnlm compact`: a new version without the removed keys (`knnlm remove`), ids contiguous from 0 again.

    shards/v<v>/<old path>.parquet           key shards that held removed rows, rewritten without them
    index/shards/v<v>/<i>-of-<n>.faiss       index shards whose ids were removed or moved, re-encoded from
                                             the compacted key shards with the existing trained index
    tokens/v<v>/<old path>                   token files with removed documents' spans set to 0 (and their
                                             sequence tables and metas beside them)
    _compact/request.json, _compact/shards/<j>.json, _compact/index/<i>.json   an unfinished compaction
                                             (its plan and commit records: a rerun skips what they list)

Remaining keys keep their order; shard j's new first_id is the old one less the removed ids before it
(builder.versions.renumber); wholly removed shards and index shards are dropped. The manifest records
how ids moved (history event "compact": id_moves). Only when everything is written is the version
published (builder.versions.publish); then the files the new version no longer lists go: the old key
and index shards and the removed documents' tokens (older versions/<v>.json still name them).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from builder.add import encode_range
from builder.config import CompactConfig
from builder.dispatch import dispatch, worker_lost
from builder.faults import maybe_fault
from builder.index import file_sha256
from builder.key_shards import COLUMNS, encode_shard, load_shard, read_row_group
from builder.layout import BUILD_LEASE, INDEX_LEASE, compacted_index_shard_path, compacted_shard_path, seqs_beside
from builder.lease import Lease
from builder.manifest import Manifest, load_manifest
from builder.remove import RemoveError, file_docs, meta_path, removed_doc_ranges
from builder.rows import row_group_rows
from builder.runtime import cluster_resources, max_node_cpus, ray_session, unwrap_task_error
from builder.seqs import ROW_BYTES, SeqTable, is_old_format
from builder.storage import NotFound, Storage, StorageError
from builder.train import IndexBuildError, load_trained_index
from builder.versions import (clip_ranges, count_ids, id_moves, is_removed, load_version, publish, removed_before,
                              removed_ranges)

log = logging.getLogger(__name__)
WORK = "_compact/"
REQUEST = "_compact/request.json"
USER_ERRORS = (RemoveError, StorageError, IndexBuildError, ValueError)


def _rec_path(kind: str, i: int) -> str:
    return f"{WORK}{kind}/{i:07d}.json"


def compacted_tokens_path(version: int, path: str) -> str:
    return f"tokens/v{version:06d}/{path.replace('/', '-')}"


# ---------------------------------------------------------------------------------------------
# pure plans


def _cuts(entries: list[dict], rows: str, ranges) -> tuple[np.ndarray, np.ndarray]:
    """(removed ids inside each entry, its new first id) of shards [{first_id, `rows`}], all at once."""
    first = np.array([int(s["first_id"]) for s in entries], np.int64)
    end = first + np.array([int(s[rows]) for s in entries], np.int64)
    lo, hi = removed_before(first, ranges), removed_before(end, ranges)
    return hi - lo, first - lo


def plan_shards(m: Manifest, ranges) -> list[tuple[int, dict, int]]:
    """[(shard index, its new entry without path/checksum when rewritten, rows removed)] of the kept shards."""
    out = []
    cuts, firsts = _cuts(m.shards, "num_rows", ranges)
    for j, s in enumerate(m.shards):
        cut = int(cuts[j])
        if cut < s["num_rows"]:
            out.append((j, {"first_id": int(firsts[j]), "num_rows": s["num_rows"] - cut}, cut))
    return out


def plan_index(m: Manifest, ranges) -> list[tuple[dict, bool]]:
    """[(new index shard {first_id, num_ids, path?...}, re-encode?)] in id order, empty ones dropped."""
    out = []
    shards = m.index_shards or []
    cuts, firsts = _cuts(shards, "num_ids", ranges)
    for s, cut, first in zip(shards, cuts.tolist(), firsts.tolist()):
        if cut == s["num_ids"]:
            continue
        same = cut == 0 and first == s["first_id"]
        out.append((dict(s) if same else {"first_id": first, "num_ids": s["num_ids"] - cut}, not same))
    return out


# ---------------------------------------------------------------------------------------------
# key shards


def rewrite_shard(storage: Storage, m: Manifest, j: int, ranges, version: int) -> dict:
    """Shard j without its removed rows, written to its compacted path; its {path, num_rows, checksum}."""
    s = m.shards[j]
    pf = load_shard(storage, s, m.dim)
    rgr = row_group_rows(m)
    parts = [read_row_group(pf, storage, s, g, min(rgr, s["num_rows"] - g * rgr), m.dim, COLUMNS, as_dict=True)
             for g in range(pf.metadata.num_row_groups)]
    cols = {c: np.concatenate([p[c] for p in parts]) for c in COLUMNS}
    cut = clip_ranges(ranges, s["first_id"], s["num_rows"]) - s["first_id"]
    keep = np.ones(s["num_rows"], bool)
    for a, b in cut:
        keep[a:b] = False
    data, digest = encode_shard(*(cols[c][keep] for c in COLUMNS), row_group_rows=rgr)
    path = compacted_shard_path(version, s["path"])
    storage.write_bytes(path, data)
    return {"path": path, "num_rows": int(keep.sum()), "checksum": digest}


def compact_key_shards(storage: Storage, m: Manifest, ranges, version: int, lease: Lease) -> list[dict]:
    shards = []
    for j, entry, cut in plan_shards(m, ranges):
        if not cut:
            shards.append({**m.shards[j], **entry})
            continue
        try:
            rec = json.loads(storage.read_text(_rec_path("shards", j)))
        except NotFound:
            rec = None
        if rec is None or not storage.exists(rec["path"]):
            lease.ensure()
            rec = rewrite_shard(storage, m, j, ranges, version)
            storage.write_text(_rec_path("shards", j), json.dumps(rec))
            maybe_fault("compact-shard", j)
        shards.append({**m.shards[j], **rec, "first_id": entry["first_id"]})
    return shards


# ---------------------------------------------------------------------------------------------
# index shards: Ray tasks, like `knnlm add`'s


def compact_index_shard(root_uri: str, manifest_json: str, i: int, n: int, first: int, num: int, version: int,
                        threads: int | None) -> dict:
    """Encode ids [first, first+num) of the (unpublished) compacted manifest into new index shard i of n."""
    import faiss
    t0 = time.perf_counter()
    storage = Storage.from_uri(root_uri)
    m = Manifest.from_dict(json.loads(manifest_json))
    trained = load_trained_index(storage, m)
    if threads:
        faiss.omp_set_num_threads(threads)
    maybe_fault("compact-index", i)
    index = encode_range(storage, m, trained, first, num)
    path = compacted_index_shard_path(version, i, n)
    with tempfile.TemporaryDirectory(prefix="knnlm-compact-") as tmp:
        local = os.path.join(tmp, os.path.basename(path))
        faiss.write_index(index, local)
        nbytes, digest = os.path.getsize(local), file_sha256(local)
        storage.upload_file(path, local)
    rec = {"path": path, "first_id": first, "num_ids": num, "bytes": nbytes, "checksum": digest}
    storage.write_text(_rec_path("index", i), json.dumps(rec))
    log.info("compacted index shard %d/%d: %d ids in %.1fs", i + 1, n, num, time.perf_counter() - t0)
    return rec


def compact_index_shards(cfg: CompactConfig, storage: Storage, new: Manifest, plan: list, version: int,
                         lease: Lease) -> list[dict]:
    n = len(plan)
    out: dict[int, dict] = {i: s for i, (s, redo) in enumerate(plan) if not redo}
    todo = []
    for i, (s, redo) in enumerate(plan):
        if not redo:
            continue
        try:
            rec = json.loads(storage.read_text(_rec_path("index", i)))
            if storage.exists(rec["path"]) and (rec["first_id"], rec["num_ids"]) == (s["first_id"], s["num_ids"]):
                out[i] = rec
                continue
        except NotFound:
            pass
        todo.append(i)
    if todo:
        import ray
        with ray_session(cfg.address):
            cluster_resources()
            nodes = max(1, sum(1 for x in ray.nodes() if x.get("Alive") and x["Resources"].get("CPU", 0) > 0))
            workers = cfg.workers or nodes
            threads = min(cfg.threads or max(1, max_node_cpus() // max(1, -(-workers // nodes))), max_node_cpus())
            task = ray.remote(max_calls=1)(compact_index_shard).options(
                num_cpus=threads, max_retries=3, retry_exceptions=[StorageError])
            text = new.to_json()
            log.info("re-encoding %d of %d index shards with %d tasks", len(todo), n, workers)

            def fail(i: int, e: BaseException) -> Exception:
                if worker_lost(e):
                    return IndexBuildError(f"compacted index shard {i}: its worker died repeatedly; rerun to resume")
                return unwrap_task_error(e, f"compacted index shard {i}", USER_ERRORS, IndexBuildError)

            dispatch(todo, lambda i, _w: task.remote(storage.uri, text, i, n, plan[i][0]["first_id"],
                                                     plan[i][0]["num_ids"], version, threads),
                     lambda i, rec: out.__setitem__(i, rec), fail, workers=workers, lease=lease, max_attempts=5,
                     retryable=worker_lost, what=lambda i: f"index shard {i}", name="compact task")
    return [{k: out[i][k] for k in ("path", "first_id", "num_ids", "bytes", "checksum")} for i in range(n)]


# ---------------------------------------------------------------------------------------------
# tokens of removed documents


def compact_tokens(storage: Storage, m: Manifest, version: int) -> tuple[list[dict], list[str]]:
    """The files entries after compaction, and the tokens files (and metas) they no longer list: a file
    whose sequences are all removed is dropped (entry marked removed), one with some removed gets a new
    tokens file with their spans set to 0 (offsets stay valid)."""
    docs = removed_doc_ranges(m)
    files, drop = [], []
    for f, entry in enumerate(m.corpus.get("files", [])):
        entry = dict(entry)
        path = entry.get("tokens")
        if entry.get("removed") or not path or not docs:
            files.append(entry)
            continue
        first, end = file_docs(m, f)
        if not any(a < end and b > first for a, b in docs):
            files.append(entry)
            continue
        if m.mode == "stream":                       # the file is one document: all of it or nothing
            n_seqs, n_gone = 1, int(any(a <= f < b for a, b in docs))
        else:                                        # its sequences' records, a chunk at a time
            meta = json.loads(storage.read_text(meta_path(path)))
            table = SeqTable(storage, path, meta)
            n_seqs = table.n
            n_gone = sum(int(is_removed(first + rows[:, 2], docs).sum()) for rows in table.chunks())
        if n_seqs and n_gone == n_seqs:
            entry["removed"] = version
            drop += [path, meta_path(path), seqs_beside(path)]
        elif n_gone:
            new = compacted_tokens_path(version, path)
            if not storage.exists(meta_path(new)):
                toks = np.frombuffer(storage.read_bytes(path), "<i4").copy()
                for rows in table.chunks():
                    for offset, n in rows[is_removed(first + rows[:, 2], docs), :2].tolist():
                        toks[offset:offset + n] = 0
                storage.write_bytes(new, toks.astype("<i4").tobytes())
                if not is_old_format(meta):          # the same table beside the new tokens file
                    storage.compose(seqs_beside(new), [(seqs_beside(path), 0, n_seqs * ROW_BYTES)])
                storage.write_text(meta_path(new), json.dumps(meta | {"tokens": new}))
            if new != path:
                drop += [path, meta_path(path), seqs_beside(path)]
            entry["tokens"] = new
        files.append(entry)
    return files, drop


# ---------------------------------------------------------------------------------------------
# the stage


@dataclass
class CompactResult:
    manifest: Manifest
    already_done: bool = False
    keys_removed: int = 0
    shards_rewritten: int = 0
    index_shards_encoded: int = 0
    deleted: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        m = self.manifest
        if self.already_done:
            return f"nothing removed since the last compaction (version {m.version}, {m.num_keys:,} keys); nothing to do"
        return (f"compacted {self.keys_removed:,} removed keys away as version {m.version}: {m.num_keys:,} keys in "
                f"{len(m.shards)} shards ({self.shards_rewritten} rewritten), {len(m.index_shards or [])} index "
                f"shards ({self.index_shards_encoded} re-encoded), {self.deleted} old files deleted, "
                f"in {self.seconds:.1f}s")


def _cleanup(storage: Storage, old: Manifest, new: Manifest, drop: list[str]) -> int:
    """Delete what `old` listed and `new` does not (key and index shards), and `drop`; then the work folder."""
    keep = {p for _, p in new.paths()}
    gone = [p for _, p in old.paths() if p not in keep] + list(drop)
    for p in gone:
        storage.delete(p)
    storage.delete_prefix(WORK)
    return len(gone)


def _finish_cleanup(storage: Storage, m: Manifest) -> int:
    """After a compaction published but died before its clean-up: that clean-up (its plan names it)."""
    try:
        req = json.loads(storage.read_text(REQUEST))
    except NotFound:
        return 0
    if req.get("version") != m.version:
        return 0
    old = load_version(storage, req["base_version"])
    return _cleanup(storage, old, m, req.get("drop", []))


def compact(cfg: CompactConfig) -> CompactResult:
    """Publish a version without the removed keys (resumable; a rerun of a finished one does nothing)."""
    t0 = time.perf_counter()
    storage = Storage.from_uri(cfg.datastore)
    m = load_manifest(storage)
    with Lease(storage, cfg.lease_ttl, BUILD_LEASE, "build or ingestion") as lease, \
            Lease(storage, cfg.lease_ttl, INDEX_LEASE, "index build") as index_lease:
        m = load_manifest(storage)
        cleaned = _finish_cleanup(storage, m)     # a compaction that published, then died before its clean-up
        ranges = removed_ranges(m)
        if not ranges:
            return CompactResult(m, already_done=True, deleted=cleaned)
        version = m.version + 1
        want = {"base_version": m.version, "version": version, "ranges": ranges,
                "index_checksum": (m.index or {}).get("checksum")}
        try:
            have = json.loads(storage.read_text(REQUEST))
        except NotFound:
            have = None
        if have is None or {k: have.get(k) for k in want} != want:
            storage.delete_prefix(WORK)                     # another plan's records (an older removal set)
            storage.write_text(REQUEST, json.dumps(want))
        shards = compact_key_shards(storage, m, ranges, version, lease)
        new = Manifest.from_dict(json.loads(m.to_json()))
        new.shards, new.num_keys = shards, m.num_keys - count_ids(ranges)
        new.removed, new.index_merged = None, None
        new.validate()                              # ids contiguous from 0 before anything is encoded
        if m.index_merged:
            log.warning("the merged index is dropped by the compaction: rerun `knnlm add %s --merge`", storage.uri)
        plan = plan_index(m, ranges)
        encoded = sum(redo for _, redo in plan)
        if m.index_shards:
            new.index_shards = compact_index_shards(cfg, storage, new, plan, version, index_lease) or None
        files, drop = compact_tokens(storage, m, version)
        new.corpus = {**new.corpus, "files": files}
        new.removals = [r if r.get("compacted") else {**r, "compacted": version} for r in m.removals or []]
        storage.write_text(REQUEST, json.dumps(want | {"drop": drop}))
        event = {"kind": "compact", "id_moves": id_moves(m.num_keys, ranges), "keys_removed": count_ids(ranges),
                 "shards_rewritten": sum(1 for _, _, c in plan_shards(m, ranges) if c),
                 "shards_dropped": len(m.shards) - len(shards), "index_shards_encoded": encoded}
        maybe_fault("compact", 0)                 # tests: the driver dies with everything written, unpublished
        index_lease.check()
        new = publish(storage, lease, m, new, event)
        maybe_fault("compact", 1)                 # tests: ... published, before the clean-up
        deleted = _cleanup(storage, m, new, drop)
    log.info("version %d: compacted %d removed keys away", new.version, count_ids(ranges))
    return CompactResult(new, keys_removed=count_ids(ranges), shards_rewritten=event["shards_rewritten"],
                         index_shards_encoded=encoded, deleted=deleted, seconds=time.perf_counter() - t0)

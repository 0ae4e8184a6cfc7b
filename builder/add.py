"""`knnlm add`: every key into index shards of contiguous global-id ranges, on Ray, resumable.

    index/shards/<i>-of-<n>.faiss   one plain FAISS file per id range, holding the datastore's
                                    global ids (never local ones)
    _index/add.json                 the plan of an unfinished add (ranges, trained index checksum)
    _index/shards/<i>.json          a shard's commit record (written after its file)
    manifest.json `index_shards`    [{path, first_id, num_ids, bytes, checksum}], written when all
                                    shards are committed

Each shard is one Ray task (`add_shard`, a thin wrapper over `encode_range`): it streams its
range's key shards one at a time (each checked against its manifest checksum; the next one is
prefetched while the current one is encoded), so its memory is one or two key shards plus the
index shard it fills. A killed task is retried by Ray; a killed driver leaves committed records
that a rerun skips; a retried shard overwrites its unlisted file with the same content.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from builder.config import AddConfig, ConfigError
from builder.dispatch import dispatch, worker_lost
from builder.faults import maybe_fault
from builder.index import Encoder, IndexFileError, file_sha256, is_fastscan, read_index_file, resolve_backend
from builder.key_shards import ShardError
from builder.layout import (
    ADD_REQUEST,
    INDEX_DIR,
    INDEX_LEASE,
    INDEX_RECORDS_DIR,
    INDEX_SHARDS_DIR,
    MANIFEST,
    MERGED_INDEX,
    MERGED_IVFDATA,
    index_shard_path,
    index_shard_record_path,
)
from builder.lease import Lease
from builder.manifest import Manifest, ManifestError, load_manifest, parse_manifest, write_manifest
from builder.rows import iter_key_range
from builder.runtime import cluster_resources, max_node_cpus, ray_session, unwrap_task_error
from builder.storage import NotFound, Storage, StorageError
from builder.train import IndexBuildError, load_trained_index

log = logging.getLogger(__name__)
USER_ERRORS = (ConfigError, ManifestError, ShardError, StorageError, IndexBuildError, ValueError)


# ---------------------------------------------------------------------------------------------
# pure cores


def plan_ranges(num_keys: int, index_shards: int | None = None, shard_size: int | None = None) -> list[tuple[int, int]]:
    """[(first_id, num_ids)]: contiguous ranges covering [0, num_keys), in id order.

    `index_shards` N: N near-equal ranges; `shard_size` R: ranges of R ids, the last shorter."""
    if index_shards is not None:
        n = max(1, min(index_shards, num_keys))
        bounds = [i * num_keys // n for i in range(n + 1)]
        return [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(n)]
    r = shard_size or AddConfig.DEFAULT_SHARD_SIZE
    return [(a, min(r, num_keys - a)) for a in range(0, num_keys, r)]


def encode_range(storage: Storage, m: Manifest, trained, first: int, num: int, backend: str = "faiss",
                 device: str = "cpu", batch_rows: int = 65536):
    """A copy of the trained index holding the keys of global ids [first, first+num)."""
    enc = Encoder(trained, backend, device)
    buf_ids, buf_keys, n = [], [], 0

    def flush():
        nonlocal buf_ids, buf_keys, n
        if n:
            enc.add(np.concatenate(buf_ids), np.concatenate(buf_keys))
        buf_ids, buf_keys, n = [], [], 0

    for ids, keys in iter_key_range(storage, m, first, num):
        buf_ids.append(ids)
        buf_keys.append(keys)
        n += len(ids)
        if n >= batch_rows:  # larger batches than one row group: faiss/torch run at full width
            flush()
    flush()
    index = enc.result()
    if index.ntotal != num:
        raise IndexBuildError(f"internal error: index shard for ids [{first}, {first + num}) holds {index.ntotal} ids")
    return index


# ---------------------------------------------------------------------------------------------
# the task (a Ray task body; also callable in-process)


def add_shard(root_uri: str, i: int, n: int, first: int, num: int, backend: str, device: str,
              threads: int | None, manifest_path: str = MANIFEST, path: str | None = None,
              record_path: str | None = None) -> dict:
    """Encode shard i of n, write its file then its commit record; return the record.

    The keys are those `manifest_path` lists (an ingestion's staged manifest, builder/ingest.py, lists
    keys not yet published); the file and record go to `path` and `record_path` (default: `knnlm add`'s)."""
    import faiss
    t0 = time.perf_counter()
    storage = Storage.from_uri(root_uri)
    m = (load_manifest(storage) if manifest_path == MANIFEST
         else parse_manifest(storage.read_bytes(manifest_path), storage.url(manifest_path)))
    trained = load_trained_index(storage, m)
    backend, device = resolve_backend(backend, device, "--encoder", is_fastscan(trained))
    if threads:
        faiss.omp_set_num_threads(threads)
        if backend == "torch":  # torch only where it is used: importing it costs seconds
            import torch
            torch.set_num_threads(threads)
    maybe_fault("add", i)
    index = encode_range(storage, m, trained, first, num, backend, device)
    path = path or index_shard_path(i, n)
    # written to a local file and streamed up, not serialized in memory: a bytes copy of the shard
    # next to the index doubled the task's peak (bench_scale.py)
    with tempfile.TemporaryDirectory(prefix="knnlm-add-") as tmp:
        local = os.path.join(tmp, os.path.basename(path))
        faiss.write_index(index, local)
        del index
        nbytes, digest = os.path.getsize(local), file_sha256(local)
        storage.upload_file(path, local)
    rec = {"shard": i, "path": path, "first_id": first, "num_ids": num, "bytes": nbytes, "checksum": digest,
           "index_checksum": m.index["checksum"], "encoder": backend, "device": device,
           "seconds": round(time.perf_counter() - t0, 3)}
    storage.write_text(record_path or index_shard_record_path(i), json.dumps(rec))
    log.info("index shard %d/%d: %d ids in %.1fs (%.0f vectors/s)", i + 1, n, num, rec["seconds"],
             num / max(rec["seconds"], 1e-9))
    return rec


# ---------------------------------------------------------------------------------------------
# the stage


@dataclass
class AddResult:
    manifest: Manifest
    already_done: bool = False
    seconds: float = 0.0
    shards_run: int = 0
    shards_skipped: int = 0
    ids_added: int = 0
    merged: bool = False

    def summary(self) -> str:
        shards = self.manifest.index_shards or []
        tail = f"; merged into {self.manifest.index_merged['path']}" if self.merged else ""
        if self.already_done:
            return f"all {len(shards)} index shards are already built ({self.manifest.num_keys:,} ids); nothing to do" + tail
        rate = self.ids_added / self.seconds if self.seconds > 0 else 0.0
        return (f"added {self.manifest.num_keys:,} ids into {len(shards)} index shards in {self.seconds:.1f}s "
                f"({rate:,.0f} vectors/s this run; {self.shards_run} shards run, {self.shards_skipped} already "
                f"committed)" + tail)


def _request(m: Manifest, ranges: list[tuple[int, int]]) -> dict:
    return {"index_checksum": m.index["checksum"], "ranges": [list(r) for r in ranges]}


def _describe(ranges: list) -> str:
    return f"{len(ranges)} shards" + (f" of ~{ranges[0][1]:,} ids" if ranges else "")


def _unwrap(e: BaseException, what: str) -> IndexBuildError:
    return unwrap_task_error(e, what, USER_ERRORS, IndexBuildError)


def add_stage(cfg: AddConfig) -> AddResult:
    """Build (or resume, or check) the index shards; optionally merge them."""
    t0 = time.perf_counter()
    storage = Storage.from_uri(cfg.datastore)
    m = load_manifest(storage)
    fastscan = is_fastscan(load_trained_index(storage, m))  # present, intact, matching dim and metric: first
    if cfg.encoder != "auto" or cfg.device != "auto":
        resolve_backend(cfg.encoder, cfg.device, "--encoder", fastscan)  # flag errors early (on this machine)
    if cfg.merge and fastscan:
        raise ConfigError(f"--merge: {m.index['factory']} is a fast-scan index, whose inverted lists hold codes in "
                          "blocks of 32 that faiss's on-disk lists cannot store; serve its shards (`knnlm serve`) "
                          "instead, or train a non-fast-scan index (e.g. IVF4096,PQ64) to merge")
    explicit = cfg.index_shards is not None or cfg.shard_size is not None
    if m.index_shards and not explicit and not cfg.force:
        ranges = [(s["first_id"], s["num_ids"]) for s in m.index_shards]  # "add again": the same layout
    else:
        ranges = plan_ranges(m.num_keys, cfg.index_shards, cfg.shard_size)
    want = _request(m, ranges)
    if m.index_shards and not cfg.force:
        have = [[s["first_id"], s["num_ids"]] for s in m.index_shards]
        if have != want["ranges"]:
            raise ConfigError(f"{storage.uri} already has {_describe(have)}; this run asks for {_describe(ranges)} "
                              "(--index-shards/--shard-size): rerun without them to keep the existing shards, "
                              "or add --force to rebuild them")
        if not cfg.merge or m.index_merged:
            return AddResult(m, already_done=True, merged=bool(m.index_merged))

    with Lease(storage, cfg.lease_ttl, INDEX_LEASE, "index build") as lease:
        m = load_manifest(storage)
        if m.index_shards and not cfg.force:   # only the merge is left
            merge_shards(storage, m, lease)
            return AddResult(m, already_done=True, merged=True, seconds=time.perf_counter() - t0)
        records = _resume(storage, m, want, cfg.force)
        pending = [i for i in range(len(ranges)) if i not in records]
        log.info("%d index shards over %s ids (%d already committed)", len(ranges), f"{m.num_keys:,}",
                 len(ranges) - len(pending))
        ids_added = 0
        if pending:
            with ray_session(cfg.address):
                ids_added = run_add_tasks(cfg, storage, lease, ranges, pending, records, fastscan)
        shards = [{k: records[i][k] for k in ("path", "first_id", "num_ids", "bytes", "checksum")}
                  for i in range(len(ranges))]
        if sum(s["num_ids"] for s in shards) != m.num_keys:
            raise IndexBuildError("internal error: the index shards do not cover the datastore")
        m.index_shards = shards
        m.index_merged = None
        lease.check()  # fencing: only the lease holder commits
        write_manifest(storage, m)
        listed = {s["path"] for s in shards}
        for p in storage.list(INDEX_SHARDS_DIR):
            if p not in listed:
                storage.delete(p)
        storage.delete_prefix(INDEX_RECORDS_DIR)
        storage.delete(ADD_REQUEST)
        storage.cleanup_incomplete(INDEX_DIR)
        if cfg.merge:
            merge_shards(storage, m, lease)
    return AddResult(m, seconds=time.perf_counter() - t0, shards_run=len(pending),
                     shards_skipped=len(ranges) - len(pending), ids_added=ids_added, merged=cfg.merge)


def _resume(storage: Storage, m: Manifest, want: dict, force: bool) -> dict[int, dict]:
    """Commit records of an unfinished add with the same plan; a different plan is refused
    (or, with force or a retrained index, dropped)."""
    try:
        have = json.loads(storage.read_text(ADD_REQUEST))
    except NotFound:
        have = None
    if have is not None and have != want:
        if have["index_checksum"] == want["index_checksum"] and not force:
            raise ConfigError(f"{storage.uri} has an unfinished add with {_describe(have['ranges'])}; this run asks "
                              f"for {_describe(want['ranges'])} (--index-shards/--shard-size): rerun with the "
                              "original setting to resume it, or add --force to start over")
        log.info("dropping an unfinished add (%s) built %s", _describe(have["ranges"]),
                 "from an older index" if have["index_checksum"] != want["index_checksum"] else "with other ranges")
        have = None
    if have is None or force:
        storage.delete_prefix(INDEX_RECORDS_DIR)
        for p in storage.list(INDEX_SHARDS_DIR) + [MERGED_INDEX, MERGED_IVFDATA]:
            storage.delete(p)
        storage.write_text(ADD_REQUEST, json.dumps(want))
        if force and m.index_shards:
            m.index_shards = m.index_merged = None
            write_manifest(storage, m)   # the old shards are about to go
        return {}
    records = {}
    for p in storage.list(INDEX_RECORDS_DIR):
        rec = json.loads(storage.read_text(p))
        if rec["index_checksum"] == want["index_checksum"] and storage.exists(rec["path"]):
            records[rec["shard"]] = rec
    return records


def run_add_tasks(cfg: AddConfig, storage: Storage, lease: Lease, ranges: list, pending: list[int],
               records: dict[int, dict], fastscan: bool = False, paths: dict[int, dict] | None = None) -> int:
    """Run the add tasks of the `pending` shards; `paths` (shard → add_shard's manifest_path, path,
    record_path) when they are not `knnlm add`'s (an ingestion's)."""
    import ray

    cpus, gpus = cluster_resources()
    use_gpu = gpus > 0 and cfg.device in ("auto", "cuda") and cfg.encoder != "faiss" and not fastscan
    if cfg.device == "cuda" and gpus == 0:
        raise IndexBuildError("--device cuda: the Ray cluster has no GPUs (use --device cpu or auto)")
    nodes = max(1, sum(1 for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0))
    workers = cfg.workers or (gpus if use_gpu else nodes)
    threads = cfg.threads or max(1, max_node_cpus() // max(1, -(-workers // nodes)))
    threads = min(threads, max_node_cpus())
    # a fresh worker process per task (max_calls=1): a pooled worker kept ~15 MB of freed heap per
    # task (glibc arenas), so its peak grew with the number of shards; the restart costs ~1 s a shard
    task = ray.remote(max_calls=1)(add_shard).options(num_cpus=threads, num_gpus=1 if use_gpu else 0,
                                                      max_retries=cfg.max_retries, retry_exceptions=[StorageError])
    device = "cuda" if use_gpu else "cpu"
    log.info("adding with %d concurrent tasks of %d threads%s", workers, threads, " and 1 GPU" if use_gpu else "")
    added, t0 = 0, time.perf_counter()
    n = len(ranges)

    def done(i: int, rec: dict) -> None:
        nonlocal added
        records[i] = rec
        added += ranges[i][1]
        el = time.perf_counter() - t0
        log.info("index shards %d/%d committed, %s ids, %s vectors/s", len(records), n, f"{added:,}",
                 f"{added / max(el, 1e-9):,.0f}")

    def fail(i: int, e: BaseException) -> IndexBuildError:
        if worker_lost(e):  # Ray's retries are spent, max_dispatches times
            where = (paths or {}).get(i, {}).get("path") or index_shard_path(i, n)
            return IndexBuildError(f"index shard {i} ({storage.url(where)}): its worker died "
                                   f"{cfg.max_dispatches * (cfg.max_retries + 1)} times ({type(e).__name__}); "
                                   "rerun to resume")
        return _unwrap(e, f"index shard {i} (ids {ranges[i][0]}..{sum(ranges[i]) - 1})")

    # `workers` tasks at a time; a killed task is retried by Ray (max_retries), then dispatched again here
    # (max_dispatches): a long run on a preemptible cluster loses many workers, and a shard's task may lose
    # several; only a lost worker is dispatched again, never a task that failed by itself
    dispatch(pending, lambda i, _w: task.remote(storage.uri, i, n, ranges[i][0], ranges[i][1], cfg.encoder, device,
                                                threads, **(paths or {}).get(i, {})),
             done, fail, workers=workers, lease=lease, max_attempts=cfg.max_dispatches,
             retryable=worker_lost, what=lambda i: f"shard {i}",
             name="add task")
    return added


# ---------------------------------------------------------------------------------------------
# --merge: one index over on-disk inverted lists, for single-node serving


def merge_shards(storage: Storage, m: Manifest, lease: Lease | None = None) -> dict:
    """Merge the index shards into index/merged.faiss + index/merged.ivfdata (read them back with
    `load_merged_index`, which puts both in one local directory)."""
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    trained = load_trained_index(storage, m)
    with tempfile.TemporaryDirectory(prefix="knnlm-merge-") as tmp:
        names = []
        for s in m.index_shards:
            names.append(os.path.join(tmp, os.path.basename(s["path"])))
            storage.download_file(s["path"], names[-1])
            if file_sha256(names[-1]) != s["checksum"]:
                raise IndexBuildError(f"{storage.url(s['path'])} does not match its manifest checksum: rerun "
                                      f"`knnlm add {storage.uri} --force`")
        ivfdata = os.path.join(tmp, os.path.basename(MERGED_IVFDATA))
        try:
            merge_ondisk(trained, names, ivfdata)                 # mmaps the shards, writes the lists
        except RuntimeError as e:
            msg = (str(e).split("Error:", 1)[-1].strip().splitlines() or [""])[0][:200]
            raise IndexFileError(f"{storage.uri}: an index shard is not a readable FAISS index ({msg}); run "
                                 f"`knnlm verify {storage.uri}`") from None
        for name in names:
            os.remove(name)
        if trained.ntotal != m.num_keys:
            raise IndexBuildError(f"internal error: the merged index holds {trained.ntotal} ids, not {m.num_keys}")
        out = os.path.join(tmp, os.path.basename(MERGED_INDEX))
        faiss.write_index(trained, out)
        sizes = {p: os.path.getsize(p) for p in (out, ivfdata)}
        sums = {p: file_sha256(p) for p in (out, ivfdata)}
        storage.upload_file(MERGED_IVFDATA, ivfdata)            # the lists first: the index file names them
        storage.upload_file(MERGED_INDEX, out)
    m.index_merged = {"path": MERGED_INDEX, "ivfdata": MERGED_IVFDATA, "num_ids": m.num_keys,
                      "bytes": sizes[out], "checksum": sums[out], "ivfdata_bytes": sizes[ivfdata],
                      "ivfdata_checksum": sums[ivfdata]}
    if lease is not None:
        lease.check()
    write_manifest(storage, m)
    log.info("merged %d index shards into %s (%.1f MB of inverted lists)", len(m.index_shards), MERGED_INDEX,
             sizes[ivfdata] / 1e6)
    return m.index_merged


def verify_index_files(storage: Storage, m: Manifest) -> list[str]:
    """Problems with the index files the manifest lists (missing, size, checksum); [] if none."""
    files = []
    if m.index:
        files.append((m.index["path"], m.index.get("bytes"), m.index["checksum"]))
    for s in m.index_shards or []:
        files.append((s["path"], s["bytes"], s["checksum"]))
    if m.index_merged:
        files.append((m.index_merged["path"], m.index_merged["bytes"], m.index_merged["checksum"]))
        files.append((m.index_merged["ivfdata"], m.index_merged["ivfdata_bytes"], m.index_merged["ivfdata_checksum"]))
    problems = []
    with tempfile.TemporaryDirectory(prefix="knnlm-verify-") as tmp:
        for i, (path, size, checksum) in enumerate(files):
            local = os.path.join(tmp, str(i))
            try:
                storage.download_file(path, local)
            except NotFound:
                problems.append(f"{path}: missing")
                continue
            if size is not None and os.path.getsize(local) != size:
                problems.append(f"{path}: {os.path.getsize(local)} bytes, the manifest says {size}")
            elif file_sha256(local) != checksum:
                problems.append(f"{path}: checksum mismatch (corrupted or replaced)")
            os.remove(local)
    return problems


def load_merged_index(storage: Storage, m: Manifest, local_dir: str):
    """The merged on-disk index, fetched into `local_dir` (checksums verified) and memory-mapped."""
    import faiss
    if not m.index_merged:
        raise IndexBuildError(f"{storage.uri} has no merged index: run `knnlm add {storage.uri} --merge`")
    os.makedirs(local_dir, exist_ok=True)
    paths = {}
    for key, ck in (("path", "checksum"), ("ivfdata", "ivfdata_checksum")):
        paths[key] = os.path.join(local_dir, os.path.basename(m.index_merged[key]))
        storage.download_file(m.index_merged[key], paths[key])
        if file_sha256(paths[key]) != m.index_merged[ck]:
            raise IndexBuildError(f"{storage.url(m.index_merged[key])} does not match its manifest checksum")
    return read_index_file(paths["path"], faiss.IO_FLAG_ONDISK_SAME_DIR, storage.url(m.index_merged["path"]))

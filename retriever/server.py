"""One index shard served: the core (`ShardServer`, no Ray) and its Ray actor (`IndexServer`).

A server loads index shard i of a datastore (manifest `index_shards[i]`):

- the FAISS file, fetched from object storage into a local cache (by checksum: verified once
  on download, reused by later servers on the node) and opened memory-mapped (IO_FLAG_MMAP),
  or copied to the GPU when faiss has GPU support;
- the values (token ids) of its id range, so that a search returns values, not just ids:
  read from the key shards once, cached as an .npy and memory-mapped;
- with `rerank`, the fp16 keys of its id range likewise, to give the exact distances of the
  candidates it owns among a request's merged top-k (`exact`: the router re-ranks by them).

Distances are what FAISS returns for the metric: squared L2 for `l2` (the kNN-LM paper's
convention), inner product for `ip`. Missing results (fewer than k) have id and value -1 and
distance +inf (l2) / -inf (ip).
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time

import numpy as np

from builder.errors import KnnlmError
from builder.index_files import IndexFileError, faiss_gpus, file_sha256, is_fastscan, read_index_file
from builder.manifest import require_index_shards
from builder.versions import clip_ranges, is_removed, load_version, removed_ranges
from builder.rows import iter_range
from builder.storage import Storage, StorageError, normalize_uri
from retriever.merge import exact_distances, normalize_missing, row_sorted, sort_topk

log = logging.getLogger(__name__)
GPU_MAX_K = 2048          # faiss GPU's limit on k (and nprobe)
CPU_MAX_K = 65536         # far beyond kNN-LM's k=1024; results are n×k×12 bytes per shard
MAX_RESULT_BYTES = 1 << 30  # one request's result per shard: a larger batch must be split
RERANK_CHUNK_BYTES = 256 << 20
FETCH_ATTEMPTS = 4        # downloads of an index shard before a server gives up (see fetch_cached)
FETCH_BACKOFF = 0.5       # seconds: the pause after attempt i is i times this


class RequestError(KnnlmError, ValueError):
    """A bad search request (shape, dtype, NaN/inf, k, nprobe): nothing was searched."""


class ServerError(KnnlmError, RuntimeError):
    """A server cannot serve its shard (missing or corrupted files, a datastore without index)."""


def datastore_key(uri: str) -> str:
    """A short stable name for a datastore: its servers' names and its local cache folder."""
    return hashlib.sha1(normalize_uri(uri).encode()).hexdigest()[:16]


def default_cache_dir() -> str:
    return os.environ.get("KNNLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "knnlm")


def check_request(q, dim: int, k: int, nprobe: int, max_k: int | None = None) -> np.ndarray:
    """The queries as a C-contiguous float32 (n, dim) array, or a RequestError saying what is wrong."""
    if not isinstance(q, np.ndarray):
        raise RequestError(f"queries must be a numpy array of shape (n, {dim}), got {type(q).__name__}")
    if q.ndim != 2 or q.shape[1] != dim:
        raise RequestError(f"queries must have shape (n, {dim}) (the datastore's key dim), got {q.shape}")
    if q.shape[0] == 0:
        raise RequestError("empty batch: queries has 0 rows")
    if not np.issubdtype(q.dtype, np.floating):
        raise RequestError(f"queries must be floating point (float32), got {q.dtype}")
    q = np.ascontiguousarray(q, dtype=np.float32)
    bad = ~np.isfinite(q).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise RequestError(f"queries hold NaN or inf in {len(rows)} rows (first: {rows[:5].tolist()})")
    max_k = max_k or CPU_MAX_K
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1 or k > max_k:
        raise RequestError(f"k must be an integer from 1 to {max_k:,} (the servers' limit), got {k!r}")
    if q.shape[0] * k * 12 > MAX_RESULT_BYTES:
        raise RequestError(f"{q.shape[0]:,} queries x k={k:,} would make a {q.shape[0] * k * 12 / 2**30:.1f} GiB result "
                           f"per shard (limit {MAX_RESULT_BYTES / 2**30:.0f} GiB): search in smaller batches")
    if not isinstance(nprobe, (int, np.integer)) or nprobe < 1:
        raise RequestError(f"nprobe must be a positive integer, got {nprobe!r}")
    return q


def fetch_cached(storage, rel: str, checksum: str, cache_dir: str, attempts: int = FETCH_ATTEMPTS) -> str:
    """A stored file in the local cache, named by its checksum; downloaded and verified if absent.

    A download that fails (the object briefly missing, a read error the storage layer's own retries
    did not absorb) or whose bytes do not match the checksum (a body cut short) is tried again, up to
    `attempts` times with a growing pause; only a verified file is ever cached."""
    os.makedirs(cache_dir, exist_ok=True)
    digest = checksum.split(":", 1)[1]
    path = os.path.join(cache_dir, f"{digest[:32]}-{os.path.basename(rel)}")
    if os.path.exists(path + ".ok"):
        return path
    tmp = f"{path}.part-{os.getpid()}"
    t0 = time.perf_counter()
    for attempt in range(1, attempts + 1):
        try:
            storage.download_file(rel, tmp)
            if file_sha256(tmp) == checksum:
                break
            error = ServerError(f"{storage.url(rel)} does not match its manifest checksum (corrupted or replaced): "
                                f"run `knnlm verify {storage.uri}`")
        except StorageError as e:
            error = e
        if os.path.exists(tmp):
            os.remove(tmp)
        if attempt == attempts:
            raise error
        log.warning("fetching %s failed (attempt %d of %d: %s); trying again", storage.url(rel), attempt, attempts,
                    error)
        time.sleep(FETCH_BACKOFF * attempt)
    os.replace(tmp, path)
    open(path + ".ok", "w").close()
    log.info("fetched %s (%.1f MB) in %.1fs", storage.url(rel), os.path.getsize(path) / 1e6, time.perf_counter() - t0)
    return path


class ShardServer:
    """Index shard `shard` of the datastore at `root_uri`, ready to search."""

    def __init__(self, root_uri: str, shard: int, cache_dir: str | None = None, rerank: bool = False,
                 device: str = "auto", threads: int | None = None, version: int | None = None):
        import faiss

        self.storage = Storage.from_uri(root_uri)
        m = load_version(self.storage, version)                  # None: the current version
        require_index_shards(m, self.storage.uri, ServerError)
        if not 0 <= shard < len(m.index_shards):
            raise ServerError(f"{self.storage.uri} has {len(m.index_shards)} index shards, not {shard + 1}")
        s = m.index_shards[shard]
        self.shard, self.first_id, self.num_ids = shard, int(s["first_id"]), int(s["num_ids"])
        self.version = m.version
        # ids of this range removed in this version (knnlm remove): never returned (filtered inside faiss)
        self.removed = clip_ranges(removed_ranges(m), self.first_id, self.num_ids)       # (r, 2) int64
        self.num_removed = int((self.removed[:, 1] - self.removed[:, 0]).sum())
        self.metric, self.dim, self.checksum = m.index["metric"], m.dim, s["checksum"]
        self.rerank_enabled = rerank
        self.cache_dir = os.path.join(cache_dir or default_cache_dir(), datastore_key(self.storage.uri))
        # Ray starts actors with OMP_NUM_THREADS=1; a search is parallel over queries, so use the cores
        # (set again in each calling thread: OpenMP's thread count is per thread, and a threaded
        # actor runs its calls on a pool of them)
        self.threads = threads or len(os.sched_getaffinity(0))
        faiss.omp_set_num_threads(self.threads)
        t0 = time.perf_counter()
        path = fetch_cached(self.storage, s["path"], s["checksum"], self.cache_dir)
        try:                                                           # inverted lists stay on disk
            self.index = read_index_file(path, faiss.IO_FLAG_MMAP, self.storage.url(s["path"]))
        except IndexFileError as e:
            raise ServerError(str(e)) from None
        if self.index.d != self.dim or self.index.ntotal != self.num_ids:
            raise ServerError(f"{self.storage.url(s['path'])}: {self.index.ntotal} vectors of dim {self.index.d}, the "
                              f"manifest says {self.num_ids} of dim {self.dim}")
        self.device = "cpu"
        fastscan = is_fastscan(self.index)          # fast-scan has no faiss GPU version: it is a CPU format
        if device == "cuda" and fastscan:
            raise ServerError(f"--device cuda: {m.index['factory']} is a fast-scan index, which faiss searches on "
                              "the CPU only")
        if device in ("auto", "cuda") and faiss_gpus() > 0 and not fastscan:
            self.gpu_res = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self.gpu_res, 0, self.index)
            self.device = "cuda"
        elif device == "cuda":
            raise ServerError("--device cuda: this faiss has no GPU support (install the `gpu` extra)")
        self.max_k = GPU_MAX_K if self.device == "cuda" else CPU_MAX_K
        self._selector = removed_selector(self.removed) if self.device == "cpu" else None
        cols = self._column_caches(m, ("value", "key") if rerank else ("value",))   # one pass over the shards
        self.values = cols["value"]                                  # (num_ids,) int32, memory-mapped
        self.keys = cols.get("key")                                  # (num_ids, dim) float16, memory-mapped
        self.load_seconds = time.perf_counter() - t0
        self.stats = {"searches": 0, "queries": 0, "seconds": 0.0}
        self._lock = threading.Lock()
        log.info("index shard %d (ids %d..%d) ready on %s in %.1fs", shard, self.first_id,
                 self.first_id + self.num_ids - 1, self.device, self.load_seconds)

    def _column_caches(self, m, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
        """The shard range's values (and keys) as memory-mapped .npy files, the missing ones built in one
        pass over the key shards."""
        paths = {c: os.path.join(self.cache_dir, f"{self.checksum.split(':')[1][:32]}-{c}.npy") for c in columns}
        todo = tuple(c for c in columns if not os.path.exists(paths[c] + ".ok"))
        if todo:
            tmp = {c: f"{paths[c]}.part-{os.getpid()}.npy" for c in todo}
            out = {c: np.lib.format.open_memmap(tmp[c], mode="w+", dtype=np.float16 if c == "key" else np.int32,
                                                shape=(self.num_ids, self.dim) if c == "key" else (self.num_ids,))
                   for c in todo}
            for ids, got in iter_range(self.storage, m, self.first_id, self.num_ids, todo):
                for c in todo:
                    out[c][ids - self.first_id] = got[c]
            for c in todo:
                out[c].flush()
                del out[c]
                os.replace(tmp[c], paths[c])
                open(paths[c] + ".ok", "w").close()
        return {c: np.load(paths[c], mmap_mode="r") for c in columns}

    def info(self) -> dict:
        import ray
        return {"shard": self.shard, "first_id": self.first_id, "num_ids": self.num_ids, "metric": self.metric,
                "version": self.version, "removed_ids": self.num_removed,
                "dim": self.dim, "rerank": self.rerank_enabled, "device": self.device, "checksum": self.checksum,
                "ray_version": ray.__version__, "pid": os.getpid(), "load_seconds": round(self.load_seconds, 2),
                "max_k": self.max_k}

    def search(self, q: np.ndarray, k: int, nprobe: int, ids: bool = True, coarse=None
               ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """(dist (n, k) float32, global ids (n, k) int64, values (n, k) int32), best first (approximate
        distances, as the index computes them), each row in (distance, id) order. `ids=False`: the ids
        stay here (None): a caller that scores needs only distances and values, and each id is 8 of the
        16 bytes a neighbour costs to send and merge. `coarse`: the queries' (distances, lists) from
        `coarse` (in-process callers compute it once for all the shards of a datastore: their quantizer is
        the trained index's, one for all; only where `sorts_queries`)."""
        with self._lock:     # one search at a time: concurrent calls queue here, not as more threads on the cores
            t0 = time.perf_counter()
            d, i, v = self._search(q, k, nprobe, coarse)
            if not ids:
                bad = ~row_sorted(d, i, self.metric)
                if bad.any():                        # (faiss returns them sorted; the merge relies on it)
                    d[bad], i[bad], v[bad] = sort_topk(d[bad], i[bad], v[bad], d.shape[1], self.metric)
                i = None
            self.stats["searches"] += 1
            self.stats["queries"] += len(d)
            self.stats["seconds"] += time.perf_counter() - t0
        return d, i, v

    def sorts_queries(self) -> bool:
        """Whether a search takes its queries by nearest inverted list (`_search_ivf`), and so takes `coarse`."""
        import faiss
        return (self.device == "cpu" and self.threads == 1 and isinstance(self.index, faiss.IndexIVF)
                and not is_fastscan(self.index) and self.num_removed < self.num_ids)

    def coarse(self, q: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """The quantizer's (distances, lists) (n, nprobe) of the queries, with this server's threads (so that
        a search given them returns exactly what it would compute itself)."""
        import faiss
        faiss.omp_set_num_threads(self.threads)
        return self.index.quantizer.search(check_request(q, self.dim, 1, nprobe, self.max_k),
                                           min(int(nprobe), self.index.nlist))

    def _search(self, q: np.ndarray, k: int, nprobe: int, coarse=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import faiss
        q = check_request(q, self.dim, k, nprobe, self.max_k)
        faiss.omp_set_num_threads(self.threads)
        if self.num_removed == self.num_ids:                                 # all of it removed
            ids = np.full((len(q), int(k)), -1, np.int64)
            d = normalize_missing(np.zeros(ids.shape, np.float32), ids, self.metric)
            return d, ids, np.full(ids.shape, -1, np.int32)
        if self.num_removed and self._selector is None:                      # GPU: no selector; over-fetch
            kk = min(int(k) + self.num_removed, self.max_k)
            d, ids = self.index.search(q, kk, params=faiss.SearchParametersIVF(nprobe=int(nprobe)))
            d, ids = drop_removed(d, ids, self.removed, int(k), self.metric)
        else:
            params = faiss.SearchParametersIVF(nprobe=int(nprobe), sel=self._selector)
            d, ids = self._search_ivf(q, int(k), int(nprobe), params, coarse)   # (n, k) float32, int64 global ids
        d = normalize_missing(d, ids, self.metric)
        local = ids - self.first_id
        ok = ids >= 0
        values = np.full(ids.shape, -1, np.int32)
        values[ok] = self.values[local[ok]]
        return d, ids, values

    def _search_ivf(self, q: np.ndarray, k: int, nprobe: int, params, coarse=None) -> tuple[np.ndarray, np.ndarray]:
        """`index.search` of the queries taken in the order of their nearest inverted list: queries that
        scan the same lists follow each other, so those lists' tables stay in cache (IVF-PQ reads a 64 KB
        table per list and query: 8-12% faster on 4096 queries, bench/bench_eval.py). The same coarse
        assignment and scan as `search` (its two halves, quantizer then `search_preassigned`), per query.
        One thread only: faiss's `search_preassigned` does not split queries over threads itself (`search`
        does), so with more threads this would run on one core (1.7x slower on 2): `search` then."""
        import faiss
        ivf = self.index
        if (self.device != "cpu" or self.threads > 1 or not isinstance(ivf, faiss.IndexIVF) or is_fastscan(ivf)
                or len(q) < 2):
            return ivf.search(q, k, params=params)
        nprobe = min(nprobe, ivf.nlist)
        cd, assign = coarse if coarse is not None else ivf.quantizer.search(q, nprobe)   # (n, nprobe) each
        o = np.argsort(assign[:, 0], kind="stable")
        qs, a, c = (np.ascontiguousarray(x[o]) for x in (q, assign, cd))
        d, i = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
        ivf.search_preassigned_c(len(q), faiss.swig_ptr(qs), k, faiss.swig_ptr(a), faiss.swig_ptr(c),
                                 faiss.swig_ptr(d), faiss.swig_ptr(i), False, params)
        out_d, out_i = np.empty_like(d), np.empty_like(i)
        out_d[o], out_i[o] = d, i
        return out_d, out_i

    def exact(self, q: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact distances (n, m) float32 of queries q (n, dim) to the keys of global ids (n, m) that
        lie in this shard's range, computed from the fp16 keys in float32 (`exact_distances`: the
        same bits on every server); NaN for the other ids (another shard's, or -1).

        The router sends every shard that owns candidates the same (n, m) id matrix of the merged
        approximate top-k, and takes from each the entries of its range."""
        if not self.rerank_enabled:
            raise RequestError(f"re-ranking was asked of index shard {self.shard}, whose server was started without "
                               "it: start the servers with `knnlm serve --rerank`")
        q = check_request(q, self.dim, 1, 1)
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[0] != q.shape[0] or not np.issubdtype(ids.dtype, np.integer):
            raise RequestError(f"ids must be an integer array of shape ({q.shape[0]}, m), got {ids.dtype} {ids.shape}")
        out = np.full(ids.shape, np.nan, np.float32)
        rows, cols = np.nonzero((ids >= self.first_id) & (ids < self.first_id + self.num_ids))   # (p,) pairs
        step = max(1, RERANK_CHUNK_BYTES // (self.dim * 4 * 3))       # keys, queries, differences: bounded
        for a in range(0, len(rows), step):
            r, c = rows[a:a + step], cols[a:a + step]
            keys = np.asarray(self.keys[ids[r, c] - self.first_id], dtype=np.float32)   # (p', dim)
            out[r, c] = exact_distances(q[r], keys, self.metric)
        return out


def removed_selector(removed: np.ndarray):
    """A faiss selector of the ids NOT in the (r, 2) removed ranges (None when there are none): the
    search skips removed entries while it scans the inverted lists, so its top-k equals that of an
    index that never held them. A few ranges are tested as ranges; many as one hash set of ids."""
    import faiss
    if not len(removed):
        return None
    if len(removed) <= 16:
        sels = [faiss.IDSelectorRange(int(a), int(b)) for a, b in removed]
        sel = sels[0]
        for other in sels[1:]:
            sel = faiss.IDSelectorOr(sel, other)
            sel.keep = (sels,)                             # the SWIG objects must outlive the selector
    else:
        ids = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in removed])
        sel = faiss.IDSelectorBatch(ids)
    out = faiss.IDSelectorNot(sel)
    out.keep = sel
    return out


def drop_removed(d: np.ndarray, ids: np.ndarray, removed: np.ndarray, k: int, metric: str):
    """The best k of each row of an over-fetched (n, kk) result without the removed ids (missing: -1)."""
    bad = is_removed(ids, removed) | (ids < 0)
    order = np.argsort(bad, axis=1, kind="stable")[:, :k]                  # kept entries first, in rank order
    d2, i2 = np.take_along_axis(d, order, 1), np.take_along_axis(ids, order, 1)
    gone = np.take_along_axis(bad, order, 1)
    i2[gone] = -1
    d2[gone] = np.inf if metric == "l2" else -np.inf
    return d2, i2


class IndexServerImpl:
    """Body of the `IndexServer` Ray actor: a thin wrapper around ShardServer."""

    def __init__(self, root_uri: str, shard: int, replica: int, cache_dir: str | None, rerank: bool, device: str,
                 threads: int | None, version: int | None = None):
        self.replica = replica
        # a user error (a missing or corrupted file, named) is kept and raised by every call, starting with the
        # router's ping: raised here, Ray would give the caller only an ActorDiedError whose message is the
        # worker's traceback, not the error
        self.error: KnnlmError | None = None
        try:
            self.core = ShardServer(root_uri, shard, cache_dir, rerank, device, threads, version)
        except KnnlmError as e:
            self.error = e

    def _core(self) -> ShardServer:
        if self.error is not None:
            raise self.error
        return self.core

    def ping(self) -> bool:
        self._core()
        return True

    def info(self) -> dict:
        return self._core().info() | {"replica": self.replica}

    def search(self, q: np.ndarray, k: int, nprobe: int, ids: bool = True):
        return self._core().search(q, k, nprobe, ids)

    def stats(self) -> dict:
        """Searches, queries and seconds spent in them (faiss and the values' lookup) since the start."""
        return dict(self._core().stats)

    def exact(self, q: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return self._core().exact(q, ids)

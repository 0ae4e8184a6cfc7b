"""Sharded index servers on Ray, and the client-side router that fans out and merges top-k.

Servers are named, detached Ray actors in the namespace "knnlm", one per index shard and
replica: `knnlm-<datastore key>-s<shard>-r<replica>`, where the datastore key is a hash of the
datastore's URI. Anything on the same cluster finds them by name: `Retriever.connect(uri)`.

The router lives in the client (no extra hop): each batch is put in the object store once
(`ray.put`, read zero-copy by servers on the same node) and sent to one replica of every shard at
once; a replica that fails is replaced by another replica of its shard, and one that is slow
(`hedge_after` seconds) gets a second request on another replica, the first answer winning,
all within `deadline` seconds. A shard with no live replica fails the call with a clear error,
or, only when the caller allows partial results, is left out and named in the result.

A re-ranked search (`rerank=True`) makes a second, smaller fan-out through the same machinery:
the merged approximate top-k goes to the shards that own its candidates (`exact`), and the rows
are re-sorted by (exact distance, id), so the answer does not depend on the index sharding.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from builder.errors import KnnlmError
from builder.index import faiss_gpus, fastscan_factory
from builder.manifest import load_manifest, require_index_shards
from builder.runtime import cluster_resources, connect_ray, max_node_cpus, ray_session
from builder.storage import Storage
from retriever.merge import boundary_ties, merge_topk, rerank_margin, shard_of, sort_topk, worst
from retriever.server import CPU_MAX_K, IndexServerImpl, RequestError, ServerError, check_request, datastore_key

log = logging.getLogger(__name__)
NAMESPACE = "knnlm"
INLINE_BYTES = 64 << 10   # query batches up to this size travel inline with the calls
# handles of the non-detached servers this process started: Ray removes an actor, named or not,
# once no handle to it is left, so they are kept here until stop_servers
_KEEP: dict[str, dict[tuple[int, int], object]] = {}


class RetrieverError(KnnlmError, RuntimeError):
    """The servers of a datastore cannot answer (none running, a shard without live replica, versions)."""


def actor_name(key: str, shard: int, replica: int) -> str:
    return f"knnlm-{key}-s{shard:05d}-r{replica:03d}"


def _parse(name: str) -> tuple[int, int]:
    _, _, s, r = name.rsplit("-", 3)
    return int(s[1:]), int(r[1:])


def _cause(e: BaseException) -> BaseException:
    return getattr(e, "cause", None) or e


def find_servers(uri: str) -> dict[int, dict[int, object]]:
    """{shard: {replica: actor handle}} of the servers of `uri` running on the connected cluster."""
    import ray
    from ray.util import list_named_actors
    prefix = f"knnlm-{datastore_key(uri)}-"
    out: dict[int, dict[int, object]] = {}
    for a in list_named_actors(all_namespaces=True):
        if a["namespace"] == NAMESPACE and a["name"].startswith(prefix):
            shard, replica = _parse(a["name"])
            try:
                out.setdefault(shard, {})[replica] = ray.get_actor(a["name"], namespace=NAMESPACE)
            except ValueError:  # removed meanwhile
                continue
    return out


def start_servers(uri: str, replicas: int = 1, rerank: bool = False, device: str = "auto",
                  cache_dir: str | None = None, threads: int | None = None, detached: bool = True,
                  timeout: float = 1800.0) -> dict[int, dict[int, object]]:
    """Start the missing servers of every index shard × replica and wait until they answer.

    Replicas of a shard are spread over nodes; with faiss GPU support and GPUs in the cluster each
    server takes one GPU. Servers already running are kept. A server that cannot load its shard
    fails the call with its reason, and the servers this call started are removed."""
    import ray

    if replicas < 1:
        raise ValueError(f"--replicas must be a positive integer (got {replicas})")
    st = Storage.from_uri(uri)
    m = load_manifest(st)
    require_index_shards(m, st.uri, ServerError)
    _, gpus = cluster_resources()
    use_gpu = (device in ("auto", "cuda") and gpus > 0 and faiss_gpus() > 0
               and not fastscan_factory(m.index["factory"]))            # fast-scan is searched on the CPU
    if threads is None:
        # a node's cores shared by the shards placed on it (one replica of each shard serves a call):
        # OpenMP teams larger than their share spin against each other
        nodes = max(1, sum(1 for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0))
        threads = max(1, max_node_cpus() // -(-len(m.index_shards) // nodes))
    key = datastore_key(st.uri)
    running = find_servers(st.uri)
    cls = ray.remote(IndexServerImpl)
    started = {}
    for shard in range(len(m.index_shards)):
        for r in range(replicas):
            if r in running.get(shard, {}):
                continue
            opts = dict(name=actor_name(key, shard, r), namespace=NAMESPACE, max_restarts=-1, max_task_retries=0,
                        max_concurrency=8, num_cpus=0, num_gpus=1 if use_gpu else 0, scheduling_strategy="SPREAD")
            if detached:
                opts["lifetime"] = "detached"
            started[(shard, r)] = cls.options(**opts).remote(st.uri, shard, r, cache_dir, rerank,
                                                             "cuda" if use_gpu else "cpu", threads)
    pings = {h.ping.remote(): sr for sr, h in started.items()}
    try:
        ready, not_ready = ray.wait(list(pings), num_returns=len(pings), timeout=timeout)
        if not_ready:
            raise RetrieverError(f"{len(not_ready)} index servers did not start within {timeout:.0f}s")
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as e:
                shard, r = pings[ref]
                raise ServerError(f"index server for shard {shard} (replica {r}) of {st.uri} failed to start: "
                                  f"{_cause(e)}") from None
    except BaseException:
        for h in started.values():
            ray.kill(h, no_restart=True)
        raise
    if not detached:
        _KEEP.setdefault(key, {}).update(started)
    log.info("started %d index servers for %s (%d shards x %d replicas; %d were running)", len(started), st.uri,
             len(m.index_shards), replicas, sum(len(v) for v in running.values()))
    return find_servers(st.uri)


def stop_servers(uri: str) -> int:
    """Remove every server of `uri` from the cluster; returns how many there were."""
    import ray
    n = 0
    for reps in find_servers(uri).values():
        for h in reps.values():
            ray.kill(h, no_restart=True)
            n += 1
    _KEEP.pop(datastore_key(uri), None)
    return n


def server_status(uri: str, timeout: float = 10.0) -> list[dict]:
    """One row per shard × replica found (and per shard with none): health, device, load time."""
    import ray

    n = len(load_manifest(Storage.from_uri(uri)).index_shards or [])
    found = find_servers(uri)
    refs = {h.info.remote(): (s, r) for s, reps in found.items() for r, h in reps.items()}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout) if refs else ([], [])
    rows = []
    for ref, (s, r) in refs.items():
        row = {"shard": s, "replica": r, "healthy": False}
        if ref in ready:
            try:
                row.update(ray.get(ref), healthy=True)
            except Exception as e:
                row["error"] = f"{type(_cause(e)).__name__}: {_cause(e)}"
        else:
            row["error"] = f"no answer within {timeout:.0f}s"
        rows.append(row)
    for s in range(n):
        if s not in found:
            rows.append({"shard": s, "replica": None, "healthy": False, "error": "no server running"})
    return sorted(rows, key=lambda x: (x["shard"], x["replica"] if x["replica"] is not None else -1))


@contextmanager
def serving(uri: str, address: str | None = None, rerank: bool = False, cache_dir: str | None = None):
    """Ray connected (an embedded one unless `address`) and the datastore's servers running for the
    block: the cluster's own, or, where none run, embedded ones started here and stopped after."""
    with ray_session(address):
        embedded = not find_servers(uri)
        if embedded:
            if address:
                raise RetrieverError(f"no index servers of {uri} run on {address}: start them with "
                                     f"`knnlm serve {uri} --address {address}`" + (" --rerank" if rerank else ""))
            start_servers(uri, rerank=rerank, cache_dir=cache_dir, detached=False)
        try:
            yield
        finally:
            if embedded:
                stop_servers(uri)


# ---------------------------------------------------------------------------------------------
# the client


@dataclass
class SearchResult:
    """dist float32 (n, k), ids int64 (n, k), values int32 (n, k); unpacks as (dist, ids, values)."""
    dist: np.ndarray
    ids: np.ndarray
    values: np.ndarray
    partial: bool = False
    missing_shards: list[int] = field(default_factory=list)
    error: str = ""                      # why shards are missing (with allow_partial)

    def __iter__(self):
        return iter((self.dist, self.ids, self.values))


class Retriever:
    """Search a datastore's sharded index through its running servers.

        r = Retriever.connect("s3://bucket/wiki")          # on the cluster Ray is connected to
        dist, ids, values = r.search(queries, k=1024, nprobe=32)
    """

    def __init__(self, uri: str, servers: dict[int, dict[int, object]], num_shards: int, metric: str, dim: int,
                 max_k: int | None, hedge_after: float = 5.0, deadline: float = 120.0,
                 ranges: list[tuple[int, int]] | None = None):
        self.uri, self.servers, self.num_shards = uri, servers, num_shards
        self.ranges = ranges or []                               # (first_id, num_ids) of each shard: who owns an id
        self.metric, self.dim, self.max_k = metric, dim, max_k
        self.hedge_after, self.deadline = hedge_after, deadline
        self._next = {s: 0 for s in range(num_shards)}          # round robin over replicas
        self._dead: set[tuple[int, int]] = set()                 # replicas seen dead (skipped first)
        self._tie_warned = False

    @classmethod
    def connect(cls, datastore_uri: str, address: str | None = None, hedge_after: float = 5.0,
                deadline: float = 120.0, timeout: float = 60.0) -> "Retriever":
        """Find the servers of `datastore_uri` on the Ray cluster this process is connected to (or
        connect to `address`, as ray.init takes it; "auto" when neither) and check them."""
        import ray

        if not ray.is_initialized():
            connect_ray(address or "auto")
        st = Storage.from_uri(datastore_uri)
        m = load_manifest(st)
        require_index_shards(m, st.uri, RetrieverError)
        servers = find_servers(st.uri)
        missing = [s for s in range(len(m.index_shards)) if not servers.get(s)]
        if len(missing) == len(m.index_shards):
            raise RetrieverError(f"no index servers of {st.uri} run on this Ray cluster: start them with "
                                 f"`knnlm serve {st.uri} --address <cluster>`")
        infos = []
        for s, reps in servers.items():
            h = next(iter(reps.values()))
            try:
                infos.append(ray.get(h.info.remote(), timeout=timeout))
            except Exception as e:
                log.warning("index server of shard %d does not answer (%s)", s, type(_cause(e)).__name__)
        for info in infos:
            if info["ray_version"] != ray.__version__:
                raise RetrieverError(f"this client runs Ray {ray.__version__}, but the index servers of {st.uri} run "
                                     f"Ray {info['ray_version']}: install ray=={info['ray_version']} here")
            s = m.index_shards[info["shard"]]
            if info["checksum"] != s["checksum"] or info["first_id"] != s["first_id"]:
                raise RetrieverError(f"the running server of shard {info['shard']} serves another version of "
                                     f"{st.uri} (rebuilt since it started): restart them with `knnlm serve --stop` "
                                     "then `knnlm serve`")
        max_k = min([i["max_k"] for i in infos if i.get("max_k")] or [None]) if infos else None
        if missing:
            log.warning("index shards %s of %s have no running server", missing, st.uri)
        return cls(st.uri, servers, len(m.index_shards), m.index["metric"], m.dim, max_k, hedge_after, deadline,
                   [(int(s["first_id"]), int(s["num_ids"])) for s in m.index_shards])

    def search(self, queries: np.ndarray, k: int = 1024, nprobe: int = 32, rerank: bool = False,
               allow_partial: bool = False) -> SearchResult:
        """Global top-k of each query over every shard: distances (squared L2 or inner product, as
        FAISS returns them), global ids and values; see SearchResult.

        A shard left without a live replica makes the router look the servers up by name once
        more (they may have been restarted by `knnlm serve`) before it gives up."""
        res = self._search(queries, k, nprobe, rerank)
        if res.missing_shards:
            fresh = find_servers(self.uri)
            if any(fresh.get(s) for s in res.missing_shards):   # servers of those shards (re)started
                self.servers = fresh
                self._dead.clear()
                res = self._search(queries, k, nprobe, rerank)
        if res.missing_shards and (not allow_partial or len(res.missing_shards) == self.num_shards):
            raise RetrieverError(res.error)
        return res

    def _search(self, queries: np.ndarray, k: int, nprobe: int, rerank: bool) -> SearchResult:
        """One fan-out (two with rerank): the merged results of the shards that answered, the others
        named in the result.

        With rerank, the exact order does not depend on how the datastore is split: each shard
        returns its approximate top-(k + margin), the router keeps the best k by (approximate
        distance, id), asks the shards owning those k candidates for their exact distances (one
        `exact` call per shard), and sorts them by (exact distance, id)."""
        import ray
        q = check_request(queries, self.dim, k, nprobe, self.max_k)
        # one copy in the object store, read zero-copy by every server on a node; a small batch
        # goes inline with the calls (a put costs more than it saves)
        q_ref = ray.put(q) if q.nbytes > INLINE_BYTES else q
        kk = min(k + rerank_margin(k), self.max_k or CPU_MAX_K) if rerank else k
        results, failed = self._fan_out("search", (q_ref, int(kk), int(nprobe)), range(self.num_shards))
        missing = sorted(s for s in range(self.num_shards) if s not in results)
        if len(missing) == self.num_shards:
            return self._result(None, k, missing, failed)
        got = [results[s] for s in sorted(results)]
        d, i, v = merge_topk([g[0] for g in got], [g[1] for g in got], [g[2] for g in got], k, self.metric)
        if rerank:
            ties = boundary_ties(d, [g[0] for g in got if g[0].shape[1] == kk], self.metric)
            if ties.any():   # once per client at warning level: a fast-scan index may tie in every batch
                log.log(logging.DEBUG if self._tie_warned else logging.WARNING, "re-rank: in %d of %d rows a "
                        "shard's %d candidates end on a tie with the k-th approximate distance; those rows may "
                        "depend on the index layout", ties.sum(), len(ties), kk)
                self._tie_warned = True
            d, i, v, lost = self._exact(q_ref, i, v)
            failed.update(lost)
            missing = sorted(set(missing) | set(lost))
        return self._result((d, i, v), k, missing, failed)

    def _exact(self, q_ref, ids: np.ndarray, values: np.ndarray):
        """Exact distances of the (n, k) candidates ids from the shards that own them, the rows re-sorted
        by (exact distance, id); candidates of a shard that did not answer are dropped (its failure
        returned, for the caller to report like a missing shard)."""
        import ray
        owner = shard_of(ids, self.ranges)                                 # (n, k) shard index, -1 missing
        shards = sorted(int(s) for s in np.unique(owner) if s >= 0)
        ids_ref = ids if ids.nbytes <= INLINE_BYTES else ray.put(ids)
        results, failed = self._fan_out("exact", (q_ref, ids_ref), shards)
        exact = np.full(ids.shape, worst(self.metric), np.float32)
        for s, e in results.items():
            mine = owner == s
            exact[mine] = e[mine]
        d, i, v = sort_topk(exact, np.where(np.isfinite(exact), ids, -1), values, ids.shape[1], self.metric)
        return d, i, v, failed

    def _result(self, div, k: int, missing: list[int], failed: dict[int, str]) -> SearchResult:
        for s in missing:
            failed.setdefault(s, f"no answer within the {self.deadline:.0f}s deadline")
        error = (f"index shards {missing} of {self.uri} have no live replica (" +
                 "; ".join(f"shard {s}: {failed[s]}" for s in missing[:5]) +
                 "): check `knnlm serve --status`, restart them with `knnlm serve`, or pass "
                 "allow_partial=True to search the other shards") if missing else ""
        if div is None:
            return SearchResult(np.zeros((0, k), np.float32), np.zeros((0, k), np.int64), np.zeros((0, k), np.int32),
                                partial=True, missing_shards=missing, error=error)
        return SearchResult(*div, partial=bool(missing), missing_shards=missing, error=error)

    def _fan_out(self, method: str, args: tuple, shards) -> tuple[dict[int, object], dict[int, str]]:
        """Call `method(*args)` on one replica of each shard in `shards`: a failed replica is replaced by
        another of its shard, a slow one (hedge_after) gets a second call elsewhere, the first answer
        winning, all within the deadline. Returns ({shard: answer}, {shard: why it has none})."""
        import ray
        import ray.exceptions as rex
        shards = list(shards)
        t0 = time.monotonic()
        results: dict[int, object] = {}
        tried: dict[int, set[int]] = {s: set() for s in shards}
        sent_at: dict[int, float] = {}
        pending: dict = {}

        def send(shard: int) -> bool:
            reps = self.servers.get(shard, {})
            order = sorted(reps, key=lambda r: ((shard, r) in self._dead, (r - self._next[shard]) % max(len(reps), 1)))
            for r in order:
                if r not in tried[shard]:
                    tried[shard].add(r)
                    pending[getattr(reps[r], method).remote(*args)] = (shard, r)
                    sent_at[shard] = time.monotonic()
                    return True
            return False

        failed: dict[int, str] = {}
        for s in shards:
            self._next[s] = (self._next[s] + 1) % max(len(self.servers.get(s, {})), 1)
            if not send(s):
                failed[s] = "no server running"
        if not failed:  # the common case: every shard answers in time, one batched get
            items = list(pending.items())
            try:
                got = ray.get([ref for ref, _ in items], timeout=self.hedge_after)
                results = {shard: g for (_, (shard, _)), g in zip(items, got)}
                pending.clear()
            except Exception:  # noqa: BLE001 - a failure or a slow shard: the loop below sorts it out
                pass
        try:
            while pending and len(results) + len(failed) < len(shards):
                left = self.deadline - (time.monotonic() - t0)
                if left <= 0:
                    break
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=min(left, self.hedge_after / 2))
                for ref in ready:
                    shard, r = pending.pop(ref)
                    if shard in results:
                        continue
                    try:
                        results[shard] = ray.get(ref)
                        self._dead.discard((shard, r))
                        continue
                    except rex.RayTaskError as e:
                        if isinstance(_cause(e), RequestError):
                            raise _cause(e) from None
                        reason = f"{type(_cause(e)).__name__}: {_cause(e)}"
                    except (rex.RayActorError, rex.ActorUnavailableError, rex.ObjectLostError) as e:
                        self._dead.add((shard, r))
                        log.warning("replica %d of index shard %d failed (%s); trying another", r, shard,
                                    type(e).__name__)
                        reason = f"every replica failed (last: {type(e).__name__})"
                    # another replica of the shard, unless none is left and none is still answering
                    if not send(shard) and not any(v[0] == shard for v in pending.values()):
                        failed[shard] = reason
                now = time.monotonic()
                for shard in shards:    # hedge slow shards on another replica
                    if shard not in results and shard not in failed and now - sent_at.get(shard, now) > self.hedge_after:
                        if send(shard):
                            log.info("index shard %d is slow (%.1fs); asked another replica", shard, now - sent_at[shard])
        finally:
            for ref in pending:
                ray.cancel(ref)
        for s in shards:
            if s not in results:
                failed.setdefault(s, f"no answer within the {self.deadline:.0f}s deadline")
        return results, failed

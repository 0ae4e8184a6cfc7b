"""Sharded index servers on Ray, and the client-side router that fans out and merges top-k.

Servers are named Ray actors in the namespace "knnlm", one per datastore version, index shard and
replica: `knnlm-<datastore key>-v<version>-s<shard>-r<replica>` (retriever/fleet.py), started and
switched from version to version by the datastore's serve controller (retriever/controller.py).
Anything on the same cluster finds them by name: `Retriever.connect(uri)`.

The router lives in the client (no extra hop): it asks the controller which version is served (at
most once per `refresh` seconds) and sends each search to the servers of that one version, so every
answer comes wholly from one version (`SearchResult.version`); when that version's servers are gone
(stopped after a switch), it searches again on the new version. Each batch is put in the object store
once (`ray.put`, read zero-copy by servers on the same node) and sent to one replica of every shard
at once; a replica that fails is replaced by another replica of its shard, and one that is slow
(`hedge_after` seconds) gets a second request on another replica, the first answer winning,
all within `deadline` seconds. A shard with no live replica fails the call with a clear error,
or, only when the caller allows partial results, is left out and named in the result.

A re-ranked search (`rerank=True`) makes a second, smaller fan-out through the same machinery:
the merged approximate top-k goes to the shards that own its candidates (`exact`), and the rows
are re-sorted by (exact distance, id), so the answer does not depend on the index sharding.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from builder.manifest import load_manifest, require_index_shards
from builder.runtime import connect_ray
from builder.storage import Storage
from builder.versions import load_version
from retriever.controller import REFRESH
from retriever.fleet import (  # noqa: F401 - names of this module's API too
    ASK_TIMEOUT,
    NAMESPACE,
    RetrieverError,
    actor_name,
    cause,
    controller,
    find_all,
    find_servers,
    served_version,
)
from retriever.merge import boundary_ties, merge_topk, rerank_margin, shard_of, sort_topk, worst
from retriever.server import CPU_MAX_K, RequestError, check_request
from retriever.servers import controller_status, server_status, serving, start_servers, stop_servers  # noqa: F401

log = logging.getLogger(__name__)
INLINE_BYTES = 64 << 10   # query batches up to this size travel inline with the calls
RESTART_POLL = 0.25       # seconds before asking a restarting shard again (doubling, at most 2 s)
_cause = cause


# ---------------------------------------------------------------------------------------------
# the client


@dataclass
class SearchResult:
    """dist float32 (n, k), ids int64 (n, k) (None from a search with ids=False), values int32 (n, k);
    unpacks as (dist, ids, values)."""
    dist: np.ndarray
    ids: np.ndarray
    values: np.ndarray
    partial: bool = False
    missing_shards: list[int] = field(default_factory=list)
    error: str = ""                      # why shards are missing (with allow_partial)
    version: int | None = None           # the datastore version whose servers gave the whole answer

    def __iter__(self):
        return iter((self.dist, self.ids, self.values))


@dataclass
class View:
    """The servers of one datastore version, as the router uses them: a search holds one view
    throughout, so that all its calls go to one version."""
    version: int | None
    servers: dict[int, dict[int, object]]
    num_shards: int
    ranges: list[tuple[int, int]]                               # (first_id, num_ids) of each shard: who owns an id
    next: dict[int, int] = field(default_factory=dict)          # round robin over replicas
    dead: set[tuple[int, int]] = field(default_factory=set)     # replicas seen dead (skipped first)


class Retriever:
    """Search a datastore's sharded index through its running servers.

        r = Retriever.connect("s3://bucket/wiki")          # on the cluster Ray is connected to
        dist, ids, values = r.search(queries, k=1024, nprobe=32)
    """

    def __init__(self, uri: str, servers: dict[int, dict[int, object]], num_shards: int, metric: str, dim: int,
                 max_k: int | None, hedge_after: float = 5.0, deadline: float = 120.0,
                 ranges: list[tuple[int, int]] | None = None, version: int | None = None, refresh: float = REFRESH):
        self.uri = uri
        self.metric, self.dim, self.max_k = metric, dim, max_k
        self.hedge_after, self.deadline, self.refresh = hedge_after, deadline, refresh
        self.view = View(version, servers, num_shards, list(ranges or []), {s: 0 for s in range(num_shards)})
        self._asked_at = time.monotonic()
        self._ctl = None                                         # the controller's handle, once looked up
        self._lock = threading.Lock()
        self._tie_warned = False
        self.timings = {"wait": 0.0, "merge": 0.0}      # seconds: waiting for the servers' answers, merging them

    # the served version's servers (the view the next search starts from)
    servers = property(lambda self: self.view.servers)
    num_shards = property(lambda self: self.view.num_shards)
    ranges = property(lambda self: self.view.ranges)
    version = property(lambda self: self.view.version)

    @classmethod
    def connect(cls, datastore_uri: str, address: str | None = None, hedge_after: float = 5.0,
                deadline: float = 120.0, timeout: float = 60.0, refresh: float = REFRESH) -> Retriever:
        """Find the servers of `datastore_uri` on the Ray cluster this process is connected to (or
        connect to `address`, as ray.init takes it; "auto" when neither) and check them."""
        import ray

        if not ray.is_initialized():
            connect_ray(address or "auto")
        st = Storage.from_uri(datastore_uri)
        require_index_shards(load_manifest(st), st.uri, RetrieverError)
        found = find_all(st.uri)
        version = served_version(st.uri, found) if found else None
        m = load_version(st, version) if version is not None else load_manifest(st)
        require_index_shards(m, st.uri, RetrieverError)
        servers = found.get(version, {})
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
                   [(int(s["first_id"]), int(s["num_ids"])) for s in m.index_shards], version, refresh)

    def _served(self) -> int | None:
        """The version the controller serves (its handle kept); without one, see fleet.served_version."""
        import ray
        if self._ctl is None:
            self._ctl = controller(self.uri)
        if self._ctl is not None:
            try:
                v = ray.get(self._ctl.current.remote(), timeout=ASK_TIMEOUT)
                if v is not None:
                    return v
            except Exception as e:  # noqa: BLE001 - dead or restarting: look at the servers instead
                log.warning("the serve controller of %s does not answer (%s)", self.uri, type(_cause(e)).__name__)
                self._ctl = None
        return served_version(self.uri)

    def _refresh(self, force: bool = False) -> View:
        """The view of the version served now (asked at most once per `refresh` seconds unless forced)."""
        if not force and time.monotonic() - self._asked_at < self.refresh:
            return self.view
        with self._lock:
            self._asked_at = time.monotonic()
            v = self._served()
            if v is not None and v != self.view.version:
                m = load_version(Storage.from_uri(self.uri), v)
                n = len(m.index_shards or [])
                self.view = View(v, find_servers(self.uri, v), n,
                                 [(int(s["first_id"]), int(s["num_ids"])) for s in m.index_shards or []],
                                 {s: 0 for s in range(n)})
                log.info("%s: searching version %d now", self.uri, v)
            return self.view

    def search(self, queries: np.ndarray, k: int = 1024, nprobe: int = 32, rerank: bool = False,
               allow_partial: bool = False, ids: bool = True) -> SearchResult:
        """Global top-k of each query over every shard of one datastore version: distances (squared L2
        or inner product, as FAISS returns them), global ids and values; see SearchResult. `ids=False`
        (scoring: `knnlm eval`) leaves the ids out (`SearchResult.ids` None): the servers send and the
        router merges 8 bytes a neighbour instead of 16, with the same distances and values.

        A shard left without a live replica makes the router ask which version is served: a newer one
        (the old version's servers stopped after a switch) is searched again, whole. Otherwise it looks
        the servers up by name again: while servers of the shard are registered (Ray restarting crashed
        ones, or `knnlm serve` having started new ones), it asks again after a growing pause, within the
        deadline; a shard none of whose servers is registered any more (removed, or unable to start)
        fails at once."""
        view = self._refresh()
        res = self._search(view, queries, k, nprobe, rerank, ids)
        t0, pause = time.monotonic(), RESTART_POLL
        while res.missing_shards and time.monotonic() - t0 <= self.deadline:
            new = self._refresh(force=True)
            if new.version != view.version:                      # switched meanwhile: all again, on the new one
                log.info("%s: version %s's servers are gone; searching version %s", self.uri, view.version,
                         new.version)
                view = new
            else:
                fresh = find_servers(self.uri, view.version)
                if not any(fresh.get(s) for s in res.missing_shards):
                    break
                view.servers = fresh                             # servers of those shards (re)starting
                view.dead.clear()
                time.sleep(pause)
                pause = min(2 * pause, 2.0)
            res = self._search(view, queries, k, nprobe, rerank, ids)
        if res.missing_shards and (not allow_partial or len(res.missing_shards) == view.num_shards):
            raise RetrieverError(res.error)
        res.version = view.version
        return res

    def _search(self, view: View, queries: np.ndarray, k: int, nprobe: int, rerank: bool,
                ids: bool = True) -> SearchResult:
        """One fan-out (two with rerank): the merged results of the shards that answered, the others
        named in the result.

        With rerank, the exact order does not depend on how the datastore is split: each shard
        returns its approximate top-(k + margin), the router keeps the best k by (approximate
        distance, id), asks the shards owning those k candidates for their exact distances (one
        `exact` call per shard), and sorts them by (exact distance, id)."""
        q = check_request(queries, self.dim, k, nprobe, self.max_k)
        q_ref = self._put(q)
        kk = min(k + rerank_margin(k), self.max_k or CPU_MAX_K) if rerank else k
        # without ids, ties are merged in shard order: that is id order when the shards' ranges increase
        ids = ids or rerank or not view.ranges or any(a[0] >= b[0] for a, b in zip(view.ranges, view.ranges[1:]))
        t0 = time.perf_counter()
        results, failed = self._fan_out(view, "search", (q_ref, int(kk), int(nprobe)) + (() if ids else (False,)),
                                        range(view.num_shards))
        t1 = time.perf_counter()
        missing = sorted(s for s in range(view.num_shards) if s not in results)
        if len(missing) == view.num_shards:
            return self._result(None, k, missing, failed)
        got = [results[s] for s in sorted(results)]
        d, i, v = merge_topk([g[0] for g in got], [g[1] for g in got] if ids else None, [g[2] for g in got], k,
                             self.metric)
        self.timings["wait"] += t1 - t0
        self.timings["merge"] += time.perf_counter() - t1
        if rerank:
            ties = boundary_ties(d, [g[0] for g in got if g[0].shape[1] == kk], self.metric)
            if ties.any():   # once per client at warning level: a fast-scan index may tie in every batch
                log.log(logging.DEBUG if self._tie_warned else logging.WARNING, "re-rank: in %d of %d rows a "
                        "shard's %d candidates end on a tie with the k-th approximate distance; those rows may "
                        "depend on the index layout", ties.sum(), len(ties), kk)
                self._tie_warned = True
            d, i, v, lost = self._exact(view, q_ref, i, v)
            failed.update(lost)
            missing = sorted(set(missing) | set(lost))
        return self._result((d, i, v), k, missing, failed)

    def _exact(self, view: View, q_ref, ids: np.ndarray, values: np.ndarray):
        """Exact distances of the (n, k) candidates ids from the shards that own them, the rows re-sorted
        by (exact distance, id); candidates of a shard that did not answer are dropped (its failure
        returned, for the caller to report like a missing shard)."""
        owner = shard_of(ids, view.ranges)                                 # (n, k) shard index, -1 missing
        shards = sorted(int(s) for s in np.unique(owner) if s >= 0)
        ids_ref = self._put(ids)
        results, failed = self._fan_out(view, "exact", (q_ref, ids_ref), shards)
        exact = np.full(ids.shape, worst(self.metric), np.float32)
        for s, e in results.items():
            mine = owner == s
            exact[mine] = e[mine]
        d, i, v = sort_topk(exact, np.where(np.isfinite(exact), ids, -1), values, ids.shape[1], self.metric)
        return d, i, v, failed

    def _put(self, x: np.ndarray):
        """x as the servers' calls take it: in the object store (one copy per node, read zero-copy by every
        server there), or inline when small (a put costs more than it saves)."""
        import ray
        return ray.put(x) if x.nbytes > INLINE_BYTES else x

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

    def _fan_out(self, view: View, method: str, args: tuple, shards) -> tuple[dict[int, object], dict[int, str]]:
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
            reps = view.servers.get(shard, {})
            order = sorted(reps, key=lambda r: ((shard, r) in view.dead, (r - view.next.get(shard, 0)) % max(len(reps), 1)))
            for r in order:
                if r not in tried[shard]:
                    tried[shard].add(r)
                    pending[getattr(reps[r], method).remote(*args)] = (shard, r)
                    sent_at[shard] = time.monotonic()
                    return True
            return False

        failed: dict[int, str] = {}
        for s in shards:
            view.next[s] = (view.next.get(s, 0) + 1) % max(len(view.servers.get(s, {})), 1)
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
                        view.dead.discard((shard, r))
                        continue
                    except rex.RayTaskError as e:
                        if isinstance(_cause(e), RequestError):
                            raise _cause(e) from None
                        reason = f"{type(_cause(e)).__name__}: {_cause(e)}"
                    except (rex.RayActorError, rex.ActorUnavailableError, rex.ObjectLostError) as e:
                        view.dead.add((shard, r))
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

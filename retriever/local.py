"""The datastore's index shards searched in this process: `knnlm eval` with no cluster to use.

An evaluation on one machine with no `--address` (and no `--workers`, no GPU) needs no Ray: starting
an embedded Ray took 3.9 s and stopping it 1.4 s on the 2-core bench (issue 18), a third of what
the evaluation spent beyond the machine's floor. `LocalRetriever` loads each index shard as a server
does (`ShardServer`: the same cached files, removed ids, value lookup and checks) and is a
`Retriever` in everything else: the same merge of the shards' top-k, the same exact re-rank, the same
results. Shards are searched side by side, each with its share of the cores, as the embedded servers
were; where the shards search one thread each by nearest list (`ShardServer.sorts_queries`), each
query's inverted lists are found once for all of them (their quantizer is the trained index's, the
same in every shard; checked at load) instead of once per shard: the same lists, the same results.
A failure is raised as it is (there is no other replica to ask).
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from builder.manifest import load_manifest, require_index_shards
from builder.storage import Storage
from retriever.fleet import RetrieverError
from retriever.router import Retriever, View
from retriever.server import ShardServer

log = logging.getLogger(__name__)


class LocalRetriever(Retriever):
    """A Retriever over index shards loaded in this process (see the module docstring).

        r = LocalRetriever.open("ds")                     # the version current now
        dist, ids, values = r.search(queries, k=1024, nprobe=32)
    """

    @classmethod
    def open(cls, datastore_uri: str, rerank: bool = False, cache_dir: str | None = None,
             threads: int | None = None) -> LocalRetriever:
        """Every index shard of the datastore's current version, loaded (in parallel: each read is
        mostly I/O and faiss's deserialization)."""
        t0 = time.perf_counter()
        st = Storage.from_uri(datastore_uri)
        m = load_manifest(st)
        require_index_shards(m, st.uri, RetrieverError)
        n, cores = len(m.index_shards), len(os.sched_getaffinity(0))
        # the shards are searched side by side, each with its share of the cores (as embedded servers are:
        # on the 2-core bench two 1-thread searches took 7.8 s where one after the other with 2 threads took 8.5)
        threads = threads or max(1, cores // min(n, cores))
        with ThreadPoolExecutor(min(n, 4), thread_name_prefix="knnlm-load-shard") as ex:
            shards = list(ex.map(lambda s: ShardServer(st.uri, s, cache_dir, rerank, "cpu", threads, m.version),
                                 range(n)))
        r = cls(st.uri, {s: {0: shard} for s, shard in enumerate(shards)}, n, m.index["metric"], m.dim,
                min(s.max_k for s in shards), ranges=[(int(s["first_id"]), int(s["num_ids"])) for s in m.index_shards],
                version=m.version)
        r.load_seconds = time.perf_counter() - t0
        r._pool = ThreadPoolExecutor(max(1, min(n, cores // threads)), thread_name_prefix="knnlm-shard")
        r._one_coarse = n > 1 and all(x.sorts_queries() for x in shards) and _one_quantizer(shards)
        return r

    def _refresh(self, force: bool = False) -> View:
        return self.view                       # the version loaded: one for the whole evaluation

    def _put(self, x: np.ndarray) -> np.ndarray:
        return x

    def _fan_out(self, view: View, method: str, args: tuple, shards) -> tuple[dict[int, object], dict[int, str]]:
        """`method(*args)` on each shard, side by side on one pool for every call (a caller with two calls in
        flight gets no more searches at once than the cores take)."""
        kw = {}
        if method == "search" and self._one_coarse:
            # the shards' quantizer is one (the trained index's): each query's lists found once, not per shard
            kw["coarse"] = view.servers[0][0].coarse(args[0], args[2])
        futures = {s: self._pool.submit(getattr(view.servers[s][0], method), *args, **kw) for s in shards}
        return {s: f.result() for s, f in futures.items()}, {}

    def close(self) -> None:
        self._pool.shutdown()

    def stats(self) -> dict[int, dict]:
        """{shard: its queries and search seconds} (as `server_stats` gives a cluster's)."""
        return {s: {"queries": reps[0].stats["queries"], "seconds": reps[0].stats["seconds"]}
                for s, reps in self.view.servers.items()}


def _one_quantizer(shards: list[ShardServer]) -> bool:
    """Whether every shard's coarse quantizer holds the same centroids (copies of one trained index)."""
    first = shards[0].index.quantizer
    c0 = first.reconstruct_n(0, first.ntotal)
    return all(s.index.quantizer.ntotal == first.ntotal and
               np.array_equal(s.index.quantizer.reconstruct_n(0, first.ntotal), c0) for s in shards[1:])

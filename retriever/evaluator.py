"""The warm evaluator: `knnlm serve` keeps one process with torch, transformers and the datastore's LM
loaded beside the index servers, and `knnlm eval --address` hands it the whole evaluation
(retriever/warm.py is the client's side, which imports none of this).

Why: a fresh `knnlm eval` process spent 7.7 s before its first forward on the 2-core bench (issue 18:
Python and its imports 4.5 s, the model's check and load 3.2 s), 16% of a 47 s evaluation whose forward
and searches were already at the machine's floor. Handed to the warm evaluator, the client imports no
torch (about 1 s to start, connect and hand over) and the evaluation starts with the model in memory.

The evaluator runs `evaluate` itself, unchanged: the same check of the model against the manifest, the
same tokenization, windows and scoring, the LM in its own process (`EvalWorkerImpl`, kept across
calls, one per model, key layer, dtype and thread count). On a one-node cluster without GPUs it also
keeps the index shards loaded (`LocalRetriever`, from the servers' cache: memory-mapped, so shared
with them) and searches them itself; on several nodes it asks the servers, and with GPUs `evaluate`
runs its LM on GPU workers (started per call: only the imports are warm there). `evaluate` gives the
kept LM a new retriever each call. Calls run one at a time (a second waits).
The actor is `knnlm-<datastore key>-evaluator` in the "knnlm" namespace; `knnlm serve --stop` removes it.
"""
from __future__ import annotations

import logging
import os
import threading
import time

from builder.errors import KnnlmError
from builder.manifest import load_manifest
from builder.storage import Storage
from retriever.evaluate import check_model, evaluate
from retriever.local import LocalRetriever
from retriever.scoring import EvalWorkerImpl, query_dtype

log = logging.getLogger(__name__)


class WarmEvaluatorImpl:
    """Body of the warm evaluator actor (`retriever.warm.WarmEvaluator`; see the module docstring)."""

    def __init__(self, uri: str, cache_dir: str | None = None):
        import ray
        self.uri, self.node, self.cache_dir = uri, ray.get_runtime_context().get_node_id(), cache_dir
        self.workers: dict[tuple, object] = {}
        self.local, self.local_key = None, None      # the index shards loaded here, and their (version, rerank)
        self.calls, self.loaded, self.error = 0, None, None
        self.lock = threading.Lock()                 # one evaluation at a time; the preload first
        threading.Thread(target=self._preload, name="knnlm-evaluator-preload", daemon=True).start()

    def _preload(self) -> None:
        """Imports, the model's check (its hash cached) and the LM of the manifest's model loaded: what a
        first call would otherwise wait for. A failure is kept for `info`: the call then raises it itself."""
        with self.lock:
            t = time.perf_counter()
            try:
                m = load_manifest(Storage.from_uri(self.uri))
                check_model(None, m)
                nodes, gpus = _cluster()
                if not gpus:             # with GPUs, `evaluate` runs the LM on GPU workers: nothing to keep here
                    self.worker(m.model.get("path") or m.model["name"], m.key_layer, "cpu", query_dtype(None, m),
                                self.uri, len(os.sched_getaffinity(0)))
                if nodes == 1 and not gpus:
                    self.shards(False)
                self.loaded = round(time.perf_counter() - t, 2)
            except Exception as e:  # noqa: BLE001 - reported by `info`, raised by the call that needs it
                self.error = f"{type(e).__name__}: {e}"
                log.warning("the warm evaluator of %s could not preload its model: %s", self.uri, self.error)

    def worker(self, model_path: str, key_layer: str, device: str, compute_dtype: str, datastore: str,
               threads: int | None):
        """`evaluate`'s in-process LM, kept across calls."""
        if os.path.isdir(model_path):
            model_path = os.path.realpath(model_path)
        key = (model_path, key_layer, device, compute_dtype, datastore, threads)
        if key not in self.workers:
            self.workers[key] = EvalWorkerImpl(*key)
        return self.workers[key]

    def ready(self) -> dict:
        """`info` once the preload is done."""
        with self.lock:
            return self.info()

    def shards(self, rerank: bool):
        """The index shards of the datastore's current version loaded in this process (kept across calls,
        reloaded when the version changes): on a one-node cluster, where the servers' shard files are in
        this node's cache already, searching them here spares the transfer of every neighbour's distance and
        value from the server processes (on the 2-core bench 3 s of a 42 s evaluation)."""
        key = (load_manifest(Storage.from_uri(self.uri)).version, rerank)
        if key != self.local_key:
            if self.local is not None:
                self.local.close()
            self.local, self.local_key = None, None
            self.local = LocalRetriever.open(self.uri, rerank, self.cache_dir)
            self.local_key = key
        return self.local

    def info(self) -> dict:
        return {"node": self.node, "pid": os.getpid(), "nice": os.nice(0), "calls": self.calls,
                "loaded_seconds": self.loaded, "error": self.error}

    def evaluate(self, cfg) -> dict:
        """{"result": the eval JSON, "table": its table} or {"error": a user error's message}."""
        with self.lock:
            self.calls += 1
            t = time.perf_counter()
            try:
                shards = (lambda: self.shards(cfg.rerank)) if _cluster() == (1, 0) and cfg.workers is None else None
                res = evaluate(cfg, make_worker=self.worker, shards=shards)
            except KnnlmError as e:
                return {"error": str(e)}
            j = res.to_json()
            j["profile"]["evaluator"] = {"warm": True, "pid": os.getpid(), "call": self.calls,
                                         "seconds": round(time.perf_counter() - t, 3)}
            return {"result": j, "table": res.table()}


def _cluster() -> tuple[int, int]:
    """(live nodes, GPUs) of the cluster. One node without GPUs: `evaluate` runs here, LM and index shards;
    with GPUs it starts GPU workers, and on several nodes it asks the servers."""
    import ray
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return len(alive), int(sum(n["Resources"].get("GPU", 0) for n in alive))

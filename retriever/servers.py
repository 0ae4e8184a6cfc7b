"""Starting, stopping and reporting a datastore's index servers (`knnlm serve`), and `serving`: the
servers a command (eval, query, neighbours, generate) needs, for the duration of the command.

`start_servers` starts the datastore's serve controller (retriever/controller.py), which starts the
servers of the version it serves and follows new versions; `stop_servers` removes the controller and
the servers of every version.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager

from builder.errors import KnnlmError
from builder.manifest import load_manifest, require_index_shards
from builder.runtime import ray_session
from builder.storage import Storage
from builder.versions import load_version
from retriever.controller import GRACE, WATCH, ensure_controller
from retriever.fleet import (RetrieverError, ask, cause, controller, evaluator, find_all, find_servers, kill,
                             served_version)
from retriever.server import ServerError, datastore_key

log = logging.getLogger(__name__)

# the controllers this process started non-detached: Ray removes an actor, named or not, once no
# handle to it is left (and with it the servers it started), so they are kept here until stop_servers
_KEEP: dict[str, object] = {}


def start_servers(uri: str, replicas: int = 1, rerank: bool = False, device: str = "auto",
                  cache_dir: str | None = None, threads: int | None = None, detached: bool = True,
                  timeout: float = 1800.0, watch: float = WATCH, grace: float = GRACE) -> dict[int, dict[int, object]]:
    """Start the datastore's serve controller (unless one runs) and the missing servers of every index
    shard × replica of the version it serves, and wait until they answer; returns them.

    The controller follows new versions every `watch` seconds (0: it serves the current version only),
    stopping the old version's servers `grace` seconds after each switch. Replicas of a shard are
    spread over nodes; with faiss GPU support and GPUs in the cluster each server takes one GPU.
    Servers already running are kept. A server that cannot load its shard fails the call with its
    reason, and the servers this call started are removed."""
    import ray
    import ray.exceptions as rex

    if replicas < 1:
        raise ValueError(f"--replicas must be a positive integer (got {replicas})")
    st = Storage.from_uri(uri)
    m = load_manifest(st)
    require_index_shards(m, st.uri, ServerError)
    settings = {"replicas": replicas, "rerank": rerank, "device": device, "cache_dir": cache_dir,
                "threads": threads, "watch": watch, "grace": grace, "timeout": timeout}
    h, created = ensure_controller(st.uri, settings, m.version, detached)
    try:
        version = ray.get(h.ensure.remote(settings))
    except (rex.RayTaskError, rex.RayActorError) as e:
        if created:
            kill([h])
        if isinstance(cause(e), KnnlmError):
            raise cause(e) from None
        raise RetrieverError(f"the serve controller of {st.uri} failed: {type(cause(e)).__name__}: "
                             f"{cause(e)}") from None
    if created and not detached:              # the creator's handle: a looked-up one does not keep it alive
        _KEEP[datastore_key(st.uri)] = h
    return find_servers(st.uri, version)


def stop_servers(uri: str) -> int:
    """Remove the controller, every server (of every version) and the warm evaluator of `uri`; returns how
    many servers."""
    uri = Storage.from_uri(uri).uri
    h = controller(uri)
    if h is not None:
        kill([h])                                      # first: it starts no server after this
    n = kill(h for reps in find_all(uri).values() for hs in reps.values() for h in hs.values())
    kill(h for h in [evaluator(uri)] if h is not None)
    _KEEP.pop(datastore_key(uri), None)
    return n


def controller_status(uri: str, timeout: float = 10.0) -> dict | None:
    """The controller's state (version served, watch, grace, last error), or None when none runs;
    {"error": ...} when it does not answer."""
    h = controller(Storage.from_uri(uri).uri)
    return None if h is None else ask(h, "status", timeout, "the controller", version=None)


def server_status(uri: str, timeout: float = 10.0) -> list[dict]:
    """One row per version × shard × replica found (and per shard of the served version with none):
    health, version, device, load time."""
    import ray

    st = Storage.from_uri(uri)
    found = find_all(st.uri)
    current = served_version(st.uri, found) if found else None
    n = len(load_version(st, current).index_shards or []) if current else len(load_manifest(st).index_shards or [])
    refs = {h.info.remote(): (v, s, r) for v, shards in found.items() for s, reps in shards.items()
            for r, h in reps.items()}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout) if refs else ([], [])
    rows = []
    for ref, (v, s, r) in refs.items():
        row = {"shard": s, "replica": r, "version": v, "serving": v == current, "healthy": False}
        if ref in ready:
            try:
                row.update(ray.get(ref), healthy=True)
            except Exception as e:
                row["error"] = f"{type(cause(e)).__name__}: {cause(e)}"
        else:
            row["error"] = f"no answer within {timeout:.0f}s"
        rows.append(row)
    for s in range(n):
        if s not in found.get(current, {}):
            rows.append({"shard": s, "replica": None, "version": current, "serving": True, "healthy": False,
                         "error": "no server running"})
    return sorted(rows, key=lambda x: (-(x["version"] or 0), x["shard"],
                                       x["replica"] if x["replica"] is not None else -1))


@contextmanager
def serving(uri: str, address: str | None = None, rerank: bool = False, cache_dir: str | None = None):
    """Ray connected (an embedded one unless `address`) and the datastore's servers running for the
    block: the cluster's own, or, where none run, embedded ones started here (serving the version
    current now, for the whole block) and stopped after."""
    with ray_session(address):
        embedded = not find_all(uri)
        if embedded:
            if address:
                raise RetrieverError(f"no index servers of {uri} run on {address}: start them with "
                                     f"`knnlm serve {uri} --address {address}`" + (" --rerank" if rerank else ""))
            t0 = time.perf_counter()
            started = start_servers(uri, rerank=rerank, cache_dir=cache_dir, detached=False, watch=0)
            log.info("started %d index servers of %s for this command (%.1fs); `knnlm serve %s%s` keeps them "
                     "running, and `--address auto` then reuses them", sum(len(r) for r in started.values()), uri,
                     time.perf_counter() - t0, uri, " --rerank" if rerank else "")
        try:
            yield
        finally:
            if embedded:
                stop_servers(uri)

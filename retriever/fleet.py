"""The index servers of a datastore on a Ray cluster, found by name, one set per datastore version.

Servers are named Ray actors in the namespace "knnlm", one per version, index shard and replica:
`knnlm-<datastore key>-v<version>-s<shard>-r<replica>`, where the datastore key is a hash of the
datastore's URI; each serves exactly one version (its manifest versions/<v>.json, its removed ids),
and a crashed one that Ray restarts reloads the same version. The datastore's serve controller
(retriever/controller.py) is `knnlm-<key>-controller`: it starts the sets and says which version is
served; anything on the same cluster finds both by name. Its warm evaluator (retriever/evaluator.py)
is `knnlm-<key>-evaluator`.
"""
from __future__ import annotations

import logging
import re
import time

from builder.errors import KnnlmError
from builder.index_files import faiss_gpus, fastscan_factory
from builder.manifest import require_index_shards
from builder.runtime import cluster_resources, max_node_cpus
from builder.storage import Storage
from builder.versions import load_version
from retriever.server import IndexServerImpl, ServerError, datastore_key

log = logging.getLogger(__name__)
NAMESPACE = "knnlm"
_NAME = re.compile(r"knnlm-([0-9a-f]{16})-v(\d+)-s(\d+)-r(\d+)")
START_DEATHS = 2          # deaths of a starting server (killed, Ray restarting it) before its start fails
ASK_TIMEOUT = 10.0        # seconds to wait for the controller's answer before looking at the servers instead


class RetrieverError(KnnlmError, RuntimeError):
    """The servers of a datastore cannot answer (none running, a shard without live replica, versions)."""


def actor_name(key: str, version: int, shard: int, replica: int) -> str:
    return f"knnlm-{key}-v{version}-s{shard:05d}-r{replica:03d}"


def controller_name(key: str) -> str:
    return f"knnlm-{key}-controller"


def evaluator_name(uri: str) -> str:
    """The warm evaluator's actor name (retriever/evaluator.py)."""
    return f"knnlm-{datastore_key(uri)}-evaluator"


def parse_name(name: str) -> tuple[str, int, int, int] | None:
    """(datastore key, version, shard, replica) of a server's name; None for any other name."""
    m = _NAME.fullmatch(name)
    return (m[1], int(m[2]), int(m[3]), int(m[4])) if m else None


def cause(e: BaseException) -> BaseException:
    return getattr(e, "cause", None) or e


def find_all(uri: str) -> dict[int, dict[int, dict[int, object]]]:
    """{version: {shard: {replica: actor handle}}} of every server of `uri` on the connected cluster."""
    import ray
    from ray.util import list_named_actors
    key = datastore_key(uri)
    out: dict[int, dict[int, dict[int, object]]] = {}
    for a in list_named_actors(all_namespaces=True):
        p = parse_name(a["name"]) if a["namespace"] == NAMESPACE else None
        if p is None or p[0] != key:
            continue
        try:
            h = ray.get_actor(a["name"], namespace=NAMESPACE)
        except ValueError:  # removed meanwhile
            continue
        out.setdefault(p[1], {}).setdefault(p[2], {})[p[3]] = h
    return out


def controller(uri: str):
    """The serve controller of `uri` on the connected cluster, or None."""
    import ray
    try:
        return ray.get_actor(controller_name(datastore_key(uri)), namespace=NAMESPACE)
    except ValueError:
        return None


def ask(h, method: str, timeout: float, what: str, **unknown) -> dict:
    """`h.<method>()`'s answer within `timeout` seconds, else the `unknown` fields with an "error" saying
    that `what` does not answer (a status to report, not raised)."""
    import ray
    try:
        return ray.get(getattr(h, method).remote(), timeout=timeout)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return {**unknown, "error": f"{what} does not answer: {type(cause(e)).__name__}"}


def evaluator(uri: str):
    """The warm evaluator of `uri` on the connected cluster, or None."""
    import ray
    try:
        return ray.get_actor(evaluator_name(uri), namespace=NAMESPACE)
    except ValueError:
        return None


def complete_versions(uri: str, found: dict) -> list[int]:
    """The versions among `found` (find_all) with a server of every index shard, newest first."""
    st = Storage.from_uri(uri)
    out = []
    for v in sorted(found, reverse=True):
        try:
            n = len(load_version(st, v).index_shards or [])
        except KnnlmError:
            continue
        if n and all(found[v].get(s) for s in range(n)):
            out.append(v)
    return out


def served_version(uri: str, found: dict | None = None, timeout: float = ASK_TIMEOUT) -> int | None:
    """The version the servers of `uri` serve: the controller's answer; without a controller (or while
    it restarts), the newest version with a server of every shard, else the newest found."""
    import ray
    h = controller(uri)
    if h is not None:
        try:
            v = ray.get(h.current.remote(), timeout=timeout)
            if v is not None:
                return v
        except Exception as e:  # noqa: BLE001 - dead or restarting: fall back to the servers themselves
            log.warning("the serve controller of %s does not answer (%s); looking at its servers", uri,
                        type(cause(e)).__name__)
    found = find_all(uri) if found is None else found
    full = complete_versions(uri, found)
    return full[0] if full else max(found, default=None)


def find_servers(uri: str, version: int | None = None) -> dict[int, dict[int, object]]:
    """{shard: {replica: actor handle}} of the servers of `uri` that serve `version` (None: the version
    being served, see served_version) on the connected cluster."""
    found = find_all(uri)
    if version is None:
        version = served_version(uri, found) if found else None
    return found.get(version, {})


def start_set(uri: str, version: int, replicas: int, rerank: bool, device: str, cache_dir: str | None,
              threads: int | None, detached: bool, timeout: float) -> tuple[dict[tuple[int, int], object], int]:
    """Start the missing servers of every index shard × replica of `version` and wait until they answer.
    Returns ({(shard, replica): handle} of those started, how many were running).

    Replicas of a shard are spread over nodes; with faiss GPU support and GPUs in the cluster each
    server takes one GPU. A server that cannot load its shard fails the call with its reason, and the
    servers this call started are removed."""
    import ray

    st = Storage.from_uri(uri)
    m = load_version(st, version)
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
    running = find_all(st.uri).get(version, {})
    cls = ray.remote(IndexServerImpl)
    started = {}
    for shard in range(len(m.index_shards)):
        for r in range(replicas):
            if r in running.get(shard, {}):
                continue
            opts = dict(name=actor_name(key, version, shard, r), namespace=NAMESPACE, max_restarts=-1,
                        max_task_retries=0, max_concurrency=8, num_cpus=0, num_gpus=1 if use_gpu else 0,
                        scheduling_strategy="SPREAD")
            if detached:
                opts["lifetime"] = "detached"
            started[(shard, r)] = cls.options(**opts).remote(st.uri, shard, r, cache_dir, rerank,
                                                             "cuda" if use_gpu else "cpu", threads, version)
    try:
        wait_answering(started, timeout, f"version {version} of {st.uri}")
    except BaseException:
        kill(started.values())
        raise
    n_running = sum(len(v) for v in running.values())
    log.info("started %d index servers for version %d of %s (%d shards x %d replicas; %d were running)",
             len(started), version, st.uri, len(m.index_shards), replicas, n_running)
    return started, n_running


def wait_answering(servers: dict[tuple[int, int], object], timeout: float, what: str) -> None:
    """Wait until every server answers ping. One that cannot load its shard fails the call with its
    reason; one that died meanwhile (killed while loading: Ray restarts it) is asked again."""
    import ray
    import ray.exceptions as rex
    t0 = time.monotonic()
    pings = {h.ping.remote(): sr for sr, h in servers.items()}
    deaths: dict[tuple[int, int], int] = {}
    while pings:
        left = timeout - (time.monotonic() - t0)
        ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=max(0.0, left))
        if not ready:
            raise RetrieverError(f"{len(pings)} index servers of {what} did not start within {timeout:.0f}s")
        for ref in ready:
            shard, r = pings.pop(ref)
            try:
                ray.get(ref)
            except rex.RayTaskError as e:
                raise ServerError(f"index server for shard {shard} (replica {r}) of {what} failed to start: "
                                  f"{cause(e)}") from None
            except (rex.RayActorError, rex.ActorUnavailableError) as e:
                deaths[(shard, r)] = deaths.get((shard, r), 0) + 1
                if deaths[(shard, r)] > START_DEATHS:
                    raise ServerError(f"index server for shard {shard} (replica {r}) of {what} failed to start: "
                                      f"it died {deaths[(shard, r)]} times (last: {type(e).__name__})") from None
                log.warning("index server for shard %d (replica %d) of %s died while starting (%s); Ray restarts "
                            "it", shard, r, what, type(e).__name__)
                time.sleep(0.5)
                pings[servers[(shard, r)].ping.remote()] = (shard, r)


def kill(handles) -> int:
    """Remove these actors for good (no restart); how many."""
    import ray
    n = 0
    for h in handles:
        try:
            ray.kill(h, no_restart=True)
        except Exception as e:  # noqa: BLE001 - gone already
            log.debug("kill: %s", e)
        n += 1
    return n


def ping_all(servers: dict[int, dict[int, object]], timeout: float) -> bool:
    """Whether every shard has a replica answering within `timeout` seconds."""
    import ray
    refs = {h.ping.remote(): s for s, reps in servers.items() for h in reps.values()}
    if not refs:
        return False
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
    ok = set()
    for ref in ready:
        try:
            ray.get(ref)
            ok.add(refs[ref])
        except Exception:  # noqa: BLE001 - a dead replica: another may answer
            pass
    return ok == set(servers)

"""Serving and evaluation under faults: scenarios for the fault suite (and tests/test_serve_faults.py).

Each scenario takes the address of a running Ray cluster (as ray.init takes it; the process may
already be connected to it) and the URI of a built and indexed datastore, injects real faults
(SIGKILLs of Ray worker processes, found by their process title, or index servers removed), and
returns one row for the suite's table:

    {"fault", "injected", "recovered", "extra_s", "keys_lost", "keys_duplicated", "failed_queries", "notes"}

plus details under "detail". Processes are found in /proc, so every node of the cluster must run
on this machine (the suite's multi-node cluster does; so does the tests' embedded Ray); only the
worker processes of the cluster at `address` are touched (children of its raylets), never another
Ray's.

    replica_kill_under_load   two clients, each with its own Retriever, send a bounded query load
                              while one index-server replica is SIGKILLed: 0 failed queries and
                              every answer byte-identical to the same load without faults
    shard_loss                every replica of one shard SIGKILLed at once (Ray restarts them: the
                              router waits for them), then removed for good: a clear error naming
                              the shard, or with allow_partial a result flagged partial naming it
    eval_worker_kills         `knnlm eval` with eval-worker processes SIGKILLed at random (seeded)
                              moments and index servers SIGKILLed during it: the same perplexities
                              (to 1e-9) and scored token count as an uninterrupted eval
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

import numpy as np
from ray_nodes import alive, cmdline  # /proc helpers shared with the cluster harness

from builder.manifest import load_manifest
from builder.runtime import connect_ray
from builder.storage import Storage
from retriever.config import EvalConfig
from retriever.evaluate import evaluate
from retriever.router import Retriever, RetrieverError, find_servers, start_servers, stop_servers

log = logging.getLogger(__name__)
SERVER_TITLE = "IndexServer"          # the Ray process title of an index server contains this
EVAL_TITLE = "EvalWorker"             # ... and of an evaluation worker


def row(fault: str, injected: int, recovered: int, extra_s: float, failed_queries: int, notes: str,
        **detail) -> dict:
    return {"fault": fault, "injected": injected, "recovered": recovered, "extra_s": round(extra_s, 2),
            "keys_lost": 0, "keys_duplicated": 0, "failed_queries": failed_queries, "notes": notes,
            "detail": detail}


# ---------------------------------------------------------------------------------------------
# processes


def ensure_ray(address: str | None) -> str:
    """Connect to `address` unless this process already is connected; the cluster's GCS address."""
    import ray
    if not ray.is_initialized():
        connect_ray(address or "auto")
    return ray.get_runtime_context().gcs_address


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def title(pid: int) -> str:
    """The process title (Ray sets it to `ray::<Class>.<method>` in its workers)."""
    return cmdline(pid)


def cluster_workers(gcs_address: str, title_part: str) -> list[int]:
    """pids of the Ray worker processes of the cluster at `gcs_address` on this machine (children of
    its raylets) whose title contains `title_part`."""
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    raylets = {p for p in pids if f"--gcs-address={gcs_address}" in cmdline(p) and "raylet" in cmdline(p).split()[0]}
    return sorted(p for p in pids if _ppid(p) in raylets and title_part in title(p))


def sigkill(pid: int, title_part: str) -> bool:
    """SIGKILL `pid` if it is still a process whose title holds `title_part`; whether it was."""
    if title_part not in title(pid):
        return False
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


def server_pid(handle, timeout: float = 30.0) -> int:
    import ray
    return int(ray.get(handle.info.remote(), timeout=timeout)["pid"])


def wait_restarted(handle, old_pid: int, timeout: float = 120.0) -> float:
    """Seconds until the actor answers from a new process (Ray restarted it)."""
    import ray
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if ray.get(handle.info.remote(), timeout=10)["pid"] != old_pid:
                return time.monotonic() - t0
        except Exception:  # noqa: BLE001 - still restarting
            time.sleep(0.2)
    raise TimeoutError(f"the index server (pid {old_pid}) was not restarted within {timeout:.0f}s")


# ---------------------------------------------------------------------------------------------
# serving: two clients under a bounded load


def _queries(uri: str, clients: int, batches: int, batch_size: int, seed: int) -> np.ndarray:
    """(clients, batches, batch_size, dim) float32: seeded, near the datastore's keys' scale."""
    m = load_manifest(Storage.from_uri(uri))
    rng = np.random.default_rng(seed)
    return rng.normal(size=(clients, batches, batch_size, m.dim)).astype(np.float32)


def _load(uri: str, q: np.ndarray, k: int, nprobe: int, budget_s: float, on_progress=None,
          hedge_after: float = 2.0, deadline: float = 60.0) -> dict:
    """Every client (a thread with its own Retriever.connect) sends its batches one after another
    within budget_s seconds. {answers[c][b]: (dist, ids, values) or None, errors, latencies, wall}."""
    clients, batches = q.shape[:2]
    answers = [[None] * batches for _ in range(clients)]
    lat = [[np.nan] * batches for _ in range(clients)]
    errors: list[str] = []
    done = [0]
    lock = threading.Lock()
    t0 = time.monotonic()

    def client(c: int) -> None:
        try:
            r = Retriever.connect(uri, hedge_after=hedge_after, deadline=deadline)
        except Exception as e:  # noqa: BLE001 - reported as failed queries
            errors.append(f"client {c}: connect: {type(e).__name__}: {e}")
            return
        for b in range(batches):
            if time.monotonic() - t0 > budget_s:
                errors.append(f"client {c}: batches {b}..{batches - 1} not sent within the {budget_s:.0f}s budget")
                return
            ts = time.monotonic()
            try:
                res = r.search(q[c, b], k=k, nprobe=nprobe)
                answers[c][b] = (res.dist, res.ids, res.values)
            except Exception as e:  # noqa: BLE001 - a failed query
                errors.append(f"client {c} batch {b}: {type(e).__name__}: {str(e)[:200]}")
            lat[c][b] = time.monotonic() - ts
            with lock:
                done[0] += 1
            if on_progress is not None:
                on_progress(done[0])

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(budget_s + deadline + 30)
    return {"answers": answers, "errors": errors, "latencies": np.array(lat), "wall": time.monotonic() - t0}


def _compare(want: dict, got: dict) -> tuple[int, int]:
    """(failed queries, answered queries whose bytes differ from the fault-free answer), in queries."""
    failed = differ = 0
    for cw, cg in zip(want["answers"], got["answers"]):
        for w, g in zip(cw, cg):
            n = len(w[0])
            if g is None:
                failed += n
            elif any(a.tobytes() != b.tobytes() or a.dtype != b.dtype for a, b in zip(w, g)):
                differ += n
    return failed, differ


def _start(uri: str, replicas: int, cache_dir: str | None) -> bool:
    """Start the datastore's missing servers (replicas per shard); whether none were running."""
    fresh = not find_servers(uri)
    start_servers(uri, replicas=replicas, cache_dir=cache_dir, detached=True)
    return fresh


def replica_kill_under_load(address: str | None, datastore_uri: str, *, cache_dir: str | None = None,
                            clients: int = 2, batches: int = 24, batch_size: int = 32, k: int = 16, nprobe: int = 4,
                            budget_s: float = 120.0, kill_at: float = 0.3, seed: int = 0,
                            stop: bool | None = None) -> dict:
    """One replica of a (seeded) random shard SIGKILLed (its process found by the title `IndexServer`)
    once `kill_at` of the load's batches are answered, while `clients` clients send `batches` batches
    each within `budget_s` seconds; servers run with 2 replicas per shard (started here if none run,
    and then stopped after unless stop=False). The same load runs first without faults: its answers
    are the reference, its wall time the baseline of extra_s."""
    ensure_ray(address)
    rng = np.random.default_rng(seed)
    uri = Storage.from_uri(datastore_uri).uri
    started = _start(uri, 2, cache_dir)
    try:
        q = _queries(uri, clients, batches, batch_size, seed)
        want = _load(uri, q, k, nprobe, budget_s)
        if want["errors"]:
            raise RuntimeError(f"the fault-free load failed: {want['errors'][:3]}")
        servers = find_servers(uri)
        shard = int(rng.integers(len(servers)))
        replica = int(rng.choice(sorted(servers[shard])))
        victim = servers[shard][replica]
        pid = server_pid(victim)
        assert SERVER_TITLE in title(pid), f"pid {pid} of an index server has the title {title(pid)!r}"
        kill = {"at": None, "done": False}
        threshold = max(1, int(kill_at * clients * batches))

        def on_progress(n: int) -> None:
            if n >= threshold and not kill["done"]:
                kill["done"] = True
                kill["at"] = n
                kill["ok"] = sigkill(pid, SERVER_TITLE)

        got = _load(uri, q, k, nprobe, budget_s, on_progress)
        restart_s = wait_restarted(victim, pid)
        failed, differ = _compare(want, got)
        lat_w, lat_g = want["latencies"], got["latencies"]
        detail = {"shard": shard, "replica": replica, "pid": pid, "killed_after_batches": kill["at"],
                  "queries": int(q.shape[0] * q.shape[1] * q.shape[2]), "baseline_s": round(want["wall"], 3),
                  "faulted_s": round(got["wall"], 3), "max_batch_latency_s": round(float(np.nanmax(lat_g)), 3),
                  "baseline_max_batch_latency_s": round(float(np.nanmax(lat_w)), 3),
                  "replica_restart_s": round(restart_s, 2), "errors": got["errors"][:5], "differing_queries": differ}
        injected = int(bool(kill.get("ok")))
        return row("index-server replica SIGKILL under 2-client load", injected,
                   int(injected and not failed and not differ), got["wall"] - want["wall"], failed + differ,
                   f"shard {shard} replica {replica}; {detail['queries']} queries in {clients} clients, answers "
                   f"byte-identical: {not differ}; max batch latency {detail['max_batch_latency_s']}s "
                   f"(baseline {detail['baseline_max_batch_latency_s']}s); restarted in {restart_s:.1f}s", **detail)
    finally:
        if started if stop is None else stop:
            stop_servers(uri)


def shard_loss(address: str | None, datastore_uri: str, *, cache_dir: str | None = None, k: int = 16,
               nprobe: int = 4, batch_size: int = 32, seed: int = 1, stop: bool | None = None) -> dict:
    """Every replica of one shard gone: (1) SIGKILLed together: Ray restarts them and the router, after
    its replicas failed, looks them up again and waits for the restarted actors (the answer must equal
    the fault-free one); (2) removed for good (ray.kill, no restart, as a lost node): a RetrieverError
    naming the shard, or with allow_partial a result flagged partial naming it and holding no id of it.
    Then `knnlm serve` (start_servers) brings them back and the answers are the fault-free ones again."""
    import ray
    ensure_ray(address)
    uri = Storage.from_uri(datastore_uri).uri
    started = _start(uri, 2, cache_dir)
    m = load_manifest(Storage.from_uri(uri))
    try:
        q = _queries(uri, 1, 1, batch_size, seed)[0, 0]
        r = Retriever.connect(uri, hedge_after=2.0, deadline=120.0)
        want = r.search(q, k=k, nprobe=nprobe)
        servers = find_servers(uri)
        shard = int(np.random.default_rng(seed).integers(len(servers)))
        # (1) every replica SIGKILLed at once
        pids = {rep: server_pid(h) for rep, h in servers[shard].items()}
        killed = sum(sigkill(p, SERVER_TITLE) for p in pids.values())
        t0 = time.monotonic()
        notes, failed = [], 0
        try:
            res = r.search(q, k=k, nprobe=nprobe)
            same = all(a.tobytes() == b.tobytes() for a, b in zip(res, want)) and not res.partial
            notes.append(f"all {killed} replicas of shard {shard} SIGKILLed: answered after their restart in "
                         f"{time.monotonic() - t0:.1f}s, identical: {same}")
            failed += 0 if same else len(q)
        except Exception as e:  # noqa: BLE001 - a failed query
            failed += len(q)
            notes.append(f"all replicas of shard {shard} SIGKILLed: {type(e).__name__}: {str(e)[:200]}")
        restart_s = time.monotonic() - t0
        for rep, h in servers[shard].items():
            wait_restarted(h, pids[rep])
        # (2) removed for good
        for h in servers[shard].values():
            ray.kill(h, no_restart=True)
        clear = partial_ok = False
        error = ""
        t1 = time.monotonic()
        try:
            r.search(q, k=k, nprobe=nprobe)
        except RetrieverError as e:
            error = str(e)
        error_s = time.monotonic() - t1
        clear = f"index shards [{shard}]" in error and "\n" not in error and "allow_partial" in error
        part = r.search(q, k=k, nprobe=nprobe, allow_partial=True)
        lo = int(m.index_shards[shard]["first_id"])
        hi = lo + int(m.index_shards[shard]["num_ids"])
        partial_ok = part.partial and part.missing_shards == [shard] and not np.any((part.ids >= lo) & (part.ids < hi))
        notes.append(f"shard {shard} removed: clear error {clear} after {error_s:.1f}s, flagged partial {partial_ok}")
        # (3) restarted by `knnlm serve`: the same client finds them again
        start_servers(uri, replicas=2, cache_dir=cache_dir, detached=True)
        again = r.search(q, k=k, nprobe=nprobe)
        back = all(a.tobytes() == b.tobytes() for a, b in zip(again, want)) and not again.partial
        notes.append(f"restarted: identical {back}")
        injected = killed + len(servers[shard])
        ok = not failed and clear and partial_ok and back
        return row("every replica of one index shard lost", injected, injected if ok else 0, restart_s, failed,
                   "; ".join(notes), shard=shard, error=error, error_s=round(error_s, 2), restart_s=round(restart_s, 2),
                   clear_error=clear, partial_flagged=partial_ok, restored=back)
    finally:
        if started if stop is None else stop:
            stop_servers(uri)


# ---------------------------------------------------------------------------------------------
# evaluation


class Killer:
    """A thread that SIGKILLs `kills` processes of the cluster whose title contains `title_part`
    (`busy_part` while they work), each a seeded random delay (0..max_delay s) after one is seen
    busy; stops when told. `killed` lists (pid, seconds since start)."""

    def __init__(self, gcs_address: str, title_part: str, busy_part: str, kills: int, seed: int,
                 max_delay: float = 0.3, pick=None):
        self.gcs, self.title, self.busy, self.kills = gcs_address, title_part, busy_part, kills
        self.rng = np.random.default_rng(seed)
        self.max_delay, self.pick = max_delay, pick
        self.killed: list[tuple[int, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while len(self.killed) < self.kills and not self.stop.is_set():
            pids = self.pick() if self.pick else [p for p in cluster_workers(self.gcs, self.title)
                                                  if self.busy in title(p)]
            if not pids:
                time.sleep(0.02)
                continue
            pid = int(self.rng.choice(pids))
            if self.stop.wait(float(self.rng.uniform(0, self.max_delay))):
                return
            if (self.pick or self.busy in title(pid)) and sigkill(pid, self.title):
                self.killed.append((pid, round(time.monotonic() - t0, 2)))
                while alive(pid) and not self.stop.is_set():     # wait for the process to be gone
                    time.sleep(0.02)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)


def eval_worker_kills(address: str | None, datastore_uri: str, corpus: list[str], *, worker_kills: int = 3,
                      server_kills: int = 1, replicas: int = 1, workers: int = 1, seed: int = 0,
                      cache_dir: str | None = None, max_delay: float = 0.3, stop: bool | None = None,
                      **eval_options) -> dict:
    """`knnlm eval` of `corpus` twice: uninterrupted, then with `worker_kills` SIGKILLs of evaluation
    workers (title `EvalWorker`, while they run a chunk) and `server_kills` SIGKILLs of index servers
    (title `IndexServer`, while the eval runs) at seeded random moments. The servers run with
    `replicas` replicas per shard (started here if none run: with 1 replica the router must wait for
    the restarted server). Recovered when both evals give the same scored token count and base and
    kNN-LM perplexities within 1e-9 (relative)."""
    gcs = ensure_ray(address)
    uri = Storage.from_uri(datastore_uri).uri
    started = _start(uri, replicas, cache_dir)
    cfg = dict(datastore=uri, corpus=list(corpus), address=address, workers=workers, cache_dir=cache_dir,
               **eval_options)
    try:
        clean = evaluate(EvalConfig(**cfg))

        def server_pids() -> list[int]:
            return [p for p in cluster_workers(gcs, SERVER_TITLE)
                    if p in {server_pid(h) for reps in find_servers(uri).values() for h in reps.values()}]
        srv_pids = server_pids()
        rng = np.random.default_rng(seed + 1)
        # the server kills land a random moment into the eval (within the clean run's duration)
        srv_at = sorted(float(t) for t in rng.uniform(0.1, 0.7, server_kills) * clean.seconds)
        srv_killed: list[tuple[int, float]] = []
        stop_srv = threading.Event()

        def kill_servers() -> None:
            t0 = time.monotonic()
            for at in srv_at:
                if stop_srv.wait(max(0.0, at - (time.monotonic() - t0))):
                    return
                live = [p for p in srv_pids if alive(p)]
                if live:
                    p = int(rng.choice(live))
                    if sigkill(p, SERVER_TITLE):
                        srv_killed.append((p, round(time.monotonic() - t0, 2)))
        ts = threading.Thread(target=kill_servers, daemon=True)
        t0 = time.monotonic()
        with Killer(gcs, EVAL_TITLE, f"{EVAL_TITLE}Impl.run", worker_kills, seed, max_delay) as killer:
            ts.start()
            try:
                got = evaluate(EvalConfig(**cfg))
            finally:
                stop_srv.set()
                ts.join(30)
        wall = time.monotonic() - t0
        same = (got.tokens == clean.tokens and abs(got.base_ppl / clean.base_ppl - 1) <= 1e-9
                and abs(got.knnlm_ppl / clean.knnlm_ppl - 1) <= 1e-9)
        injected = len(killer.killed) + len(srv_killed)
        return row("eval-worker and index-server SIGKILLs during eval", injected, injected if same else 0,
                   wall - clean.seconds, 0 if same else got.tokens,
                   f"{len(killer.killed)} eval-worker and {len(srv_killed)} index-server kills; {got.tokens} tokens, "
                   f"base ppl {got.base_ppl:.6f} (clean {clean.base_ppl:.6f}), kNN-LM ppl {got.knnlm_ppl:.6f} "
                   f"(clean {clean.knnlm_ppl:.6f}); identical: {same}",
                   worker_kills=killer.killed, server_kills=srv_killed, clean=clean.to_json(), faulted=got.to_json(),
                   clean_s=round(clean.seconds, 2), faulted_s=round(wall, 2), same=same)
    finally:
        if started if stop is None else stop:
            stop_servers(uri)

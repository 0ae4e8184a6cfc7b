"""The serve controller of a datastore: which version its servers serve, and the switch to a new one.

One Ray actor per datastore, `knnlm-<datastore key>-controller` in the namespace "knnlm" (detached
like the servers when `knnlm serve --address` starts them, restarted by Ray if it dies). It records
the serving settings (replicas, rerank, device, cache dir, threads) and the version being served.

Blue/green per version: a watch thread reads manifest.json's `version` every `watch` seconds
(0: pinned, never follow); on a newer one it starts that version's whole server set (index shards
that did not change come from the local cache by checksum, so this is quick), waits until every
server answers, then switches its current version. Routers ask for the current version (at most
once per their `refresh`) and send each search to the servers of one version only. The previous
version's servers are stopped `grace` seconds after the switch (a router still on them when they go
refreshes and searches the new version again). A new version whose servers cannot start is not
switched to: the old one keeps serving and `status` reports the error; it is tried again later.

A restarted controller recovers its state from the running servers: the newest version whose full
set answers is the current one.
"""
from __future__ import annotations

import logging
import threading
import time
import warnings

from builder.errors import KnnlmError
from builder.storage import Storage
from builder.versions import load_version
from retriever.fleet import NAMESPACE, cause, complete_versions, controller_name, find_all, kill, ping_all, start_set
from retriever.server import datastore_key

log = logging.getLogger(__name__)
REFRESH = 1.0             # seconds: how often a router asks the controller for the current version, at most
DEADLINE = 120.0          # the router's default deadline of one search
GRACE = 2 * REFRESH + DEADLINE   # seconds the previous version's servers keep serving after a switch
WATCH = 5.0               # seconds between two reads of manifest.json's version
MAX_BACKOFF = 300.0       # seconds at most between two tries of a version whose servers failed to start
RECOVER_PING = 10.0       # seconds a restarted controller waits for the running servers to answer
SETTINGS = ("replicas", "rerank", "device", "cache_dir", "threads", "watch", "grace", "timeout")


class ServeControllerImpl:
    """Body of the controller actor (a threaded actor: its watch thread runs beside the calls)."""

    def __init__(self, uri: str, settings: dict, version: int | None, detached: bool):
        import ray
        self.uri, self.storage, self.detached = uri, Storage.from_uri(uri), detached
        self.settings = {"replicas": 1, "rerank": False, "device": "auto", "cache_dir": None, "threads": None,
                         "watch": WATCH, "grace": GRACE, "timeout": 1800.0} | dict(settings)
        self.pinned = version                   # the version to serve first (with watch 0: always)
        self._current: int | None = None
        self.sets: dict[int, dict[tuple[int, int], object]] = {}   # handles of each version's servers
        self.retiring: dict[int, float] = {}   # version: when its servers stop
        self.error = ""
        self.backoff: dict[int, tuple[int, float]] = {}            # version: (failed tries, next try at)
        self.switched_at: dict[int, float] = {}
        self._next_read = 0.0
        self.failed_switches = 0                # tries of a new version whose servers did not start
        self.lock = threading.Lock()            # starting servers: one set at a time
        with warnings.catch_warnings():          # it reads the deprecated RuntimeContext.actor_id
            warnings.simplefilter("ignore", DeprecationWarning)
            self.reconstructed = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        self._recover()
        threading.Thread(target=self._loop, name="knnlm-watch", daemon=True).start()

    # -- calls ---------------------------------------------------------------------------------

    def ping(self) -> bool:
        return True

    def current(self) -> int | None:
        """The version being served (the routers' call); None before the first servers answer."""
        return self._current

    def status(self) -> dict:
        now = time.time()
        return {"version": self._current, "watch": self.settings["watch"], "grace": self.settings["grace"],
                "replicas": self.settings["replicas"], "error": self.error, "versions": sorted(self.sets),
                "retiring": {v: round(max(0.0, t - now), 1) for v, t in sorted(self.retiring.items())},
                "switched_at": dict(self.switched_at), "pinned": self.settings["watch"] == 0,
                "failed_switches": self.failed_switches}

    def ensure(self, settings: dict) -> int:
        """Record `settings` (knnlm serve's) and start the missing servers of the current version (the
        first time: of the version the controller was created for, or the newest with watch on);
        returns that version. Raises the servers' error when they cannot start."""
        with self.lock:
            self.settings.update({k: v for k, v in settings.items() if k in SETTINGS})
            v = self._current if self._current is not None else self._target()
            self._start(v)
            if self._current is None:
                self._current = v
                self.switched_at[v] = time.time()
            return v

    # -- the watch thread ------------------------------------------------------------------------

    def _target(self) -> int:
        if self.pinned is not None and (self.settings["watch"] == 0 or self._current is None):
            return self.pinned
        return load_version(self.storage).version

    def _start(self, v: int) -> None:
        s = self.settings
        started, _ = start_set(self.uri, v, s["replicas"], s["rerank"], s["device"], s["cache_dir"], s["threads"],
                               self.detached, s["timeout"])
        self.sets.setdefault(v, {}).update(started)

    def _loop(self) -> None:
        while True:
            watch = self.settings["watch"]
            time.sleep(min(watch, 1.0) if watch > 0 else 1.0)
            try:
                self._tick()
            except Exception as e:  # noqa: BLE001 - the thread must live on; the error is in status
                self.error = f"{type(cause(e)).__name__}: {cause(e)}"
                log.warning("serve controller of %s: %s", self.uri, self.error)

    def _tick(self) -> None:
        now = time.time()
        for v, at in list(self.retiring.items()):
            if now >= at and v != self._current:
                n = kill(self.sets.pop(v, {}).values())
                n += kill(h for reps in find_all(self.uri).get(v, {}).values() for h in reps.values())
                del self.retiring[v]
                log.info("stopped the servers of version %d of %s (%d)", v, self.uri, n)
        if self._current is None:
            if self.reconstructed:                # restarted and nothing to recover: serve again
                self.ensure({})
            return
        watch = self.settings["watch"]
        if watch <= 0 or now < self._next_read:
            return
        self._next_read = now + watch
        latest = load_version(self.storage).version
        if latest > self._current and now >= self.backoff.get(latest, (0, 0.0))[1]:
            self._switch(latest)

    def _switch(self, v: int) -> None:
        with self.lock:
            try:
                self._start(v)
            except KnnlmError as e:
                self.failed_switches += 1
                n, _ = self.backoff.get(v, (0, 0.0))
                wait = min(MAX_BACKOFF, max(self.settings["watch"], 1.0) * 2 ** (n + 1))
                self.backoff[v] = (n + 1, time.time() + wait)
                self.error = (f"version {v} cannot be served (still serving version {self._current}; trying again "
                              f"in {wait:.0f}s): {e}")
                log.warning("%s", self.error)
                return
            old, self._current = self._current, v
            self.switched_at[v] = time.time()
            self.error = ""
            self.backoff.pop(v, None)
            for u in list(self.sets):
                if u != v and u not in self.retiring:
                    self.retiring[u] = time.time() + self.settings["grace"]
            log.info("%s: serving version %d (was %s); the old servers stop in %.0fs", self.uri, v, old,
                     self.settings["grace"])

    def _recover(self) -> None:
        """After a restart: the newest version whose full set of servers answers is the current one; the
        older ones retire after the grace period, newer incomplete ones (a switch cut short) go now."""
        found = find_all(self.uri)
        if not found:
            return
        for v in complete_versions(self.uri, found):
            if ping_all(found[v], RECOVER_PING):
                self._current = v
                break
        for v, reps in found.items():
            self.sets[v] = {(s, r): h for s, hs in reps.items() for r, h in hs.items()}
            if self._current is None or v > self._current:
                kill(self.sets.pop(v).values())
            elif v < self._current:
                self.retiring[v] = time.time() + self.settings["grace"]
        log.info("serve controller of %s recovered: serving version %s", self.uri, self._current)


def ensure_controller(uri: str, settings: dict, version: int, detached: bool):
    """The controller of `uri`: the running one, else one created here. (handle, created)."""
    import ray
    name = controller_name(datastore_key(uri))
    try:
        return ray.get_actor(name, namespace=NAMESPACE), False
    except ValueError:
        pass
    opts = dict(name=name, namespace=NAMESPACE, max_restarts=-1, max_task_retries=0, max_concurrency=16,
                num_cpus=0)
    if detached:
        opts["lifetime"] = "detached"
    try:
        return ray.remote(ServeControllerImpl).options(**opts).remote(uri, settings, version, detached), True
    except ValueError:                            # created by another client meanwhile
        return ray.get_actor(name, namespace=NAMESPACE), False

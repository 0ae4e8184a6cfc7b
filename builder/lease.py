"""A build lease: at most one build writes a datastore root at a time.

The lease is an object created with a conditional write (S3 `If-None-Match: *`, an
exclusive link locally) and renewed by its holder every ttl/4 seconds with a
compare-and-swap. A second build that finds a live lease (it sees it renewed) is
refused; one that finds a dead holder's lease waits until it is `ttl` seconds past its
last renewal, saying so, then takes it over with a compare-and-swap. A holder whose
renewal fails (it was taken over) stops before committing anything.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from builder.errors import KnnlmError
from builder.layout import BUILD_LEASE
from builder.storage import NotFound, Storage

log = logging.getLogger(__name__)


class LeaseError(KnnlmError, RuntimeError):
    pass


class Lease:
    def __init__(self, storage: Storage, ttl: float = 60.0, path: str = BUILD_LEASE, what: str = "build"):
        self.storage = storage
        self.path, self.what = path, what
        self.ttl = float(ttl)
        self.interval = self.ttl / 4
        self.id = uuid.uuid4().hex
        self._seq = 0
        self._bytes: bytes | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None
        self._lock = threading.Lock()  # the renew thread and check() must not race their CAS

    def _payload(self) -> bytes:
        self._seq += 1
        return json.dumps({"holder": self.id, "host": socket.gethostname(), "pid": os.getpid(),
                           "renewed_at": time.time(), "seq": self._seq, "ttl": self.ttl}).encode()

    def _read(self) -> bytes | None:
        try:
            return self.storage.read_bytes(self.path)
        except NotFound:
            return None

    def acquire(self) -> None:
        seen: bytes | None = None
        seen_since = 0.0
        announced = False
        while True:
            mine = self._payload()
            if self.storage.create_exclusive(self.path, mine):
                break
            cur = self._read()
            if cur is None:
                continue  # released between our two calls
            now = time.monotonic()
            if cur != seen:
                if seen is not None:
                    info = json.loads(cur)
                    raise LeaseError(
                        f"another {self.what} is running on {self.storage.uri} (holder on host {info.get('host')} "
                        f"pid {info.get('pid')} renewed its lease at "
                        f"{time.strftime('%H:%M:%S', time.localtime(info.get('renewed_at', 0)))}); "
                        "wait for it to finish or stop it first")
                seen, seen_since = cur, now
            info = json.loads(cur)
            age = time.time() - float(info.get("renewed_at", 0))
            unchanged = now - seen_since
            # stale by the holder's clock (and not renewed while we watched), or unchanged for a
            # whole ttl by ours (robust to clock skew)
            if (age >= self.ttl and unchanged >= min(self.interval, 2.0)) or unchanged >= self.ttl:
                if self.storage.replace_if(self.path, mine, cur):
                    log.warning("took over the %s lease of a dead holder (host %s pid %s, last renewed %.0fs ago)",
                                self.what, info.get("host"), info.get("pid"), age)
                    break
                continue
            if not announced:
                wait = max(0.0, min(self.ttl - age, self.ttl - unchanged))
                log.warning("%s has a %s lease held by host %s pid %s, last renewed %.0fs ago: waiting up to "
                            "%.0fs for it to expire (a live holder renews it every %.0fs and this run then stops)",
                            self.storage.uri, self.what, info.get("host"), info.get("pid"), max(age, 0), wait, self.interval)
                announced = True
            time.sleep(min(1.0, self.interval / 2))
        self._bytes = mine
        self._thread = threading.Thread(target=self._renew_loop, name="knnlm-lease", daemon=True)
        self._thread.start()

    def renew(self) -> None:
        with self._lock:
            if self.lost:
                raise LeaseError(self.lost)
            new = self._payload()
            if not self.storage.replace_if(self.path, new, self._bytes):
                self.lost = (f"lost the {self.what} lease on {self.storage.uri} to another {self.what}; "
                             "this run stops without committing")
                raise LeaseError(self.lost)
            self._bytes = new

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.renew()
            except LeaseError as e:
                log.error("%s", e)
                return
            except Exception as e:  # transient storage trouble: try again next tick
                log.warning("lease renewal failed (%s); retrying", e)

    def check(self) -> None:
        """Raise unless we still hold the lease: a compare-and-swap (fencing before a commit)."""
        self.renew()

    def ensure(self) -> None:
        """Raise if the renew thread found the lease lost (no I/O: for loops)."""
        if self.lost:
            raise LeaseError(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            if self._bytes is not None and not self.lost and self._read() == self._bytes:
                self.storage.delete(self.path)
            self._bytes = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

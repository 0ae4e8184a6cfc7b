"""Fault injection for tests: kill a worker process mid-task, once.

KNNLM_FAULT_FILE names a file; while it holds "<kind>:<id>:<marker>", the worker that reaches
`maybe_fault(kind, id)` creates <marker> and exits at once (os._exit, like a preempted machine),
unless <marker> already exists: the retried task then runs to the end. "<kind>:<id>:<marker>:<n>" fires
n times (the marker counts them): a task that loses its worker again and again.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
FAULT_ENV = "KNNLM_FAULT_FILE"


def maybe_fault(kind: str, ident: int) -> None:
    path = os.environ.get(FAULT_ENV)
    if not path or not os.path.exists(path):
        return
    with open(path) as f:
        spec = f.read().strip()
    if not spec:
        return
    k, uid, marker = spec.split(":", 2)
    times = 1
    head, _, tail = marker.rpartition(":")
    if head and tail.isdigit():
        marker, times = head, int(tail)
    if k != kind or int(uid) != ident:
        return
    fired = 0
    if os.path.exists(marker):
        with open(marker) as f:
            fired = int(f.read().strip() or 1)
    if fired < times:
        with open(marker, "w") as f:
            f.write(str(fired + 1))
        log.error("fault injection: exiting during %s %d", kind, ident)
        os._exit(1)

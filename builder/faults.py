"""Fault injection for tests: kill a worker process mid-task, once.

KNNLM_FAULT_FILE names a file; while it holds "<kind>:<id>:<marker>", the worker that reaches
`maybe_fault(kind, id)` creates <marker> and exits at once (os._exit, like a preempted machine),
unless <marker> already exists: the retried task then runs to the end.
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
    if k == kind and int(uid) == ident and not os.path.exists(marker):
        open(marker, "w").close()
        log.error("fault injection: exiting during %s %d", kind, ident)
        os._exit(1)

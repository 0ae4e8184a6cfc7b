"""One dispatch loop for the Ray stages: work items → calls on a pool of workers, results as they come.

    build      key worker actors over units, 2 per worker; the driver redoes a dead worker's unit
    tokenize   one task per input file, all at once
    add        `add_shard` tasks over id ranges, `--workers` at a time (Ray retries a killed task)
    eval       LM worker actors over chunks, 1 per worker; the driver redoes a dead worker's chunk

`dispatch` gives each of `workers` workers at most `depth` calls at a time (one running, the rest
queued behind it), the least loaded first, and hands each result to `on_done` in completion order.
A failed call is, in this order:
- a dead worker's work (with `revive`, for actors whose restart the driver watches): the item goes
  back to the head of the queue, not counted as an attempt, and the worker gets nothing until
  `revive(w, e)`'s ping answers (`revive` returns None for a worker that is gone for good, or raises
  the stage's error when none is left);
- tried again at the head of the queue if `transient(e)` and it has failed fewer than `max_attempts`
  times;
- otherwise the end of the stage: `fail(item, e)` (the stage's error, usually
  `runtime.unwrap_task_error`: a user error keeps its message) is raised, from None, and the calls
  in flight are cancelled.
While waiting it checks the lease (no I/O) and, every POLL_SECONDS, calls `progress(busy workers)`.
"""
from __future__ import annotations

import collections
import logging
import time
from typing import Any, Callable, Iterable, TypeVar

from builder.errors import KnnlmError
from builder.lease import Lease
from builder.storage import StorageError

log = logging.getLogger(__name__)
POLL_SECONDS = 2.0        # longest wait for a result: the lease check and progress run this often
REVIVE_BACKOFF = 0.5      # seconds before pinging a restarting worker again

T = TypeVar("T")
Ref = Any                 # a ray.ObjectRef


class DispatchError(KnnlmError, RuntimeError):
    """No worker is left to run the remaining items."""


def worker_lost(e: BaseException) -> bool:
    """The call failed because its worker process died (or was restarting), not because of its work."""
    import ray.exceptions as rex
    return isinstance(e, (rex.RayActorError, rex.WorkerCrashedError))


def transient(e: BaseException) -> bool:
    """A failure worth another attempt: a lost worker or object, an out-of-memory kill, a storage
    error; never one whose cause is a user error (bad data or input: another KnnlmError, ValueError)."""
    import ray.exceptions as rex
    cause = getattr(e, "cause", None)
    if isinstance(cause, ValueError) or (isinstance(cause, KnnlmError) and not isinstance(cause, StorageError)):
        return False
    return isinstance(e, (rex.RayActorError, rex.WorkerCrashedError, rex.ObjectLostError, rex.OutOfMemoryError)) \
        or isinstance(cause, StorageError)


def dispatch(items: Iterable[T], submit: Callable[[T, int], Ref], on_done: Callable[[T, Any], None],
             fail: Callable[[T, BaseException], Exception], *, workers: int, depth: int = 1,
             max_attempts: int = 1, revive: Callable[[int, BaseException], Ref | None] | None = None,
             lease: Lease | None = None, progress: Callable[[list[int]], None] | None = None,
             name: str = "worker", what: Callable[[T], str] = str,
             retryable: Callable[[BaseException], bool] = transient) -> None:
    """Run `submit(item, worker index) -> ObjectRef` for every item (see the module docstring).

    At most workers × depth calls are in flight; `retryable` (default `transient`) says which failures
    get another attempt. `name` and `what(item)` word the log lines
    ("key worker 1 died during unit 7 ...")."""
    import ray

    queue = collections.deque(items)
    attempts: collections.Counter = collections.Counter()   # id(item) -> failed calls (items stay alive here)
    inflight: dict = {}                  # ref -> (item, worker)
    pings: dict = {}                     # ref -> worker (restarting: nothing is sent to it meanwhile)
    healthy = set(range(workers))
    load = [0] * workers
    last_poll = time.monotonic()

    def down(w: int, e: BaseException) -> None:
        healthy.discard(w)
        if w not in pings.values():
            ref = revive(w, e)
            if ref is not None:
                pings[ref] = w

    try:
        while queue or inflight:
            for w in sorted(healthy, key=lambda j: load[j]):          # backpressure: `depth` per worker
                while queue and load[w] < depth:
                    item = queue.popleft()
                    inflight[submit(item, w)] = (item, w)
                    load[w] += 1
            if not inflight and not pings:
                raise DispatchError(f"no {name} is available")
            ready, _ = ray.wait(list(inflight) + list(pings), num_returns=1, timeout=POLL_SECONDS)
            if lease is not None:
                lease.ensure()
            if progress is not None and time.monotonic() - last_poll >= POLL_SECONDS:
                last_poll = time.monotonic()
                progress([w for w in sorted(healthy) if load[w] > 0])
            for ref in ready:
                if ref in pings:
                    w = pings.pop(ref)
                    try:
                        ray.get(ref)
                        healthy.add(w)
                        log.info("%s %d is back", name, w)
                    except Exception as e:
                        time.sleep(REVIVE_BACKOFF)
                        down(w, e)
                    continue
                item, w = inflight.pop(ref)
                load[w] -= 1
                try:
                    result = ray.get(ref)
                except Exception as e:
                    if revive is not None and worker_lost(e):
                        log.warning("%s %d died during %s (%s); it will run again", name, w, what(item),
                                    type(e).__name__)
                        queue.appendleft(item)
                        down(w, e)
                        continue
                    attempts[id(item)] += 1
                    if retryable(e) and attempts[id(item)] < max_attempts:
                        log.warning("%s failed on %s %d (%s); retrying (attempt %d of %d)", what(item), name, w,
                                    type(e).__name__, attempts[id(item)] + 1, max_attempts)
                        queue.appendleft(item)
                        continue
                    raise fail(item, e) from None
                on_done(item, result)
    finally:
        for ref in inflight:
            ray.cancel(ref, force=False)

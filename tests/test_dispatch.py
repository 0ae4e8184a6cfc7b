"""builder.dispatch on tiny Ray tasks and actors: the bound, redoing a dead worker's work, errors."""
from __future__ import annotations

import logging
import os
import sys

import pytest

import builder.dispatch as dispatch_mod
from builder.dispatch import dispatch
from builder.errors import KnnlmError
from builder.lease import LeaseError
from builder.runtime import unwrap_task_error


class StageError(KnnlmError, RuntimeError):
    pass


def fail(i, e):
    return unwrap_task_error(e, f"item {i}", (ValueError,), StageError)


def square(i: int, sleep: float = 0.0, die_marker: str | None = None, bad: int | None = None,
           calls: str | None = None) -> int:
    """The task body: i*i; dies (once, before its marker exists) or raises ValueError on request."""
    import time
    if calls:
        with open(calls, "a") as f:
            f.write(f"{i}\n")
    if die_marker and not os.path.exists(die_marker):
        open(die_marker, "w").close()
        os._exit(1)
    if i == bad:
        raise ValueError(f"row {i} is bad")
    time.sleep(sleep)
    return i * i


@pytest.fixture(scope="module")
def task(ray_cluster):
    from ray import cloudpickle
    cloudpickle.register_pickle_by_value(sys.modules[__name__])   # tests/ is not importable on Ray's workers
    return ray_cluster.remote(num_cpus=0, max_retries=0)(square)


def test_all_items_done_and_in_flight_never_exceeds_the_bound(task):
    on = {}                                     # item -> worker, while its call is in flight
    per_worker, peak, got = [0, 0, 0], [0], {}

    def submit(i, w):
        on[i] = w
        per_worker[w] += 1
        assert per_worker[w] <= 2, "a worker got more than `depth` calls"
        peak[0] = max(peak[0], len(on))
        return task.remote(i, 0.05)

    def on_done(i, r):
        per_worker[on.pop(i)] -= 1
        got[i] = r

    dispatch(range(20), submit, on_done, fail, workers=3, depth=2)
    assert got == {i: i * i for i in range(20)}
    assert peak[0] == 6 and not on               # filled up to workers × depth, never beyond


def test_a_task_that_dies_once_is_redone(task, tmp_path, caplog):
    marker = str(tmp_path / "died")
    got = {}
    caplog.set_level(logging.WARNING)
    dispatch([1, 2, 3], lambda i, w: task.remote(i, 0, marker if i == 2 else None),
             lambda i, r: got.__setitem__(i, r), fail, workers=2, max_attempts=2)
    assert os.path.exists(marker) and got == {1: 1, 2: 4, 3: 9}
    assert "retrying (attempt 2 of 2)" in caplog.text
    # without attempts left, the stage ends with the stage's error, naming the item
    with pytest.raises(StageError, match=r"^item 2 failed on a Ray worker: WorkerCrashedError"):
        dispatch([2], lambda i, w: task.remote(i, 0, str(tmp_path / "died-again")), lambda i, r: None, fail,
                 workers=1)


def test_a_user_error_is_not_retried_and_keeps_its_message(task, tmp_path):
    calls = tmp_path / "calls"
    with pytest.raises(StageError) as e:
        dispatch([0, 1, 2], lambda i, w: task.remote(i, 0, None, 1, str(calls)), lambda i, r: None, fail,
                 workers=1, max_attempts=3)
    assert str(e.value) == "item 1: row 1 is bad"
    assert calls.read_text().split().count("1") == 1      # tried once, though 3 attempts were allowed


class Worker:
    def __init__(self, marker: str):
        self.marker = marker

    def ping(self) -> bool:
        return True

    def run(self, i: int) -> tuple[int, int]:
        if i == 3 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return i * i, os.getpid()


def test_a_dead_actors_work_is_redone_once_it_is_back(ray_cluster, task, tmp_path, caplog):
    """The build's pattern: Ray restarts the actor; the driver pings it and sends the item again."""
    actor = ray_cluster.remote(Worker).options(num_cpus=0, max_restarts=-1, max_task_retries=0)
    pool = [actor.remote(str(tmp_path / "died"))]
    revived = []

    def revive(w, e):
        revived.append((w, type(e).__name__))
        return pool[w].ping.remote()

    got, pids = {}, set()

    def on_done(i, r):
        got[i] = r[0]
        pids.add(r[1])

    caplog.set_level(logging.INFO)
    try:
        dispatch(range(6), lambda i, w: pool[w].run.remote(i), on_done, fail, workers=1, depth=2, revive=revive,
                 name="test worker", what=lambda i: f"item {i}")
    finally:
        ray_cluster.kill(pool[0])
    assert got == {i: i * i for i in range(6)}
    assert revived and revived[0][0] == 0 and len(pids) == 2       # the restarted process finished the work
    assert "test worker 0 died during item 3" in caplog.text and "test worker 0 is back" in caplog.text


def test_a_lost_lease_stops_the_stage_and_progress_sees_busy_workers(task, monkeypatch):
    monkeypatch.setattr(dispatch_mod, "POLL_SECONDS", 0.05)
    seen = []

    class Lease:
        def ensure(self):
            if len(seen) >= 2:
                raise LeaseError("lost the build lease")

    with pytest.raises(LeaseError, match="lost the build lease"):
        dispatch(range(4), lambda i, w: task.remote(i, 5.0), lambda i, r: None, fail, workers=2,
                 lease=Lease(), progress=seen.append)
    assert seen[0] == [0, 1]


def test_no_worker_left(task):
    with pytest.raises(dispatch_mod.DispatchError, match="no key worker is available"):
        dispatch([1], lambda i, w: task.remote(i), lambda i, r: None, fail, workers=0, name="key worker")

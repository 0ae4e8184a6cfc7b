"""The build's key stage: key worker actors (each holds the model) run the planned units.

`KeyWorkerImpl` is a thin actor around `builder.unit.run_unit` (its process title reads
`ray::KeyWorkerImpl.run`: operators find key workers by that name); it gets a unit's compact span and
reads the unit's sequences itself (`builder.unit.load_unit`), so the driver never ships per-document
data. `run_key_stage` hands units to the workers with builder.dispatch and shows progress (a tqdm bar,
or log lines without one).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import ray

from builder.build_errors import BuildError, unwrap
from builder.dispatch import DispatchError, dispatch
from builder.keys import load_encoder
from builder.lease import Lease
from builder.storage import Storage
from builder.unit import UnitParams, UnitSpan, load_unit, run_unit

log = logging.getLogger(__name__)
MAX_UNIT_ATTEMPTS = 3            # tries of a unit whose own call failed transiently (a dead worker's are free)
UNITS_PER_WORKER = 2             # one running, one queued behind it
PROGRESS_LOG_SECONDS = 30.0


class KeyWorkerImpl:
    """Body of the key worker actor: holds the model, runs units.

    Two concurrency groups: `compute` runs one unit at a time; `control` answers pings and
    progress queries while a unit runs."""

    def __init__(self, model_path: str, key_layer: str, device: str, compute_dtype: str, threads: int,
                 root_uri: str, dtype_source: str | None = None):
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        torch.set_num_threads(threads)
        self.storage = Storage.from_uri(root_uri)
        self.encoder = load_encoder(model_path, key_layer, device, compute_dtype, dtype_source)
        self.unit_rows: tuple[int, int] = (-1, 0)  # (unit id, rows computed so far)

    @ray.method(concurrency_group="control")
    def ping(self) -> bool:
        return True

    @ray.method(concurrency_group="control")
    def progress(self) -> tuple[int, int]:
        return self.unit_rows

    @ray.method(concurrency_group="compute")
    def run(self, span: dict, params: dict) -> dict:
        u = load_unit(UnitSpan.from_dict(span), self.storage)
        self.unit_rows = (u.id, 0)

        def on_rows(n: int) -> None:
            self.unit_rows = (u.id, self.unit_rows[1] + n)
        return run_unit(u, self.storage, self.encoder, UnitParams(**params), on_rows)


WORKER_CONCURRENCY = {"compute": 1, "control": 1}


def start_workers(cfg, storage: Storage, model_dir: str, use_cuda: bool, cpus: int, node_cpus: int, gpus: int,
                  compute_dtype: str) -> list:
    """Key worker actors; they load the model while the driver tokenizes the corpus."""

    n_workers = cfg.workers or (gpus if use_cuda else 1)
    # torch threads per CPU worker: its share of the cluster, never more than one node has
    threads = 1 if use_cuda else max(1, min(node_cpus, cpus // n_workers))
    # Ray's default CPU request of an actor: one CPU to be placed (never on a node without CPUs), none held
    # while it lives. The tokenize tasks, which run while the workers load their model, then always find
    # the CPUs: workers that held one each starved them forever once they filled the cluster (--workers
    # as many as its CPUs, or a node lost mid-tokenization). CPU workers spread, one per node first.
    Actor = ray.remote(concurrency_groups=WORKER_CONCURRENCY)(KeyWorkerImpl).options(
        **({"num_gpus": 1} if use_cuda else {"scheduling_strategy": "SPREAD"}), max_restarts=-1,
        max_task_retries=0)
    device = "cuda" if use_cuda else "cpu"
    log.info("%d key workers (%s, %s%s)", n_workers, device, compute_dtype,
             "" if use_cuda else f", {threads} threads each")
    source = f"--compute-dtype {cfg.compute_dtype}" + (f" (chose {compute_dtype} for this model on {device}; "
                                                       "choose another)" if cfg.compute_dtype == "auto" else "")
    return [Actor.remote(model_dir, cfg.key_layer, device, compute_dtype, threads, storage.uri, source)
            for _ in range(n_workers)]


def run_key_stage(cfg, lease: Lease, actors: list, units: list[UnitSpan], params: Callable[[UnitSpan], dict],
                  records: dict[int, dict], total: int, done_before: int, marks: dict) -> int:
    """Run `units` on the worker actors, their commit records into `records`; return the rows written.

    A worker that dies is restarted by Ray; until a ping answers, nothing is sent to it, and the
    units it held run again (elsewhere, or on it once it is back). A unit whose own call failed is
    tried again up to MAX_UNIT_ATTEMPTS times when the failure is transient (builder.dispatch); a
    worker that cannot start ends the build with its own error."""
    import ray.exceptions as rex
    from tqdm import tqdm

    alive = set(range(len(actors)))          # workers whose constructor has not failed
    written = n_shards = 0
    # one key per token: the rate reads as tokens/s, the count as keys written
    bar = tqdm(total=total, initial=done_before, unit="tok", unit_scale=True, disable=not cfg.progress,
               desc="keys", smoothing=0.1, dynamic_ncols=True)
    t_stage = last_log = time.monotonic()

    def show(rows: int) -> None:
        """Progress: rows written this run, plus those computed by units still running."""
        nonlocal last_log
        bar.update(done_before + rows - bar.n)
        if not cfg.progress and time.monotonic() - last_log >= PROGRESS_LOG_SECONDS:
            last_log = time.monotonic()
            _log_progress(done_before + rows, total, rows, last_log - t_stage)

    def revive(a: int, e: BaseException):
        """A ping of restarting worker a, or None when its constructor failed (it will not come back)."""
        if isinstance(e, rex.ActorDiedError) and not isinstance(e, rex.ActorUnavailableError) and \
                getattr(e, "cause", None) is not None:
            alive.discard(a)
            if not alive:
                raise unwrap(e, "starting the key workers") from None
            return None
        return actors[a].ping.remote()

    def done(u: UnitSpan, rec: dict) -> None:
        nonlocal written, n_shards
        records[u.id] = rec
        marks.setdefault("first_unit", time.perf_counter() - marks["t0"])
        written += rec["num_rows"]
        n_shards += len(rec["shards"])
        bar.set_postfix(shards=n_shards, refresh=False)
        show(written)

    try:
        dispatch(units, lambda u, a: actors[a].run.remote(u.to_dict(), params(u)), done,
                 lambda u, e: unwrap(e, f"unit {u.id} ({params(u)['file_uri']})"),
                 workers=len(actors), depth=UNITS_PER_WORKER, max_attempts=MAX_UNIT_ATTEMPTS, revive=revive,
                 lease=lease, progress=lambda busy: show(written + _rows_in_flight([actors[a] for a in busy], records)),
                 name="key worker", what=lambda u: f"unit {u.id}")
    except DispatchError as e:
        raise BuildError(str(e)) from None
    finally:
        bar.close()
    return written


def _rows_in_flight(actors: list, records: dict) -> int:
    """Rows computed so far by the units the given workers are running (best effort)."""
    refs = [a.progress.remote() for a in actors]
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=1.0)
    rows = 0
    for r in done:
        try:
            uid, n = ray.get(r)
        except Exception:  # a worker that just died: its unit runs again
            continue
        if uid >= 0 and uid not in records:
            rows += n
    return rows


def _log_progress(done: int, total: int, written: int, seconds: float) -> None:
    """The progress bar's content as a log line (no terminal: CI, Ray jobs, nohup)."""
    rate = written / seconds if seconds > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else float("inf")
    log.info("keys %s/%s (%.0f%%), %s keys/s, ETA %s", f"{done:,}", f"{total:,}", 100.0 * done / max(total, 1),
             f"{rate:,.0f}", time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "?")

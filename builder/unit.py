"""A work unit: the unit of dispatch, retry and resume of the key stage. Its plan, then its run.

Planning (pure): `stream_units` cuts the corpus's sequences into units of whole windows, reading the
sequence tables in chunks and yielding compact `UnitSpan`s; a key worker expands its span into a `Unit`
(a Segment per sequence) from the rows it reads (`load_unit`); `plan_units` does both for a small corpus.
Processing: `run_unit` computes a unit's keys and commits its shards. A unit's shards get
deterministic names; the unit is committed when its record `_build/units/<id>.json` (listing its
shards, rows and checksums) exists. Shards are written before the record, so a unit killed midway
leaves only unlisted shards that its retry overwrites with the same bytes.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from builder.corpus import plan_windows
from builder.errors import KnnlmError
from builder.faults import maybe_fault
from builder.key_shards import encode_shard
from builder.keys import KeyEncoder, WindowJob, compute_keys
from builder.layout import key_shard_path, tokens_path, unit_record_path
from builder.seqs import SeqTable, table_rows
from builder.storage import Storage

log = logging.getLogger(__name__)

# Tests kill a worker mid-unit with KNNLM_FAULT_FILE holding "exit:<unit id>:<marker>" (builder/faults.py).


class UnitError(KnnlmError, RuntimeError):
    """A work unit failed because of its data (e.g. a non-finite key); retrying will not help."""


# ---------------------------------------------------------------------------------------------
# the unit and its planning (pure)


@dataclass(frozen=True)
class Segment:
    seq: int          # sequence index within the file
    offset: int       # offset of the sequence in the file's token array
    length: int       # sequence length n
    t0: int           # first target (a window boundary)
    t1: int           # end target (a window boundary)
    record: int       # record index (document mode) or -1


@dataclass(frozen=True)
class Unit:
    id: int
    file: int                 # input file index
    segments: tuple[Segment, ...]

    @property
    def num_targets(self) -> int:
        return sum(s.t1 - s.t0 for s in self.segments)

    def to_dict(self) -> dict:
        return {"id": self.id, "file": self.file, "segments": [list(s.__dict__.values()) for s in self.segments]}

    @staticmethod
    def from_dict(d: dict) -> "Unit":
        return Unit(d["id"], d["file"], tuple(Segment(*s) for s in d["segments"]))


@dataclass(frozen=True)
class UnitSpan:
    """A planned unit in O(1) space (what the driver keeps and sends): targets [t0 of sequence `first`, t1 of
    sequence `last`] of one file; `load_unit` expands it to its Unit from the file's sequence table."""
    id: int
    file: int
    first: int         # first sequence (row of the file's table)
    t0: int            # its first target
    last: int          # last sequence
    t1: int            # its end target
    offset: int        # token offset of the first sequence in the file
    num_targets: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @staticmethod
    def from_dict(d: dict) -> "UnitSpan":
        return UnitSpan(**d)


def _window_end(y: int, n: int, window: int, stride: int) -> int:
    """The first window end >= y of a sequence of n tokens (ends: min(W + k * stride, n), k = 0, 1, ...)."""
    k = 0 if y <= window else -(-(y - window) // stride)
    return min(window + k * stride, n)


def stream_units(files: Iterable[Iterable[np.ndarray]], window: int, min_context: int, unit_tokens: int,
                 first_id: int = 0) -> Iterator[UnitSpan]:
    """Split the corpus into units of about `unit_tokens` targets, streaming. Pure and deterministic.

    `files` holds, per input file in corpus order, its sequence table in chunks of rows ((k, 3) int64:
    offset, length, record; builder/seqs.py), of any size. Units never cross a file; they split sequences
    only at window boundaries, so a unit that starts inside a sequence re-reads exactly min_context tokens
    of context and its keys equal those of a single pass. Unit ids are consecutive in corpus order.

    The cut rule, on a file's targets numbered 1, 2, ... in order: a unit that starts after target `done`
    ends at the first window end holding target done + unit_tokens (or at the file's end). Per chunk the
    targets through each sequence are one cumsum, and each cut a searchsorted: the work is per chunk and per
    unit, never per sequence in Python; memory is one chunk and one unit's start."""
    stride, uid = window - min_context, first_id
    for fi, chunks in enumerate(files):
        done = base = row0 = 0     # targets in units yielded; targets and rows before the chunk
        start = last = None        # (row, t0, offset) of the unit's first target; (row, n) of the last sequence
        for rows in chunks:
            n = rows[:, 1]
            ends = np.maximum(n - 1, 0)                           # (k,) targets through each sequence:
            np.cumsum(ends, out=ends)                             # in place (one array of the chunk's size)
            ends += base
            while len(n) and ends[-1] > done:                     # the chunk holds target done + 1
                if start is None:                                 # the unit starts there
                    s = int(np.searchsorted(ends, done + 1))      # its sequence (target j of one: position j)
                    before = int(ends[s] - n[s]) + 1              # targets of the file before that sequence
                    start = (row0 + s, done + 1 - before, int(rows[s, 0]))
                x = done + unit_tokens                            # the unit ends with target x's window
                if x > ends[-1]:
                    break
                s = int(np.searchsorted(ends, x))
                before = int(ends[s] - n[s]) + 1
                e = _window_end(x - before + 1, int(n[s]), window, stride)
                yield UnitSpan(uid, fi, start[0], start[1], row0 + s, e, start[2], before + e - 1 - done)
                uid, done, start = uid + 1, before + e - 1, None
            if len(n) and ends[-1] > base:                        # the chunk's last sequence with targets
                s = int(np.searchsorted(ends, ends[-1]))
                last = (row0 + s, int(n[s]))
            base, row0 = int(ends[-1]) if len(n) else base, row0 + len(n)
            del rows, n, ends                                     # before the next chunk is read: one at a time
        if done < base:                                           # the file's last unit
            yield UnitSpan(uid, fi, start[0], start[1], last[0], last[1], start[2], base - done)
            uid += 1


def expand(span: UnitSpan, rows: np.ndarray) -> Unit:
    """The Unit of a span: one Segment per sequence with targets; `rows` are the table's rows [first, last]."""
    segs = []
    for i, (offset, n, record) in enumerate(rows.tolist()):
        seq = span.first + i
        t0, t1 = span.t0 if seq == span.first else 1, span.t1 if seq == span.last else n
        if t1 > t0:
            segs.append(Segment(seq, offset, n, t0, t1, record))
    return Unit(span.id, span.file, tuple(segs))


def plan_units(files: list[tuple[list[int], list[int]]], window: int, min_context: int,
               unit_tokens: int) -> list[Unit]:
    """`stream_units` of a small corpus held in memory, expanded: `files` holds, per input file in corpus
    order, (sequence lengths, sequence records)."""
    tables = [table_rows(lengths, records) for lengths, records in files]
    return [expand(sp, tables[sp.file][sp.first:sp.last + 1])
            for sp in stream_units([[t] for t in tables], window, min_context, unit_tokens)]


def load_unit(span: UnitSpan, storage: Storage) -> Unit:
    """A key worker's unit: its span expanded with its rows of tokens/<file>.seqs (one range read)."""
    return expand(span, SeqTable(storage, tokens_path(span.file)).rows(span.first, span.last + 1))


def unit_token_range(unit: Unit, window: int, min_context: int) -> tuple[int, int]:
    """[start, end) in the file's token array that the unit reads (its context included)."""
    first, last = unit.segments[0], unit.segments[-1]
    s0 = max(s for (s, _, a, _) in plan_windows(first.length, window, min_context) if a <= first.t0)
    return first.offset + s0, last.offset + last.t1


def unit_jobs(unit: Unit, window: int, min_context: int) -> list[tuple[int, int, int, int]]:
    """The windows a unit runs, in output order: (segment index, window start, a, b).

    The window [start, b) runs forward; it emits keys for targets [a, b) (key position t-1)."""
    jobs = []
    for si, seg in enumerate(unit.segments):
        for (s, e, a, b) in plan_windows(seg.length, window, min_context):
            if b > a and a >= seg.t0 and b <= seg.t1:
                jobs.append((si, s, a, b))
    return jobs


# ---------------------------------------------------------------------------------------------
# processing a unit


@dataclass
class UnitParams:
    window: int
    min_context: int
    mode: str
    batch_size: int
    shard_rows: int
    row_group_rows: int
    file_uri: str          # for error messages
    doc_base: int          # document index of the file's record 0 (document mode)
    pad_id: int = 0
    writer_threads: int = 1  # shards encoded and uploaded in parallel (more on GPU workers)


def compute_unit(unit: Unit, tokens: np.ndarray, base: int, encoder: KeyEncoder, p: UnitParams):
    """Yield row blocks (keys, values, doc, pos) of the unit in target order.

    `tokens` is the unit's slice of the file's token array starting at file offset `base`."""
    jobs = unit_jobs(unit, p.window, p.min_context)
    chunk = max(1, p.batch_size) * 16  # sort-by-length batching within a chunk, output in order
    for c in range(0, len(jobs), chunk):
        part = jobs[c:c + chunk]
        wj = []
        for (si, s, a, b) in part:
            seg = unit.segments[si]
            o = seg.offset - base
            # forward tokens [s, b); keep hidden states at positions a-1 .. b-2 (keys of targets a .. b-1)
            wj.append(WindowJob(tokens[o + s:o + b], a - 1 - s, b - 1 - s))
        keys = compute_keys(wj, encoder, p.batch_size, p.pad_id)
        for (si, s, a, b), k in zip(part, keys):
            seg = unit.segments[si]
            o = seg.offset - base
            values = tokens[o + a:o + b].astype(np.int32)
            doc = p.doc_base + seg.record if p.mode == "document" else p.doc_base
            yield k, values, np.full(b - a, doc, np.int64), np.arange(a, b, dtype=np.int64)


def check_finite(keys: np.ndarray, doc: np.ndarray, pos: np.ndarray, p: UnitParams, compute_dtype: str) -> None:
    """Raise naming the document and position of the first non-finite key (a float16 overflow)."""
    ok = np.isfinite(keys).all(axis=1)
    if ok.all():
        return
    i = int(np.argmin(ok))
    where = (f"document {int(doc[i])} ({p.file_uri}, record {int(doc[i]) - p.doc_base})" if p.mode == "document"
             else p.file_uri)
    hint = ("try --compute-dtype float32 or bfloat16" if compute_dtype == "float16" else
            "use another --key-layer or model")
    raise UnitError(f"non-finite key in {where} for the token at position {int(pos[i])} (key position "
                    f"{int(pos[i]) - 1}): the hidden state overflows in {compute_dtype} or exceeds the float16 "
                    f"range (+-65504) keys are stored in; {hint}")


def run_unit(unit: Unit, storage: Storage, encoder: KeyEncoder, p: UnitParams,
             on_rows: Callable[[int], None] | None = None) -> dict:
    """Compute a unit's keys, write its shards, commit its record; return the record.

    `on_rows(n)` is called with the number of rows each computed block adds (for progress reports)."""
    t_start = time.perf_counter()
    lo, hi = unit_token_range(unit, p.window, p.min_context)
    raw = storage.read_range(tokens_path(unit.file), 4 * lo, 4 * hi)
    tokens = np.frombuffer(raw, dtype="<i4")
    if tokens.size != hi - lo:
        raise UnitError(f"{storage.url(tokens_path(unit.file))} is truncated: expected tokens [{lo}, {hi})")

    shards: list[dict] = []
    buf: list[tuple[np.ndarray, ...]] = []   # row blocks (keys, values, doc, pos) not yet in a shard
    buffered = 0
    writers = max(1, p.writer_threads)
    pool = cf.ThreadPoolExecutor(max_workers=writers, thread_name_prefix="knnlm-writer")
    inflight: list[cf.Future] = []
    dtype = str(encoder.dtype).replace("torch.", "")

    def write(part: int, blocks: list[tuple[np.ndarray, ...]]) -> dict:
        # in a writer thread: assembling, checking, encoding, hashing and uploading a shard all
        # overlap the next forward passes
        cols = [np.concatenate([b[i] for b in blocks]) for i in range(4)]
        check_finite(cols[0], cols[2], cols[3], p, dtype)
        data, digest = encode_shard(*cols, row_group_rows=p.row_group_rows)
        path = key_shard_path(unit.id, part)
        storage.write_bytes(path, data)
        return {"path": path, "num_rows": int(len(cols[1])), "checksum": digest, "bytes": len(data)}

    def flush(n_rows: int):
        nonlocal buffered
        take, need = [], n_rows
        while need:
            b = buf[0]
            if len(b[1]) <= need:
                take.append(buf.pop(0))
                need -= len(b[1])
            else:  # split a block: views, no copy
                take.append(tuple(c[:need] for c in b))
                buf[0] = tuple(c[need:] for c in b)
                need = 0
        buffered -= n_rows
        # bounded memory: at most `writers` + 1 shards in flight
        while len(inflight) > writers:
            shards.append(inflight.pop(0).result())
        inflight.append(pool.submit(write, len(shards) + len(inflight), take))
        maybe_fault("exit", unit.id)

    try:
        for block in compute_unit(unit, tokens, lo, encoder, p):
            buf.append(block)
            buffered += len(block[1])
            if on_rows is not None:
                on_rows(len(block[1]))
            while buffered >= p.shard_rows:
                flush(p.shard_rows)
        if buffered:
            flush(buffered)
        for f in inflight:
            shards.append(f.result())
    finally:
        for f in inflight:
            f.cancel()
        pool.shutdown(wait=True)
    n = sum(s["num_rows"] for s in shards)
    if n != unit.num_targets:
        raise UnitError(f"unit {unit.id}: wrote {n} rows, expected {unit.num_targets}")
    record = {"unit": unit.id, "file": unit.file, "num_rows": n, "shards": shards,
              "seconds": round(time.perf_counter() - t_start, 3)}
    storage.write_text(unit_record_path(unit.id), json.dumps(record))
    return record

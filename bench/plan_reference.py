"""The in-memory unit planner that builder.unit.stream_units replaced (builder.unit.plan_units of commit ff5f857):
one Segment per document, a Python loop per window. The reference that tests/test_plan.py compares the streaming
planner with, and bench/bench_plan.py's baseline."""
from __future__ import annotations

from builder.corpus import plan_windows
from builder.unit import Segment, Unit


def naive_plan_units(files, window, min_context, unit_tokens):
    """Units of about unit_tokens targets, cut at window boundaries; files: [(lengths, records)] per file."""
    units = []
    for fi, (lengths, records) in enumerate(files):
        segs = []
        count = 0
        offset = 0
        for si, (n, rec) in enumerate(zip(lengths, records)):
            seg_t0 = None
            for (_, _, a, b) in plan_windows(n, window, min_context):
                if b <= a:
                    continue
                if seg_t0 is None:
                    seg_t0 = a
                count += b - a
                if count >= unit_tokens:
                    segs.append(Segment(si, offset, n, seg_t0, b, rec))
                    units.append(Unit(len(units), fi, tuple(segs)))
                    segs, count, seg_t0 = [], 0, None
            if seg_t0 is not None:
                segs.append(Segment(si, offset, n, seg_t0, n, rec))
            offset += n
        if segs:
            units.append(Unit(len(units), fi, tuple(segs)))
    return units

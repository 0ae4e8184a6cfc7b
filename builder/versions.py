"""Datastore versions: a built datastore is version 1; each ingestion, removal and compaction publishes
the next one, whole, in one atomic write of manifest.json.

    manifest.json          always the current version, complete (shards contiguous from id 0, every
                           index shard listed, the ids removed since the last compaction)
    versions/<v>.json      every published version's manifest, the current one included, so a server
                           still answering for version v (retriever/router.py) can be restarted on it

`publish` writes versions/<v+1>.json first, then manifest.json: a reader sees the previous version,
complete, until the second write lands. Only the holder of the datastore's lease publishes
(builder/lease.py), so two publishers never interleave; `check_current` refuses to write a manifest
read before another version was published (it would silently undo that version).

Removed ids are id ranges [first, end): a document's keys are contiguous (units run in corpus order),
so a removal of whole documents or sources is a few ranges whatever its size. The range helpers
below are the one definition of "is this id removed" for servers, evaluation and provenance.
"""
from __future__ import annotations

import time

import numpy as np

from builder.layout import MANIFEST, version_path
from builder.manifest import Manifest, ManifestError, check_current, load_manifest, parse_manifest
from builder.storage import NotFound, Storage

KINDS = ("build", "ingest", "remove", "compact")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def publish(storage: Storage, lease, base: Manifest, new: Manifest, event: dict) -> Manifest:
    """Publish `new` as version base.version + 1, recording `event` ({kind, ...}) in its history.

    `base` is the current version as this publisher read it (under `lease`): a newer manifest.json
    means someone published without the lease, and nothing is written."""
    if event.get("kind") not in KINDS:
        raise ValueError(f"unknown version event {event!r}")
    new.version = base.version + 1
    new.history = list(base.history or [initial_event(base)]) + [
        {"version": new.version, "at": now(), "num_keys": new.num_keys, **event}]
    new.validate()
    lease.check()                                         # fencing: only the lease holder publishes
    check_current(storage, base)
    if not storage.exists(version_path(base.version)):   # the previous version stays readable for its servers
        storage.write_text(version_path(base.version), base.to_json())
    text = new.to_json()
    storage.write_text(version_path(new.version), text)
    storage.write_text(MANIFEST, text)
    return new


def initial_event(m: Manifest) -> dict:
    """The history entry of version 1 (the build), from a manifest that has none yet."""
    return {"version": 1, "kind": "build", "at": (m.build or {}).get("finished_at"), "num_keys": m.num_keys,
            "inputs": len(m.corpus.get("files", []))}


def history(m: Manifest) -> list[dict]:
    """Every version of the datastore, oldest first (a never-changed datastore: its build)."""
    return list(m.history or [initial_event(m)])


def load_version(storage: Storage, version: int | None = None) -> Manifest:
    """The manifest of `version` (None: the current one), checked like manifest.json."""
    m = load_manifest(storage)
    if version is None or version == m.version:
        return m
    try:
        raw = storage.read_bytes(version_path(version))
    except NotFound:
        raise ManifestError(f"{storage.uri} has no version {version} (the current one is {m.version}; "
                            f"{storage.url(version_path(version))} is missing)") from None
    return parse_manifest(raw, storage.url(version_path(version)))


# ---------------------------------------------------------------------------------------------
# id ranges [first, end): pure


def merge_ranges(ranges) -> list[list[int]]:
    """Sorted, disjoint, adjacent ones joined: [[first, end), ...]."""
    out: list[list[int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in ranges if b > a):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def count_ids(ranges) -> int:
    return int(sum(b - a for a, b in ranges))


def removed_ranges(m: Manifest) -> list[list[int]]:
    return [list(r) for r in (m.removed or {}).get("ranges", [])]


def clip_ranges(ranges, first: int, num: int) -> np.ndarray:
    """The parts of `ranges` inside [first, first + num), as an (r, 2) int64 array (vectorized: a
    compaction clips the removed ranges, possibly 10^5, to each of its rewritten shards)."""
    lo, hi = first, first + num
    r = np.asarray(ranges, np.int64).reshape(-1, 2)
    r = r[(r[:, 1] > lo) & (r[:, 0] < hi)]
    return np.stack([np.maximum(r[:, 0], lo), np.minimum(r[:, 1], hi)], axis=1).reshape(-1, 2)


def removed_before(ids, ranges) -> np.ndarray:
    """How many ids of `ranges` (sorted, disjoint: a manifest's removed ranges) lie below each of `ids`:
    O((len(ids) + len(ranges)) log) for all of them, where clipping per id costs len(ids) x len(ranges)."""
    r = np.asarray(ranges, np.int64).reshape(-1, 2)
    x = np.asarray(ids, np.int64)
    if not len(r):
        return np.zeros(x.shape, np.int64)
    before = np.concatenate([[0], np.cumsum(r[:, 1] - r[:, 0])])   # ids of the ranges before range j
    j = np.searchsorted(r[:, 1], x, side="right")                   # ranges ending at or below x
    part = np.where(j < len(r), x - r[np.minimum(j, len(r) - 1), 0], 0)   # range j, if it starts below x
    return before[j] + np.maximum(part, 0)


def is_removed(ids: np.ndarray, ranges) -> np.ndarray:
    """Boolean mask, ids' shape: which ids lie in a removed range (-1, a missing result, never does)."""
    r = np.asarray(ranges, np.int64).reshape(-1, 2)
    ids = np.asarray(ids)
    if not len(r):
        return np.zeros(ids.shape, bool)
    j = np.searchsorted(r[:, 0], ids, side="right") - 1          # the last range starting at or before id
    return (j >= 0) & (ids < r[np.maximum(j, 0), 1]) & (ids >= 0)


def renumber(ids: np.ndarray, ranges) -> np.ndarray:
    """New ids after compacting `ranges` away: old id - the number of removed ids before it (for ids
    that are not removed)."""
    r = np.asarray(ranges, np.int64).reshape(-1, 2)
    if not len(r):
        return np.asarray(ids, np.int64)
    before = np.concatenate([[0], np.cumsum(r[:, 1] - r[:, 0])])   # removed ids before range j
    j = np.searchsorted(r[:, 1], ids, side="right")                # ranges wholly before id
    return np.asarray(ids, np.int64) - before[j]


def id_moves(num_keys: int, ranges) -> list[list[int]]:
    """How a compaction moves ids: [[old_first, new_first, count], ...] for each kept run, in order."""
    out, new, pos = [], 0, 0
    for a, b in list(ranges) + [[num_keys, num_keys]]:
        if a > pos:
            out.append([pos, new, a - pos])
            new += a - pos
        pos = b
    return out

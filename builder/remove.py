"""`knnlm remove`: take documents out of a datastore, as a new version (builder/versions.py).

Nothing is rewritten: the new version lists the removed documents' global ids as id ranges
(`removed`: {ranges, num_keys}) and records the removal (`removals`: what, when, how many keys). From
that version on the servers filter those ids inside faiss (retriever/server.py), provenance refuses
their text (retriever/provenance.py) and `knnlm tune` refuses neighbour caches made before it.
`knnlm compact` (builder/compact.py) later rewrites the shards without them.

A document's keys are contiguous (units run in corpus order), so the ids of whole documents or
sources are a few ranges, found by scanning the key shards' `doc` column; Parquet row-group
statistics (min/max doc per row group) skip the row groups that cannot hold them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from builder.config import RemoveConfig
from builder.errors import KnnlmError
from builder.key_shards import open_shard, read_row_group
from builder.layout import BUILD_LEASE, INDEX_LEASE
from builder.lease import Lease
from builder.manifest import Manifest, load_manifest
from builder.rows import row_group_rows
from builder.storage import Storage, normalize_uri
from builder.versions import count_ids, merge_ranges, now, publish, removed_ranges

log = logging.getLogger(__name__)


class RemoveError(KnnlmError, ValueError):
    pass


# ---------------------------------------------------------------------------------------------
# documents and files


def doc_bases(m: Manifest) -> np.ndarray:
    """(files + 1,) the first document index of each input file (document mode; cumulative num_records)."""
    return np.cumsum([0] + [int(f["num_records"]) for f in m.corpus.get("files", [])]).astype(np.int64)


def num_docs(m: Manifest) -> int:
    """How many `doc` values the datastore's keys can have: documents (document mode) or input files (stream)."""
    files = m.corpus.get("files", [])
    return len(files) if m.mode == "stream" else int(doc_bases(m)[-1])


def file_docs(m: Manifest, f: int) -> tuple[int, int]:
    """[first, end) of the `doc` values of input file f."""
    if m.mode == "stream":
        return f, f + 1
    b = doc_bases(m)
    return int(b[f]), int(b[f + 1])


def match_sources(m: Manifest, sources: list[str]) -> list[int]:
    """The input file indices of --source paths/URIs (as given to --corpus: a file, or a folder/prefix
    holding files); an unknown one is refused, listing the datastore's sources."""
    uris = [normalize_uri(f["uri"]) for f in m.corpus.get("files", [])]
    out: list[int] = []
    for src in sources:
        want = normalize_uri(src)
        hit = [i for i, u in enumerate(uris) if u == want] or \
              [i for i, u in enumerate(uris) if u.startswith(want.rstrip("/") + "/")]
        if not hit:
            listed = ", ".join(uris[:10]) + (f" and {len(uris) - 10} more" if len(uris) > 10 else "")
            raise RemoveError(f"--source {src}: not a source of this datastore (its sources: {listed})")
        out += hit
    return sorted(set(out))


def meta_path(tokens: str) -> str:
    """A tokens file's meta, beside it (tokens/000003.bin → tokens/000003.json)."""
    return tokens[:-len(".bin")] + ".json" if tokens.endswith(".bin") else tokens + ".json"


def removed_doc_ranges(m: Manifest) -> list[list[int]]:
    """[first, end) ranges of the `doc` values of every removal recorded in m, compacted or not."""
    return merge_ranges([r for rec in (m.removals or []) for r in rec.get("doc_ranges", [])])


def docs_to_ranges(docs) -> list[list[int]]:
    return merge_ranges([[int(d), int(d) + 1] for d in docs])


def in_ranges(x: int, ranges) -> bool:
    return any(a <= x < b for a, b in ranges)


# ---------------------------------------------------------------------------------------------
# the ids of documents: a scan of the doc column


def _runs(ids: np.ndarray) -> list[list[int]]:
    """Sorted ids → [first, end) ranges of consecutive ids."""
    if not len(ids):
        return []
    cut = np.flatnonzero(np.diff(ids) != 1) + 1
    starts, ends = ids[np.r_[0, cut]], ids[np.r_[cut - 1, len(ids) - 1]] + 1
    return [[int(a), int(b)] for a, b in zip(starts, ends)]


def removal_ranges(storage: Storage, m: Manifest, docs) -> list[list[int]]:
    """The global id ranges [first, end) of the keys whose `doc` is in `docs` (any iterable of ints; or
    [first, end) doc ranges via `docs_to_ranges`). Reads only the doc column of the row groups whose
    statistics say they may hold one of them (a document's keys are contiguous: a few ranges)."""
    want = np.unique(np.asarray(list(docs), np.int64))
    if not len(want):
        return []
    rgr = row_group_rows(m)
    out: list[list[int]] = []
    for s in m.shards:
        pf = open_shard(storage, s, m.dim)
        meta = pf.metadata
        col = meta.schema.to_arrow_schema().get_field_index("doc")
        for g in range(meta.num_row_groups):
            st = meta.row_group(g).column(col).statistics
            if st is not None and st.has_min_max:
                lo, hi = np.searchsorted(want, st.min, "left"), np.searchsorted(want, st.max, "right")
                if hi <= lo:
                    continue                                  # no wanted doc in [min, max]
            rows = min(rgr, int(s["num_rows"]) - g * rgr)
            doc = read_row_group(pf, storage, s, g, rows, m.dim, ("doc",), as_dict=True)["doc"]
            hit = np.flatnonzero(np.isin(doc, want))
            if len(hit):
                out += _runs(int(s["first_id"]) + g * rgr + hit)
    return merge_ranges(out)


def subtract_ranges(ranges, minus) -> list[list[int]]:
    """The parts of `ranges` outside `minus`: one sweep over both, sorted (a removal of many documents
    makes thousands of ranges on each side; comparing every pair took minutes)."""
    minus = merge_ranges(minus)
    out, i = [], 0
    for a, b in merge_ranges(ranges):
        while i < len(minus) and minus[i][1] <= a:          # wholly before this range (and the next ones)
            i += 1
        j = i
        while j < len(minus) and minus[j][0] < b:
            c, d = minus[j]
            if c > a:
                out.append([a, c])
            a = max(a, d)
            j += 1
        if a < b:
            out.append([a, b])
    return merge_ranges(out)


# ---------------------------------------------------------------------------------------------
# the stage


@dataclass
class RemoveResult:
    manifest: Manifest
    already_done: bool = False
    num_docs: int = 0
    num_keys: int = 0

    def summary(self) -> str:
        m = self.manifest
        if self.already_done:
            return f"already removed: nothing to do (version {m.version}, {(m.removed or {}).get('num_keys', 0):,} keys " \
                   "removed since the last compaction)"
        return (f"removed {self.num_docs:,} documents ({self.num_keys:,} keys) as version {m.version}; "
                f"{m.removed['num_keys']:,} of {m.num_keys:,} keys are removed until `knnlm compact`")


def resolve_docs(m: Manifest, cfg: RemoveConfig) -> tuple[list[list[int]], dict]:
    """The doc ranges a removal asks for, and what the record says it asked for (source/files or docs)."""
    if cfg.source is not None:
        files = match_sources(m, cfg.source)
        return merge_ranges([list(file_docs(m, f)) for f in files]), {"source": list(cfg.source), "files": files}
    n = num_docs(m)
    bad = [d for d in cfg.docs if d >= n]
    if bad:
        what = "input file" if m.mode == "stream" else "document"
        raise RemoveError(f"--docs: no {what} {bad[0]} in this datastore (it has {n}: 0..{n - 1}"
                          + ("; in stream mode --docs takes input file indices" if m.mode == "stream" else "") + ")")
    return docs_to_ranges(cfg.docs), {"docs": list(cfg.docs)}


def remove(cfg: RemoveConfig) -> RemoveResult:
    """Publish a version with the asked documents removed (or nothing, when they already are)."""
    storage = Storage.from_uri(cfg.datastore)
    m = load_manifest(storage)
    resolve_docs(m, cfg)                                   # user errors before taking any lease
    with Lease(storage, cfg.lease_ttl, BUILD_LEASE, "build or ingestion") as lease, \
            Lease(storage, cfg.lease_ttl, INDEX_LEASE, "index build") as index_lease:
        m = load_manifest(storage)                          # as of now, under the leases
        doc_ranges, what = resolve_docs(m, cfg)
        new_docs = subtract_ranges(doc_ranges, removed_doc_ranges(m))
        if not new_docs:
            return RemoveResult(m, already_done=True)
        old = removed_ranges(m)
        asked = removal_ranges(storage, m, [d for a, b in new_docs for d in range(a, b)])
        new = subtract_ranges(asked, old)
        merged = merge_ranges(old + new)
        base = load_manifest(storage)
        m.removed = {"ranges": merged, "num_keys": count_ids(merged)} if merged else None
        n_docs = sum(b - a for a, b in new_docs)
        rec = {"at": now(), **what, "num_docs": n_docs, "num_keys": count_ids(new), "ranges": new,
               "doc_ranges": new_docs}
        m.removals = list(m.removals or []) + [rec | {"version": base.version + 1}]
        index_lease.check()
        m = publish(storage, lease, base, m, {"kind": "remove", "keys_removed": rec["num_keys"],
                                              **{k: v for k, v in rec.items()
                                                 if k not in ("ranges", "num_keys", "version", "at")}})
    log.info("version %d: removed %d documents, %d keys", m.version, n_docs, count_ids(new))
    return RemoveResult(m, num_docs=n_docs, num_keys=count_ids(new))


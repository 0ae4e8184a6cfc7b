"""The training text behind a datastore's entries: a stored (doc, pos) → its input file, its document
and the tokens around it, read from the tokens the build stored (`tokens/`, an ingestion's
`ingest/<name>/tokens/`, a compaction's rewrite) and, in document mode, the sequence table beside them
(builder/seqs.py). `knnlm neighbours` and `knnlm report` show text through it; removed documents and
ids (`knnlm remove`) are refused, never shown."""
from __future__ import annotations

import json
import threading
from collections import OrderedDict

import numpy as np

from builder.layout import tokens_meta_path, tokens_path
from builder.manifest import Manifest
from builder.remove import doc_bases, in_ranges, meta_path, removed_doc_ranges
from builder.seqs import SeqTable
from builder.versions import is_removed, removed_ranges
from retriever.scoring import EvalError


class ContextReader:
    """Tokens before (and at) a stored (doc, pos), from the tokens file each input's manifest entry names
    (m.corpus["files"][i]["tokens"], its meta beside it: a build's tokens/, an ingestion's
    ingest/<name>/tokens/, a compaction's rewrite). Removed documents and ids (`knnlm remove`) are refused:
    their text is never shown."""

    REMOVED = "[removed]"

    def __init__(self, storage, m: Manifest):
        self.storage, self.m = storage, m
        self.files = m.corpus.get("files", [])
        self.doc_base = doc_bases(m)
        self.removed_docs = removed_doc_ranges(m)
        self.removed_ids = removed_ranges(m)
        self._metas: dict[int, dict] = {}
        self._tables: dict[int, SeqTable] = {}
        self._seqs: dict[int, tuple[int, int]] = {}   # doc → (token offset, length) of its sequence (document mode)
        self._docs: OrderedDict[int, np.ndarray] = OrderedDict()   # whole documents read, most recent last
        self._held = 0                                             # their tokens
        self._lock = threading.Lock()                              # (a report reads from several threads)

    WHOLE = 1 << 22            # documents up to this many tokens are read whole and kept (a report's windows
    KEEP = 1 << 25             # fall in the same documents again and again), this many tokens at most

    def tokens_file(self, f: int) -> str:
        """Input f's tokens file under the root."""
        return self.files[f].get("tokens") or tokens_path(f)

    def meta(self, f: int) -> dict:
        if f not in self._metas:
            path = self.files[f].get("tokens")
            self._metas[f] = json.loads(self.storage.read_text(meta_path(path) if path else tokens_meta_path(f)))
        return self._metas[f]

    def _file(self, doc: int) -> int:
        return int(doc) if self.m.mode == "stream" else int(np.searchsorted(self.doc_base, doc, side="right") - 1)

    def is_removed(self, doc: int, id: int | None = None) -> bool:
        """Whether (doc, id) belongs to a removed document (or a removed id range)."""
        if id is not None and bool(is_removed(np.array([id]), self.removed_ids)[0]):
            return True
        f = self._file(doc)
        return in_ranges(int(doc), self.removed_docs) or not 0 <= f < len(self.files) or \
            bool(self.files[f].get("removed"))

    def are_removed(self, docs: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """`is_removed` of each (doc, id) pair (n,) bool; all False at once where nothing was removed."""
        if not self.removed_docs and not self.removed_ids and not any(f.get("removed") for f in self.files):
            return np.zeros(len(docs), bool)
        return np.array([self.is_removed(int(d), int(i)) for d, i in zip(docs, ids)], bool)

    def tokens(self, doc: int, pos: int, before: int, id: int | None = None) -> tuple[np.ndarray, int]:
        """(tokens [pos - before, pos], index of the token at pos in them); refused for removed text."""
        lo = max(0, pos - before)
        return self.window(doc, lo, pos + 1, id)[0], pos - lo

    def window(self, doc: int, lo: int, hi: int, id: int | None = None) -> tuple[np.ndarray, int]:
        """(tokens [lo, hi) of document `doc` (a file in stream mode), clipped to it; where they start);
        refused for removed text."""
        if self.is_removed(doc, id):
            raise EvalError(f"document {doc} was removed from the datastore (`knnlm remove`): its text is not shown")
        f = self._file(doc)
        offset, length = self._sequence(f, int(doc))
        lo, hi = max(0, int(lo)), min(int(hi), length)
        if hi <= lo:
            return np.zeros(0, np.int32), lo
        if length <= self.WHOLE:
            return self._whole(f, int(doc), offset, length)[lo:hi], lo
        raw = self.storage.read_range(self.tokens_file(f), 4 * (offset + lo), 4 * (offset + hi))
        return np.frombuffer(raw, dtype="<i4"), lo

    def _whole(self, f: int, doc: int, offset: int, length: int) -> np.ndarray:
        """All tokens of a document, kept (least recently used dropped beyond KEEP tokens)."""
        with self._lock:
            if doc in self._docs:
                self._docs.move_to_end(doc)
                return self._docs[doc]
        toks = np.frombuffer(self.storage.read_range(self.tokens_file(f), 4 * offset, 4 * (offset + length)), "<i4")
        with self._lock:
            self._docs[doc] = toks
            self._held += len(toks)
            while self._held > self.KEEP and len(self._docs) > 1:
                self._held -= len(self._docs.popitem(last=False)[1])
        return toks

    def source(self, doc: int) -> tuple[int, int]:
        """(the input file's index in the manifest's corpus files, the document's index in that file: its
        record, 0 in stream mode) of a `doc` value."""
        f = self._file(doc)
        return f, 0 if self.m.mode == "stream" else int(doc) - int(self.doc_base[f])

    def _sequence(self, f: int, doc: int) -> tuple[int, int]:
        """(where the tokens of `doc` start in file f's tokens, how many there are): the whole file in stream
        mode, else its record's row of the sequence table."""
        if self.m.mode == "stream":
            return 0, int(self.files[f].get("num_tokens") or self.meta(f)["num_tokens"])
        if doc not in self._seqs:
            if f not in self._tables:
                self._tables[f] = SeqTable(self.storage, self.tokens_file(f), self.meta(f))
            table = self._tables[f]
            seq = table.find_record(doc - int(self.doc_base[f]))
            if seq is None:
                raise EvalError(f"document {doc} has no tokens in {self.storage.url(self.tokens_file(f))} "
                                "(it was skipped when the datastore was built)")
            row = table.rows(seq, seq + 1)[0]
            self._seqs[doc] = int(row[0]), int(row[1])
        return self._seqs[doc]

    def context(self, doc: int, pos: int, before: int, tok, id: int | None = None) -> str:
        """The decoded text before (doc, pos), or "[removed]"."""
        if self.is_removed(doc, id):
            return self.REMOVED
        toks, at = self.tokens(doc, pos, before, id)
        return tok.decode(toks[:at].tolist())



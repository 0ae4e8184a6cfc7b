"""`knnlm neighbours`: where the kNN-LM's evidence comes from.

For each position of a text, the retrieved neighbours with their distance, the next token they
vote for, and the datastore context they come from: the document and position stored in the
shards' `doc`/`pos` columns, decoded from the tokens the build stored under `tokens/` (a document's
sequence found in the sequence table beside them, builder/seqs.py).
"""
from __future__ import annotations

import json

import numpy as np

from builder.layout import tokens_meta_path, tokens_path
from builder.manifest import Manifest, load_manifest, require_index_shards
from builder.remove import doc_bases, in_ranges, meta_path, removed_doc_ranges
from builder.rows import read_rows
from builder.seqs import SeqTable
from builder.storage import Storage
from builder.versions import is_removed, removed_ranges
from retriever.evaluate import EvalError, check_model, load_query_encoder, plan_chunks, score_windows
from retriever.router import Retriever, serving


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
        self._offsets: dict[int, int] = {}       # doc → token offset of its sequence (document mode)

    def _tokens_path(self, f: int) -> str:
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

    def tokens(self, doc: int, pos: int, before: int, id: int | None = None) -> tuple[np.ndarray, int]:
        """(tokens [pos - before, pos], index of the token at pos in them); refused for removed text."""
        if self.is_removed(doc, id):
            raise EvalError(f"document {doc} was removed from the datastore (`knnlm remove`): its text is not shown")
        f = self._file(doc)
        offset = 0 if self.m.mode == "stream" else self._offset(f, int(doc))
        lo = max(0, pos - before)
        raw = self.storage.read_range(self._tokens_path(f), 4 * (offset + lo), 4 * (offset + pos + 1))
        return np.frombuffer(raw, dtype="<i4"), pos - lo

    def _offset(self, f: int, doc: int) -> int:
        """Where document `doc` (of file f) starts in the file's tokens: its record's row of the table."""
        if doc not in self._offsets:
            if f not in self._tables:
                self._tables[f] = SeqTable(self.storage, self._tokens_path(f), self.meta(f))
            table = self._tables[f]
            seq = table.find_record(doc - int(self.doc_base[f]))
            if seq is None:
                raise EvalError(f"document {doc} has no tokens in {self.storage.url(self._tokens_path(f))} "
                                "(it was skipped when the datastore was built)")
            self._offsets[doc] = int(table.rows(seq, seq + 1)[0, 0])
        return self._offsets[doc]

    def context(self, doc: int, pos: int, before: int, tok, id: int | None = None) -> str:
        """The decoded text before (doc, pos), or "[removed]"."""
        if self.is_removed(doc, id):
            return self.REMOVED
        toks, at = self.tokens(doc, pos, before, id)
        return tok.decode(toks[:at].tolist())


def neighbours(datastore: str, text: str, k: int = 8, nprobe: int = 32, context: int = 24, model: str | None = None,
               address: str | None = None, cache_dir: str | None = None) -> list[dict]:
    """[{position, token, neighbours: [{rank, distance, id, value, next_token, doc, pos, context}]}] for every
    token of `text` after the first."""
    from transformers import AutoTokenizer

    st = Storage.from_uri(datastore)
    m = load_manifest(st)
    require_index_shards(m, st.uri, EvalError)
    info = check_model(model, m)
    tok = AutoTokenizer.from_pretrained(info.path)
    ids = np.array(tok(text)["input_ids"], dtype=np.int32)
    if len(ids) < 2:
        raise EvalError("--text: needs at least 2 tokens")
    enc = load_query_encoder(info.path, m.key_layer, m.compute_dtype, "cpu")     # as the keys were computed
    q, _, tgt = score_windows([w for c in plan_chunks([ids], m.window, m.min_context) for w in c.windows], enc)
    with serving(st.uri, address, cache_dir=cache_dir):
        res = Retriever.connect(st.uri).search(q.astype(np.float32), k=k, nprobe=nprobe)
    ok = res.ids >= 0
    rows = read_rows(st, m, res.ids[ok], ("doc", "pos"))
    doc = np.full(res.ids.shape, -1, np.int64)
    pos = np.full(res.ids.shape, -1, np.int64)
    doc[ok], pos[ok] = rows["doc"], rows["pos"]
    ctx = ContextReader(st, m)
    out = []
    for t in range(len(q)):
        nbs = []
        for j in range(k):
            if res.ids[t, j] < 0:
                continue
            shown = ctx.context(int(doc[t, j]), int(pos[t, j]), context, tok, int(res.ids[t, j]))
            nbs.append({"rank": j + 1, "distance": float(res.dist[t, j]), "id": int(res.ids[t, j]),
                        "value": int(res.values[t, j]), "next_token": tok.decode([int(res.values[t, j])]),
                        "doc": int(doc[t, j]), "pos": int(pos[t, j]),
                        "context": shown, "matches": bool(res.values[t, j] == tgt[t])})
        out.append({"position": t + 1, "token": tok.decode([int(tgt[t])]), "prefix": tok.decode(ids[:t + 1].tolist()),
                    "neighbours": nbs})
    return out

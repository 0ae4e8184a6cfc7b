"""`knnlm neighbours`: where the kNN-LM's evidence comes from.

For each position of a text, the retrieved neighbours with their distance, the next token they
vote for, and the datastore context they come from: the document and position stored in the
shards' `doc`/`pos` columns, decoded from the tokens the build stored under `tokens/` (a document's
sequence found in the sequence table beside them, builder/seqs.py).
"""
from __future__ import annotations

import numpy as np

from builder.manifest import load_manifest, require_index_shards
from builder.rows import read_rows
from builder.storage import Storage
from retriever.evaluate import EvalError, check_model, load_query_encoder, plan_chunks, score_windows
from retriever.router import Retriever, serving
from retriever.sources import ContextReader  # noqa: F401 - also this module's API


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

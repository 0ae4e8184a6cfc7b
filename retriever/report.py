"""`knnlm report` and `knnlm eval --report DIR`: a static page of where the datastore helped, and which
training text each prediction came from.

The folder opens from disk with no server and no network: `index.html` (styles and code inline) reads
`data/run.js` (the run, the plots, the largest gains and losses, the pages) and, page by page,
`data/page-NNNNN.js` (each page's tokens, their numbers and their first neighbours with the training text
around each), loaded as scripts: a browser refuses `fetch` of file:// URLs, not scripts. Its size is
linear in the scored tokens: the pages hold a compact per-token summary (retriever/report_data.py), not
the neighbour cache, and each page stores the training text its neighbours come from once (their
windows merged). `index.html` is written last: a report is complete when it exists.
"""
from __future__ import annotations

import bisect
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources

import numpy as np

from builder.config import ConfigError
from builder.layout import REPORT_DATA_DIR, REPORT_INDEX, REPORT_RUN, report_page_path
from builder.manifest import Manifest, load_manifest
from builder.rows import read_rows
from builder.storage import Storage, StorageError, read_uri
from retriever.config import ReportConfig
from retriever.knnlm import perplexity
from retriever.report_data import (concat, curves, extremes, frequency_buckets, gain_histogram, merge_windows,
                                   pieces_of_many, summarize_chunk)
from retriever.scoring import EvalError, check_model, tokenizer_of
from retriever.sources import ContextReader
from retriever.tune import check_not_stale, iter_chunks, read_meta, read_text

log = logging.getLogger(__name__)
COUNT_LIMIT = 1 << 25          # training tokens counted exactly up to this; beyond, this many are sampled


@dataclass
class ReportOptions:
    show: int = 4              # neighbours shown per token
    context: int = 12          # training tokens shown before a neighbour's token (a third as many after)
    page_tokens: int = 2000    # scored tokens per page
    top: int = 50              # tokens in the lists of largest gains and losses


def report_from_cache(cfg: ReportConfig) -> dict:
    """`knnlm report`: the report of the evaluation whose neighbour cache is cfg.cache, with its λ, T and k
    (the page's numbers are the evaluation's). The cache is read a chunk at a time: memory holds the
    summary, not the neighbours. Refused: not a cache, one made before caches kept ids and text, one made
    with another model, one whose neighbours include ids removed since."""
    try:
        meta = read_meta(cfg.cache)
    except ValueError as e:
        raise ConfigError(f"--cache {cfg.cache}: {e}") from None
    if "ids" not in meta:
        raise ConfigError(f"--cache {cfg.cache}: made before neighbour caches kept the neighbours' ids and the "
                          "evaluated text; rerun `knnlm eval --save-neighbours` (or `knnlm eval --report DIR`)")
    st = Storage.from_uri(cfg.datastore)
    m = load_manifest(st)
    if meta.get("model_sha256") != m.model.get("sha256"):
        raise ConfigError(f"--cache {cfg.cache}: made with model {meta.get('model')} on {meta.get('datastore')}, "
                          f"not with {cfg.datastore}'s model ({m.model.get('name')}): its neighbour ids are another "
                          "datastore's")
    if meta.get("datastore") != st.uri:
        log.info("--cache %s was made on %s; reporting it against %s", cfg.cache, meta.get("datastore"), st.uri)
    check_not_stale(meta, "--cache", cfg.cache)
    info = check_model(cfg.model, m)
    tune = None
    if cfg.tune:
        try:
            tune = json.loads(read_uri(cfg.tune))
        except (StorageError, OSError, ValueError) as e:
            raise ConfigError(f"--tune {cfg.tune}: cannot read `knnlm tune --out`'s JSON ({e})") from None
    opts = ReportOptions(show=cfg.neighbours, context=cfg.context, page_tokens=cfg.page_tokens)
    s = concat([summarize_chunk(c.target, c.lm, c.dist, c.values, c.ids, lam=meta["lambda"],
                                temperature=meta["temperature"], k=meta["k"], metric=meta["metric"], show=opts.show)
                for c in iter_chunks(cfg.cache, meta)])
    mix = perplexity(float(np.sum(s["mix"])), len(s["mix"]))
    if abs(mix / meta["knnlm_ppl"] - 1) > 1e-9:
        log.warning("--cache %s: its neighbours give kNN-LM perplexity %.6f, its evaluation recorded %.6f", cfg.cache,
                    mix, meta["knnlm_ppl"])
    return write_report(cfg.out, run_header(st.uri, m, meta, meta["corpus"]), s, read_text(Storage.from_uri(cfg.cache)),
                        st, m, tokenizer_of(info.path, info.tokenizer_sha256), opts, tune)


def run_header(uri: str, m: Manifest, j: dict, corpus: list[str]) -> dict:
    """The page's header: the datastore and its model, key layer and index, and from `j` (an eval result's
    JSON or a cache's cache.json) the settings of the run."""
    keys = ("nprobe", "k", "lambda", "temperature", "distances", "index_factory", "window", "min_context", "mode",
            "version", "compute_dtype")
    model = m.model.get("name") or m.model.get("path")
    return {"datastore": uri, "model": model + (f" ({m.model['path']})" if m.model.get("path") not in (None, model)
                                                 else ""),
            "key_layer": f"{m.key_layer} ({m.key_module})" if m.key_module else m.key_layer,
            "corpus": list(corpus), "made": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            **{k: j.get(k) for k in keys}}


def write_report(out: str, run: dict, s: dict, sequences: list, storage: Storage, m: Manifest, tok,
                 opts: ReportOptions, tune: dict | None = None) -> dict:
    """The report folder at `out` (a local path or URI) for the summary `s` (report_data.concat of the
    chunks) of the scored `sequences` ((input, index, tokens) each, in evaluation order), `run` the header's
    settings. Returns {path, files, bytes, tokens, bytes_per_token, seconds}."""
    t0 = time.perf_counter()
    n = len(s["target"])
    pieces, heads = _text(sequences, s["target"], tok)
    ctx = ContextReader(storage, m)
    where = _sources(storage, m, s["nb_id"])
    gain = s["mix"] - s["lm"]
    st = Storage.from_uri(out)
    sizes = {}
    pages = []
    memo: dict = {}                                          # token id → its decode, for every page
    with ThreadPoolExecutor(8, thread_name_prefix="knnlm-report") as pool:
        for p, a in enumerate(range(0, n, opts.page_tokens)):
            b = min(n, a + opts.page_tokens)
            data = _page(p, a, b, s, pieces, heads, where, ctx, tok, opts, pool, memo)
            sizes[report_page_path(p)] = _write_js(st, report_page_path(p), f"knnlmPage({p}, ", data)
            pages.append({"first": a, "count": b - a, "gain": float(np.mean(gain[a:b]))})
    freq, counted, total = token_counts(storage, m, ctx, max(len(tok), int(s["target"].max()) + 1))
    top_gain, top_loss = extremes(gain, opts.top)
    head = dict(run, tokens=n, base_ppl=perplexity(float(np.sum(s["lm"])), n),
                knnlm_ppl=perplexity(float(np.sum(s["mix"])), n))
    data = {"run": head, "pages": pages, "page_tokens": opts.page_tokens, "neighbours": opts.show,
            "context": opts.context,
            "files": [f.get("uri", f"input {i}") for i, f in enumerate(m.corpus.get("files", []))],
            "curves": curves(s), "valid": _valid_curves(tune), "histogram": gain_histogram(gain),
            "buckets": frequency_buckets(freq, s["target"], s["lm"], s["mix"]),
            "frequency": {"counted": counted, "total": total, "exact": counted == total},
            "improved": int(np.sum(gain > 0)), "hurt": int(np.sum(gain < 0)),
            "gains": [_listed(int(t), gain, pieces) for t in top_gain],
            "losses": [_listed(int(t), gain, pieces) for t in top_loss]}
    sizes[REPORT_RUN] = _write_js(st, REPORT_RUN, "knnlmRun(", data)
    _drop_stale_pages(st, len(pages))
    html = resources.files("retriever").joinpath("report_page.html").read_bytes()
    st.write_bytes(REPORT_INDEX, html)                       # last: the report is complete
    sizes[REPORT_INDEX] = len(html)
    total_bytes = sum(sizes.values())
    info = {"path": st.url(REPORT_INDEX), "files": len(sizes), "bytes": total_bytes, "tokens": n,
            "bytes_per_token": round(total_bytes / max(n, 1), 1), "seconds": round(time.perf_counter() - t0, 2)}
    log.debug("report: %s (%d files, %.1f MB for %d scored tokens, %.0f bytes per token) in %.1fs", info["path"],
             info["files"], total_bytes / 1e6, n, info["bytes_per_token"], info["seconds"])
    return info


def _text(sequences: list, target: np.ndarray, tok) -> tuple[list[str], list[tuple]]:
    """(each scored token's piece, [(scored index, the unscored first token's piece, input, index)] at each
    sequence's start, in order); refuses a text that is not the one scored."""
    seq_tokens = [np.asarray(q[2]) for q in sequences]
    got = np.concatenate([q[1:] for q in seq_tokens]) if seq_tokens else np.zeros(0, np.int64)
    if len(got) != len(target) or not np.array_equal(got, target):
        raise EvalError(f"the evaluated text ({len(got)} targets) is not the one the neighbours were found for "
                        f"({len(target)} targets)")
    first = np.cumsum([0] + [len(q) - 1 for q in seq_tokens])[:-1]
    pieces: list[str] = []
    heads = []
    for (inp, idx, _), p, f in zip(sequences, pieces_of_many(tok, seq_tokens), first):
        heads.append((int(f), p[0], int(inp), int(idx)))
        pieces.extend(p[1:])
    return pieces, heads


def _sources(storage: Storage, m: Manifest, nb_id: np.ndarray) -> dict[str, np.ndarray]:
    """{ids (u,) sorted, doc (u,), pos (u,)} of every shown neighbour: their training positions."""
    ids = np.unique(nb_id[nb_id >= 0])
    rows = read_rows(storage, m, ids, ("doc", "pos")) if ids.size else {"doc": ids, "pos": ids}
    return {"ids": ids, "doc": np.asarray(rows["doc"], np.int64), "pos": np.asarray(rows["pos"], np.int64)}


def _page(p: int, a: int, b: int, s: dict, pieces: list[str], heads: list, where: dict, ctx: ContextReader, tok,
          opts: ReportOptions, pool, memo: dict) -> dict:
    """Page p: scored tokens [a, b), their numbers, their neighbours and the training text around them."""
    ids = s["nb_id"][a:b]                                            # (m, show)
    t_i, j_i = np.nonzero(ids >= 0)
    at = np.searchsorted(where["ids"], ids[t_i, j_i])
    doc, pos = where["doc"][at], where["pos"][at]
    after = max(1, opts.context // 3)
    keep = ~ctx.are_removed(doc, ids[t_i, j_i])
    spans, span_of = merge_windows(doc[keep], pos[keep] - opts.context, pos[keep] + after + 1)
    batches = [spans[i:i + 256] for i in range(0, len(spans), 256)]  # (a thread per span: its overhead dominated)
    read = [r for got in pool.map(lambda batch: [ctx.window(*sp) for sp in batch], batches) for r in got]
    texts = pieces_of_many(tok, [r[0] for r in read], memo=memo)      # (tokens, start) of each span → pieces
    span_index = np.full(len(doc), -1, np.int64)
    span_index[keep] = span_of
    nb: list[list] = [[] for _ in range(b - a)]
    dist, weight, value = s["nb_dist"][a:b], s["nb_weight"][a:b], s["nb_value"][a:b]
    for x, (t, j) in enumerate(zip(t_i, j_i)):
        nb[t].append([int(span_index[x]), int(pos[x]), _num(dist[t, j], 6), _num(weight[t, j], 4),
                      int(value[t, j]), int(ids[t, j])])
    span_rows = [[d, start, text, *ctx.source(d)] for (d, _, _), (_, start), text in zip(spans, read, texts)]
    first, end = bisect.bisect_left(heads, (a,)), bisect.bisect_left(heads, (b,))    # the sequences starting here
    return {"page": p, "first": a, "count": b - a, "text": pieces[a:b],
            "heads": [[h[0] - a, *h[1:]] for h in heads[first:end]],
            "target": s["target"][a:b].tolist(), "lm": _nums(s["lm"][a:b]), "knn": _nums(s["knn"][a:b]),
            "mix": _nums(s["mix"][a:b]), "nb": nb, "spans": span_rows}


def _num(x, digits: int = 7):
    """A float for JSON at `digits` significant digits; None for ±inf and NaN."""
    x = float(x)
    return float(f"{x:.{digits}g}") if np.isfinite(x) else None


def _nums(a: np.ndarray, digits: int = 7) -> list:
    return [_num(x, digits) for x in a]


def _listed(t: int, gain: np.ndarray, pieces: list[str]) -> dict:
    """A token of the lists of gains and losses: its index, gain, piece, and the text just before it."""
    return {"t": t, "gain": _num(gain[t], 5), "piece": pieces[t], "before": "".join(pieces[max(0, t - 12):t])[-60:]}


def _valid_curves(tune: dict | None) -> dict | None:
    """The validation curves of `knnlm tune --out`'s grid: ppl vs λ at its chosen T and k, vs k at its λ and T."""
    if not tune or not tune.get("table"):
        return None
    rows, lam, T, k = tune["table"], tune["lambda"], tune["temperature"], tune["k"]
    by_lam = sorted((r["lambda"], r["valid_ppl"]) for r in rows if r["k"] == k and r["temperature"] == T)
    by_k = sorted((r["k"], r["valid_ppl"]) for r in rows if r["lambda"] == lam and r["temperature"] == T)
    return {"lambda": {"x": [x for x, _ in by_lam], "ppl": [y for _, y in by_lam]},
            "k": {"x": [x for x, _ in by_k], "ppl": [y for _, y in by_k]},
            "chosen": {"lambda": lam, "temperature": T, "k": k, "valid_ppl": tune.get("valid_ppl"),
                       "valid_base_ppl": tune.get("valid_base_ppl")}}


def token_counts(storage: Storage, m: Manifest, ctx: ContextReader, vocab: int, limit: int = COUNT_LIMIT
                 ) -> tuple[np.ndarray, int, int]:
    """(occurrences (vocab,) of each token id in the datastore's training tokens, tokens read, tokens in all):
    every token when there are at most `limit`, else `limit` tokens in 256 blocks spread evenly over them,
    the counts scaled to the whole. Removed inputs are left out."""
    files = [(f, int(e.get("num_tokens") or 0)) for f, e in enumerate(ctx.files) if not e.get("removed")]
    total = sum(n for _, n in files)
    counts = np.zeros(vocab, np.float64)
    block = total if total <= limit else limit // 256
    starts = [0] if total <= limit else np.linspace(0, total - block, 256).astype(np.int64).tolist()
    base = np.cumsum([0] + [n for _, n in files])
    read = 0
    for g in starts:                                       # a block may span several files
        lo, hi = g, g + block
        for (f, n), fb in zip(files, base[:-1]):
            a, b = max(lo, fb), min(hi, fb + n)
            for c in range(a, b, 1 << 24):                 # 64 MB reads
                raw = storage.read_range(ctx.tokens_file(f), 4 * (c - fb),
                                         4 * (min(b, c + (1 << 24)) - fb))
                toks = np.frombuffer(raw, "<i4")
                counts += np.bincount(toks[(toks >= 0) & (toks < vocab)], minlength=vocab)[:vocab]
                read += len(toks)
    if read and read < total:
        counts *= total / read
    return counts, read, total


def _write_js(st: Storage, path: str, call: str, data: dict) -> int:
    body = (call + json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + ");\n").encode()
    st.write_bytes(path, body)
    return len(body)


def _drop_stale_pages(st: Storage, pages: int) -> None:
    """Pages of an earlier report in the same folder beyond this one's last (only the report's own files)."""
    for name in st.list(REPORT_DATA_DIR):
        base = name.rsplit("/", 1)[-1]
        if base.startswith("page-") and base.endswith(".js") and base[5:-3].isdigit() and int(base[5:-3]) >= pages:
            st.delete(REPORT_DATA_DIR + base)

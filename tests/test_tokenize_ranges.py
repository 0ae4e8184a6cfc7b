"""Tokenization in byte ranges (builder/corpus_ranges.py): the same tokens, sequences, records and skipped
records as `tokenize_file`'s one pass, on files where a naive cut changes a token; a build whose files are
cut into ranges; peak memory bounded by the chunk, not the file."""
from __future__ import annotations

import io
import json
import logging
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_tokenizer, write_text

from builder import build_tokens
from builder import corpus_ranges as cr
from builder.corpus import MAX_SKIPPED, detect_format, first_skipped, split_wikitext, tokenize_file
from builder.layout import tokens_meta_path, tokens_part_meta_path, tokens_path, tokens_seqs_path
from builder.seqs import TableWriter, parse_rows
from builder.storage import Storage

WORDS = ["the", "quick", "brown", "fox", "über", "naïve", "日本語", "😀x", "a,b", "3,000", "\n", "\n\n", "\n\n\n",
         " ", "  ", "\t", "don't", "Hello"]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("rtok")
    return {False: make_tokenizer(str(root / "plain"), bos=False), True: make_tokenizer(str(root / "bos"), bos=True)}


def _words(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(WORDS) + rng.choice(["", " "]) for _ in range(n))


def text_file(seed: int) -> bytes:
    """Runs of blank lines, "\\n\\n" and multi-byte characters everywhere (so at many cuts), one long line."""
    rng = random.Random(seed)
    return (_words(rng, 300) + "x" * 500 + "\n" + _words(rng, 300) + "\n\n\n\n").encode()


def wiki_file(seed: int) -> bytes:
    rng = random.Random(seed)
    out = [" \n", _words(rng, 5) + "\n"]                                   # a preamble
    for a in range(25):
        out += [f" = Title {a} = \n", " \n"]
        for s in range(rng.randint(0, 3)):
            out.append(f" = = Section {s} = = \n" + _words(rng, rng.randint(1, 40)) + "\n")
        if a == 5:
            out.append(_words(rng, 300) + "\n")                             # an article larger than a range
        if a == 9:
            out.append(" \n \n")
    return "".join(out).encode()


def jsonl_file(seed: int) -> bytes:
    rng = random.Random(seed)
    lines = [b""] * 3 + [b"{oops"] * 2                                      # no usable record in the first bytes
    for i in range(60):
        r = rng.random()
        lines.append(b"" if r < .08 else b'{"text": "ok \xff\xfe"}' if r < .13 else b"{oops" if r < .18 else
                     json.dumps({"text": "  \n "}).encode() if r < .23 else json.dumps({"text": "a"}).encode()
                     if r < .28 else json.dumps({"x": 1}).encode() if r < .31 else
                     json.dumps({"text": _words(rng, 300 if i == 20 else rng.randint(1, 30))}).encode())
    return b"\n".join(lines) + b"\n"


def ranged(data: bytes, uri: str, mode: str, tok, range_bytes: int = 200, chunk_bytes: int | None = None):
    """(file meta, tokens, sequence table bytes) of `data` tokenized in ranges, every range on its own Source
    (as separate tasks), the parts' tables joined as build_tokens.finish_ranged joins them."""
    read = lambda s, e: data[s:e]
    fmt = detect_format(uri, "auto")
    bounds, ranges = cr.chunk_grid(uri, len(data), fmt, mode, range_bytes, chunk_bytes, read)
    parts, arrays, tables = [], [], []
    for j0, j1 in ranges:
        out, seqs = io.BytesIO(), io.BytesIO()
        parts.append(cr.tokenize_range(cr.Source(uri, len(data), fmt, tok, read=read), mode, bounds, j0, j1, out,
                                       TableWriter(seqs)))
        arrays.append(np.frombuffer(out.getvalue(), "<i4"))
        tables.append([parse_rows(seqs.getvalue())])
        assert (parts[-1]["num_sequences"], len(parts[-1]["skipped"])) == (len(tables[-1][0]), min(
            parts[-1]["num_skipped"], MAX_SKIPPED))
    meta, use = cr.join_parts(parts, uri, fmt, mode)
    table = io.BytesIO()
    build_tokens.join_tables(parts, tables, mode, meta, TableWriter(table))
    return meta, (np.concatenate([arrays[k] for k in use]) if use else np.zeros(0, np.int32)), table.getvalue()


def assert_same(data: bytes, uri: str, mode: str, tok, **kw) -> dict:
    one = tokenize_file(data, uri, "auto", mode, tok)
    meta, tokens, table = ranged(data, uri, mode, tok, **kw)
    want = one.meta()
    for k in ("format", "num_records", "num_tokens", "num_sequences", "num_targets", "num_skipped", "skipped"):
        assert meta[k] == want[k], (uri, mode, k)
    assert tokens.tolist() == one.tokens.tolist(), (uri, mode)
    assert table == one.table(), (uri, mode)
    return meta


def test_plan_ranges_cuts_at_record_boundaries():
    wiki = wiki_file(0)
    read = lambda s, e: wiki[s:e]
    cuts = cr.plan_ranges("/d/w.tokens", len(wiki), "auto", "document", 200, read)
    assert len(cuts) > 5 and cuts[0] == 0 and cuts[-1] == len(wiki)
    titles = {0} | {sum(len(a) for _, a in split_wikitext(wiki)[:k]) for k in range(1, 40)}
    assert set(cuts[1:-1]) <= titles                      # article titles only, never a section heading
    assert all(b - a >= 200 for a, b in zip(cuts[:-2], cuts[1:-1]))
    for uri, mode in (("/d/w.tokens", "stream"), ("/d/a.txt", "stream"), ("/d/j.jsonl", "document")):
        cuts = cr.plan_ranges(uri, len(wiki), "auto", mode, 200, read)
        assert len(cuts) > 10 and all(wiki[c - 1:c] == b"\n" for c in cuts[1:-1])
    assert cr.plan_ranges("/d/a.txt", len(wiki), "auto", "document", 200, read) == [0, len(wiki)]
    assert cr.plan_ranges("/d/a.txt", 100, "auto", "stream", 200, read) == [0, 100]
    one_line = b"x" * 1000
    assert cr.plan_ranges("/d/a.txt", 1000, "auto", "stream", 200, lambda s, e: one_line[s:e]) == [0, 1000]


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("mode", ["stream", "document"])
def test_ranges_give_the_one_pass_tokens(toks, bos, mode, monkeypatch):
    """200-byte ranges (and 100-byte chunks inside them) with 64 bytes of context: many cuts, each next to a
    "\\n\\n", a word or a multi-byte character in some file."""
    monkeypatch.setattr(cr, "MARGIN_BYTES", 64)
    tok = toks[bos]
    for seed in range(3):
        for data, uri in ((text_file(seed), "/d/a.txt"), (wiki_file(seed), "/d/w.tokens"), (jsonl_file(seed), "/d/j.jsonl")):
            meta = assert_same(data, uri, mode, tok)
            if uri.endswith(".txt") and mode == "document":
                assert meta["ranges"] == 1                   # one record: never cut
            else:
                assert meta["ranges"] > 5
            assert_same(data, uri, mode, tok, range_bytes=300, chunk_bytes=100)


def test_ranges_edge_files(toks):
    """Nothing usable, a bad byte late in the file, blank runs: the same skipped records as one pass; more
    skipped records than a meta lists (MAX_SKIPPED), in the file and in one range (over several chunks)."""
    many_skipped = b'{"text": ""}\n{"x": 1}\n{"text": "a b c"}\n' * 120
    for mode in ("stream", "document"):
        meta = assert_same(many_skipped, "/d/s.jsonl", mode, toks[False], range_bytes=4000, chunk_bytes=1000)
        assert meta["num_skipped"] == 240 and len(meta["skipped"]) == MAX_SKIPPED
    for bos in (False, True):
        for data, uri in ((b" \n" * 300, "/d/e.txt"), (b"ok\n" * 150 + b"\xff\n" + b"ok\n" * 150, "/d/e.txt"),
                          (b"\n" * 500, "/d/e.jsonl"), (b"\n" * 400 + b'{"text": "a b"}\n', "/d/e.jsonl"),
                          (b'{"text": "a"}\n' + b"\n" * 400, "/d/e.jsonl"), (b"x\n" + b" \n" * 300, "/d/e.tokens"),
                          (b"\n\n" * 300, "/d/e.tokens"), (many_skipped, "/d/s.jsonl")):
            for mode in ("stream", "document"):
                assert_same(data, uri, mode, toks[bos])


def test_no_agreed_cut_widens_the_context(toks, monkeypatch, caplog):
    """With 8 bytes of context a cut is rarely certain: the margin grows (and says so), tokens stay exact."""
    monkeypatch.setattr(cr, "MARGIN_BYTES", 8)
    with caplog.at_level(logging.INFO, logger="builder.corpus_ranges"):
        assert_same(text_file(7), "/d/a.txt", "stream", toks[True])
    assert "widening the context" in caplog.text


def test_tokenize_input_in_ranges_writes_the_one_pass_files(toks, tmp_path, monkeypatch):
    """The build's task on a local file forced into ranges: tokens/<i>.bin byte-identical, the meta equal but
    for "ranges"; a rerun keeps finished parts and redoes only a missing one."""
    tok_path = str(tmp_path / "tok")
    toks[True].save_pretrained(tok_path)
    data = wiki_file(3)
    src = write_text(tmp_path / "in" / "w.tokens", data)
    one = Storage.from_uri(str(tmp_path / "one"))
    m1 = build_tokens.tokenize_input(0, src, "auto", "stream", "text", tok_path, one.uri)
    assert m1["ranges"] == 1
    monkeypatch.setattr(cr, "RANGE_BYTES", 400)
    monkeypatch.setattr(cr, "CHUNK_BYTES", 150)
    many = Storage.from_uri(str(tmp_path / "many"))
    m2 = build_tokens.tokenize_input(0, src, "auto", "stream", "text", tok_path, many.uri)
    assert m2["ranges"] > 3 and list(m2) == list(m1)
    assert {k: v for k, v in m2.items() if k != "ranges"} == {k: v for k, v in m1.items() if k != "ranges"}
    for p in (tokens_path(0), tokens_seqs_path(0)):
        assert many.read_bytes(p) == one.read_bytes(p)
    assert many.list("tokens/") == [tokens_path(0), tokens_meta_path(0), tokens_seqs_path(0)]  # the parts are gone
    # resume: parts 0 and 2 finished earlier (part 0 made up, to prove it is kept), 1 missing
    bounds, ranges = cr.chunk_grid(src, len(data), "wikitext", "stream")
    for k in (0, 2):
        build_tokens.tokenize_part(1, k, src, "auto", "stream", "text", tok_path, many.uri, bounds, *ranges[k])
    fake = json.loads(many.read_text(tokens_part_meta_path(1, 0)))
    fake["skipped"] = [{"record": 0, "where": "x", "reason": "kept"}]
    many.write_text(tokens_part_meta_path(1, 0), json.dumps(fake))
    parts = [build_tokens.tokenize_part(1, k, src, "auto", "stream", "text", tok_path, many.uri, bounds, *r)
             for k, r in enumerate(ranges)]
    assert parts[0]["skipped"][0]["reason"] == "kept" and parts[1]["num_tokens"] > 0
    # a file of one range but many chunks: one part, a chunk at a time, never the one pass (~160 B per byte)
    monkeypatch.setattr(cr, "RANGE_BYTES", 1 << 30)
    monkeypatch.setattr(build_tokens, "tokenize_file", None)
    single = Storage.from_uri(str(tmp_path / "single"))
    m3 = build_tokens.tokenize_input(0, src, "auto", "stream", "text", tok_path, single.uri)
    assert m3 == m1, {k: (m3.get(k), m1.get(k)) for k in set(m1) | set(m3) if m1.get(k) != m3.get(k)}
    assert single.list("tokens/") == [tokens_path(0), tokens_meta_path(0), tokens_seqs_path(0)]
    for p in (tokens_path(0), tokens_seqs_path(0)):
        assert single.read_bytes(p) == one.read_bytes(p)


@pytest.mark.s3
def test_ranged_tokens_on_s3(toks, tmp_path, s3_bucket, monkeypatch):
    """Input and datastore on S3: ranged reads of the input, parts joined by Storage.compose."""
    import boto3
    tok_path = str(tmp_path / "tok")
    toks[False].save_pretrained(tok_path)
    data = jsonl_file(4)
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="in/c.jsonl", Body=data)
    monkeypatch.setattr(cr, "RANGE_BYTES", 500)
    monkeypatch.setattr(cr, "CHUNK_BYTES", 200)
    st = Storage.from_uri(f"s3://{s3_bucket}/ds")
    meta = build_tokens.tokenize_input(0, f"s3://{s3_bucket}/in/c.jsonl", "auto", "stream", "text", tok_path, st.uri)
    one = tokenize_file(data, f"s3://{s3_bucket}/in/c.jsonl", "auto", "stream", toks[False])
    assert meta["ranges"] > 3 and meta["skipped"] == first_skipped(one.skipped) and meta["sha256"] == one.sha256
    assert meta["num_skipped"] == len(one.skipped) and st.read_bytes(tokens_seqs_path(0)) == one.table()
    assert np.frombuffer(st.read_bytes(tokens_path(0)), "<i4").tolist() == one.tokens.tolist()


_PEAK = r"""
import sys, tempfile
from builder import build_tokens
from builder.corpus import tokenize_file
from common import peak_rss_mb       # VmHWM, not ru_maxrss: that one counts this test process's RSS too
path, tok_path, how = sys.argv[1:4]
with tempfile.TemporaryDirectory() as out:
    if how == "one pass":            # the tokenization before ranges: the whole file's text and tokens at once
        tokenize_file(open(path, "rb").read(), path, "text", "stream", build_tokens._tokenizer(tok_path))
    else:                            # the build's task: one range (the file is smaller than RANGE_BYTES)
        build_tokens.tokenize_input(0, path, "text", "stream", "text", tok_path, out)
print(peak_rss_mb())
"""


def _child(script: str, *args: str) -> str:
    """stdout of `script` run in a fresh Python (its memory its own), with the repository and bench/ importable."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=False,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join((repo, os.path.join(repo, "bench")))},
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def _peak_mb(path: str, tok_path: str, how: str) -> float:
    return float(_child(_PEAK, path, tok_path, how).split()[-1])


@pytest.mark.slow
def test_peak_memory_is_bounded_by_the_chunk_not_the_file(shared_model, wikitext_splits, tmp_path):
    """Stream mode, the real GPT-2 tokenizer on WikiText-2 text, the build's task (tokenize_input, one range of
    256 KB chunks): a 15 MB file peaks within 1.5x of a 1.5 MB one (353 and 358 MB measured); the one pass
    grows with the file (0.5 MB against 3 MB: 375 and 763 MB; a 64 MB file, one range, would need ~10 GB)."""
    with open(os.path.join(wikitext_splits, "train.txt"), "rb") as fh:
        block = fh.read()
    files = {n: write_text(tmp_path / f"{n}.txt", (block * 16)[:int(n * (1 << 20))]) for n in (0.5, 1.5, 3, 15)}
    task_small, task_big = _peak_mb(files[1.5], shared_model, "task"), _peak_mb(files[15], shared_model, "task")
    one_small, one_big = _peak_mb(files[0.5], shared_model, "one pass"), _peak_mb(files[3], shared_model, "one pass")
    print(f"peak RSS MB: task 1.5MB {task_small:.0f}, 15MB {task_big:.0f}; "
          f"one pass 0.5MB {one_small:.0f}, 3MB {one_big:.0f}")
    assert task_big <= 1.5 * task_small
    assert one_big >= 1.5 * one_small and one_big >= 1.5 * task_small


@pytest.mark.slow
@pytest.mark.parametrize("mode,fmt", [("stream", "text"), ("document", "wikitext")])
def test_shared_wikitext2_train_a_chunk_at_a_time_equals_one_pass(shared_model, wikitext_splits, tmp_path, mode, fmt):
    """The build's task on the shared WikiText-2 train split with the shared model's GPT-2 tokenizer: one range
    (the file is under RANGE_BYTES) of 256 KB chunks, as every file above one chunk is tokenized since
    2026-12-02, gives the tokens, sequence table and counts of the one pass that tokenized it before."""
    path = os.path.join(wikitext_splits, "train.txt")
    with open(path, "rb") as fh:
        data = fh.read()
    assert cr.CHUNK_BYTES < len(data) <= cr.RANGE_BYTES
    one = tokenize_file(data, path, fmt, mode, build_tokens._tokenizer(shared_model))
    st = Storage.from_uri(str(tmp_path / "out"))
    meta = build_tokens.tokenize_input(0, path, fmt, mode, "text", shared_model, st.uri)
    assert meta["ranges"] == 1 and st.list("tokens/") == [tokens_path(0), tokens_meta_path(0), tokens_seqs_path(0)]
    assert st.read_bytes(tokens_path(0)) == one.tokens.astype("<i4").tobytes()
    assert st.read_bytes(tokens_seqs_path(0)) == one.table()
    assert {k: v for k, v in meta.items() if k not in ("tokens", "ranges")} == one.meta()
    assert meta["num_tokens"] > 400_000


_POOLED = r"""
import os, sys, tempfile
from builder import build_tokens
from builder import corpus_ranges as cr
path, tok_path = sys.argv[1:3]
cr.RANGE_BYTES, cr.CHUNK_BYTES = 64 << 10, 16 << 10
bounds, ranges = cr.chunk_grid(path, os.path.getsize(path), "text", "stream")
rss = []
with tempfile.TemporaryDirectory() as out:
    for k in range(len(ranges)):           # as a pooled Ray worker runs them: one task after another
        build_tokens.tokenize_part(0, k, path, "text", "stream", "text", tok_path, out, bounds, *ranges[k])
        rss.append(next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("RssAnon:")) / 1024)
print(len(ranges), rss[4], rss[-1])
"""


def test_a_worker_running_many_range_tasks_stays_flat(shared_model, wikitext_splits, tmp_path):
    """Range tasks one after another in one process (a pooled Ray worker) load the tokenizer once: each load
    kept ~4 MB (a 2 GB file's 30 tasks took a worker from 442 to 552 MB)."""
    with open(os.path.join(wikitext_splits, "train.txt"), "rb") as fh:
        src = write_text(tmp_path / "t.txt", fh.read()[:2 << 20])
    out = _child(_POOLED, src, shared_model)
    n, after_5, last = out.split()
    assert int(n) >= 30 and float(last) - float(after_5) < 25, out


@pytest.fixture(scope="module")
def one_range_build(tiny_models, tmp_path_factory, ray_cluster):
    from test_build import small_cfg

    from builder.build import build
    root = tmp_path_factory.mktemp("ranges-build")
    f = write_text(root / "in" / "w.tokens", wiki_file(5)[:3000])
    build(small_cfg([f], tiny_models["llama"], root / "one", mode="stream"))
    return f, root / "one"


@pytest.mark.parametrize("where", ["driver", pytest.param("ray", marks=pytest.mark.slow)])
def test_build_in_ranges_gives_the_same_datastore(one_range_build, tiny_models, tmp_path, where, monkeypatch):
    """A build whose input is cut into ranges, on the driver or as Ray tasks (parts, hash, join): key shards
    and tokens files byte-identical to the build of the same file in one range (stream mode, BOS)."""
    from test_build import small_cfg

    from builder.build import build
    f, one_root = one_range_build
    monkeypatch.setattr(cr, "RANGE_BYTES", 400 if where == "driver" else 1000)
    monkeypatch.setattr(cr, "CHUNK_BYTES", 150)
    if where == "ray":
        monkeypatch.setattr(build_tokens, "DRIVER_TOKENIZE_BYTES", 0)
    build(small_cfg([f], tiny_models["llama"], tmp_path / "ds", mode="stream"))
    one, st = Storage.from_uri(str(one_root)), Storage.from_uri(str(tmp_path / "ds"))
    files = [p for p in one.list() if p.startswith(("shards/", "tokens/")) and
             p.endswith((".parquet", ".bin", ".seqs"))]
    assert json.loads(st.read_text(tokens_meta_path(0)))["ranges"] >= 3
    assert len(files) > 2 and st.list("shards/") == one.list("shards/")
    assert st.list("tokens/") == one.list("tokens/")                   # no part left
    for p in files:
        assert st.read_bytes(p) == one.read_bytes(p), p

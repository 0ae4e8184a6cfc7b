"""Pure corpus functions: window planning, unit planning, readers and tokenization (no Ray)."""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_tokenizer, write_text

from builder.corpus import (
    STREAM_RECORD_SEPARATOR,
    InputError,
    count_targets,
    detect_format,
    plan_windows,
    read_records,
    split_wikitext,
    tokenize_file,
)
from builder.seqs import parse_rows
from builder.unit import Segment, Unit, plan_units

# ---------------------------------------------------------------------------------------------
# plan_windows


def reference_windows(n: int, window: int, min_context: int) -> list[tuple[int, int, int, int]]:
    """Independent plan: target t belongs to the smallest k with t < k*stride + window."""
    stride = window - min_context
    targets: dict[int, list[int]] = {}
    for t in range(1, n):
        k = 0
        while not t < k * stride + window:
            k += 1
        targets.setdefault(k, []).append(t)
    if not targets:  # n == 1: a single window over the lone token, no targets
        return [(0, min(window, n), 1, 1)]
    out = []
    for k in range(max(targets) + 1):
        ts = targets[k]  # every window up to the last one owns at least one target
        s = k * stride
        out.append((s, min(s + window, n), ts[0], ts[-1] + 1))
    return out


def test_plan_windows_exhaustive():
    checked = 0
    for n in range(1, 61):
        for window in range(2, 13):
            for mc in range(1, window):
                wins = plan_windows(n, window, mc)
                stride = window - mc
                ctx = f"n={n} W={window} mc={mc}: {wins}"
                assert wins, ctx
                assert wins[0][0] == 0 and wins[0][1] == min(window, n), ctx
                assert wins[-1][1] == n, ctx
                for k, (s, e, a, b) in enumerate(wins):
                    assert s == k * stride, ctx
                    assert e == min(s + window, n), ctx
                    assert 0 <= s < e <= n, ctx
                # (first_target, end_target) ranges partition [1, n) in order
                seen = []
                for (s, e, a, b) in wins:
                    assert a <= b, ctx
                    seen.extend(range(a, b))
                    for t in range(a, b):
                        assert s < t < e, (t, ctx)                      # not the window's first position
                        assert t - s >= min(mc, t), (t, ctx)            # key position sees enough context
                assert seen == list(range(1, n)), ctx
                # only n == 1 has a window without targets
                assert all(b > a for (_, _, a, b) in wins) or n == 1, ctx
                assert wins == reference_windows(n, window, mc), ctx
                checked += 1
    assert checked == 60 * sum(w - 1 for w in range(2, 13))


@pytest.mark.parametrize("window,mc", [(4, 0), (4, 4), (4, 5), (1, 1), (3, -1)])
def test_plan_windows_rejects_bad_context(window, mc):
    with pytest.raises(ValueError, match="min_context"):
        plan_windows(10, window, mc)


def test_plan_windows_known_values():
    # W=4, mc=1 -> stride 3: windows [0,4) [3,7) [6,10)
    assert plan_windows(10, 4, 1) == [(0, 4, 1, 4), (3, 7, 4, 7), (6, 10, 7, 10)]
    assert plan_windows(5, 8, 4) == [(0, 5, 1, 5)]
    assert plan_windows(1, 8, 4) == [(0, 1, 1, 1)]


# ---------------------------------------------------------------------------------------------
# plan_units


def check_units(files, window, mc, unit_tokens):
    units = plan_units(files, window, mc, unit_tokens)
    assert [u.id for u in units] == list(range(len(units)))
    # files in corpus order, never crossed
    assert [u.file for u in units] == sorted(u.file for u in units)
    for u in units:
        assert 0 <= u.file < len(files)
        assert u.num_targets >= 1, u
        assert u.segments
    covered = []  # (file, seq, t) in the order the units hold them
    for u in units:
        lengths, records = files[u.file]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(int).tolist()
        for seg in u.segments:
            assert isinstance(seg, Segment)
            n = lengths[seg.seq]
            assert seg.length == n and seg.record == records[seg.seq], (seg, u)
            assert seg.offset == offsets[seg.seq], (seg, offsets)
            wins = plan_windows(n, window, mc)
            assert seg.t0 in {a for (_, _, a, b) in wins if b > a}, (seg, wins)
            assert seg.t1 in {b for (_, _, a, b) in wins if b > a}, (seg, wins)
            assert 1 <= seg.t0 < seg.t1 <= n, seg
            covered.extend((u.file, seg.seq, t) for t in range(seg.t0, seg.t1))
        # a unit closes as soon as it reaches unit_tokens: without its last window it is short
        last = u.segments[-1]
        last_win = [(a, b) for (_, _, a, b) in plan_windows(last.length, window, mc) if b == last.t1 and b > a]
        assert len(last_win) == 1
        assert u.num_targets - (last_win[0][1] - last_win[0][0]) < unit_tokens, u
    expected = [(fi, si, t) for fi, (lengths, _) in enumerate(files) for si, n in enumerate(lengths)
                for t in range(1, n)]
    assert covered == expected
    assert len(covered) == sum(count_targets(lengths) for lengths, _ in files)
    # all units but the last of each file hold at least unit_tokens targets
    for u, nxt in zip(units, units[1:]):
        if nxt.file == u.file:
            assert u.num_targets >= unit_tokens, (u, unit_tokens)
    # deterministic, and the dict round trip used to ship units to workers is lossless
    again = plan_units([(list(a), list(b)) for a, b in files], window, mc, unit_tokens)
    assert again == units
    assert [Unit.from_dict(json.loads(json.dumps(u.to_dict()))) for u in units] == units
    return units


def test_plan_units_random():
    rng = np.random.default_rng(1234)
    n_units = 0
    for _ in range(300):
        window = int(rng.integers(2, 20))
        mc = int(rng.integers(1, window))
        unit_tokens = int(rng.choice([1, 2, 5, 17, 50, 200, 10_000]))
        files = []
        for _ in range(int(rng.integers(1, 5))):
            n_seq = int(rng.integers(0, 8))
            kind = rng.integers(3)
            if kind == 0:
                lengths = rng.integers(1, 5, n_seq)
            elif kind == 1:
                lengths = rng.integers(1, 3 * window, n_seq)
            else:
                lengths = rng.integers(1, 300, n_seq)
            records = sorted(rng.choice(1000, n_seq, replace=False).tolist())
            files.append(([int(x) for x in lengths], records))
        n_units += len(check_units(files, window, mc, unit_tokens))
    assert n_units > 300  # the random configurations do exercise splitting


def test_plan_units_length_one_and_empty_files():
    files = [([1, 1, 1], [0, 1, 2]), ([], []), ([1, 5, 1], [0, 3, 4]), ([], [])]
    units = check_units(files, 4, 2, 10)
    assert len(units) == 1 and units[0].file == 2
    assert units[0].segments == (Segment(seq=1, offset=1, length=5, t0=1, t1=5, record=3),)
    assert plan_units([([1], [0]), ([], [])], 4, 2, 3) == []
    assert plan_units([], 4, 2, 3) == []
    # split inside the 5-token sequence at the window boundary 4 (window [0,4) holds 3 targets)
    units = check_units(files, 4, 2, 3)
    assert [(u.file, u.segments) for u in units] == [
        (2, (Segment(seq=1, offset=1, length=5, t0=1, t1=4, record=3),)),
        (2, (Segment(seq=1, offset=1, length=5, t0=4, t1=5, record=3),))]


def test_plan_units_long_sequence_split_into_many_units():
    n, window, mc, ut = 10_000, 16, 8, 100
    units = check_units([([n], [7])], window, mc, ut)
    assert len(units) > 50
    for u in units:
        assert len(u.segments) == 1 and u.segments[0].record == 7
    # consecutive units continue exactly where the previous ended
    assert [u.segments[0].t0 for u in units[1:]] == [u.segments[0].t1 for u in units[:-1]]
    assert units[0].segments[0].t0 == 1 and units[-1].segments[0].t1 == n


def test_plan_units_unit_tokens_one_is_one_window_per_unit():
    files = [([9, 1, 4], [0, 1, 2]), ([30], [0])]
    units = check_units(files, 6, 2, 1)
    got = [(u.file, s.seq, s.t0, s.t1) for u in units for s in u.segments]
    want = [(fi, si, a, b) for fi, (lengths, _) in enumerate(files) for si, n in enumerate(lengths)
            for (_, _, a, b) in plan_windows(n, 6, 2) if b > a]
    assert got == want
    assert all(len(u.segments) == 1 for u in units)


def test_plan_units_packs_many_short_sequences():
    files = [([3] * 10, list(range(10)))]
    units = check_units(files, 8, 4, 5)  # 2 targets each: units of 3 sequences (6 targets), last of 1
    assert [len(u.segments) for u in units] == [3, 3, 3, 1]
    assert [u.num_targets for u in units] == [6, 6, 6, 2]


# ---------------------------------------------------------------------------------------------
# readers


def test_detect_format():
    assert detect_format("/d/a.jsonl", "auto") == "jsonl"
    assert detect_format("/d/a.JSON", "auto") == "jsonl"
    assert detect_format("s3://b/x/a.ndjson", "auto") == "jsonl"
    assert detect_format("/d/a.parquet", "auto") == "parquet"
    assert detect_format("/d/a.pq", "auto") == "parquet"
    assert detect_format("/d/wiki.train.tokens", "auto") == "wikitext"
    assert detect_format("/d/a.txt", "auto") == "text"
    assert detect_format("/d/README", "auto") == "text"
    assert detect_format("/d/a.jsonl", "text") == "text"  # explicit --format wins
    assert detect_format("/d/a.txt.gz", "wikitext") == "wikitext"
    for uri in ("/d/a.jsonl.gz", "s3://b/a.txt.zst"):
        with pytest.raises(InputError, match="compressed") as ei:
            detect_format(uri, "auto")
        assert uri in str(ei.value)


WIKI = (b" \n"
        b" = Valkyria Chronicles III = \n"
        b" \n"
        b" Senjou no Valkyria 3 is a game . \n"
        b" = = Gameplay = = \n"
        b" The game is tactical . \n"
        b" = = = Sub = = = \n"
        b" more text \n"
        b" = Tower Building = \n"
        b" The tower is tall . \n"
        b" = A = \n"
        b" short\n")


def test_split_wikitext_titles_not_headings():
    arts = split_wikitext(WIKI)
    assert [line for line, _ in arts] == [2, 9, 11]
    assert arts[0][1].startswith(b" = Valkyria Chronicles III = \n")
    assert b" = = Gameplay = = \n" in arts[0][1] and b" more text \n" in arts[0][1]
    assert arts[1][1] == b" = Tower Building = \n The tower is tall . \n"
    assert arts[2][1] == b" = A = \n short\n"
    assert b"".join(a for _, a in arts) == WIKI[len(b" \n"):]  # only the blank preamble is dropped


def test_split_wikitext_preamble_and_roundtrip():
    data = b"some preamble\n\n = First = \n body 1\n = Second = \r\n body 2\r\n = = h = = \n tail"
    arts = split_wikitext(data)
    assert [line for line, _ in arts] == [1, 3, 5]
    assert arts[0][1] == b"some preamble\n\n"
    assert b"".join(a for _, a in arts) == data
    assert split_wikitext(b"") == []
    assert split_wikitext(b"\n \n") == []
    assert split_wikitext(b"no titles at all\n = = h = = \n") == [(1, b"no titles at all\n = = h = = \n")]


def test_read_records_text_and_wikitext():
    [r] = read_records("héllo\nworld".encode(), "/d/a.txt", "text")
    assert (r.text, r.where, r.skip) == ("héllo\nworld", "file", None)
    [r] = read_records(b"ok \xff\xfe bad", "/d/a.txt", "text")
    assert r.text is None and "UTF-8" in r.skip and "byte 3" in r.skip
    recs = read_records(WIKI, "/d/w.tokens", "wikitext")
    assert [r.where for r in recs] == ["article 0 (line 2)", "article 1 (line 9)", "article 2 (line 11)"]
    assert recs[1].text == " = Tower Building = \n The tower is tall . \n"
    assert all(r.skip is None for r in recs)
    bad = WIKI.replace(b"tall", b"t\xc3all")
    recs = read_records(bad, "/d/w.tokens", "wikitext")
    assert recs[1].text is None and "line 9" in recs[1].skip and "UTF-8" in recs[1].skip
    assert recs[0].skip is None and recs[2].skip is None


def test_read_records_jsonl():
    lines = [
        json.dumps({"text": "first doc", "id": 1}).encode(),   # line 1
        b"",                                                    # line 2: blank, not a record
        b"   ",                                                 # line 3: blank
        b'{"text": "unterminated',                              # line 4: invalid JSON
        json.dumps({"body": "x"}).encode(),                     # line 5: missing field
        b'{"text": "caf\xe9"}',                                 # line 6: not UTF-8
        json.dumps({"text": 42}).encode(),                      # line 7: not a string
        json.dumps(["text", "x"]).encode(),                     # line 8: not an object
        json.dumps({"text": ""}).encode(),                      # line 9: empty text is still a record
        json.dumps({"text": "last"}).encode() + b"\r",          # line 10: CRLF
    ]
    data = b"\n".join(lines) + b"\n"
    recs = read_records(data, "/d/a.jsonl", "jsonl")
    assert [r.where for r in recs] == [f"line {i}" for i in (1, 4, 5, 6, 7, 8, 9, 10)]
    assert [r.text for r in recs] == ["first doc", None, None, None, None, None, "", "last"]
    skips = [r.skip for r in recs]
    assert skips[0] is None and skips[6] is None and skips[7] is None
    assert "invalid JSON" in skips[1]
    assert "'text'" in skips[2] and "--text-field" in skips[2]
    assert "UTF-8" in skips[3] and "line 6" in skips[3]
    assert "'text'" in skips[4] and "'text'" in skips[5]
    # another field name
    recs = read_records(data, "/d/a.jsonl", "jsonl", text_field="body")
    assert recs[2].text == "x" and recs[0].text is None and "'body'" in recs[0].skip


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def test_read_records_parquet():
    data = _parquet(pa.table({"id": [1, 2, 3], "text": ["a b c", None, "d"]}))
    recs = read_records(data, "/d/a.parquet", "parquet")
    assert [(r.text, r.where, r.skip) for r in recs] == [("a b c", "row 0", None), (None, "row 1", "null text"),
                                                         ("d", "row 2", None)]
    with pytest.raises(InputError) as ei:
        read_records(data, "/d/a.parquet", "parquet", text_field="content")
    msg = str(ei.value)
    assert "/d/a.parquet" in msg and "'content'" in msg and "--text-field" in msg and "id, text" in msg
    with pytest.raises(InputError) as ei:
        read_records(data, "/d/a.parquet", "parquet", text_field="id")
    assert "/d/a.parquet" in str(ei.value) and "--text-field" in str(ei.value)
    with pytest.raises(InputError) as ei:
        read_records(b"definitely not parquet", "/d/b.parquet", "parquet")
    assert "/d/b.parquet" in str(ei.value) and "--format" in str(ei.value)
    big = _parquet(pa.table({"text": pa.array(["x"] * 3, type=pa.large_string())}))
    assert [r.text for r in read_records(big, "/d/c.parquet", "parquet")] == ["x"] * 3


def test_read_records_unknown_format():
    with pytest.raises(InputError, match="--format"):
        read_records(b"x", "/d/a", "csv")


# ---------------------------------------------------------------------------------------------
# tokenize_file


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {False: make_tokenizer(str(root / "plain"), bos=False), True: make_tokenizer(str(root / "bos"), bos=True)}


def ids(tok, text):
    return list(tok(text)["input_ids"])


DOCS = [
    ("good", "The quick brown fox jumps over the lazy dog."),
    ("empty", ""),
    ("blank", "  \n\t "),
    ("good", "A kNN-LM interpolates a language model.\nSecond line."),
    ("one", "a"),  # one token: dropped without a BOS, kept with one
    ("good", "Tokens, keys and values."),
]


def _jsonl_bytes(with_bad: bool) -> bytes:
    lines = [json.dumps({"text": t}).encode() for _, t in DOCS]
    if with_bad:
        lines.insert(2, b'{"text": "\xff\xfe"}')   # record 2: not UTF-8
        lines.insert(4, b"{oops")                  # record 4: invalid JSON
    return b"\n".join(lines) + b"\n"


@pytest.mark.parametrize("bos", [False, True])
def test_tokenize_file_document_mode(toks, bos):
    tok = toks[bos]
    data = _jsonl_bytes(with_bad=True)
    # records: 0 good, 1 empty, 2 bad utf-8, 3 blank, 4 invalid json, 5 good, 6 one, 7 good
    tf = tokenize_file(data, "/d/c.jsonl", "auto", "document", tok)
    assert tf.format == "jsonl" and tf.num_records == 8
    texts = {0: DOCS[0][1], 5: DOCS[3][1], 6: DOCS[4][1], 7: DOCS[5][1]}
    kept = [0, 5, 6, 7] if bos else [0, 5, 7]
    assert tf.seq_records == kept
    want = [ids(tok, texts[i]) for i in kept]
    assert tf.seq_lengths == [len(w) for w in want]
    assert tf.tokens.dtype == np.int32
    assert tf.tokens.tolist() == [t for w in want for t in w]
    bos_id = tok.convert_tokens_to_ids("<s>")
    assert all((w[0] == bos_id) == bos for w in want)
    skipped = {s["record"]: s for s in tf.skipped}
    assert [s["record"] for s in tf.skipped] == sorted(skipped)
    assert set(skipped) == ({1, 2, 3, 4} if bos else {1, 2, 3, 4, 6})
    assert skipped[1]["reason"] == "empty document" and skipped[1]["where"] == "line 2"
    assert skipped[3]["reason"] == "empty document" and skipped[3]["where"] == "line 4"
    assert "UTF-8" in skipped[2]["reason"] and skipped[2]["where"] == "line 3"
    assert "invalid JSON" in skipped[4]["reason"] and skipped[4]["where"] == "line 5"
    if not bos:
        assert skipped[6]["reason"] == "fewer than 2 tokens (1)" and skipped[6]["where"] == "line 7"
    assert tf.sha256 == "sha256:" + hashlib.sha256(data).hexdigest() and tf.bytes == len(data)
    meta = tf.meta()
    assert meta["num_tokens"] == len(tf.tokens) and meta["num_sequences"] == len(kept)
    assert meta["num_skipped"] == len(tf.skipped) and meta["skipped"] == tf.skipped
    rows = parse_rows(tf.table())              # the sequence table: (offset, length, record) per sequence
    assert rows[:, 2].tolist() == kept and rows[:, 1].tolist() == tf.seq_lengths
    assert rows[:, 0].tolist() == np.cumsum([0] + tf.seq_lengths)[:-1].tolist()
    assert meta["num_targets"] == count_targets(tf.seq_lengths)


def test_tokenize_file_text_document_mode(toks):
    tok = toks[False]
    text = "The quick brown fox.\n\nA second paragraph stays in the same document.\n"
    tf = tokenize_file(text.encode(), "/d/a.txt", "auto", "document", tok)
    assert tf.format == "text" and tf.num_records == 1 and tf.seq_records == [0] and tf.skipped == []
    assert tf.tokens.tolist() == ids(tok, text)
    for data, reason in ((b"", "empty document"), (b"   \n\n", "empty document"), (b"ok \xff", "UTF-8"),
                         (b"a", "fewer than 2 tokens")):
        tf = tokenize_file(data, "/d/b.txt", "auto", "document", tok)
        assert tf.seq_lengths == [] and tf.tokens.size == 0 and tf.seq_records == []
        assert len(tf.skipped) == 1 and tf.skipped[0]["record"] == 0 and reason in tf.skipped[0]["reason"]


def test_tokenize_file_wikitext_document_mode(toks):
    tok = toks[True]
    tf = tokenize_file(WIKI, "/d/wiki.train.tokens", "auto", "document", tok)
    assert tf.format == "wikitext" and tf.num_records == 3 and tf.seq_records == [0, 1, 2]
    arts = [a.decode() for _, a in split_wikitext(WIKI)]
    assert tf.tokens.tolist() == [t for a in arts for t in ids(tok, a)]


@pytest.mark.parametrize("bos", [False, True])
def test_tokenize_file_stream_mode(toks, bos):
    tok = toks[bos]
    # text and wikitext: the whole decoded file, byte for byte (preamble included)
    for uri in ("/d/wiki.valid.tokens", "/d/a.txt"):
        tf = tokenize_file(WIKI, uri, "auto", "stream", tok)
        assert tf.seq_records == [-1] and tf.num_records == 1 and tf.skipped == []
        assert tf.tokens.tolist() == ids(tok, WIKI.decode())
        assert tf.seq_lengths == [len(tf.tokens)]
    # jsonl: usable records joined with a blank line; bad records reported
    data = _jsonl_bytes(with_bad=True)
    tf = tokenize_file(data, "/d/c.jsonl", "auto", "stream", tok)
    joined = STREAM_RECORD_SEPARATOR.join([DOCS[0][1], DOCS[3][1], DOCS[4][1], DOCS[5][1]])
    assert STREAM_RECORD_SEPARATOR == "\n\n"
    assert tf.tokens.tolist() == ids(tok, joined)
    assert tf.seq_records == [-1] and tf.num_records == 1
    # bad records (2, 4) and empty / whitespace-only ones (1, 3) are reported as in document mode
    assert sorted(s["record"] for s in tf.skipped) == [1, 2, 3, 4]
    assert tf.sha256 == "sha256:" + hashlib.sha256(data).hexdigest() and tf.bytes == len(data)
    # a file with nothing usable gives no sequence
    for data, uri in ((b"", "/d/e.txt"), (b" \n \n", "/d/e.txt"), (b"\xff\xfe", "/d/e.txt"),
                      (b'{"text": ""}\n', "/d/e.jsonl")):
        tf = tokenize_file(data, uri, "auto", "stream", tok)
        assert tf.seq_lengths == [] and tf.tokens.size == 0, (data, uri)


def test_tokenize_file_parquet_and_text_field(toks, tmp_path):
    tok = toks[False]
    data = _parquet(pa.table({"content": ["one two three", None, "", "four five"]}))
    tf = tokenize_file(data, str(tmp_path / "p.parquet"), "auto", "document", tok, text_field="content")
    assert tf.seq_records == [0, 3]
    assert tf.tokens.tolist() == ids(tok, "one two three") + ids(tok, "four five")
    assert [(s["record"], s["reason"]) for s in tf.skipped] == [(1, "null text"), (2, "empty document")]
    with pytest.raises(InputError, match="--text-field"):
        tokenize_file(data, str(tmp_path / "p.parquet"), "auto", "document", tok)


def test_tokenize_file_reads_real_file(toks, tmp_path):
    # write_text round trip, as the build reads files from disk
    p = write_text(tmp_path / "sub" / "doc.txt", "Every corpus token becomes one entry.")
    with open(p, "rb") as f:
        data = f.read()
    tf = tokenize_file(data, p, "auto", "document", toks[False])
    assert tf.uri == p and tf.tokens.tolist() == ids(toks[False], "Every corpus token becomes one entry.")

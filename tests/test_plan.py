"""The streaming planner (builder.unit.stream_units) and the sequence tables it reads (builder/seqs.py).

- its units equal, cut for cut and id for id, those of the in-memory planner it replaced (bench/plan_reference.py's
  `naive_plan_units`) on seeded random length tables read in chunks of every size;
- the sequence table: rows, chunks, a record's sequence, an older-format meta read from its lists;
- builds give the shard checksums of the code before the tables (document and stream mode), also when
  resuming a build whose tokens metas are of the older format. The reference shards are built in the same
  run with the in-memory planner in the driver: key checksums depend on the CPU's float kernels (AVX2 and
  AVX-512 round differently), so only integers (units, keys, tokens) are written down here.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import sys

import numpy as np
import pytest
from conftest import REPO, write_text

from builder.corpus import count_targets
from builder.layout import UNITS_DIR, tokens_meta_path, tokens_path, tokens_seqs_path
from builder.seqs import ROW_BYTES, SeqTable, TableWriter, parse_rows, table_rows, upgrade_meta
from builder.storage import Storage, StorageError
from builder.unit import UnitSpan, expand, load_unit, plan_units, stream_units

sys.path.insert(0, os.path.join(REPO, "bench"))
from plan_reference import naive_plan_units  # noqa: E402  (the planner before this one, also bench_plan's baseline)


def chunked(table: np.ndarray, size: int):
    return [table[a:a + size] for a in range(0, len(table), size)]


def random_files(rng: np.random.Generator, window: int) -> list[tuple[list[int], list[int]]]:
    files = []
    for _ in range(int(rng.integers(0, 7))):
        k = int(rng.integers(0, 25))
        kind = int(rng.integers(5))
        lengths = (rng.integers(1, 5, k) if kind == 0 else rng.integers(1, 3 * window, k) if kind == 1 else
                   rng.integers(1, 12 * window, k) if kind == 2 else np.full(k, 2) if kind == 3 else
                   rng.integers(0, 3, k))          # sequences of length 2 (one target); of none
        files.append(([int(x) for x in lengths], sorted(rng.choice(10_000, k, replace=False).tolist())))
    return files


def check_spans(files, window, mc, unit_tokens, chunk) -> list[UnitSpan]:
    want = naive_plan_units(files, window, mc, unit_tokens)
    tables = [table_rows(lengths, records) for lengths, records in files]
    spans = list(stream_units([chunked(t, chunk) for t in tables], window, mc, unit_tokens))
    assert [expand(s, tables[s.file][s.first:s.last + 1]) for s in spans] == want, (files, window, mc, unit_tokens)
    for s, u in zip(spans, want):                  # the span's own fields, without expanding it
        first, last = u.segments[0], u.segments[-1]
        assert (s.id, s.file, s.first, s.t0, s.last, s.t1, s.offset, s.num_targets) == \
            (u.id, u.file, first.seq, first.t0, last.seq, last.t1, first.offset, u.num_targets)
        assert UnitSpan.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert plan_units(files, window, mc, unit_tokens) == want
    return spans


def test_stream_units_equal_the_naive_plan_on_random_tables():
    """Chunks of 1 row to whole tables (cuts mid-table), sequences of many windows, unit_tokens below a
    window, many files, empty files, sequences of 0, 1 and 2 tokens."""
    rng = np.random.default_rng(17)
    n_units = n_multi = 0
    for _ in range(400):
        window = int(rng.integers(2, 24))
        mc = int(rng.integers(1, window))
        unit_tokens = int(rng.choice([1, 2, 3, window - 1 or 1, window, 5 * window, 17, 200, 5000]))
        spans = check_spans(random_files(rng, window), window, mc, unit_tokens, int(rng.choice([1, 2, 3, 7, 64])))
        n_units += len(spans)
        n_multi += sum(s.first != s.last for s in spans)
    assert n_units > 20_000 and n_multi > 2_000       # the configurations do exercise cuts and packing


def test_stream_units_known_cases():
    # a sequence of 10,000 tokens in units of 100 targets (windows of 16, stride 8): cut at window ends
    spans = check_spans([([10_000], [7])], 16, 8, 100, 1)
    assert len(spans) > 50 and spans[0].t0 == 1 and spans[-1].t1 == 10_000
    assert [s.t0 for s in spans[1:]] == [s.t1 for s in spans[:-1]]
    # 2-token sequences (one target each) in units of 3: three sequences a unit, records kept
    spans = check_spans([([2] * 10, list(range(0, 20, 2)))], 8, 4, 3, 4)
    assert [(s.first, s.last, s.num_targets, s.offset) for s in spans] == \
        [(0, 2, 3, 0), (3, 5, 3, 6), (6, 8, 3, 12), (9, 9, 1, 18)]
    assert list(stream_units([], 4, 2, 3)) == []
    assert list(stream_units([[], [np.zeros((0, 3), np.int64)]], 4, 2, 3)) == []


def test_stream_units_reads_chunks_lazily():
    """The planner holds one chunk: its first unit comes before the next chunks are read."""
    read = []

    def chunks():
        for k in range(200):
            read.append(k)
            yield table_rows([50] * 1000, range(1000), 50_000 * k)

    it = stream_units([chunks()], 16, 8, 1000)
    first = next(it)
    assert (first.id, first.t0, first.first, first.last, first.t1) == (0, 1, 0, 20, 24) and read == [0]
    assert sum(s.num_targets for s in it) + first.num_targets == 49 * 1000 * 200 and len(read) == 200


def test_seq_table_rows_chunks_records_and_the_older_format(tmp_path):
    st = Storage.from_uri(str(tmp_path))
    rng = np.random.default_rng(3)
    lengths, records = rng.integers(2, 60, 2500), np.sort(rng.choice(10_000, 2500, replace=False))
    with open(tmp_path / "t.seqs", "wb") as f:        # written in pieces, as a ranged tokenization does
        w = TableWriter(f)
        for a in range(0, 2500, 1000):
            w.add(lengths[a:a + 1000], records[a:a + 1000])
    assert w.counts() == {"num_sequences": 2500, "num_targets": count_targets(lengths)}
    want = table_rows(lengths, records)
    assert (tmp_path / "t.seqs").read_bytes() == want.astype("<i8").tobytes()
    meta = {"num_sequences": 2500}
    for t in (SeqTable(st, "t.bin", meta), SeqTable(st, "t.bin"),        # without a meta: n from its size
              SeqTable(st, "old.bin", {"seq_lengths": lengths.tolist(), "seq_records": records.tolist()})):
        assert t.n == 2500
        np.testing.assert_array_equal(t.rows(10, 20), want[10:20])
        np.testing.assert_array_equal(np.concatenate(list(t.chunks(999))), want)
        assert [t.find_record(int(r)) for r in records[[0, 1, 777, 2499]]] == [0, 1, 777, 2499]
        assert t.find_record(-1) is None and t.find_record(10_001) is None
        assert t.find_record(int(np.setdiff1d(np.arange(10_000), records)[5])) is None
    # a unit's rows, as a key worker reads them
    st.write_bytes(tokens_seqs_path(0), want.astype("<i8").tobytes())
    span = next(iter(stream_units([[want]], 16, 8, 300)))
    assert load_unit(span, st) == expand(span, want[span.first:span.last + 1])
    # a truncated table is named
    (tmp_path / "cut.seqs").write_bytes(want.astype("<i8").tobytes()[:100 * ROW_BYTES + 5])
    with pytest.raises(StorageError, match=r"cut.seqs is truncated: expected sequences \[90, 110\)"):
        SeqTable(st, "cut.bin", meta).rows(90, 110)
    # an older-format meta, upgraded
    old = {"uri": "u", "num_tokens": int(lengths.sum()), "seq_lengths": lengths.tolist(),
           "seq_records": records.tolist(),
           "skipped": [{"record": r, "where": "x", "reason": "y"} for r in range(150, 0, -1)]}
    new, rows = upgrade_meta(old, 100)
    np.testing.assert_array_equal(rows, want)
    assert new["num_sequences"] == 2500 and new["num_targets"] == count_targets(lengths) and new["num_skipped"] == 150
    assert [d["record"] for d in new["skipped"]] == list(range(1, 101))
    assert list(new) == ["uri", "num_tokens", "num_sequences", "num_targets", "num_skipped", "skipped"]


# ---------------------------------------------------------------------------------------------
# builds: the shard checksums of the code before the sequence tables

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "kNN-LM", "datastore", "3,000", "river",
         "valley", "tokens", "keys", "values", "Sega", "game", ",", "."]


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def corpus_files(root) -> list[str]:
    """JSONL with empty, one-word and long documents; a WikiText file; a text file (seeded)."""
    rng = random.Random(0)
    lines = [json.dumps({"text": "" if r < .1 else "a" if r < .15 else _text(rng, rng.choice([1, 2, 3, 8, 30, 90]))})
             for r in (rng.random() for _ in range(40))]
    wiki = "".join(f" = Title {a} = \n\n {_text(rng, rng.randint(0, 60))} \n" for a in range(12))
    return [write_text(root / "corpus" / "a.jsonl", "\n".join(lines) + "\n"),
            write_text(root / "corpus" / "w.tokens", wiki), write_text(root / "corpus" / "c.txt", _text(rng, 50))]


# measured with the in-memory planner (commit ff5f857): units, keys and the first 16 hex digits of each
# tokens file's sha256 (the shard checksums are compared with a reference build of the same run: REFERENCE)
BEFORE = {
    "document": (75, 2168, ["701668c381052a88", "7722b84f80d289ba", "29730982785bcd2b"]),
    "stream": (59, 2299, ["9d27c24eef8a6c1e", "52dee29b196a6aea", "7047367eab4890a2"]),
}
SETTINGS = {"document": ("gpt2", 23), "stream": ("llama", 37)}      # model, unit_tokens


def _cfg(corpus, model, out, mode):
    from test_build import small_cfg
    return small_cfg(corpus, model, out, mode=mode, unit_tokens=SETTINGS[mode][1])


def _fingerprint(root) -> tuple:
    """(units, keys, sha256 of the manifest's [[path, num_rows, checksum], ...], tokens files' sha256[:16])."""
    st = Storage.from_uri(str(root))
    m = json.loads(st.read_text("manifest.json"))
    shards = [[s["path"], s["num_rows"], s["checksum"]] for s in m["shards"]]
    tokens = [hashlib.sha256(st.read_bytes(tokens_path(i))).hexdigest()[:16] for i in range(3)]
    return m["build"]["num_units"], m["num_keys"], hashlib.sha256(json.dumps(shards).encode()).hexdigest(), tokens


def naive_stream_units(files, window, min_context, unit_tokens, first_id=0):
    """`stream_units` as the in-memory planner cut it: each file's table gathered whole, planned one Segment
    per document by `naive_plan_units`, and each Unit written as the span of its segments."""
    assert first_id == 0
    tables = [np.concatenate(list(chunks)) for chunks in files]
    lists = [(t[:, 1].tolist(), t[:, 2].tolist()) for t in tables]
    for u in naive_plan_units(lists, window, min_context, unit_tokens):
        first, last = u.segments[0], u.segments[-1]
        yield UnitSpan(u.id, u.file, first.seq, first.t0, last.seq, last.t1, first.offset, u.num_targets)


REFERENCE: dict[str, tuple] = {}


def reference(mode, tiny_models, tmp_path_factory) -> tuple:
    """The fingerprint of a build whose driver plans with the in-memory planner (built once per mode)."""
    if mode not in REFERENCE:
        from builder import build as build_mod
        root = tmp_path_factory.mktemp(f"reference-{mode}")
        mp = pytest.MonkeyPatch()
        mp.setattr(build_mod, "stream_units", naive_stream_units)
        try:
            build_mod.build(_cfg(corpus_files(root), tiny_models[SETTINGS[mode][0]], root / "ds", mode))
        finally:
            mp.undo()
        REFERENCE[mode] = _fingerprint(root / "ds")
        units, keys, _, tokens = REFERENCE[mode]
        assert (units, keys, tokens) == BEFORE[mode]
    return REFERENCE[mode]


@pytest.mark.parametrize("mode", ["document", "stream"])
def test_build_gives_the_shards_of_the_in_memory_planner(mode, tiny_models, ray_cluster, tmp_path, caplog,
                                                        tmp_path_factory):
    from builder.build import build
    want = reference(mode, tiny_models, tmp_path_factory)
    caplog.set_level("INFO", logger="builder.build")
    res = build(_cfg(corpus_files(tmp_path), tiny_models[SETTINGS[mode][0]], tmp_path / "ds", mode))
    assert _fingerprint(tmp_path / "ds") == want
    assert f"{BEFORE[mode][1]} keys in {BEFORE[mode][0]} units (0 already committed)" in caplog.text
    st = Storage.from_uri(str(tmp_path / "ds"))
    files = res.manifest.corpus["files"]
    for i, f in enumerate(files):
        meta = json.loads(st.read_text(tokens_meta_path(i)))
        rows = parse_rows(st.read_bytes(tokens_seqs_path(i)))
        assert "seq_lengths" not in meta and len(rows) == meta["num_sequences"] == f["num_sequences"]
        assert count_targets(rows[:, 1]) == meta["num_targets"] == f["num_keys"]
        assert meta["num_skipped"] == f["skipped"] == len(meta["skipped"])
    assert [f["skipped"] for f in files] == ([5, 0, 0] if mode == "document" else [0, 0, 0])


def test_resume_of_a_build_with_older_format_tokens(tiny_models, ray_cluster, tmp_path, monkeypatch, caplog,
                                                   tmp_path_factory):
    """A build of the older code died before its commit (some units committed): its tokens metas hold the
    sequences as JSON lists, no table beside them. The rerun writes the tables and ends with the same shards."""
    from builder import build as build_mod
    corpus, out, mode = corpus_files(tmp_path), tmp_path / "ds", "document"
    cfg = _cfg(corpus, tiny_models["gpt2"], out, mode)

    def die(*a, **k):
        raise RuntimeError("killed before the commit")
    monkeypatch.setattr(build_mod, "commit_manifest", die)
    with pytest.raises(RuntimeError, match="killed before the commit"):
        build_mod.build(cfg)
    monkeypatch.undo()
    st = Storage.from_uri(str(out))
    for i in range(3):              # the older format, as TokenizedFile.meta() wrote it
        meta = json.loads(st.read_text(tokens_meta_path(i)))
        rows = parse_rows(st.read_bytes(tokens_seqs_path(i)))
        old = {k: meta[k] for k in ("uri", "format", "bytes", "sha256", "num_records", "num_tokens")} | {
            "seq_lengths": rows[:, 1].tolist(), "seq_records": rows[:, 2].tolist(), "skipped": meta["skipped"],
            "tokens": meta["tokens"], "ranges": meta["ranges"]}
        st.delete(tokens_seqs_path(i))
        st.write_text(tokens_meta_path(i), json.dumps(old))
    records = st.list(UNITS_DIR)
    for p in records[::2]:          # half the units run again
        st.delete(p)
    caplog.set_level("INFO", logger="builder")
    res = build_mod.build(cfg)
    assert res.units_run == (len(records) + 1) // 2 and res.units_skipped == len(records) // 2
    assert _fingerprint(out) == reference(mode, tiny_models, tmp_path_factory)
    assert "rewrote the tokens meta of an earlier version" in caplog.text
    for i in range(3):
        meta = json.loads(st.read_text(tokens_meta_path(i)))
        assert "seq_lengths" not in meta and st.size(tokens_seqs_path(i)) == ROW_BYTES * meta["num_sequences"]

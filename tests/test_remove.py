"""`knnlm remove` and `knnlm compact`: removed documents never come back (queries, perplexity, provenance),
compaction equals a datastore built without them, and both resume to the same bytes."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, upload_dir, write_text

from builder.add import add_stage
from builder.build import build
from builder.compact import compact, plan_shards
from builder.config import AddConfig, BuildConfig, CompactConfig, ConfigError, RemoveConfig, TrainConfig
from builder.faults import FAULT_ENV
from builder.key_shards import read_shard
from builder.layout import seqs_beside
from builder.manifest import load_manifest, write_manifest
from builder.remove import RemoveError, remove, removal_ranges
from builder.rows import iter_range
from builder.seqs import SeqTable
from builder.storage import Storage
from builder.train import train_stage
from builder.versions import load_version

W, C = 16, 6
A_DOCS = ["The quick brown fox jumps over the lazy dog. " * 3,
          "A kNN-LM interpolates a language model with nearest neighbours from a datastore. " * 2,
          "In 1998 the river flooded the valley, and 3,000 people moved to the hills. " * 2]
A2 = "Tokens, keys and values: every corpus token becomes one entry of the datastore. " * 2
B = "Valkyria Chronicles III is a tactical role-playing game developed by Sega, and the fox moved. " * 3
EVAL = ["The quick brown fox moved to the valley of the game.", "Every token of Sega becomes a key of the river."]
NLIST = 8
SMALL = dict(window=W, min_context=C, shard_rows=48, row_group_rows=16, progress=False)


def _corpus(root) -> dict:
    a = write_text(root / "corpus" / "a.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in A_DOCS))
    a2 = write_text(root / "corpus" / "a2.txt", A2)
    b = write_text(root / "corpus" / "b.txt", B)
    return {"a": a, "a2": a2, "b": b}


def _datastores(root, mode: str, model: str) -> dict:
    """A+B (trained IVF8,Flat, 2 index shards) and A alone with the same trained index."""
    files = _corpus(root)
    ab, a = str(root / f"ab-{mode}"), str(root / f"a-{mode}")
    build(BuildConfig(corpus=[files["a"], files["a2"], files["b"]], model=model, out=ab, mode=mode, **SMALL))
    train_stage(TrainConfig(datastore=ab, index_factory=f"IVF{NLIST},Flat", train_size=10**6, trainer="faiss",
                            min_points_per_centroid=1))
    add_stage(AddConfig(datastore=ab, index_shards=2, encoder="faiss"))
    build(BuildConfig(corpus=[files["a"], files["a2"]], model=model, out=a, mode=mode, **SMALL))
    mab, st = load_manifest(Storage.from_uri(ab)), Storage.from_uri(a)
    ma = load_manifest(st)
    st.write_bytes(mab.index["path"], Storage.from_uri(ab).read_bytes(mab.index["path"]))
    ma.index = dict(mab.index)
    write_manifest(st, ma)
    add_stage(AddConfig(datastore=a, index_shards=3, encoder="faiss"))
    evalf = write_text(root / "eval.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in EVAL))
    return {"ab": ab, "a": a, "files": files, "eval": evalf}


@pytest.fixture(scope="module")
def made(tmp_path_factory, gpt2_model, ray_cluster):
    root = tmp_path_factory.mktemp("remove")
    cache = {}

    def get(mode: str) -> dict:
        if mode not in cache:
            cache[mode] = _datastores(root, mode, gpt2_model)
        return cache[mode]
    return get


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _rows(uri: str) -> dict:
    st = Storage.from_uri(uri)
    m = load_manifest(st)
    parts = list(iter_range(st, m, 0, m.num_keys, ("key", "value", "doc", "pos")))
    return {c: np.concatenate([p[1][c] for p in parts]) for c in ("key", "value", "doc", "pos")}


def _b_docs(uri: str) -> set:
    m = load_manifest(Storage.from_uri(uri))
    return {2} if m.mode == "stream" else {len(A_DOCS) + 1}


def _pairs(uri: str) -> list:
    """Every (id, code) pair of the index shards, sorted."""
    import faiss
    from faiss.contrib.inspect_tools import get_invlist
    st = Storage.from_uri(uri)
    out = []
    for s in load_manifest(st).index_shards:
        whole = faiss.read_index(os.path.join(uri, s["path"]))       # held: the IVF below is a view of it
        index = faiss.extract_index_ivf(whole)
        for lst in range(index.nlist):
            ids, codes = get_invlist(index.invlists, lst)
            if not len(ids):
                continue
            out += [(int(i), bytes(c)) for i, c in zip(ids, codes.reshape(len(ids), -1))]
    return sorted(out)


def _eval(uri: str, evalf: str, cache: str, **kw):
    from retriever.config import EvalConfig
    from retriever.evaluate import evaluate
    return evaluate(EvalConfig(datastore=uri, corpus=[evalf], lam=0.5, temperature=2.0, k=8, nprobe=NLIST,
                               cache_dir=cache, **kw))


def _search(uri: str, q: np.ndarray, cache: str):
    from retriever.router import Retriever, serving
    with serving(uri, cache_dir=cache):
        return Retriever.connect(uri).search(q.astype(np.float32), k=8, nprobe=NLIST)


def test_plans_renumber_shards_that_start_inside_a_removed_range():
    """Regression: a shard starting inside a removed range got its old first_id (renumber is for kept ids)."""
    from builder.compact import plan_index
    from builder.manifest import Manifest
    m = Manifest(num_keys=200, dim=2, model={}, tokenizer={}, key_layer="", window=4, min_context=1, mode="document",
                 compute_dtype="float32", corpus={}, shards=[{"path": f"s{i}", "num_rows": 50, "first_id": 50 * i,
                                                              "checksum": ""} for i in range(4)],
                 index_shards=[{"path": "i0", "first_id": 0, "num_ids": 120}, {"path": "i1", "first_id": 120,
                                                                                "num_ids": 80}])
    ranges = [[40, 105], [190, 200]]
    plan = plan_shards(m, ranges)
    assert [(j, e["first_id"], e["num_rows"], cut) for j, e, cut in plan] == [(0, 0, 40, 10), (2, 40, 45, 5),
                                                                               (3, 85, 40, 10)]
    assert [(e["first_id"], e["num_ids"], redo) for e, redo in plan_index(m, ranges)] == [(0, 55, True),
                                                                                          (55, 70, True)]
    assert plan_index(m, [[130, 140]])[0] == (m.index_shards[0], False)        # untouched: kept as it is


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["document", "stream"])
def test_remove_then_compact_equals_a_alone(made, mode, tmp_path, capsys):
    """Document mode also compares perplexities (one server start and one eval per version); stream mode
    checks the queries, the rows and the index codes, which decide the perplexity."""
    from retriever.router import serving
    from cluster.cli import main
    d = made(mode)
    ds = _copy(d["ab"], tmp_path / "ds")
    st = Storage.from_uri(ds)
    before = _rows(ds)
    b_ids = np.flatnonzero(np.isin(before["doc"], list(_b_docs(ds))))
    assert len(b_ids) and b_ids[-1] == len(before["doc"]) - 1
    cache, nb = str(tmp_path / "srv"), str(tmp_path / "valid-cache")
    ppl = mode == "document"
    with serving(ds, cache_dir=cache):
        got = _search(ds, before["key"][b_ids], cache)
        assert np.isin(got.ids, b_ids).any()                           # B's keys find B before its removal
        full = _eval(ds, d["eval"], cache, save_neighbours=nb) if ppl else None
    if mode == "stream":
        with pytest.raises(RemoveError, match="--docs: no input file 7 in this datastore .*input file indices"):
            remove(RemoveConfig(datastore=ds, docs=["7"]))
    src = os.path.relpath(d["files"]["b"])                      # a relative path names the same file
    res = remove(RemoveConfig(datastore=ds, source=[src]))
    m = load_manifest(st)
    assert (m.version, res.num_keys, m.removed) == (2, len(b_ids), {"ranges": [[int(b_ids[0]), int(b_ids[-1]) + 1]],
                                                                    "num_keys": len(b_ids)})
    rec = m.removals[0]
    assert rec["source"] == [src] and rec["num_keys"] == len(b_ids) and rec["version"] == 2 and rec["at"]
    assert m.history[-1]["kind"] == "remove" and m.num_keys == len(before["doc"])     # ids are not renumbered
    with serving(ds, cache_dir=cache):
        got = _search(ds, before["key"][b_ids], cache)                 # B's own keys: none of B's ids come back
        assert got.ids.size and not np.isin(got.ids, b_ids).any() and (got.ids >= 0).all()
        after_remove = _eval(ds, d["eval"], cache) if ppl else None
    if ppl:
        want = _eval(d["a"], d["eval"], cache)                          # A alone, the same trained index
        assert after_remove.knnlm_ppl == pytest.approx(want.knnlm_ppl, rel=1e-9, abs=0)
        assert full.knnlm_ppl != pytest.approx(want.knnlm_ppl, rel=1e-6)     # B mattered before its removal
        assert after_remove.to_json()["version"] == 2
        assert main(["tune", "--valid", nb]) == 2                      # a cache of version 1 is stale now
        assert "made from version 1 of" in capsys.readouterr().err
    # compaction
    c = compact(CompactConfig(datastore=ds))
    m = load_manifest(st)
    a_rows = _rows(d["a"])
    assert (m.version, m.num_keys, m.removed, c.keys_removed) == (3, len(a_rows["doc"]), None, len(b_ids))
    assert m.history[-1]["kind"] == "compact" and m.history[-1]["id_moves"] == [[0, 0, len(a_rows["doc"])]]
    assert m.removals[0]["compacted"] == 3
    now = _rows(ds)
    for col in ("key", "value", "doc", "pos"):
        np.testing.assert_array_equal(now[col], a_rows[col])
    assert _pairs(ds) == _pairs(d["a"])
    with serving(ds, cache_dir=cache):
        got = _search(ds, before["key"][b_ids], cache)
        assert got.ids.max() < m.num_keys
        if ppl:
            assert _eval(ds, d["eval"], cache).knnlm_ppl == pytest.approx(want.knnlm_ppl, rel=1e-9, abs=0)
    for p in st.list("shards/"):                                  # B's rows are gone from storage
        assert not set(read_shard(st.read_bytes(p), m.dim, ("doc",))["doc"].tolist()) & _b_docs(ds)
    b_tokens = load_version(st, 1).corpus["files"][2]["tokens"]
    assert not st.exists(b_tokens) and m.corpus["files"][2]["removed"] == 3
    assert sorted(p for p in st.list("index/shards/")) == sorted(s["path"] for s in m.index_shards)
    # again: nothing to do, for both
    assert compact(CompactConfig(datastore=ds)).already_done
    assert remove(RemoveConfig(datastore=ds, source=[d["files"]["b"]])).already_done
    assert load_manifest(st).version == 3


def test_remove_docs_record_errors_and_compacted_tokens(made, tmp_path, capsys):
    from cluster.cli import main
    d = made("document")
    ds = _copy(d["ab"], tmp_path / "ds")
    st = Storage.from_uri(ds)
    before = _rows(ds)
    ids1 = np.flatnonzero(before["doc"] == 1)
    assert main(["remove", ds, "--docs", "1"]) == 0
    assert "removed 1 documents" in capsys.readouterr().out
    m = load_manifest(st)
    assert m.removed == {"ranges": [[int(ids1[0]), int(ids1[-1]) + 1]], "num_keys": len(ids1)}
    assert (m.removals[0]["docs"], m.removals[0]["num_docs"], m.removals[0]["num_keys"]) == ([1], 1, len(ids1))
    assert removal_ranges(st, m, [1]) == m.removed["ranges"]
    assert removal_ranges(st, m, [0, 1]) == [[0, int(ids1[-1]) + 1]]            # adjacent documents: one range
    assert main(["remove", ds, "--docs", "1"]) == 0                              # again: nothing to do
    assert "nothing to do" in capsys.readouterr().out and load_manifest(st).version == 2
    assert main(["info", ds]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["removed_keys"] == len(ids1) and info["version"] == 2
    # clear errors
    assert main(["remove", ds, "--docs", "99"]) == 2
    assert "--docs: no document 99 in this datastore (it has 5: 0..4)" in capsys.readouterr().err
    assert main(["remove", ds, "--source", str(tmp_path / "nope.txt")]) == 2
    err = capsys.readouterr().err
    assert f"--source {tmp_path / 'nope.txt'}: not a source of this datastore (its sources: " in err and "b.txt" in err
    with pytest.raises(ConfigError, match="give --source or --docs"):
        RemoveConfig(datastore=ds)
    with pytest.raises(ConfigError, match="--docs: 'x' is not a document index"):
        RemoveConfig(datastore=ds, docs=["x"])
    # compaction: doc 1's tokens are 0s in a new tokens file; the rest of the file is as it was
    old = m.corpus["files"][0]["tokens"]
    old_tokens = np.frombuffer(st.read_bytes(old), "<i4")
    meta = json.loads(st.read_text(old[:-4] + ".json"))
    table = st.read_bytes(seqs_beside(old))
    assert main(["compact", ds]) == 0
    m = load_manifest(st)
    new = m.corpus["files"][0]["tokens"]
    assert new != old and not st.exists(old) and not st.exists(seqs_beside(old))
    assert st.read_bytes(seqs_beside(new)) == table          # the sequence table moves with the tokens file
    tokens = np.frombuffer(st.read_bytes(new), "<i4")
    rows = SeqTable(st, new, meta).rows(0, meta["num_sequences"])
    offs = np.append(rows[:, 0], rows[-1, 0] + rows[-1, 1])
    assert (tokens[offs[1]:offs[2]] == 0).all() and (old_tokens[offs[1]:offs[2]] != 0).any()
    keep = np.r_[0:offs[1], offs[2]:len(tokens)]
    np.testing.assert_array_equal(tokens[keep], old_tokens[keep])
    now = _rows(ds)
    kept = ~np.isin(np.arange(len(before["doc"])), ids1)
    for col in ("key", "value", "doc", "pos"):
        np.testing.assert_array_equal(now[col], before[col][kept])
    assert m.history[-1]["id_moves"] == [[0, 0, int(ids1[0])], [int(ids1[-1]) + 1, int(ids1[0]),
                                                                 len(before["doc"]) - int(ids1[-1]) - 1]]


def test_provenance_never_shows_removed_text(made, gpt2_model, tmp_path):
    from retriever.provenance import ContextReader, neighbours
    from retriever.evaluate import EvalError
    d = made("document")
    ds = _copy(d["ab"], tmp_path / "ds")
    st = Storage.from_uri(ds)
    cache = str(tmp_path / "srv")
    b_doc = _b_docs(ds).pop()
    text = B[:60]
    rows = neighbours(ds, text, k=4, nprobe=NLIST, cache_dir=cache)
    assert any(n["doc"] == b_doc for r in rows for n in r["neighbours"])        # B's text is there before
    remove(RemoveConfig(datastore=ds, source=[d["files"]["b"]]))
    rows = neighbours(ds, text, k=4, nprobe=NLIST, cache_dir=cache)
    shown = [n for r in rows for n in r["neighbours"]]
    assert shown and all(n["doc"] != b_doc and n["context"] != ContextReader.REMOVED for n in shown)
    ctx = ContextReader(st, load_manifest(st))
    with pytest.raises(EvalError, match=f"document {b_doc} was removed"):
        ctx.tokens(b_doc, 3, 2)
    assert ctx.context(0, 3, 2, None, id=int(load_manifest(st).removed["ranges"][0][0])) == "[removed]"
    compact(CompactConfig(datastore=ds))
    ctx = ContextReader(st, load_manifest(st))
    assert ctx.context(b_doc, 3, 2, None) == "[removed]"
    toks, at = ctx.tokens(0, 4, 3)                                         # A's text is still read
    assert at == 3 and len(toks) == 4


def _kill_driver(ds: str, spec: str, marker, *extra) -> None:
    fault = os.environ[FAULT_ENV]
    with open(fault, "w") as f:
        f.write(f"{spec}:{marker}")
    try:
        env = dict(os.environ, PYTHONPATH=REPO)
        p = subprocess.run([sys.executable, "-m", "cluster.cli", "compact", ds, *extra], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    finally:
        os.remove(fault)
    assert p.returncode == 1 and os.path.exists(marker), p.stderr[-2000:]


def _facts(uri: str) -> dict:
    st = Storage.from_uri(uri)
    m = load_manifest(st)
    files = sorted(p for pre in ("shards/", "index/", "tokens/") for p in st.list(pre))
    return {"num_keys": m.num_keys, "shards": m.shards, "index_shards": m.index_shards, "files": m.corpus["files"],
            "removed": m.removed, "moves": m.history[-1].get("id_moves"), "version": m.version,
            "bytes": {p: st.read_bytes(p) for p in files}, "work": st.list("_compact/")}


@pytest.mark.slow
def test_killed_compaction_resumes_to_the_same_bytes(made, tmp_path, ray_cluster):
    import ray
    d = made("document")
    ref = _copy(d["ab"], tmp_path / "ref")
    remove(RemoveConfig(datastore=ref, docs=["1", "4"]))
    ds = _copy(ref, tmp_path / "ds")
    compact(CompactConfig(datastore=ref))
    m = load_manifest(Storage.from_uri(ds))
    rewritten = [j for j, _, cut in plan_shards(m, m.removed["ranges"]) if cut]
    assert len(rewritten) >= 2
    # the driver dies while rewriting key shards (before any Ray work), then just after publishing
    _kill_driver(ds, f"compact-shard:{rewritten[1]}", tmp_path / "m1")
    assert load_manifest(Storage.from_uri(ds)).version == 2
    address = ray.get_runtime_context().gcs_address
    _kill_driver(ds, "compact:1", tmp_path / "m2", "--address", address)
    st = Storage.from_uri(ds)
    assert load_manifest(st).version == 3 and st.list("_compact/")          # published, not cleaned up
    assert compact(CompactConfig(datastore=ds)).already_done                 # the rerun cleans up
    assert _facts(ds) == _facts(ref)


def test_s3_remove_and_compact_with_a_killed_worker(made, tmp_path, s3_bucket, ray_cluster):
    d = made("document")
    ref = _copy(d["ab"], tmp_path / "ref")
    uri = upload_dir(d["ab"], s3_bucket, "ds")
    for where in (ref, uri):
        remove(RemoveConfig(datastore=where, source=[d["files"]["b"]]))
    compact(CompactConfig(datastore=ref))
    fault = os.environ[FAULT_ENV]
    with open(fault, "w") as f:
        f.write(f"compact-index:1:{tmp_path / 'marker'}")
    try:
        compact(CompactConfig(datastore=uri))
    finally:
        os.remove(fault)
    assert os.path.exists(tmp_path / "marker")                              # the worker did die
    a, b = _facts(uri), _facts(ref)
    assert a == b
    assert _pairs(ref) == _pairs(d["a"])

"""Integrity: paths cannot leave the datastore root, nothing read from storage is unpickled, and one
flipped byte in any stored file is detected, named, and never served (issue 15, security checks).

One small real datastore (tiny GPT-2, IVF-Flat, 2 index shards) is built once; each test corrupts a
copy of it and runs the CLI the way a user would: a non-zero exit, a one-line error naming the file,
no traceback.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil

import numpy as np
import pytest
from conftest import write_text

from builder.add import add_stage
from builder.build import build
from builder.config import AddConfig, BuildConfig, TrainConfig
from builder.key_shards import checksum
from builder.manifest import CHECKSUM_FIELD, ManifestError, content_checksum, load_manifest
from builder.rows import iter_range
from builder.storage import LocalStorage, S3Storage, Storage, StorageError
from builder.train import train_stage
from cluster.cli import main

W, C = 16, 6
TRAIN = ["The quick brown fox jumps over the lazy dog. " * 4,
         "A kNN-LM interpolates a language model with nearest neighbours from a datastore. " * 3,
         "In 1998 the river flooded the valley, and 3,000 people moved to the hills. " * 3]
EVAL = ["The quick brown fox jumps over the river. A language model with neighbours."]


@pytest.fixture(scope="module")
def store(tmp_path_factory, gpt2_model, ray_cluster):
    """(a built, trained and added datastore, an eval corpus, queries of the datastore's dim)."""
    root = tmp_path_factory.mktemp("integrity")
    corpus = [write_text(root / "corpus" / f"{i}.txt", t) for i, t in enumerate(TRAIN)]
    out = str(root / "ds")
    build(BuildConfig(corpus=corpus, model=gpt2_model, out=out, window=W, min_context=C, progress=False,
                      shard_rows=40, row_group_rows=16))
    train_stage(TrainConfig(datastore=out, index_factory="IVF2,Flat", train_size=10**6, trainer="faiss",
                            min_points_per_centroid=1))
    add_stage(AddConfig(datastore=out, index_shards=2, encoder="faiss"))
    evalf = write_text(root / "eval.jsonl", json.dumps({"text": EVAL[0]}) + "\n")
    st = Storage.from_uri(out)
    m = load_manifest(st)
    assert len(m.shards) >= 2, "the test needs several key shards"
    keys = np.concatenate([c["key"] for _, c in iter_range(st, m, 0, m.num_keys)]).astype(np.float32)
    q = root / "q.npy"
    np.save(q, keys[:5])
    return out, evalf, str(q)


def copy_store(store, dst) -> str:
    shutil.copytree(store[0], dst)
    return str(dst)


def fail(capsys, args: list[str]) -> str:
    """The CLI must exit 2 with `knnlm CMD: error: ...` on one line and no traceback; returns that line
    (`knnlm verify` lists each problem on its own `knnlm verify: FILE: problem` line: returns those)."""
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    if args[0] == "verify" and not lines:
        return "\n".join(ln for ln in err.splitlines() if ln.startswith("knnlm verify: "))
    assert len(lines) == 1, err
    return lines[0]


def reader_args(reader: str, uri: str, store, tmp_path) -> list[str]:
    """The command line of each stage that reads a datastore."""
    _, evalf, q = store
    cache = str(tmp_path / "cache")
    return {
        "verify": ["verify", uri],
        "info": ["info", uri],
        "add": ["add", uri, "--force", "--index-shards", "2", "--encoder", "faiss"],
        "add-again": ["add", uri],
        "train-index": ["train-index", uri, "--force", "--index-factory", "IVF2,Flat", "--train-size", "1000000",
                        "--trainer", "faiss"],
        "serve": ["query", uri, "--queries", q, "--k", "4", "--nprobe", "2", "--out", str(tmp_path / "r.npz"),
                  "--cache-dir", cache],
        "eval": ["eval", uri, "--corpus", evalf, "--k", "4", "--nprobe", "2", "--lambda", "0.25",
                 "--temperature", "1", "--cache-dir", cache],
    }[reader]


def rewrite_manifest(uri: str, edit) -> None:
    """Edit manifest.json as an attacker would: consistently (its manifest_checksum recomputed)."""
    p = os.path.join(uri, "manifest.json")
    d = json.load(open(p))
    edit(d)
    d[CHECKSUM_FIELD] = content_checksum(d)
    with open(p, "w") as f:
        json.dump(d, f, indent=1)


def flip(path: str, at: int | None = None) -> None:
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2 if at is None else at] ^= 0x01
    with open(path, "wb") as f:
        f.write(bytes(data))




# ---- 1. paths that leave the datastore root ---------------------------------------------------


BAD_RELS = ["../outside.parquet", "/etc/passwd", "shards/../../x", "a//b", "./manifest.json", "a/./b", "a\\..\\b",
            "a\0b", "", "shards/.."]


@pytest.mark.parametrize("rel", BAD_RELS)
def test_storage_refuses_paths_outside_the_root(tmp_path, rel):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside.parquet"
    outside.write_bytes(b"precious")
    st = LocalStorage(str(root))
    calls = [lambda: st.read_bytes(rel), lambda: st.read_range(rel, 0, 4), lambda: st.size(rel),
             lambda: st.write_bytes(rel, b"x"), lambda: st.exists(rel), lambda: st.delete(rel),
             lambda: st.create_exclusive(rel, b"x"), lambda: st.replace_if(rel, b"x", b"precious"),
             lambda: st.download_file(rel, str(tmp_path / "dl")), lambda: st.upload_file(rel, str(outside)),
             lambda: st.open_read(rel)]
    if rel:                                   # "" is the root itself for a listing
        calls += [lambda: st.list(rel), lambda: st.delete_prefix(rel), lambda: st.cleanup_incomplete(rel)]
    for call in calls:
        with pytest.raises(StorageError, match="must be a relative path inside the datastore root"):
            call()
    assert outside.read_bytes() == b"precious" and not (tmp_path / "dl").exists()


def test_storage_accepts_clean_paths_and_prefixes(tmp_path):
    st = LocalStorage(str(tmp_path))
    st.write_bytes("a/b.bin", b"x")
    assert st.list("") == ["a/b.bin"] and st.list("a/") == ["a/b.bin"] and st.read_bytes("a/b.bin") == b"x"
    assert st.delete_prefix("a/") == 1 and not st.exists("a/b.bin")


def test_local_writes_do_not_follow_a_symlink_out_of_the_root(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (elsewhere / "victim.bin").write_bytes(b"precious")
    os.symlink(elsewhere, root / "shards")
    st = LocalStorage(str(root))
    for call in (lambda: st.write_bytes("shards/victim.bin", b"x"), lambda: st.delete("shards/victim.bin"),
                 lambda: st.create_exclusive("shards/new.bin", b"x"), lambda: st.cleanup_incomplete("shards/")):
        with pytest.raises(StorageError, match="symlink.*outside the datastore root"):
            call()
    assert (elsewhere / "victim.bin").read_bytes() == b"precious" and os.listdir(elsewhere) == ["victim.bin"]


@pytest.mark.s3
def test_s3_storage_refuses_paths_outside_the_root(s3_bucket):
    import boto3
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="outside.parquet", Body=b"precious")
    st = S3Storage(f"s3://{s3_bucket}/ds")
    for rel in ("../outside.parquet", "/outside.parquet", "a//b", "a/./b"):
        for call in (lambda: st.read_bytes(rel), lambda: st.write_bytes(rel, b"x"), lambda: st.delete(rel),
                     lambda: st.exists(rel), lambda: st.size(rel), lambda: st.create_exclusive(rel, b"x")):
            with pytest.raises(StorageError, match="must be a relative path inside the datastore root"):
                call()
    body = boto3.client("s3").get_object(Bucket=s3_bucket, Key="outside.parquet")["Body"].read()
    assert body == b"precious"


@pytest.mark.parametrize("field", ["shards", "index", "index_shards", "index_merged"])
def test_manifest_paths_must_stay_inside_the_root(tmp_path, field):
    from builder.synthetic import write_synthetic_datastore
    uri = str(tmp_path / "ds")
    write_synthetic_datastore(uri, 200, 8, shard_rows=100, row_group_rows=50, seed=0)

    def edit(d):
        if field == "shards":
            d["shards"][1]["path"] = "../outside.parquet"
        elif field == "index":
            d["index"] = {"path": "/abs/trained.faiss", "checksum": "sha256:0"}
        elif field == "index_shards":
            d["index_shards"] = [{"path": "index/../../x.faiss", "first_id": 0, "num_ids": 200, "bytes": 1,
                                  "checksum": "sha256:0"}]
        else:
            d["index_merged"] = {"path": "index/merged.faiss", "ivfdata": "../merged.ivfdata"}
    rewrite_manifest(uri, edit)
    name = {"shards": r"shards\[1\]\.path '\.\./outside", "index": "index.path '/abs/trained.faiss'",
            "index_shards": r"index_shards\[0\]\.path 'index/\.\./\.\./x", "index_merged": "index_merged.ivfdata"}
    with pytest.raises(ManifestError, match=rf"manifest\.json: {name[field]}.* leaves the datastore root"):
        load_manifest(Storage.from_uri(uri))


@pytest.mark.parametrize("reader", ["verify", "info", "add", "train-index", "serve", "eval"])
@pytest.mark.parametrize("escape", ["relative", "absolute"])
def test_manifest_path_escape_is_refused_by_every_reader(store, tmp_path, capsys, reader, escape, ray_cluster):
    """A manifest listing a shard outside the root (consistent, so only the path is wrong) is refused by
    name; the outside file, a valid shard whose read would "succeed", is never read nor touched."""
    uri = copy_store(store, tmp_path / "ds")
    m = load_manifest(Storage.from_uri(uri))
    outside = tmp_path / "outside.parquet"
    shutil.copy(os.path.join(uri, m.shards[1]["path"]), outside)
    content = outside.read_bytes()
    os.utime(outside, ns=(10**18, 10**18))       # in 2001: a read would move atime (relatime: atime < ctime)
    listed = "../outside.parquet" if escape == "relative" else str(outside)
    rewrite_manifest(uri, lambda d: d["shards"][1].update(path=listed))
    line = fail(capsys, reader_args(reader, uri, store, tmp_path))
    assert f"shards[1].path '{listed}' leaves the datastore root" in line and "manifest.json" in line, line
    s = os.stat(outside)
    assert (s.st_atime_ns, s.st_mtime_ns) == (10**18, 10**18) and outside.read_bytes() == content


# ---- 2. nothing unpickled: an index file replaced by a pickle ----------------------------------


class Boom:
    """Unpickling this creates the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


PICKLED = [("trained", "verify", False), ("trained", "add-again", False), ("trained", "add", False),
           ("trained", "add-again", True), ("trained", "add", True), ("shard", "verify", False),
           ("shard", "serve", False), ("shard", "serve", True), ("shard", "eval", False), ("shard", "eval", True)]


@pytest.mark.parametrize("kind,reader,consistent", [
    pytest.param(*c, marks=[pytest.mark.slow] if c[1] == "eval" or c[1:] == ("serve", False) else [],
                 id=f"{c[0]}-{c[1]}-{'manifest-too' if c[2] else 'file-only'}") for c in PICKLED])
def test_index_file_replaced_by_a_pickle_is_refused(store, tmp_path, capsys, kind, reader, consistent, ray_cluster):
    """Refused before faiss parses it (manifest checksum), or, when the manifest was rewritten to match,
    by faiss itself, which never unpickles: a one-line error naming the file; the marker never appears."""
    uri = copy_store(store, tmp_path / "ds")
    m = load_manifest(Storage.from_uri(uri))
    marker = tmp_path / "marker"
    rel = m.index["path"] if kind == "trained" else m.index_shards[1]["path"]
    data = pickle.dumps(Boom(str(marker)))
    with open(os.path.join(uri, rel), "wb") as f:
        f.write(data)
    if consistent:
        def edit(d):
            entry = d["index"] if kind == "trained" else d["index_shards"][1]
            entry.update(checksum=checksum(data), bytes=len(data))
        rewrite_manifest(uri, edit)
    line = fail(capsys, reader_args(reader, uri, store, tmp_path))
    assert rel in line, line
    assert any(w in line for w in (["not a readable FAISS index"] if consistent else ["checksum", "the manifest says"])), line
    assert not marker.exists()


def test_checksum_of_an_index_file_costs_little(tmp_path):
    """The manifest checksum checked before faiss reads a file: sha256 at >= 200 MB/s (measured ~1.5-2 GB/s)."""
    import time

    from builder.index import file_sha256
    p = tmp_path / "big.bin"
    p.write_bytes(np.random.default_rng(0).bytes(100 << 20))
    t0 = time.perf_counter()
    file_sha256(str(p))
    dt = time.perf_counter() - t0
    print(f"sha256 of 100 MB: {dt:.3f}s ({100 / dt:.0f} MB/s)")
    assert dt < 0.5 * 100 / 100 * 5     # 100 MB in under 2.5 s even on a loaded 2-core machine


# ---- 3. one flipped byte in each kind of file, for each stage that reads it --------------------


FLIPS = [("key-shard", "verify"), ("key-shard", "add"), ("key-shard", "train-index"), ("key-shard", "serve"),
         ("index-shard", "verify"), ("index-shard", "serve"), ("index-shard", "eval"),
         ("trained-index", "verify"), ("trained-index", "add-again"), ("trained-index", "add"),
         ("manifest", "verify"), ("manifest", "info"), ("manifest", "add-again"), ("manifest", "train-index"),
         ("manifest", "serve"), ("manifest", "eval")]


SLOW_FLIPS = {("key-shard", "serve"), ("index-shard", "eval")}     # each starts servers (~20 s on 2 cores)


@pytest.mark.parametrize("kind,reader", [pytest.param(k, r, id=f"{k}-{r}", marks=[pytest.mark.slow] if (k, r) in
                                                      SLOW_FLIPS else []) for k, r in FLIPS])
def test_one_flipped_byte_is_detected_and_named(store, tmp_path, capsys, kind, reader, ray_cluster):
    uri = copy_store(store, tmp_path / "ds")
    m = load_manifest(Storage.from_uri(uri))
    if kind == "manifest":
        rel = "manifest.json"
        text = open(os.path.join(uri, rel), "rb").read()
        at = re.search(rb'"window": \d+', text).end() - 1       # the last digit of a number: still valid JSON
    else:
        rel = {"key-shard": m.shards[1]["path"], "index-shard": m.index_shards[0]["path"],
               "trained-index": m.index["path"]}[kind]
        at = None                                                  # the middle: key data / inverted lists
    flip(os.path.join(uri, rel), at)
    line = fail(capsys, reader_args(reader, uri, store, tmp_path))
    assert rel in line, line
    if kind == "manifest":
        assert "manifest_checksum" in line, line
    if reader == "serve":
        assert not (tmp_path / "r.npz").exists()
    if reader == "add" and kind != "manifest":
        assert load_manifest(Storage.from_uri(uri)).index_shards is None or kind == "trained-index"


def test_verify_names_every_corrupted_file(store, tmp_path, capsys):
    """`knnlm verify` lists each flipped file (one line each), exit 2."""
    uri = copy_store(store, tmp_path / "ds")
    m = load_manifest(Storage.from_uri(uri))
    rels = [m.shards[0]["path"], m.index["path"], m.index_shards[1]["path"]]
    for rel in rels:
        flip(os.path.join(uri, rel))
    capsys.readouterr()
    assert main(["verify", uri]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for rel in rels:
        assert any(rel in ln and "checksum mismatch" in ln for ln in err.splitlines()), (rel, err)


def test_every_single_byte_flip_of_a_manifest_is_detected(store, tmp_path):
    """Each byte of manifest.json flipped in turn (bit i % 8 of byte i: every bit position, names, numbers,
    strings, the checksum itself): load_manifest refuses every one."""
    uri = copy_store(store, tmp_path / "ds")
    path = os.path.join(uri, "manifest.json")
    good = open(path, "rb").read()
    st = Storage.from_uri(uri)
    missed = []
    for i in range(len(good)):
        bad = bytearray(good)
        bad[i] ^= 1 << (i % 8)
        with open(path, "wb") as f:
            f.write(bytes(bad))
        try:
            load_manifest(st)
            missed.append((i, good[max(0, i - 20):i + 20]))
        except ManifestError:
            pass
    assert not missed, missed[:5]
    with open(path, "wb") as f:
        f.write(good)
    load_manifest(st)


def test_manifest_without_checksum_still_loads(store, tmp_path):
    """Manifests written before `manifest_checksum` existed load as before."""
    uri = copy_store(store, tmp_path / "ds")
    p = os.path.join(uri, "manifest.json")
    d = json.load(open(p))
    del d[CHECKSUM_FIELD]
    with open(p, "w") as f:
        json.dump(d, f, indent=1)
    assert load_manifest(Storage.from_uri(uri)).num_keys == d["num_keys"]

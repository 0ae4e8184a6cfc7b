"""`knnlm ingest`: a new corpus into a finished datastore as its next version (builder/ingest.py)."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import upload_dir, write_text
from test_build import read_datastore

from builder.add import add_stage
from builder.build import BuildError, build
from builder.config import AddConfig, BuildConfig, ConfigError, IngestConfig, TrainConfig
from builder.drift import DRIFT_THRESHOLD, coarse_error, drift_record
from builder.index import ivf_contents, read_index_file
from builder.ingest import IngestError, ingest, warn_drift
from builder.layout import BUILD_LEASE, INDEX_LEASE, MANIFEST
from builder.lease import Lease
from builder.manifest import load_manifest, write_manifest
from builder.storage import Storage
from builder.train import train_stage
from builder.versions import history, publish

W, C = 16, 6
A_DOCS = ["The quick brown fox jumps over the lazy dog. " * 3,
          "Tokens, keys and values: every corpus token becomes one entry of the datastore.",
          "In 1998 the river flooded the valley, and 3,000 people moved to the hills. " * 2]
B_DOCS = ["A kNN-LM interpolates a language model with nearest neighbours from a datastore. " * 2,
          "",                                   # skipped, but keeps its document index
          "Valkyria Chronicles III is a tactical role-playing game developed by Sega.",
          "The lazy dog sleeps while the quick brown fox jumps over it again and again."]
FACTORY = "IVF4,PQ8x4"


def corpus_a(root) -> list[str]:
    return [write_text(root / "a" / "a.txt", A_DOCS[0]),
            write_text(root / "a" / "b.jsonl", "\n".join(json.dumps({"text": t}) for t in A_DOCS[1:]) + "\n")]


def corpus_b(root) -> list[str]:
    return [write_text(root / "b" / "c.jsonl", "\n".join(json.dumps({"text": t}) for t in B_DOCS[:3]) + "\n"),
            write_text(root / "b" / "d.txt", B_DOCS[3])]


def bcfg(corpus, model, out, **kw) -> BuildConfig:
    args = dict(corpus=corpus, model=model, out=str(out), window=W, min_context=C, unit_tokens=20, shard_rows=7,
                batch_size=2, progress=False, lease_ttl=3.0, device="cpu")
    return BuildConfig(**(args | kw))


def icfg(ds, corpus, name="b", **kw) -> IngestConfig:
    args = dict(datastore=str(ds), corpus=corpus, name=name, batch_size=2, progress=False, lease_ttl=3.0,
                device="cpu")
    return IngestConfig(**(args | kw))


def index_pairs(uri: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{inverted list: (ids, codes) sorted by id} over every index shard of the datastore."""
    st = Storage.from_uri(uri)
    m = load_manifest(st)
    got: dict[int, list] = {}
    for s in m.index_shards:
        local = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"knnlm-ingest-test-{os.getpid()}.faiss")
        st.download_file(s["path"], local)
        for lst, (ids, codes) in ivf_contents(read_index_file(local)).items():
            got.setdefault(lst, []).append((ids, codes))
        os.remove(local)
    out = {}
    for lst, parts in got.items():
        ids, codes = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        o = np.argsort(ids, kind="stable")
        out[lst] = (ids[o], codes[o])
    return out


def stable(uri: str) -> dict:
    """What an ingestion must reproduce byte for byte: shards, index shards, corpus, the ingestion's record
    without its times."""
    m = load_manifest(Storage.from_uri(uri))
    recs = {k: {f: v for f, v in r.items() if f != "finished_at"} for k, r in m.ingestions.items()}
    return {"shards": m.shards, "index_shards": m.index_shards, "num_keys": m.num_keys, "corpus": m.corpus,
            "ingestions": recs, "version": m.version, "identity": m.identity}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, gpt2_model, ray_cluster):
    """A (2 files) built, trained and added; then B (2 files) ingested as "b"; `before` is a copy of the datastore
    before the ingestion; `scratch` is A + B built from scratch."""
    root = tmp_path_factory.mktemp("ingest")
    a, b = corpus_a(root), corpus_b(root)
    build(bcfg(a + b, gpt2_model, root / "scratch"))
    ds = root / "ds"
    build(bcfg(a, gpt2_model, ds))
    train_stage(TrainConfig(datastore=str(ds), index_factory=FACTORY, train_size=10**6, trainer="faiss",
                            min_points_per_centroid=1, lease_ttl=3.0))
    add_stage(AddConfig(datastore=str(ds), index_shards=2, encoder="faiss", lease_ttl=3.0))
    shutil.copytree(ds, root / "before")
    res = ingest(icfg(ds, b, index_shards=2))
    return {"root": root, "a": a, "b": b, "ds": str(ds), "before": str(root / "before"),
            "scratch": str(root / "scratch"), "res": res}


def fresh(ingested, dst) -> str:
    shutil.copytree(ingested["before"], dst)
    return str(dst)


def test_ingest_equals_build_from_scratch(ingested):
    ds, scratch, res = ingested["ds"], ingested["scratch"], ingested["res"]
    m_ds, rows = read_datastore(ds)
    m_sc, ref = read_datastore(scratch)
    for c in ("key", "value", "doc", "pos"):
        np.testing.assert_array_equal(rows[c], ref[c], err_msg=c)
    assert [s["checksum"] for s in m_ds["shards"]] == [s["checksum"] for s in m_sc["shards"]]
    assert m_ds["num_keys"] == m_sc["num_keys"] == res.manifest.num_keys
    assert m_ds["corpus"]["num_documents"] == m_sc["corpus"]["num_documents"] == 3 + 4
    assert m_ds["identity"] == json.loads(Storage.from_uri(ingested["before"]).read_text(MANIFEST))["identity"]
    assert m_ds["version"] == 2 and [e["kind"] for e in history(res.manifest)] == ["build", "ingest"]
    rec = m_ds["ingestions"]["b"]
    assert rec["first_id"] == m_ds["num_keys"] - rec["num_keys"] and rec["version"] == 2
    assert [f["uri"] for f in rec["files"]] == ingested["b"]
    # the same trained index in the from-scratch datastore, one add of all its ids
    st_sc, st_ds = Storage.from_uri(scratch), Storage.from_uri(ds)
    m_sc, m_d = load_manifest(st_sc), load_manifest(st_ds)
    st_sc.write_bytes(m_d.index["path"], st_ds.read_bytes(m_d.index["path"]))
    m_sc.index = m_d.index
    write_manifest(st_sc, m_sc)
    add_stage(AddConfig(datastore=scratch, index_shards=1, encoder="faiss", lease_ttl=3.0))
    assert len(m_d.index_shards) == 4
    got, want = index_pairs(ds), index_pairs(scratch)
    assert sorted(got) == sorted(want)
    ids = np.sort(np.concatenate([got[lst][0] for lst in got]))
    np.testing.assert_array_equal(ids, np.arange(m_d.num_keys))           # every id once
    for lst in want:
        np.testing.assert_array_equal(got[lst][0], want[lst][0])
        np.testing.assert_array_equal(got[lst][1], want[lst][1])
    # no leftovers of the unfinished ingestion
    left = st_ds.list("ingest/b/")
    assert not [p for p in left if "_index" in p or "_build" in p or p.endswith(("staged.json", "manifest.json"))]


def test_rerun_does_nothing_other_corpus_refused(ingested, monkeypatch, tmp_path):
    ds = ingested["ds"]
    before = stable(ds)

    def no_ray(*a, **k):
        raise AssertionError("Ray was started")
    monkeypatch.setattr("builder.ingest.ray_session", no_ray)
    monkeypatch.setattr("builder.ingest.inspect_model", no_ray)
    res = ingest(icfg(ds, ingested["b"]))
    assert res.already_done and res.version == 2 and "nothing to do" in res.summary()
    assert stable(ds) == before
    other = [write_text(tmp_path / "other.txt", "Some other text about foxes and dogs.")]
    with pytest.raises(IngestError, match=r"--name b: already ingested in version 2 from 2 files.*1 files"):
        ingest(icfg(ds, other))
    assert stable(ds) == before


def test_concurrent_ingestion_is_refused_by_the_lease(ingested, tmp_path):
    ds = fresh(ingested, tmp_path / "ds")
    st = Storage.from_uri(ds)
    for path, what in ((BUILD_LEASE, "build"), (INDEX_LEASE, "index build")):
        holder = Lease(st, ttl=2.0, path=path, what="ingestion")
        holder.acquire()                   # a live ingestion (or add): renews every 0.5 s
        try:
            with pytest.raises(IngestError, match=f"another {what} or ingestion is running"):
                ingest(icfg(ds, ingested["b"], name="c", lease_ttl=2.0))
        finally:
            holder.release()
        assert load_manifest(st).version == 1
    assert not st.exists(BUILD_LEASE) and not st.exists(INDEX_LEASE)


@pytest.mark.slow
def test_worker_killed_mid_unit_resumes_to_the_same_bytes(ingested, tmp_path):
    ds = fresh(ingested, tmp_path / "ds")
    marker = tmp_path / "fault-happened"
    fault_file = os.environ["KNNLM_FAULT_FILE"]
    with open(fault_file, "w") as f:
        f.write(f"exit:1:{marker}")
    try:
        ingest(icfg(ds, ingested["b"], index_shards=2))
    finally:
        os.remove(fault_file)
    assert marker.exists(), "the worker was not killed"
    assert stable(ds) == stable(ingested["ds"])


@pytest.mark.slow
def test_driver_killed_before_publish_resumes_to_the_same_bytes(ingested, tmp_path, ray_cluster):
    ds = fresh(ingested, tmp_path / "ds")
    marker = tmp_path / "fault-happened"
    fault_file = os.environ["KNNLM_FAULT_FILE"]
    gcs = ray_cluster.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "cluster.cli", "ingest", ds, "--corpus", *ingested["b"], "--name", "b",
           "--index-shards", "2", "--batch-size", "2", "--device", "cpu", "--lease-ttl", "3", "--address", gcs,
           "--no-progress"]
    with open(fault_file, "w") as f:
        f.write(f"ingest:0:{marker}")
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                              timeout=300)
    finally:
        os.remove(fault_file)
    assert marker.exists() and proc.returncode != 0, proc.stdout.decode()[-2000:]
    st = Storage.from_uri(ds)
    assert load_manifest(st).version == 1                 # nothing published
    assert st.exists("ingest/b/staged.json") and st.exists(BUILD_LEASE)
    with pytest.raises(IngestError, match=r"--name b: an unfinished ingestion of 2 files .* 1 files"):
        ingest(icfg(ds, ingested["b"][:1]))
    res = ingest(icfg(ds, ingested["b"], index_shards=2))
    assert res.version == 2 and not res.already_done
    assert stable(ds) == stable(ingested["ds"])


@pytest.mark.slow
def test_driver_killed_after_publish_rerun_does_nothing(ingested, tmp_path, monkeypatch):
    """Killed between the publish and the clean-up: the version is whole; a rerun finds it done."""
    ds = fresh(ingested, tmp_path / "ds")

    def die(kind, ident):
        if (kind, ident) == ("ingest", 1):
            raise KeyboardInterrupt
    monkeypatch.setattr("builder.ingest.maybe_fault", die)
    with pytest.raises(KeyboardInterrupt):
        ingest(icfg(ds, ingested["b"], index_shards=2))
    assert stable(ds) == stable(ingested["ds"])
    st = Storage.from_uri(ds)
    assert st.exists("ingest/b/staged.json")              # the clean-up did not run
    assert ingest(icfg(ds, ingested["b"], index_shards=2)).already_done
    assert not st.exists("ingest/b/staged.json") and not st.list("ingest/b/_index/")
    assert not st.exists("ingest/b/manifest.json") and not st.exists(BUILD_LEASE)
    assert stable(ds) == stable(ingested["ds"])


def test_removed_source_is_not_silently_readded(ingested, tmp_path):
    ds = fresh(ingested, tmp_path / "ds")
    st = Storage.from_uri(ds)
    m = load_manifest(st)
    src = m.corpus["files"][1]["uri"]                    # b.jsonl of A
    new = load_manifest(st)
    new.removals = [{"version": 2, "at": "now", "source": src, "num_docs": 2, "num_keys": 1, "ranges": [[0, 1]]}]
    new.removed = {"ranges": [[0, 1]], "num_keys": 1}
    with Lease(st, 3.0) as lease:
        publish(st, lease, m, new, {"kind": "remove", "source": src})
    with pytest.raises(IngestError, match=r"b\.jsonl: it is the source .* --readd"):
        ingest(icfg(ds, [src], name="again"))
    same = shutil.copy(src, tmp_path / "renamed.jsonl")  # the same content under another name
    with pytest.raises(IngestError, match="renamed.jsonl.*--readd"):
        ingest(icfg(ds, [str(same)], name="again"))
    assert load_manifest(st).version == 2


def test_bad_input_publishes_nothing(ingested, tmp_path):
    ds = fresh(ingested, tmp_path / "ds")
    with pytest.raises(IngestError, match="--corpus .*missing.txt: no such file"):
        ingest(icfg(ds, [str(tmp_path / "missing.txt")]))
    empty = write_text(tmp_path / "empty.jsonl", "\n")
    with pytest.raises(BuildError, match="no usable document"):
        ingest(icfg(ds, [empty], name="empty"))
    with pytest.raises(IngestError, match="not a finished datastore"):
        ingest(icfg(tmp_path / "nothing", ingested["b"]))
    assert load_manifest(Storage.from_uri(ds)).version == 1
    assert not Storage.from_uri(ds).exists(BUILD_LEASE)


def test_model_of_another_datastore_is_refused(ingested, tmp_path, tiny_models):
    ds = fresh(ingested, tmp_path / "ds")
    with pytest.raises(IngestError, match="--model .*neox.*weights"):
        ingest(icfg(ds, ingested["b"], model=tiny_models["neox"]))


def test_config_checks():
    for bad in ("", "a/b", "x" * 65, "sp ace"):
        with pytest.raises(ConfigError, match="--name"):
            icfg("ds", ["c.txt"], name=bad)
    with pytest.raises(ConfigError, match="--index-shards or --shard-size"):
        icfg("ds", ["c.txt"], index_shards=2, shard_size=10)
    with pytest.raises(ConfigError, match="--corpus"):
        icfg("ds", [])


@pytest.mark.slow
@pytest.mark.s3
def test_ingest_on_s3_killed_worker_and_driver_resume(ingested, s3_bucket, tmp_path, ray_cluster):
    """The datastore on S3: an ingestion that loses a key worker mid-unit, and one whose driver is killed
    before the publish (its leases left held) then rerun, both end with the bytes of the uninterrupted local
    ingestion; a concurrent ingestion is refused by the lease."""
    want = stable(ingested["ds"])
    uri = upload_dir(ingested["before"], s3_bucket, "worker")
    marker = tmp_path / "worker-killed"
    fault_file = os.environ["KNNLM_FAULT_FILE"]
    with open(fault_file, "w") as f:
        f.write(f"exit:1:{marker}")
    try:
        res = ingest(icfg(uri, ingested["b"], index_shards=2))
    finally:
        os.remove(fault_file)
    assert marker.exists(), "the worker was not killed"
    assert res.version == 2 and stable(uri) == want

    uri = upload_dir(ingested["before"], s3_bucket, "driver")
    marker = tmp_path / "driver-killed"
    cmd = [sys.executable, "-m", "cluster.cli", "ingest", uri, "--corpus", *ingested["b"], "--name", "b",
           "--index-shards", "2", "--batch-size", "2", "--device", "cpu", "--lease-ttl", "3", "--no-progress",
           "--address", ray_cluster.get_runtime_context().gcs_address]
    with open(fault_file, "w") as f:
        f.write(f"ingest:0:{marker}")
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    finally:
        os.remove(fault_file)
    assert marker.exists() and proc.returncode != 0, proc.stdout.decode()[-2000:]
    st = Storage.from_uri(uri)
    assert load_manifest(st).version == 1 and st.exists(BUILD_LEASE)     # nothing published, leases held
    assert ingest(icfg(uri, ingested["b"], index_shards=2)).version == 2  # takes the dead driver's leases over
    assert stable(uri) == want and not st.exists(BUILD_LEASE) and not st.exists(INDEX_LEASE)
    with Lease(st, ttl=2.0, what="ingestion"):
        with pytest.raises(IngestError, match="another build or ingestion is running"):
            ingest(icfg(uri, ingested["b"], name="c", lease_ttl=2.0))


def test_stream_mode_build_then_ingest_equals_build_from_scratch(ingested, tmp_path, gpt2_model):
    """In stream mode every input file is its own sequence, so B's files ingested later get exactly the keys
    they get in one build of A + B; their `doc` (the file's number) continues after A's files."""
    a, b = ingested["a"], ingested["b"]
    build(bcfg(a + b, gpt2_model, tmp_path / "scratch", mode="stream"))
    build(bcfg(a, gpt2_model, tmp_path / "ds", mode="stream"))
    res = ingest(icfg(tmp_path / "ds", b))
    assert res.version == 2 and res.first_id > 0
    m_ds, rows = read_datastore(str(tmp_path / "ds"))
    m_sc, ref = read_datastore(str(tmp_path / "scratch"))
    for c in ("key", "value", "doc", "pos"):
        np.testing.assert_array_equal(rows[c], ref[c], err_msg=c)
    assert m_ds["num_keys"] == m_sc["num_keys"] and m_ds["mode"] == "stream"
    assert sorted(set(rows["doc"][res.first_id:].tolist())) == [2, 3]   # B's two files after A's two


def test_drift_recorded(ingested):
    d = load_manifest(Storage.from_uri(ingested["ds"])).ingestions["b"]["drift"]
    assert d["threshold"] == DRIFT_THRESHOLD and d["sample_new"] == ingested["res"].keys_added
    assert d["new_coarse_error"] > 0 and d["base_coarse_error"] > 0
    assert d["ratio"] == pytest.approx(d["new_coarse_error"] / d["base_coarse_error"], rel=1e-3)


def test_drift_warning_names_both_numbers(caplog):
    caplog.set_level("WARNING")
    warn_drift("n", {"new_coarse_error": 9.0, "base_coarse_error": 3.0, "ratio": 3.0, "threshold": 1.5, "far": True},
               "ds")
    assert "9 vs 3" in caplog.text and "train-index ds --force" in caplog.text
    caplog.clear()
    warn_drift("n", {"new_coarse_error": 3.3, "base_coarse_error": 3.0, "ratio": 1.1, "threshold": 1.5, "far": False},
               "ds")
    warn_drift("n", None, "ds")
    assert not caplog.text


def test_coarse_error_separates_far_keys():
    import faiss
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 16)).astype(np.float32)
    index = faiss.index_factory(16, "IVF16,Flat")
    index.train(x)
    same = rng.normal(size=(2000, 16)).astype(np.float32)
    far = same + 6.0
    near = drift_record(index, same, x[:2000])
    assert 0.8 < near["ratio"] < 1.25 and not near["far"]
    out = drift_record(index, far, x[:2000])
    assert out["ratio"] > 5 and out["far"]
    # the nearest centroid by brute force
    cent = faiss.extract_index_ivf(index).quantizer.reconstruct_n(0, 16)
    ref = ((same[:, None, :] - cent[None]) ** 2).sum(-1).min(1).mean()
    assert coarse_error(index, same) == pytest.approx(float(ref), rel=1e-4)


def test_pipeline_ingest_section(tmp_path, gpt2_model):
    from cluster.pipeline_file import load_pipeline
    from cluster.pipeline_spec import pipeline_reference
    write_text(tmp_path / "a.txt", A_DOCS[0])
    write_text(tmp_path / "new" / "c.txt", B_DOCS[0])
    path = write_text(tmp_path / "p.yaml", f"datastore: ds\nbuild: {{corpus: [a.txt], model: {gpt2_model}}}\n"
                                           "ingest: {corpus: [new/], name: day2, shards: 1}\n")
    p = load_pipeline(path)
    assert p.ingest.corpus == [str(tmp_path / "new")] and p.ingest.name == "day2"
    cfg = p.stage_configs()["ingest"]
    assert isinstance(cfg, IngestConfig) and cfg.datastore == str(tmp_path / "ds") and cfg.index_shards == 1
    assert p.resolved()["ingest"]["name"] == "day2"
    assert "  ingest:  (optional section)" in pipeline_reference()
    for body, msg in (("ingest: {corpus: [new/]}", "ingest needs ingest.corpus and ingest.name"),
                      ("ingest: {corpus: [nope/], name: x}", r"ingest.corpus: .*nope"),
                      ("ingest: {corpus: [new/], name: 'a/b'}", r"ingest: --name|ingest: ingest.name"),
                      ("ingest: {corpus: [new/], nme: x}", "did you mean 'ingest.name'")):
        bad = write_text(tmp_path / "bad.yaml", f"datastore: ds\nbuild: {{corpus: [a.txt], model: {gpt2_model}}}\n"
                                               + body + "\n")
        with pytest.raises(ConfigError, match=msg):
            load_pipeline(bad)


@pytest.mark.slow
def test_run_pipeline_with_ingest_section_twice(ingested, tmp_path, gpt2_model):
    """`knnlm run` with an ingest section: build, index, then the ingestion; a rerun does nothing."""
    from cluster.pipeline import run_pipeline
    from cluster.pipeline_file import load_pipeline
    a, b = ingested["a"], ingested["b"]
    body = (f"datastore: {tmp_path / 'ds'}\n"
            f"build: {{corpus: {json.dumps(a)}, model: {gpt2_model}, window: {W}, min_context: {C}, unit_tokens: 20, "
            "shard_rows: 7, batch_size: 2, device: cpu}\n"
            f"index: {{factory: '{FACTORY}', train_size: 1000000, min_points_per_centroid: 1, trainer: faiss, "
            "shards: 2, encoder: faiss}\n"
            f"ingest: {{corpus: {json.dumps(b)}, name: b, shards: 2, batch_size: 2, device: cpu}}\n")
    p = load_pipeline(write_text(tmp_path / "p.yaml", body))
    out = run_pipeline(p)
    assert "ingested b" in out["ingest"]
    got = stable(str(tmp_path / "ds"))
    want = stable(ingested["ds"])
    assert got["shards"] == want["shards"] and got["index_shards"] == want["index_shards"]
    again = run_pipeline(load_pipeline(write_text(tmp_path / "p.yaml", body)))
    assert "nothing to do" in again["ingest"] and "left as they are" in again["add"]


@pytest.mark.slow
def test_servers_follow_a_real_ingestion_and_removal_under_load(ingested, tmp_path, ray_cluster):
    """Servers of the datastore (watching its versions) under two clients' query load while `knnlm ingest`
    publishes version 2 and `knnlm remove` version 3: no query fails, every answer is wholly the answer of
    the one version it is tagged with (computed in-process afterwards), B's ids come back from version 2
    on, the removed source's never from version 3."""
    from test_serve_versions import Clients, check_answers, expected, wait_versions

    from builder.config import RemoveConfig
    from builder.remove import remove
    from builder.rows import iter_range
    from builder.versions import is_removed
    from retriever.router import start_servers, stop_servers

    ds = fresh(ingested, tmp_path / "ds")
    st, sc = Storage.from_uri(ds), Storage.from_uri(ingested["scratch"])
    n_a, ms = load_manifest(st).num_keys, load_manifest(sc)
    keys = np.concatenate([p[1]["key"] for p in iter_range(sc, ms, 0, ms.num_keys, ("key",))]).astype(np.float32)
    rng = np.random.default_rng(3)
    ids = rng.permutation(np.concatenate([rng.integers(0, n_a, 24), rng.integers(n_a, ms.num_keys, 24)]))
    q = keys[ids] + rng.normal(0, 0.01, (len(ids), keys.shape[1])).astype(np.float32)
    batches = [q[i:i + 6] for i in range(0, len(q), 6)]
    cache = str(tmp_path / "cache")
    want = {1: expected(ds, 1, batches, cache)}
    start_servers(ds, cache_dir=cache, detached=True, watch=0.3, grace=2.0)
    try:
        with Clients(ds, batches) as clients:
            clients.wait_seen(1, timeout=300)
            assert ingest(icfg(ds, ingested["b"], index_shards=2)).manifest.version == 2
            clients.wait_seen(2, timeout=300)
            assert remove(RemoveConfig(datastore=ds, source=[ingested["a"][0]], lease_ttl=3.0)).manifest.version == 3
            clients.wait_seen(3, timeout=300)
            wait_versions(ds, {3}, timeout=120)
        for v in (2, 3):
            want[v] = expected(ds, v, batches, cache)
        per = check_answers(clients, want)
        assert set(per) == {1, 2, 3}, per
        removed = load_manifest(st).removed["ranges"]
        for b in range(len(batches)):
            assert want[1][b][1].max() < n_a
            assert not is_removed(want[3][b][1], removed).any()
        assert any((want[2][b][1] >= n_a).any() for b in range(len(batches)))             # B is found from v2
        assert any(is_removed(want[2][b][1], removed).any() for b in range(len(batches)))  # and A's source until v3
    finally:
        stop_servers(ds)


def test_format_defaults_to_the_datastores():
    """Found by bench/bench_ingest.py: a WikiText datastore's ingestion of a .txt file was read as one text
    document (--format auto), so removing its first article removed it all. Without --format, an ingestion
    reads its corpus as the datastore was built."""
    from types import SimpleNamespace

    from builder.ingest import ingest_format
    wikitext = SimpleNamespace(corpus={"format": "wikitext"})
    assert ingest_format(icfg("ds", ["b.txt"]), wikitext) == "wikitext"
    assert ingest_format(icfg("ds", ["b.txt"], format="jsonl"), wikitext) == "jsonl"
    assert ingest_format(icfg("ds", ["b.txt"]), SimpleNamespace(corpus={})) == "auto"

"""End-to-end builds on an embedded Ray: keys, ids, doc/pos, resume, failures, the lease."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import write_text
from test_keys import reference_keys
from transformers import AutoModelForCausalLM, AutoTokenizer

from builder.build import BuildError, build
from builder.config import BuildConfig
from builder.key_shards import checksum, read_shard
from builder.layout import BUILD_LEASE
from builder.lease import Lease
from builder.manifest import load_manifest
from builder.storage import Storage

W, C = 16, 6  # window / min_context of these tests: documents span several windows

DOCS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Tokens, keys and values: every corpus token becomes one entry of the datastore.",
    "",  # skipped (empty) but keeps its document index
    "In 1998 the river flooded the valley, and 3,000 people moved to the hills. " * 2,
    "A kNN-LM interpolates a language model with nearest neighbours from a datastore.",
]


def read_datastore(uri: str) -> tuple[dict, dict]:
    """(manifest dict, concatenated columns); verifies checksums and row counts."""
    st = Storage.from_uri(uri)
    m = load_manifest(st)
    cols = {c: [] for c in ("key", "value", "doc", "pos")}
    for s in m.shards:
        data = st.read_bytes(s["path"])
        assert checksum(data) == s["checksum"], s["path"]
        rows = read_shard(data, m.dim)
        assert len(rows["value"]) == s["num_rows"]
        for c in cols:
            cols[c].append(rows[c])
    return json.loads(st.read_text("manifest.json")), {c: np.concatenate(v) for c, v in cols.items()}


def document_corpus(root) -> list[str]:
    a = write_text(root / "corpus" / "a.txt", DOCS[0])
    b = write_text(root / "corpus" / "b.jsonl", "\n".join(json.dumps({"text": t}) for t in DOCS[1:4]) + "\n")
    c = write_text(root / "corpus" / "c.txt", DOCS[4])
    return [a, b, c]


def small_cfg(corpus, model, out, **kw) -> BuildConfig:
    args = dict(corpus=corpus, model=model, out=str(out), window=W, min_context=C, unit_tokens=20, shard_rows=7,
                batch_size=2, progress=False, lease_ttl=3.0)
    args.update(kw)
    return BuildConfig(**args)


@pytest.fixture(scope="module")
def doc_build(tmp_path_factory, gpt2_model, ray_cluster):
    root = tmp_path_factory.mktemp("docbuild")
    corpus = document_corpus(root)
    res = build(small_cfg(corpus, gpt2_model, root / "ds"))
    return root, corpus, res


def test_document_mode_keys_ids_doc_pos(doc_build, gpt2_model):
    root, corpus, res = doc_build
    man, cols = read_datastore(str(root / "ds"))
    tok = AutoTokenizer.from_pretrained(gpt2_model)
    model = AutoModelForCausalLM.from_pretrained(gpt2_model).eval()
    docs = {0: DOCS[0], 1: DOCS[1], 3: DOCS[3], 4: DOCS[4]}  # document 2 is empty: skipped, index kept
    expected = sum(len(tok(t)["input_ids"]) - 1 for t in docs.values())
    assert man["num_keys"] == expected == len(cols["value"])
    for k in ("format_version", "num_keys", "dim", "key_dtype", "value_dtype", "shard_format", "model", "tokenizer",
              "key_layer", "window", "min_context", "mode", "compute_dtype", "corpus", "shards"):
        assert k in man, k
    assert (man["key_dtype"], man["value_dtype"], man["shard_format"]) == ("float16", "int32", "parquet")
    assert man["model"]["sha256"].startswith("sha256:") and man["model"]["name"] == gpt2_model
    assert (man["window"], man["min_context"], man["mode"], man["key_layer"]) == (W, C, "document", "ffn_input")
    assert man["compute_dtype"] == "float32" and man["dim"] == 32
    assert man["corpus"]["skipped_documents"] == 1 and man["corpus"]["num_documents"] == 5
    # ids contiguous in corpus order; several shards per unit (shard_rows=7)
    first = [s["first_id"] for s in man["shards"]]
    assert first == list(np.cumsum([0] + [s["num_rows"] for s in man["shards"]])[:-1])
    assert max(s["num_rows"] for s in man["shards"]) <= 7 and len(man["shards"]) > len(corpus)
    assert man["build"]["num_units"] > 3
    assert sorted(set(cols["doc"].tolist())) == [0, 1, 3, 4]
    assert (np.diff(cols["doc"]) >= 0).all()
    for d, text in docs.items():
        ids = tok(text)["input_ids"]
        sel = cols["doc"] == d
        np.testing.assert_array_equal(cols["pos"][sel], np.arange(1, len(ids)))
        np.testing.assert_array_equal(cols["value"][sel], ids[1:])
        ref = reference_keys(model, "gpt2", "ffn_input", ids, W, C)
        np.testing.assert_allclose(cols["key"][sel].astype(np.float32), ref, rtol=1e-2, atol=2e-3)
    # nothing of the build's progress is left
    st = Storage.from_uri(str(root / "ds"))
    assert st.list("_build/") == []
    assert sorted(st.list("shards/")) == sorted(s["path"] for s in man["shards"])


def test_rerun_of_finished_build_does_nothing(doc_build, gpt2_model):
    root, corpus, res = doc_build
    before = Storage.from_uri(str(root / "ds")).read_text("manifest.json")
    again = build(small_cfg(corpus, gpt2_model, root / "ds"))
    assert again.already_complete and "nothing to do" in again.summary()
    assert Storage.from_uri(str(root / "ds")).read_text("manifest.json") == before


def test_stream_mode_llama_bos(tmp_path, tiny_models, ray_cluster):
    text = (" = First = \n\n Some words about the first article . \n = = Part = = \n More text here . \n"
            " = Second = \n\n The second article has other words , and numbers 1 @,@ 000 . \n")
    f = write_text(tmp_path / "wiki.tokens", text * 3)
    model_path = tiny_models["llama"]
    res = build(small_cfg([f], model_path, tmp_path / "ds", mode="stream", format="wikitext"))
    man, cols = read_datastore(str(tmp_path / "ds"))
    tok = AutoTokenizer.from_pretrained(model_path)
    ids = tok(text * 3)["input_ids"]
    assert ids[0] == tok.bos_token_id and man["tokenizer"]["adds_special_tokens"] is True
    assert man["num_keys"] == len(ids) - 1 == res.manifest.num_keys
    assert (cols["doc"] == 0).all()
    np.testing.assert_array_equal(cols["pos"], np.arange(1, len(ids)))
    np.testing.assert_array_equal(cols["value"], ids[1:])  # the BOS gets no key; it is the first word's context
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    ref = reference_keys(model, "llama", "ffn_input", ids, W, C)
    np.testing.assert_allclose(cols["key"].astype(np.float32), ref, rtol=1e-2, atol=2e-3)


def test_worker_killed_mid_unit(tmp_path, doc_build, gpt2_model):
    root, corpus, _ = doc_build
    marker = tmp_path / "fault-happened"
    fault_file = os.environ["KNNLM_FAULT_FILE"]
    with open(fault_file, "w") as f:
        f.write(f"exit:2:{marker}")
    try:
        res = build(small_cfg(corpus, gpt2_model, tmp_path / "ds"))
    finally:
        os.remove(fault_file)
    assert marker.exists(), "the worker was not killed"
    assert res.units_run == res.manifest.build["num_units"]
    _, clean = read_datastore(str(root / "ds"))
    _, got = read_datastore(str(tmp_path / "ds"))
    for c in clean:
        np.testing.assert_array_equal(got[c], clean[c])


def _wait_for(pred, timeout, what):
    t = time.time()
    while not pred():
        if time.time() - t > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.slow
def test_driver_killed_then_resumed(tmp_path, doc_build, gpt2_model, ray_cluster, caplog):
    """Kill -9 the `knnlm build` driver mid-build; the rerun takes over the lease and finishes."""
    root, corpus, _ = doc_build
    out = tmp_path / "ds"
    gcs = ray_cluster.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "cluster.cli", "build", "--corpus", *corpus, "--model", gpt2_model,
           "--out", str(out), "--window", str(W), "--min-context", str(C), "--unit-tokens", "2",
           "--shard-rows", "7", "--batch-size", "2", "--lease-ttl", "3", "--address", gcs, "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    units = out / "_build" / "units"
    try:
        _wait_for(lambda: units.exists() and len(os.listdir(units)) >= 3, 120, "3 committed units")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "manifest.json").exists(), "the build finished before it was killed"
    committed = len(os.listdir(units))
    assert (out / BUILD_LEASE).exists()  # the dead driver's lease is still there
    t0 = time.time()
    caplog.set_level("WARNING")
    res = build(small_cfg(corpus, gpt2_model, out, unit_tokens=2))
    assert res.units_skipped >= committed >= 3
    assert "build lease" in caplog.text
    _, clean = read_datastore(str(root / "ds"))  # built with other units: keys equal up to batching noise
    _, got = read_datastore(str(out))
    for c in ("value", "doc", "pos"):
        np.testing.assert_array_equal(got[c], clean[c])
    np.testing.assert_allclose(got["key"].astype(np.float32), clean["key"].astype(np.float32), atol=1e-3)
    assert time.time() - t0 < 60


def test_second_build_is_refused_while_one_runs(tmp_path, doc_build, gpt2_model):
    _, corpus, _ = doc_build
    st = Storage.from_uri(str(tmp_path / "ds"))
    holder = Lease(st, ttl=2.0)
    holder.acquire()  # a live build: renews every 0.5 s
    try:
        with pytest.raises(BuildError, match="another build is running"):
            build(small_cfg(corpus, gpt2_model, tmp_path / "ds", lease_ttl=2.0))
    finally:
        holder.release()
    assert not st.exists("manifest.json")


def test_dead_holders_lease_is_taken_over(tmp_path, doc_build, gpt2_model, caplog):
    _, corpus, _ = doc_build
    st = Storage.from_uri(str(tmp_path / "ds"))
    st.write_text(BUILD_LEASE, json.dumps({"holder": "dead", "host": "gone", "pid": 1, "renewed_at": time.time(),
                                           "seq": 1, "ttl": 2.0}))
    caplog.set_level("WARNING")
    t0 = time.time()
    res = build(small_cfg(corpus, gpt2_model, tmp_path / "ds", lease_ttl=2.0))
    assert res.manifest.num_keys > 0
    assert "waiting up to" in caplog.text and "took over" in caplog.text
    assert time.time() - t0 >= 1.5
    assert not st.exists(BUILD_LEASE)


def test_mismatched_rerun_is_refused(tmp_path, doc_build, gpt2_model, tiny_models):
    root, corpus, _ = doc_build
    with pytest.raises(BuildError, match="key_layer.*ffn_input.*final_hidden"):
        build(small_cfg(corpus, gpt2_model, root / "ds", key_layer="final_hidden"))
    with pytest.raises(BuildError, match="model_sha256"):
        build(small_cfg(corpus, tiny_models["neox"], root / "ds"))
    with pytest.raises(BuildError, match="mode"):
        build(small_cfg(corpus, gpt2_model, root / "ds", mode="stream"))


@pytest.mark.slow
def test_real_text_real_model(tmp_path, ray_cluster, shared_model, wikitext_splits):
    """WikiText-2 valid split with the small GPT-2 trained on the train split (../shared): the key
    count matches the model's README (57,067 scored tokens) and sampled keys match a plain forward."""
    valid = os.path.join(wikitext_splits, "valid.txt")
    res = build(BuildConfig(corpus=[valid], model=shared_model, out=str(tmp_path / "ds"), format="wikitext",
                            mode="stream", window=512, min_context=256, unit_tokens=20000, progress=False))
    man, cols = read_datastore(str(tmp_path / "ds"))
    assert man["num_keys"] == 57067 == res.manifest.num_keys
    assert man["dim"] == 256 and man["key_module"] == "transformer.h.3.mlp" and man["build"]["num_units"] == 3
    tok = AutoTokenizer.from_pretrained(shared_model)
    ids = tok(open(valid, encoding="utf-8").read())["input_ids"]
    np.testing.assert_array_equal(cols["value"], ids[1:])
    np.testing.assert_array_equal(cols["pos"], np.arange(1, len(ids)))
    # keys of the second window (targets 512..767, context from 256) and of a unit boundary
    model = AutoModelForCausalLM.from_pretrained(shared_model).eval()
    for s in (256, 256 * 79):
        captured = {}
        h = model.transformer.h[-1].mlp.register_forward_hook(lambda m, a, o: captured.update(x=a[0]))
        with torch.no_grad():
            model(torch.tensor(ids[s:s + 512])[None])
        h.remove()
        ref = captured["x"][0, 255:511].numpy()           # key positions s+255 .. s+510
        got = cols["key"][s + 256 - 1:s + 512 - 1].astype(np.float32)  # targets s+256 .. s+511
        np.testing.assert_allclose(got, ref, rtol=1e-2, atol=5e-3)


def test_verify_finds_corrupted_and_missing_shards(tmp_path, doc_build, capsys):
    import shutil

    from cluster.cli import main
    root, _, _ = doc_build
    ds = tmp_path / "copy"
    shutil.copytree(root / "ds", ds)
    assert main(["verify", str(ds)]) == 0
    assert "checksums match" in capsys.readouterr().out
    man = json.loads((ds / "manifest.json").read_text())
    bad, gone = man["shards"][1]["path"], man["shards"][-1]["path"]
    data = bytearray((ds / bad).read_bytes())
    data[100] ^= 0xFF
    (ds / bad).write_bytes(bytes(data))
    (ds / gone).unlink()
    assert main(["verify", str(ds)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: checksum mismatch" in err and f"{gone}: missing" in err and "2 of" in err
    assert main(["verify", str(tmp_path / "nothing")]) == 2
    assert "not a finished datastore" in capsys.readouterr().err


def test_manifest_typed_fields_round_trip():
    """`tuned` and `pipeline` are typed fields stored as before ("knnlm": {"tuned": ...}, "pipeline");
    keys this knnlm does not know stay in `extra` and are written back unchanged."""
    import json

    from builder.manifest import Manifest

    base = dict(num_keys=0, dim=4, model={}, tokenizer={}, key_layer="ffn_input", window=8, min_context=4,
                mode="stream", compute_dtype="float32", corpus={}, shards=[])
    m = Manifest(**base)
    assert "knnlm" not in json.loads(m.to_json()) and "pipeline" not in json.loads(m.to_json())
    d = json.loads(m.to_json()) | {"knnlm": {"tuned": {"lambda": 0.3}, "future": 1}, "pipeline": {"datastore": "x"},
                                   "from_a_newer_knnlm": [1]}
    m = Manifest.from_dict(d)
    assert m.tuned == {"lambda": 0.3} and m.pipeline == {"datastore": "x"}
    assert m.extra == {"knnlm": {"future": 1}, "from_a_newer_knnlm": [1]}
    strip = (lambda j: {k: v for k, v in j.items() if k != "manifest_checksum"})   # over the new content
    assert strip(json.loads(m.to_json())) == strip(d)

"""Builds against a real S3-compatible server (moto server mode on 127.0.0.1) through boto3."""
import logging

import boto3
import numpy as np
import pytest
from test_build import document_corpus, read_datastore, small_cfg

from builder.build import BuildError, build
from builder.storage import Storage, expand_inputs

pytestmark = pytest.mark.s3


def test_s3_build_is_byte_identical_to_local(tmp_path, s3_bucket, gpt2_model, ray_cluster, caplog):
    corpus = document_corpus(tmp_path)
    # the corpus itself comes from S3 too (a prefix, listed in key order)
    s3 = boto3.client("s3")
    for p in corpus:
        s3.upload_file(p, s3_bucket, f"corpus/{p.rsplit('/', 1)[-1]}")
    s3_corpus = expand_inputs([f"s3://{s3_bucket}/corpus"])
    assert s3_corpus == [f"s3://{s3_bucket}/corpus/{n}" for n in ("a.txt", "b.jsonl", "c.txt")]
    # a multipart upload left behind by a killed writer is aborted by the build
    s3.create_multipart_upload(Bucket=s3_bucket, Key="ds/shards/0000000-000.parquet")

    caplog.set_level(logging.DEBUG)
    local = build(small_cfg(corpus, gpt2_model, tmp_path / "local"))
    remote = build(small_cfg([f"s3://{s3_bucket}/corpus"], gpt2_model, f"s3://{s3_bucket}/ds"))
    lm, lcols = read_datastore(str(tmp_path / "local"))
    rm, rcols = read_datastore(f"s3://{s3_bucket}/ds")
    assert rm["num_keys"] == lm["num_keys"] > 0
    assert rcols["key"].tobytes() == lcols["key"].tobytes()
    for c in ("value", "doc", "pos"):
        np.testing.assert_array_equal(rcols[c], lcols[c])
    assert [s["checksum"] for s in rm["shards"]] == [s["checksum"] for s in lm["shards"]]
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads") in (None, [])
    st = Storage.from_uri(f"s3://{s3_bucket}/ds")
    assert st.list("_build/") == []
    assert sorted(st.list("shards/")) == sorted(s["path"] for s in rm["shards"])
    # credentials never reach logs or the manifest
    secret = "testing-secret-never-logged"
    assert secret not in caplog.text
    assert secret not in st.read_text("manifest.json")
    assert "testing-key-id" not in st.read_text("manifest.json")
    # a rerun is a no-op on S3 as well
    assert build(small_cfg([f"s3://{s3_bucket}/corpus"], gpt2_model, f"s3://{s3_bucket}/ds")).already_complete


def test_s3_missing_bucket_is_a_clear_error(gpt2_model, tmp_path, s3_server):
    corpus = document_corpus(tmp_path)
    with pytest.raises(BuildError, match="not writable.*--out"):
        build(small_cfg(corpus, gpt2_model, "s3://no-such-bucket-knnlm/ds"))


def test_s3_missing_corpus_is_a_clear_error(gpt2_model, tmp_path, s3_bucket):
    with pytest.raises(BuildError, match="--corpus s3://.*no object"):
        build(small_cfg([f"s3://{s3_bucket}/nothing-here/"], gpt2_model, tmp_path / "ds"))


def test_s3_build_with_as_many_key_workers_as_cpus_tokenizes(tmp_path, s3_bucket, gpt2_model, ray_cluster):
    """The key workers start while the corpus is tokenized on Ray tasks: they must not hold the CPUs those
    tasks need. With one CPU held per worker, 2 workers on this 2-CPU Ray starved the tasks forever (and so
    did a node lost mid-tokenization: the fault suite's node kill hung)."""
    import threading

    corpus = document_corpus(tmp_path)
    s3 = boto3.client("s3")
    for p in corpus:
        s3.upload_file(p, s3_bucket, f"cpus/{p.rsplit('/', 1)[-1]}")
    got: dict = {}
    t = threading.Thread(target=lambda: got.update(res=build(small_cfg(
        [f"s3://{s3_bucket}/cpus"], gpt2_model, f"s3://{s3_bucket}/ds-cpus", workers=2))), daemon=True)
    t.start()
    t.join(timeout=240)
    assert not t.is_alive(), "the build hung: its tokenize tasks found no free CPU beside the key workers"
    assert got["res"].manifest.num_keys == build(small_cfg(corpus, gpt2_model, tmp_path / "local")).manifest.num_keys > 0

"""Storage primitives and the lease, on local disk and on a real S3-compatible server."""
import threading
import time

import pytest
from conftest import write_text

from builder.layout import BUILD_LEASE
from builder.lease import Lease, LeaseError
from builder.storage import NotFound, Storage, StorageError, expand_inputs, normalize_uri, split_s3


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage.from_uri(str(tmp_path / "root"))
    bucket = request.getfixturevalue("s3_bucket")
    return Storage.from_uri(f"s3://{bucket}/some/prefix/")


def test_primitives(storage):
    with pytest.raises(NotFound):
        storage.read_bytes("a/b.bin")
    assert not storage.exists("a/b.bin")
    storage.write_bytes("a/b.bin", bytes(range(100)))
    assert storage.exists("a/b.bin")
    assert storage.read_bytes("a/b.bin") == bytes(range(100))
    assert storage.read_range("a/b.bin", 10, 20) == bytes(range(10, 20))
    storage.write_bytes("a/b.bin", b"new")  # atomic overwrite
    assert storage.read_bytes("a/b.bin") == b"new"
    storage.write_text("a/c.json", "{}")
    storage.write_text("z.json", "1")
    assert storage.list("a/") == ["a/b.bin", "a/c.json"]
    assert storage.list() == ["a/b.bin", "a/c.json", "z.json"]
    assert storage.create_exclusive("lock", b"one")
    assert not storage.create_exclusive("lock", b"two")
    assert storage.read_bytes("lock") == b"one"
    assert not storage.replace_if("lock", b"three", expected=b"wrong")
    assert storage.replace_if("lock", b"three", expected=b"one")
    assert storage.read_bytes("lock") == b"three"
    assert storage.delete_prefix("a/") == 2
    assert storage.list("a/") == []
    storage.check_writable()


def test_compose_joins_byte_ranges(storage):
    """compose: one object from ranges of others (a piece may be empty); a missing source is NotFound."""
    storage.write_bytes("p/a.bin", bytes(range(200)))
    storage.write_bytes("p/b.bin", b"xyz")
    storage.compose("out.bin", [("p/a.bin", 10, 20), ("p/b.bin", 0, 3), ("p/a.bin", 5, 5), ("p/a.bin", 190, 200)])
    assert storage.read_bytes("out.bin") == bytes(range(10, 20)) + b"xyz" + bytes(range(190, 200))
    storage.compose("empty.bin", [])
    assert storage.read_bytes("empty.bin") == b""
    with pytest.raises(NotFound):
        storage.compose("out2.bin", [("p/none.bin", 0, 3)])
    assert not storage.exists("out2.bin")


@pytest.mark.s3
def test_s3_compose_copies_large_parts_on_the_server(s3_bucket):
    """Pieces of 5 MiB and more become UploadPartCopy parts; smaller ones (and the bytes that make a part
    reach 5 MiB) are read and re-uploaded; nothing is left pending."""
    import boto3
    st = Storage.from_uri(f"s3://{s3_bucket}/ds")
    big = bytes(range(256)) * (6 << 12)                 # 6 MiB
    st.write_bytes("p/0.bin", big)
    st.write_bytes("p/1.bin", b"small piece")
    st.write_bytes("p/2.bin", big[::-1])
    pieces = [("p/0.bin", 0, len(big)), ("p/1.bin", 0, 11), ("p/2.bin", 100, len(big)), ("p/0.bin", 3, 1 << 20),
              ("p/1.bin", 2, 5)]
    st.compose("tokens/x.bin", pieces)
    assert st.read_bytes("tokens/x.bin") == b"".join(st.read_bytes(r)[s:e] for r, s, e in pieces)
    head = boto3.client("s3").head_object(Bucket=s3_bucket, Key="ds/tokens/x.bin")
    # parts: p/0 copied; the small piece + the first bytes of p/2 read up to 5 MiB; the rest (~2 MiB) read
    assert head["ETag"].strip('"').endswith("-3") and head["ContentLength"] == sum(e - s for _, s, e in pieces)
    assert boto3.client("s3").list_multipart_uploads(Bucket=s3_bucket).get("Uploads") in (None, [])


def test_create_exclusive_has_one_winner(storage):
    wins = []

    def go(i):
        if storage.create_exclusive("race", str(i).encode()):
            wins.append(i)
    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and storage.read_bytes("race") == str(wins[0]).encode()


def test_lease_refuses_live_holder_and_takes_over_dead_one(storage, caplog):
    a = Lease(storage, ttl=1.2)
    a.acquire()
    b = Lease(storage, ttl=1.2)
    t0 = time.time()
    with pytest.raises(LeaseError, match="another build is running"):
        b.acquire()
    assert time.time() - t0 < 3.0  # refused when it sees a renewal, not after waiting out the lease
    # the holder dies: it stops renewing without releasing
    a._stop.set()
    a._thread.join()
    caplog.set_level("WARNING")
    c = Lease(storage, ttl=1.2)
    t0 = time.time()
    c.acquire()
    assert time.time() - t0 >= 0.3
    assert "took over" in caplog.text
    # the old holder finds out before it commits anything
    with pytest.raises(LeaseError, match="lost the build lease"):
        a.check()
    c.release()
    assert not storage.exists(BUILD_LEASE)


def test_expand_inputs_local(tmp_path):
    for n in ("b.txt", "a.txt", "sub/c.txt"):
        write_text(tmp_path / "c" / n, n)
    d = str(tmp_path / "c")
    assert expand_inputs([d]) == [f"{d}/a.txt", f"{d}/b.txt", f"{d}/sub/c.txt"]
    assert expand_inputs([f"{d}/*.txt"]) == [f"{d}/a.txt", f"{d}/b.txt"]
    assert expand_inputs([f"{d}/b.txt", f"{d}/a.txt"]) == [f"{d}/b.txt", f"{d}/a.txt"]  # order given
    with pytest.raises(FileNotFoundError, match="--corpus .*nope"):
        expand_inputs([f"{d}/nope.txt"])
    with pytest.raises(FileNotFoundError, match="no file matches"):
        expand_inputs([f"{d}/*.jsonl"])
    with pytest.raises(ValueError, match="more than once"):
        expand_inputs([f"{d}/a.txt", f"{d}/*.txt"])


@pytest.mark.s3
def test_expand_inputs_s3(s3_bucket):
    import boto3
    s3 = boto3.client("s3")
    for k in ("x/2.jsonl", "x/1.jsonl", "x/sub/3.txt", "xy/4.txt"):
        s3.put_object(Bucket=s3_bucket, Key=k, Body=b"{}")
    b = f"s3://{s3_bucket}"
    assert expand_inputs([f"{b}/x"]) == [f"{b}/x/1.jsonl", f"{b}/x/2.jsonl", f"{b}/x/sub/3.txt"]
    assert expand_inputs([f"{b}/x/*.jsonl"]) == [f"{b}/x/1.jsonl", f"{b}/x/2.jsonl"]
    assert expand_inputs([f"{b}/xy/4.txt"]) == [f"{b}/xy/4.txt"]


def test_uris():
    assert normalize_uri("s3://b/p/") == "s3://b/p"
    assert split_s3("s3://bucket/a/b") == ("bucket", "a/b")
    with pytest.raises(StorageError, match="credentials"):
        split_s3("s3://key:secret@bucket/x")
    assert normalize_uri("file:///tmp/x") == "/tmp/x"


@pytest.mark.s3
def test_s3_multipart_write(s3_bucket, monkeypatch):
    """Large shards go up as multipart uploads: complete objects, nothing left pending."""
    import boto3

    from builder.storage import S3Storage
    monkeypatch.setattr(S3Storage, "MULTIPART_THRESHOLD", 5 << 20)
    st = Storage.from_uri(f"s3://{s3_bucket}/ds")
    data = bytes(range(256)) * (24 << 12)  # 24 MiB: several 5+ MiB parts
    monkeypatch.setattr(S3Storage, "MULTIPART_CHUNK", 8 << 20)
    st.write_bytes("shards/big.parquet", data)
    assert st.read_bytes("shards/big.parquet") == data
    assert st.read_range("shards/big.parquet", 10 << 20, (10 << 20) + 7) == data[10 << 20:(10 << 20) + 7]
    assert boto3.client("s3").list_multipart_uploads(Bucket=s3_bucket).get("Uploads") in (None, [])
    # an upload abandoned by a killed writer is aborted by cleanup_incomplete
    boto3.client("s3").create_multipart_upload(Bucket=s3_bucket, Key="ds/shards/x.parquet")
    assert st.cleanup_incomplete() == 1
    assert boto3.client("s3").list_multipart_uploads(Bucket=s3_bucket).get("Uploads") in (None, [])


def test_transient_errors_are_retried_with_backoff(monkeypatch, caplog):
    """with_retries: connection drops and 5xx/throttling are retried; other errors are not."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    from builder import storage_s3 as storage_mod
    monkeypatch.setattr(storage_mod.time, "sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        if len(calls) == 2:
            raise ClientError({"Error": {"Code": "SlowDown", "Message": "slow down"}}, "PutObject")
        return "ok"
    caplog.set_level("WARNING")
    assert storage_mod.with_retries(flaky, "write x") == "ok" and len(calls) == 3
    assert caplog.text.count("transient storage error") == 2

    def denied():
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "PutObject")
    with pytest.raises(ClientError):
        storage_mod.with_retries(denied, "write y")

    def down():
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
    with pytest.raises(StorageError, match="write z: failed after 3 attempts"):
        storage_mod.with_retries(down, "write z", attempts=3)

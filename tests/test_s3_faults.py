"""S3 under faults: the suite's fault proxy (tests/s3_proxy.py) and storage that survives it.

Every S3 request of the suite goes through conftest's S3_PROXY (Ray workers included); the
`s3_faults` fixture hands it out with its counts zeroed and sets its rates back to 0 afterwards.
"""
import hashlib
import http.client
import logging
import os
import random
import time
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.config import Config
from conftest import MOTO_URL
from s3_proxy import KINDS, FaultProxy

from builder.storage import NotFound, S3Storage, Storage, read_uri, size_uri
from builder.storage_s3 import ShortRead, get_object_checked

pytestmark = pytest.mark.s3
SECRET = os.environ["AWS_SECRET_ACCESS_KEY"]
EVERY_KIND = {"latency": 0.1, "reset": 0.1, "500": 0.1, "503": 0.1, "truncate": 0.1}


def expected_faults(seed: int, n: int, rates: dict) -> dict:
    """What FaultProxy(seed) applies to n requests made one after another (all eligible)."""
    rng, out = random.Random(seed), {k: 0 for k in KINDS}
    r = {k: rates.get(k, 0.0) for k in KINDS}
    for _ in range(n):
        hit = {k: rng.random() < r[k] for k in KINDS}
        out["latency"] += hit["latency"]
        f = next((k for k in ("reset", "500", "503", "truncate", "short") if hit[k]), None)
        if f:
            out[f] += 1
    return out


def plain_client(url: str):
    """A client that does not retry: every injected fault is seen."""
    return boto3.client("s3", endpoint_url=url, config=Config(retries={"total_max_attempts": 1, "mode": "standard"}))


@pytest.fixture
def own_proxy(s3_server):
    proxies = []

    def make(**kw) -> FaultProxy:
        p = FaultProxy(MOTO_URL, **kw)
        p.start()
        proxies.append(p)
        return p
    yield make
    for p in proxies:
        p.stop()


# ---- the proxy itself -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["reset", "500", "503", "truncate", "short"])
def test_proxy_injects_each_fault_at_its_rate(own_proxy, s3_bucket, kind):
    """With a fixed seed each kind fires exactly where random.Random(seed) says, and the client sees
    each one: an error for reset/500/503/truncate; for `short` (a lying server) a short body, or
    botocore's FlexibleChecksumError where the server stored a checksum."""
    from botocore.exceptions import ClientError
    body = bytes(range(256)) * 40
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="obj", Body=body)
    n, rates = 60, {kind: 0.25}
    p = own_proxy(rates=rates, seed=7)
    c = plain_client(p.url)
    errors, short = {}, 0
    for _ in range(n):
        try:
            got = c.get_object(Bucket=s3_bucket, Key="obj")["Body"].read()
            short += len(got) < len(body)
        except ClientError as e:
            errors[e.response["Error"]["Code"]] = errors.get(e.response["Error"]["Code"], 0) + 1
        except Exception as e:
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
    want = expected_faults(7, n, rates)
    assert p.counts["requests"] == n
    assert p.counts == {"requests": n, **want}
    assert 5 <= want[kind] <= 25
    seen = {"reset": errors.get("ConnectionClosedError", 0), "500": errors.get("InternalError", 0),
            "503": errors.get("SlowDown", 0), "truncate": errors.get("ResponseStreamingError", 0),
            # botocore checks a whole body against the CRC the server stored at upload
            "short": short + errors.get("FlexibleChecksumError", 0)}[kind]
    assert seen == want[kind] and sum(errors.values()) + short == want[kind], errors


def test_proxy_latency_and_every_request_kind(own_proxy, s3_bucket):
    """Latency delays without failing; 503s hit PUT, HEAD, LIST and multipart calls alike."""
    from botocore.exceptions import ClientError
    p = own_proxy(rates={"latency": 1.0}, latency_s=0.1, seed=1)
    c = plain_client(p.url)
    t = time.monotonic()
    for i in range(5):
        c.put_object(Bucket=s3_bucket, Key=f"k{i}", Body=b"x")
    assert time.monotonic() - t >= 0.5 and p.counts["latency"] == 5
    p.set_rates({"503": 1.0})
    calls = [lambda: c.put_object(Bucket=s3_bucket, Key="k", Body=b"x"),
             lambda: c.head_object(Bucket=s3_bucket, Key="k0"),
             lambda: c.list_objects_v2(Bucket=s3_bucket),
             lambda: c.create_multipart_upload(Bucket=s3_bucket, Key="mp"),
             lambda: c.delete_object(Bucket=s3_bucket, Key="k0")]
    for call in calls:
        with pytest.raises(ClientError) as e:
            call()
        assert e.value.response["Error"]["Code"] in ("SlowDown", "503")
    assert p.counts["503"] == len(calls)
    p.set_rates({})
    assert c.head_object(Bucket=s3_bucket, Key="k0")["ContentLength"] == 1


def test_proxy_truncated_body_is_really_short(own_proxy, s3_bucket):
    """The real status and Content-Length, half the body, then the connection's end."""
    body = os.urandom(10000)
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="obj", Body=body)
    p = own_proxy(rates={"truncate": 1.0})
    url = plain_client(p.url).generate_presigned_url("get_object", Params={"Bucket": s3_bucket, "Key": "obj"})
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("GET", f"{u.path}?{u.query}")
    r = conn.getresponse()
    assert r.status == 200 and int(r.getheader("Content-Length")) == len(body)
    with pytest.raises(http.client.IncompleteRead) as e:
        r.read()
    assert e.value.partial == body[:5000]
    conn.close()
    assert p.counts["truncate"] == 1


# ---- storage under faults -------------------------------------------------------------------


def test_a_short_body_is_never_returned(s3_faults, s3_bucket, monkeypatch):
    """A lying server (Content-Length says the short length, so HTTP cannot tell): whole reads are
    caught by the ETag's MD5, ranged reads by the length asked for; both are re-read."""
    st = Storage.from_uri(f"s3://{s3_bucket}/ds")
    data = os.urandom(50000)
    st.write_bytes("a.bin", data)
    s3_faults.set_rates({"short": 0.3})
    for i in range(8):
        assert st.read_bytes("a.bin") == data
        assert st.read_range("a.bin", 100 * i, 100 * i + 3000) == data[100 * i:100 * i + 3000]
        assert st.read_range("a.bin", 49000, 60000) == data[49000:]          # clipped to the object
    assert read_uri(f"s3://{s3_bucket}/ds/a.bin") == data
    assert s3_faults.counts["short"] >= 3
    # one attempt alone (no retries) raises ShortRead for either check; the whole object is one
    # written without a checksum (which botocore would check first: FlexibleChecksumError, retried too)
    from builder import storage_s3
    s3_faults.set_rates({})
    boto3.client("s3", config=Config(request_checksum_calculation="when_required")).put_object(
        Bucket=s3_bucket, Key="ds/b.bin", Body=data)
    s3_faults.set_rates({"short": 1.0})
    monkeypatch.setattr(storage_s3, "with_retries", lambda fn, what, attempts=1: fn())
    with pytest.raises(ShortRead, match="ETag"):
        get_object_checked(s3_bucket, "ds/b.bin", "read b.bin")
    with pytest.raises(ShortRead, match="for bytes 10-2009"):
        get_object_checked(s3_bucket, "ds/a.bin", "read a.bin", 10, 2010)


def _seed_for(pattern: list[bool], rate: float, kind: str = "reset") -> int:
    """A seed whose successive requests draw `kind` (alone at `rate`) exactly where `pattern` says."""
    for seed in range(10000):
        rng = random.Random(seed)
        got = [[rng.random() < rate for k in KINDS][KINDS.index(kind)] for _ in pattern]
        if got == pattern:
            return seed
    raise AssertionError("no seed")


def test_conditional_write_whose_answer_was_lost_is_ours(own_proxy, s3_bucket, monkeypatch):
    """The server writes, the answer is lost (a reset after forwarding), the retry fails its
    precondition against our own object: create_exclusive / replace_if still report success
    (read back, our bytes) — before, the lease took its own write for another holder's."""
    from builder import storage_s3
    # create: PUT (reset, written), PUT again (412), GET (read back)
    p = own_proxy(rates={"reset": 0.5}, seed=_seed_for([True, False, False], 0.5))
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
    storage_s3.reset_clients()
    try:
        st = Storage.from_uri(f"s3://{s3_bucket}/ds")
        assert st.create_exclusive("lease", b"mine")
        assert p.counts["reset"] == 1 and p.counts["requests"] == 3
        # replace: GET (current), PUT (reset, written), PUT again (412), GET (read back)
        p.set_rates({})
        p2 = own_proxy(rates={"reset": 0.5}, seed=_seed_for([False, True, False, False], 0.5))
        monkeypatch.setenv("AWS_ENDPOINT_URL", p2.url)
        storage_s3.reset_clients()
        assert st.replace_if("lease", b"mine, renewed", b"mine")
        assert p2.counts["reset"] == 1 and p2.counts["requests"] == 4
        p2.set_rates({})
        assert st.read_bytes("lease") == b"mine, renewed"
        # another holder's object is still not ours
        assert not st.create_exclusive("lease", b"someone else")
        assert not st.replace_if("lease", b"x", b"mine")
    finally:
        monkeypatch.undo()
        storage_s3.reset_clients()


def test_transient_errors_include_bodies_cut_short():
    """What a body cut short or a reset raises is retried (each was found against the proxy);
    permanent errors are not."""
    import urllib3.exceptions
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError
    from botocore.exceptions import (ClientError, ConnectionClosedError, FlexibleChecksumError,
                                     IncompleteReadError, ResponseStreamingError)

    from builder.storage_s3 import _transient
    for e in (ShortRead("x"), FlexibleChecksumError(error_msg="crc"), IncompleteReadError(actual_bytes=1, expected_bytes=2),
              ResponseStreamingError(error="x"), ConnectionClosedError(endpoint_url="http://h"),
              urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead"),   # a truncated error body
              RetriesExceededError(last_exception=None),
              S3UploadFailedError("Failed to upload f to b/k: An error occurred (SlowDown) when calling ..."),
              ClientError({"Error": {"Code": "NoSuchUpload"}}, "CompleteMultipartUpload")):
        assert _transient(e), e
    for code in ("NoSuchKey", "AccessDenied", "PreconditionFailed", "InvalidAccessKeyId"):
        assert _transient(ClientError({"Error": {"Code": code}}, "GetObject")) is None


def test_a_truncated_error_body_is_retried(own_proxy, s3_bucket, monkeypatch):
    """A 404 whose XML body is cut short is the clean NotFound, never a leaked transport error.
    Depending on the botocore/urllib3 release the cut body either surfaces as urllib3's ProtocolError
    (retried: a second request gets the whole 404) or is parsed from the status line alone (one
    request); both end in NotFound."""
    from builder import storage_s3
    p = own_proxy(rates={"truncate": 0.5}, seed=_seed_for([True, False], 0.5, "truncate"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
    storage_s3.reset_clients()
    try:
        with pytest.raises(NotFound, match="none.bin does not exist"):
            Storage.from_uri(f"s3://{s3_bucket}/ds").read_bytes("none.bin")
        assert p.counts["truncate"] == 1 and p.counts["requests"] in (1, 2)
    finally:
        monkeypatch.undo()
        storage_s3.reset_clients()


def test_storage_survives_every_fault_kind(s3_faults, s3_bucket, tmp_path, monkeypatch, caplog):
    """10% of every kind of fault at once: writes, reads, ranges, sizes, lists, conditional writes,
    uploads and downloads (multipart too) give back the same bytes, and no credential is logged."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(S3Storage, "MULTIPART_THRESHOLD", 5 << 20)   # S3's smallest part
    monkeypatch.setattr(S3Storage, "MULTIPART_CHUNK", 5 << 20)
    st = Storage.from_uri(f"s3://{s3_bucket}/ds")
    rng = random.Random(0)
    objs = {f"obj/{i:03d}.bin": rng.randbytes(rng.choice([0, 1, 100, 5000, 70000])) for i in range(24)}
    s3_faults.set_rates(EVERY_KIND)
    t0 = time.monotonic()
    for k, v in objs.items():
        st.write_bytes(k, v)
    assert st.list("obj/") == sorted(objs)
    for k, v in objs.items():
        assert st.read_bytes(k) == v
        assert st.size(k) == len(v) == size_uri(st.url(k))
        if len(v) > 10:
            a = rng.randrange(len(v) - 1)
            b = rng.randrange(a + 1, len(v) + 1)
            assert st.read_range(k, a, b) == v[a:b]
    assert st.exists("obj/000.bin") and not st.exists("obj/none.bin")
    with pytest.raises(NotFound):
        st.read_bytes("obj/none.bin")          # a truncated error body too is a clean NotFound
    # conditional writes: each create of a new name is ours, of an existing one is not; a chain of
    # compare-and-swaps all succeed (a lost answer of ours is recognised, never "taken by another")
    for i in range(8):
        assert st.create_exclusive(f"lease/{i}", f"holder-{i}".encode())
        assert not st.create_exclusive(f"lease/{i}", b"another holder")
        assert st.read_bytes(f"lease/{i}") == f"holder-{i}".encode()
    cur = b"v0"
    st.write_bytes("cas", cur)
    for i in range(1, 13):
        new = f"v{i}".encode()
        assert st.replace_if("cas", new, cur), i
        assert not st.replace_if("cas", b"stale", cur)
        cur = new
    assert st.read_bytes("cas") == cur
    # files: one PUT and one multipart (3 parts); downloads checked against the HEAD
    for name, n in (("small", 300_000), ("large", (10 << 20) + 1000)):
        src = tmp_path / f"{name}.src"
        src.write_bytes(rng.randbytes(n))
        st.upload_file(f"files/{name}", str(src))
        dst = tmp_path / f"{name}.dst"
        st.download_file(f"files/{name}", str(dst))
        assert hashlib.md5(dst.read_bytes()).digest() == hashlib.md5(src.read_bytes()).digest()
    big = rng.randbytes((5 << 20) + 1000)                                        # write_bytes' multipart path
    st.write_bytes("files/big", big)
    assert st.read_bytes("files/big") == big
    assert st.cleanup_incomplete() >= 0
    elapsed = time.monotonic() - t0
    c = dict(s3_faults.counts)
    s3_faults.set_rates({})
    assert boto3.client("s3").list_multipart_uploads(Bucket=s3_bucket).get("Uploads") in (None, [])
    for kind in ("latency", "reset", "500", "503"):
        assert c[kind] >= 8, c
    assert c["truncate"] >= 3, c                               # GETs only
    logging.getLogger(__name__).warning("storage under faults: %s in %.1fs", c, elapsed)
    print(f"storage under 10% of every fault: {c} in {elapsed:.1f}s")
    assert SECRET not in caplog.text


# ---- the pipeline under faults --------------------------------------------------------------


@pytest.mark.slow                                  # ~160 s here: two pipelines on a loaded 2-core machine
def test_pipeline_under_faults_gives_the_same_bytes(s3_faults, s3_bucket, tmp_path, gpt2_model, ray_cluster, caplog):
    """build (corpus on S3 too) + train-index + add, on S3 through the proxy with 10% of the requests
    failing (503 SlowDown, 500, reset, body cut short; and some latency), from the driver and the Ray
    workers alike: the shard, sample, index and index-shard checksums equal a run without faults."""
    from test_build import document_corpus, small_cfg

    from builder.add import add_stage
    from builder.build import build
    from builder.config import AddConfig, TrainConfig
    from builder.manifest import load_manifest
    from builder.train import train_stage

    caplog.set_level(logging.INFO)
    s3 = boto3.client("s3")
    for p in document_corpus(tmp_path):
        s3.upload_file(p, s3_bucket, f"corpus/{os.path.basename(p)}")

    def pipeline(name: str) -> dict:
        uri = f"s3://{s3_bucket}/{name}"
        build(small_cfg([f"s3://{s3_bucket}/corpus"], gpt2_model, uri))
        train_stage(TrainConfig(datastore=uri, train_size=1000, index_factory="IVF4,Flat", seed=1, trainer="faiss",
                                min_points_per_centroid=8, lease_ttl=3.0))
        add_stage(AddConfig(datastore=uri, index_shards=2, encoder="faiss", lease_ttl=3.0))
        m = load_manifest(Storage.from_uri(uri))
        return {"shards": [(s["path"], s["checksum"]) for s in m.shards], "num_keys": m.num_keys,
                "sample": m.index["sample_checksum"], "index": m.index["checksum"],
                "index_shards": [(s["path"], s["checksum"]) for s in m.index_shards]}

    t = time.monotonic()
    clean = pipeline("clean")
    t_clean = time.monotonic() - t
    assert s3_faults.counts["requests"] > 100 and s3_faults.counts["503"] == 0
    s3_faults.reset_counts()
    s3_faults.set_rates({"503": 0.025, "500": 0.025, "reset": 0.025, "truncate": 0.025, "latency": 0.05})
    t = time.monotonic()
    faulty = pipeline("faulty")
    t_faulty = time.monotonic() - t
    c = dict(s3_faults.counts)
    s3_faults.set_rates({})
    print(f"pipeline: {t_clean:.1f}s clean, {t_faulty:.1f}s under faults {c}")
    assert faulty == clean and clean["num_keys"] > 0 and len(clean["index_shards"]) == 2
    for kind in ("503", "500", "reset", "truncate"):
        assert c[kind] >= 1, c
    assert SECRET not in caplog.text

"""Bookkeeping that scales with the number of key shards (issue 17; bench/bench_bookkeeping.py measures
25,000): the manifest, the units' commit records, the commit's clean-up and a compaction's plan stay linear
in the shards, and S3 gets one request per 1,000 objects where one would do."""
from __future__ import annotations

import collections
import contextlib
import json
import time

import numpy as np

from builder.build_manifest import commit_manifest, read_unit_records
from builder.compact import plan_index, plan_shards
from builder.layout import BUILD_REQUEST, MANIFEST, UNITS_DIR, key_shard_path, unit_record_path
from builder.lease import Lease
from builder.manifest import Manifest, parse_manifest
from builder.storage import Storage
from builder.storage_s3 import s3_client
from builder.unit import Segment, Unit
from builder.versions import clip_ranges, count_ids


def _manifest(shards: int, rows: int = 100, index_shards: int = 0) -> Manifest:
    entries = [{"path": key_shard_path(i, 0), "num_rows": rows, "first_id": rows * i,
                "checksum": "sha256:" + f"{i:064x}"} for i in range(shards)]
    per = shards * rows // max(index_shards, 1)
    index = [{"path": f"index/shards/{i:05d}-of-{index_shards:05d}.faiss", "first_id": per * i, "num_ids": per,
              "bytes": 1, "checksum": ""} for i in range(index_shards)] or None
    return Manifest(num_keys=shards * rows, dim=8, model={"name": "m"}, tokenizer={}, key_layer="ffn_input",
                    window=8, min_context=4, mode="stream", compute_dtype="float32", corpus={}, shards=entries,
                    index_shards=index)


@contextlib.contextmanager
def s3_requests():
    """HTTP requests the storage's S3 client sends meanwhile, by operation (the real client, counted)."""
    counts: collections.Counter = collections.Counter()

    def hook(event_name: str = "", **_):
        counts[event_name.rsplit(".", 1)[-1]] += 1
    s3_client().meta.events.register("before-send.s3", hook, unique_id="test-bookkeeping-count")
    try:
        yield counts
    finally:
        s3_client().meta.events.unregister("before-send.s3", unique_id="test-bookkeeping-count")


def test_manifest_of_50k_shards_serializes_and_validates_in_seconds():
    """A WIKI-3B manifest (about 23,000 shards) twice over: write, parse, check (checksum, paths, ids) in
    linear time; a check comparing shards with each other would take minutes here."""
    m = _manifest(50_000)
    t = time.perf_counter()
    raw = m.to_json().encode()
    back = parse_manifest(raw, "manifest.json")
    took = time.perf_counter() - t
    assert back.num_keys == m.num_keys and len(back.shards) == 50_000 and back.shards[-1] == m.shards[-1]
    assert took < 20, f"{took:.1f}s for a manifest of 50,000 shards"


def test_compaction_plan_is_linear_in_shards_and_removed_ranges():
    """Regression: plan_shards/plan_index clipped every removed range to every shard (shards x ranges Python
    steps: about a minute at 5,000 x 5,000, hours for a WIKI-3B datastore after a removal of many
    documents); now the removed ids before each shard's bounds come from one searchsorted."""
    m = _manifest(5_000, rows=100, index_shards=50)
    rng = np.random.default_rng(0)
    starts = np.sort(rng.choice(np.arange(0, m.num_keys, 100), 5_000, replace=False)) + rng.integers(0, 60, 5_000)
    ranges = [[int(a), int(a) + int(k)] for a, k in zip(starts, rng.integers(1, 40, 5_000))]
    t = time.perf_counter()
    plan, index_plan = plan_shards(m, ranges), plan_index(m, ranges)
    took = time.perf_counter() - t
    assert took < 5, f"{took:.1f}s to plan a compaction of 5,000 shards with 5,000 removed ranges"
    # the same plan as clipping the ranges shard by shard (a sample of shards)
    kept = {j: (e, cut) for j, e, cut in plan}
    for j in list(range(0, 5_000, 97)) + [4_999]:
        s = m.shards[j]
        cut = count_ids(clip_ranges(ranges, s["first_id"], s["num_rows"]))
        assert kept[j] == ({"first_id": s["first_id"] - count_ids(clip_ranges(ranges, 0, s["first_id"])),
                            "num_rows": s["num_rows"] - cut}, cut)
    assert sum(e["num_ids"] for e, _ in index_plan) == m.num_keys - count_ids(ranges)
    assert all(redo for _, redo in index_plan)


def test_commit_cleans_unit_records_up_with_one_s3_request_per_batch(s3_bucket):
    """Regression: the commit deleted the build's unit records one DELETE each (25,000 requests, minutes,
    for a WIKI-3B build); S3 storage's delete_prefix now sends DeleteObjects of up to 1,000 keys (here 10).
    The resume scan reads each record once: one listing page, one GET per record."""
    st = Storage.from_uri(f"s3://{s3_bucket}/ds")
    st.DELETE_BATCH = 10
    n = 25
    records = {u: {"unit": u, "file": 0, "num_rows": 3, "seconds": 0.1,
                   "shards": [{"path": key_shard_path(u, 0), "num_rows": 3, "checksum": f"sha256:{u}", "bytes": 9}]}
               for u in range(n)}
    for u, r in records.items():
        st.write_text(unit_record_path(u), json.dumps(r))
    st.write_bytes(key_shard_path(0, 0), b"x")                  # listed
    st.write_bytes(key_shard_path(99, 0), b"x")                 # not listed: the commit drops it
    st.write_text(BUILD_REQUEST, "{}")
    st.write_text("keep/me.txt", "kept")
    units = [Unit(u, 0, (Segment(0, 0, 4 * n, 3 * u + 1, 3 * u + 4, -1),)) for u in range(n)]
    m = _manifest(0)
    m.shards = [{"path": key_shard_path(u, 0), "num_rows": 3, "first_id": 3 * u, "checksum": f"sha256:{u}"}
                for u in range(n)]
    m.num_keys = 3 * n
    with s3_requests() as scan:
        got: dict = {}
        read_unit_records(st, units, got)
    assert got == records
    assert scan["GetObject"] == n and scan["ListObjectsV2"] == 0, dict(scan)
    with Lease(st, 60.0) as lease, s3_requests() as commit:
        commit_manifest(st, lease, m)
    assert commit["DeleteObjects"] == 3, dict(commit)            # 25 records in batches of 10
    assert commit["DeleteObject"] == 2, dict(commit)             # the unlisted shard and the request
    assert st.list(UNITS_DIR) == [] and not st.exists(BUILD_REQUEST) and not st.exists(key_shard_path(99, 0))
    assert st.exists(key_shard_path(0, 0)) and st.read_text("keep/me.txt") == "kept" and st.exists(MANIFEST)


def test_delete_prefix_deletes_exactly_the_prefix_on_s3_and_locally(s3_bucket, tmp_path):
    """The batched S3 delete_prefix and the local one agree: the count, and nothing outside the prefix
    (a key sharing the prefix's characters but not its folder is kept)."""
    for uri in (f"s3://{s3_bucket}/root", str(tmp_path / "root")):
        st = Storage.from_uri(uri)
        st.DELETE_BATCH = 4
        for i in range(9):
            st.write_bytes(f"a/b/{i}.bin", b"1")
        st.write_bytes("a/bc.bin", b"2")
        st.write_bytes("ab/0.bin", b"3")
        assert st.delete_prefix("a/b/") == 9
        assert st.list("a/") == ["a/bc.bin"] and st.list("ab/") == ["ab/0.bin"], uri
        assert st.delete_prefix("a/b/") == 0


def test_subtract_ranges_is_one_sweep():
    """Regression: subtract_ranges compared every range with every removed one (20,000 x 20,000: minutes,
    for a removal of many documents from a datastore with many earlier removals); now one sweep. Same
    result as a brute-force set difference on small random inputs."""
    import random

    from builder.remove import subtract_ranges
    from builder.versions import merge_ranges
    rng = random.Random(0)
    for _ in range(300):
        a = merge_ranges([[x, x + rng.randint(1, 9)] for x in (rng.randint(0, 120) for _ in range(rng.randint(0, 12)))])
        b = [[x, x + rng.randint(1, 30)] for x in (rng.randint(0, 120) for _ in range(rng.randint(0, 12)))]
        want = {i for x, y in a for i in range(x, y)} - {i for x, y in b for i in range(x, y)}
        got = subtract_ranges(a, b)
        assert got == merge_ranges([[i, i + 1] for i in want]), (a, b)
    n = 20_000
    ranges = [[10 * i, 10 * i + 6] for i in range(n)]
    minus = [[10 * i + 3, 10 * i + 8] for i in range(n)]
    t = time.perf_counter()
    got = subtract_ranges(ranges, minus)
    took = time.perf_counter() - t
    assert got == [[10 * i, 10 * i + 3] for i in range(n)]
    assert took < 5, f"{took:.1f}s to subtract 20,000 ranges from 20,000"

"""Sharded index servers, the router and the Retriever client, on an embedded Ray."""
import os
import shutil
import threading

import numpy as np
import pytest

from builder.add import add_stage
from builder.config import AddConfig, TrainConfig
from builder.index import add_batches
from builder.manifest import load_manifest
from builder.rows import iter_range
from builder.storage import Storage
from builder.synthetic import write_synthetic_datastore
from builder.train import load_trained_index, train_stage
from retriever import (
    RequestError,
    Retriever,
    RetrieverError,
    find_servers,
    merge_topk,
    server_status,
    start_servers,
    stop_servers,
)
from retriever import merge
from retriever.local import LocalRetriever
from retriever.merge import boundary_ties, exact_distances, shard_of, sort_topk

DIM, N = 32, 12000


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("rsynth") / "ds"
    write_synthetic_datastore(str(root), N, DIM, shard_rows=1900, row_group_rows=500, seed=7)
    return str(root)


def columns(uri: str) -> tuple[np.ndarray, np.ndarray]:
    st = Storage.from_uri(uri)
    m = load_manifest(st)
    parts = list(iter_range(st, m, 0, m.num_keys, ("key", "value")))
    return (np.concatenate([p[1]["key"] for p in parts]).astype(np.float32),
            np.concatenate([p[1]["value"] for p in parts]))


def indexed(synth, dst, factory: str, metric: str, shards: int) -> str:
    uri = str(dst)
    shutil.copytree(synth, uri)
    train_stage(TrainConfig(datastore=uri, index_factory=factory, metric=metric, train_size=4000, trainer="faiss"))
    add_stage(AddConfig(datastore=uri, index_shards=shards, encoder="faiss"))
    return uri


def monolithic(uri: str):
    st = Storage.from_uri(uri)
    m = load_manifest(st)
    keys, _ = columns(uri)
    return add_batches(load_trained_index(st, m), [(np.arange(m.num_keys), keys)])


def assert_same_topk(got, mono, q, k, nprobe, metric):
    """Distances exactly equal; ids equal up to ties at equal distance (checked against a deeper
    monolithic search at the k-th distance)."""
    import faiss
    p = faiss.SearchParametersIVF(nprobe=nprobe)
    d_ref, i_ref = mono.search(q, k, params=p)
    d_deep, i_deep = mono.search(q, k + 256, params=p)
    fill = np.inf if metric == "l2" else -np.inf
    d_ref = np.where(i_ref < 0, fill, d_ref).astype(np.float32)
    np.testing.assert_array_equal(got.dist, d_ref)
    for row in range(len(q)):
        cut = d_ref[row][-1]                        # the k-th distance: ties there may keep any of their ids
        inner = got.dist[row] != cut
        assert np.array_equal(inner, d_ref[row] != cut), row
        g = np.lexsort((got.ids[row][inner], got.dist[row][inner]))
        w = np.lexsort((i_ref[row][inner], d_ref[row][inner]))
        np.testing.assert_array_equal(got.ids[row][inner][g], i_ref[row][inner][w])
        at_cut = got.ids[row][~inner]
        if np.isfinite(cut):
            assert set(at_cut) <= set(i_deep[row][d_deep[row] == cut]), row
        else:
            assert np.all(at_cut == -1), row


def test_merge_topk_metric_aware_and_padding():
    d1, i1 = np.array([[1.0, 4.0, 3.4028235e38]], np.float32), np.array([[10, 11, -1]])
    d2, i2 = np.array([[2.0, 3.0]], np.float32), np.array([[20, 21]])
    v1, v2 = np.array([[5, 6, -1]], np.int32), np.array([[7, 8]], np.int32)
    d, i, v = merge_topk([d1, d2], [i1, i2], [v1, v2], 4, "l2")
    assert d.tolist() == [[1.0, 2.0, 3.0, 4.0]] and i.tolist() == [[10, 20, 21, 11]] and v.tolist() == [[5, 7, 8, 6]]
    d, i, v = merge_topk([d1[:, :2]], [i1[:, :2]], [v1[:, :2]], 4, "l2")      # fewer than k: padded
    assert i.tolist() == [[10, 11, -1, -1]] and v.tolist() == [[5, 6, -1, -1]] and np.isinf(d[0, 2:]).all()
    d, i, v = merge_topk([np.array([[9.0, 1.0]], np.float32), np.array([[5.0, -3.4028235e38]], np.float32)],
                         [np.array([[1, 2]]), np.array([[3, -1]])], [np.zeros((1, 2), np.int32)] * 2, 3, "ip")
    assert d.tolist() == [[9.0, 5.0, 1.0]] and i.tolist() == [[1, 3, 2]]
    d, i, _ = merge_topk([np.array([[9.0]], np.float32)], [np.array([[1]])], [np.zeros((1, 1), np.int32)], 2, "ip")
    assert i.tolist() == [[1, -1]] and d[0, 1] == -np.inf


def test_merge_topk_ties_go_to_the_smaller_id():
    # shard 0 holds ids 30 and 10 at distance 2.0, shard 1 holds 20 at 2.0 and 5 at 1.0: (distance, id)
    d0, i0 = np.array([[2.0, 2.0, np.inf]], np.float32), np.array([[10, 30, -1]])
    d1, i1 = np.array([[1.0, 2.0]], np.float32), np.array([[5, 20]])
    v0, v1 = np.array([[1, 3, -1]], np.int32), np.array([[0, 2]], np.int32)
    for order in ((0, 1), (1, 0)):                                     # shard order does not matter
        ds, is_, vs = zip(*[((d0, i0, v0), (d1, i1, v1))[o] for o in order])
        d, i, v = merge_topk(list(ds), list(is_), list(vs), 4, "l2")
        assert i.tolist() == [[5, 10, 20, 30]] and v.tolist() == [[0, 1, 2, 3]]
        d, i, v = merge_topk(list(ds), list(is_), list(vs), 6, "l2")   # missing results last
        assert i.tolist() == [[5, 10, 20, 30, -1, -1]] and np.isinf(d[0, 4:]).all()
    # one shard whose ties are out of id order (as a fast-scan index may return them): re-sorted
    d, i, _ = merge_topk([np.array([[3.0, 3.0]], np.float32)], [np.array([[9, 4]])], [v1], 2, "ip")
    assert i.tolist() == [[4, 9]]


def _sorted_lists(rng, n, w, ranges, metric, ties):
    """Per-shard (n, w) results in (distance, id) order as faiss gives them, ids from each shard's range,
    distances drawn from `ties` values (many ties) and some rows short (missing results last)."""
    out = []
    for first, size in ranges:
        d = rng.integers(0, ties, (n, w)).astype(np.float32)
        i = np.stack([rng.choice(size, w, replace=False) for _ in range(n)]) + first
        short = rng.random(n) < 0.2
        cut = rng.integers(0, w, n)
        miss = short[:, None] & (np.arange(w)[None, :] >= cut[:, None])
        key = d if metric == "l2" else -d
        key = np.where(miss, np.inf, key)
        order = np.lexsort((i, key), axis=-1)
        d, i, miss = (np.take_along_axis(x, order, 1) for x in (d, i, miss))
        d[miss] = np.finfo(np.float32).max if metric == "l2" else -np.finfo(np.float32).max   # faiss's padding
        i[miss] = -1
        v = np.where(miss, -1, (i * 7) % 1000).astype(np.int32)
        out.append((d, i, v))
    return out


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_heap_merge_equals_the_full_sort(metric):
    """The k-way heap merge (many ties, ties at the k-th place, short lists, lists wider than k as a
    re-rank asks them) equals sorting the concatenation by (distance, id); without ids, it gives the
    same distances and values when the shards hold increasing id ranges."""
    rng = np.random.default_rng(11)
    for S, w, k, ties in ((2, 64, 64, 5), (3, 80, 64, 40), (2, 64, 64, 10_000), (4, 32, 16, 3)):
        ranges = [(s * 1000, 1000) for s in range(S)]
        lists = _sorted_lists(rng, 300, w, ranges, metric, ties)
        ds, is_, vs = (list(x) for x in zip(*lists))
        want = sort_topk(np.concatenate([merge.normalize_missing(d, i, metric) for d, i in zip(ds, is_)], 1),
                         np.concatenate(is_, 1), np.concatenate(vs, 1), k, metric)
        got = merge_topk(ds, is_, vs, k, metric)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        d, i, v = merge_topk(ds, None, vs, k, metric)
        assert i is None
        np.testing.assert_array_equal(d, want[0])
        np.testing.assert_array_equal(v, want[2])
        # shards given out of id order: the ids still decide the ties
        got = merge_topk(ds[::-1], is_[::-1], vs[::-1], k, metric)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


def test_exact_distances_per_pair_whatever_the_batch():
    rng = np.random.default_rng(3)
    q = rng.normal(size=(500, 256)).astype(np.float32)
    keys = rng.normal(size=(500, 256)).astype(np.float16).astype(np.float32)
    for metric in ("l2", "ip"):
        full = exact_distances(q, keys, metric)
        ref = ((keys.astype(np.float64) - q) ** 2).sum(1) if metric == "l2" else (keys.astype(np.float64) * q).sum(1)
        np.testing.assert_allclose(full, ref, rtol=1e-5, atol=1e-4)
        sub = rng.permutation(500)[:37]                                # another batch: other rows, another order
        assert np.array_equal(exact_distances(q[sub], keys[sub], metric), full[sub])
        assert np.array_equal(exact_distances(q[7:8], keys[7:8], metric), full[7:8])
        # the (n, k, d) form the tests use as an independent reference gives the same bits
        assert np.array_equal((((keys - q) ** 2) if metric == "l2" else keys * q).reshape(50, 10, 256).sum(-1).ravel(),
                              full)


def test_shard_of_and_boundary_ties():
    ranges = [(0, 10), (10, 5), (15, 20)]
    ids = np.array([[0, 9, 10, 14, 15, 34, -1, 35]])
    assert shard_of(ids, ranges).tolist() == [[0, 0, 1, 1, 2, 2, -1, -1]]
    merged = np.array([[1.0, 2.0], [1.0, np.inf]], np.float32)
    a = np.array([[1.0, 2.0, 2.0], [1.0, 3.0, np.inf]], np.float32)   # row 0 ends on the cut 2.0
    b = np.array([[2.0, 5.0, 6.0], [np.inf] * 3], np.float32)
    assert boundary_ties(merged, [a, b], "l2").tolist() == [True, False]
    _, i, v = sort_topk(np.array([[3.0, np.inf, 3.0]], np.float32), np.array([[8, 2, 5]]),
                        np.array([[1, 2, 3]], np.int32), 3, "l2")
    assert i.tolist() == [[5, 8, -1]] and v.tolist() == [[3, 1, -1]]


def test_rerank_does_not_depend_on_the_index_shards(synth, tmp_path, ray_cluster):
    """`knnlm add --index-shards 1`, then --force 2 and 3: `knnlm query --rerank` gives the same ids and
    distances, which are the exact order of the merged approximate top-k (computed here from a
    monolithic index and the keys), and differ from the approximate order."""
    from cluster.cli import main
    uri = str(tmp_path / "ds")
    shutil.copytree(synth, uri)
    train_stage(TrainConfig(datastore=uri, index_factory="IVF16,PQ4", train_size=4000, trainer="faiss"))
    keys, values = columns(uri)
    rng = np.random.default_rng(5)
    q = keys[rng.choice(N, 40, replace=False)] + rng.normal(0, 0.05, (40, DIM)).astype(np.float32)
    np.save(tmp_path / "q.npy", q)
    k, nprobe = 50, 4
    got = []
    for shards in (1, 2, 3):
        assert main(["add", uri, "--index-shards", str(shards), "--encoder", "faiss"] +
                    (["--force"] if shards > 1 else [])) == 0
        assert len(load_manifest(Storage.from_uri(uri)).index_shards) == shards
        out = tmp_path / f"r{shards}.npz"
        assert main(["query", uri, "--queries", str(tmp_path / "q.npy"), "--k", str(k), "--nprobe", str(nprobe),
                     "--rerank", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
        got.append(np.load(out))
    for g in got[1:]:
        for name in ("ids", "dist", "values"):
            assert np.array_equal(g[name], got[0][name]), name
    # independently: the approximate top-k by (distance, id) of a monolithic index, searched deeper,
    # then those candidates in exact order (float32, (n, k, d) summed over d; ties by id)
    import faiss
    d_a, i_a = monolithic(uri).search(q, k + 200, params=faiss.SearchParametersIVF(nprobe=nprobe))
    o = np.lexsort((i_a, d_a), axis=-1)[:, :k]
    cand = np.take_along_axis(i_a, o, 1)                               # (40, k) merged approximate candidates
    assert np.all(cand >= 0)
    e = ((keys[cand] - q[:, None, :]) ** 2).sum(-1)                    # (40, k) exact, float32
    o = np.lexsort((cand, e), axis=-1)
    assert np.array_equal(got[0]["ids"], np.take_along_axis(cand, o, 1))
    assert np.array_equal(got[0]["dist"], np.take_along_axis(e, o, 1))
    assert np.array_equal(got[0]["values"], values[got[0]["ids"]])
    np.testing.assert_allclose(got[0]["dist"], ((keys[got[0]["ids"]].astype(np.float64) - q[:, None, :]) ** 2).sum(-1),
                               rtol=1e-5)
    assert not np.array_equal(got[0]["ids"], cand)                     # re-ranking changed the order


@pytest.mark.parametrize("factory,metric,shards", [
    ("IVF16,Flat", "l2", 1), ("IVF16,Flat", "l2", 2), ("IVF16,Flat", "l2", 3),
    ("IVF16,PQ4", "l2", 1), ("IVF16,PQ4", "l2", 2), ("IVF16,PQ4", "l2", 3),
    ("IVF16,Flat", "ip", 3), ("IVF16,PQ4", "ip", 2), ("IVF16,PQ8x4fs", "l2", 3), ("IVF16,PQ8x4fs", "ip", 2)])
def test_sharded_equals_monolithic(synth, tmp_path, factory, metric, shards, ray_cluster):
    uri = indexed(synth, tmp_path / "ds", factory, metric, shards)
    start_servers(uri, cache_dir=str(tmp_path / "cache"), detached=False)
    try:
        r = Retriever.connect(uri)
        keys, values = columns(uri)
        rng = np.random.default_rng(1)
        q = keys[rng.choice(N, 40, replace=False)] + rng.normal(0, 0.05, (40, DIM)).astype(np.float32)
        mono = monolithic(uri)
        for k, nprobe in ((10, 1), (100, 4), (20000, 16)):    # k beyond the datastore: padded
            got = r.search(q, k=k, nprobe=nprobe)
            assert got.dist.dtype == np.float32 and got.ids.dtype == np.int64 and got.values.dtype == np.int32
            assert got.dist.shape == got.ids.shape == got.values.shape == (40, k) and not got.partial
            assert_same_topk(got, mono, q, k, nprobe, metric)
            ok = got.ids >= 0
            np.testing.assert_array_equal(got.values[ok], values[got.ids[ok]])
            assert np.all(got.values[~ok] == -1)
            bare = r.search(q, k=k, nprobe=nprobe, ids=False)           # scoring's search: no ids sent
            assert bare.ids is None
            np.testing.assert_array_equal(bare.dist, got.dist)
            np.testing.assert_array_equal(bare.values, got.values)
        dist, ids, vals = r.search(q[:3], k=5, nprobe=2)                # unpacks as a tuple
        assert ids.shape == (3, 5)
        # the shards loaded in this process (`knnlm eval` with no cluster): the servers' answers, bit for bit
        local = LocalRetriever.open(uri, cache_dir=str(tmp_path / "cache"), threads=max(1, 2 // shards))
        # several 1-thread IVF shards (not fast-scan): each query's lists are found once for all of them
        assert local._one_coarse == (shards > 1 and "fs" not in factory)
        try:
            for k, nprobe in ((10, 1), (100, 4), (20000, 16)):
                for with_ids in (True, False):
                    a, b = r.search(q, k=k, nprobe=nprobe, ids=with_ids), local.search(q, k=k, nprobe=nprobe, ids=with_ids)
                    np.testing.assert_array_equal(a.dist, b.dist)
                    np.testing.assert_array_equal(a.values, b.values)
                    assert (b.ids is None) == (not with_ids) and (not with_ids or np.array_equal(a.ids, b.ids))
            assert {s: v["queries"] for s, v in local.stats().items()} == {s: 6 * 40 for s in range(shards)}
        finally:
            local.close()
    finally:
        stop_servers(uri)
    assert not find_servers(uri)


@pytest.fixture(scope="module")
def served(synth, tmp_path_factory, ray_cluster):
    """IVF-PQ over 3 index shards, 2 replicas each, with re-ranking."""
    root = tmp_path_factory.mktemp("served")
    uri = indexed(synth, root / "ds", "IVF16,PQ4", "l2", 3)
    start_servers(uri, replicas=2, rerank=True, cache_dir=str(root / "cache"), detached=False)
    yield uri, str(root / "cache")
    stop_servers(uri)


def test_rerank_uses_exact_distances(served, tmp_path):
    uri, _ = served
    keys, _ = columns(uri)
    r = Retriever.connect(uri)
    q = keys[::400] + 0.03
    plain = r.search(q, k=50, nprobe=4)
    exact = r.search(q, k=50, nprobe=4, rerank=True)
    brute = ((keys[exact.ids] - q[:, None, :]) ** 2).sum(-1)          # brute force on the candidates
    np.testing.assert_allclose(exact.dist, brute, rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(exact.dist, axis=1) >= 0)
    assert not np.allclose(plain.dist, exact.dist)                   # PQ distances were approximate
    # re-ranked: the merged approximate top-k (not each shard's own k), in exact order
    for row in range(len(q)):
        assert sorted(exact.ids[row]) == sorted(plain.ids[row]), row
    assert not np.array_equal(exact.ids, plain.ids)
    local = LocalRetriever.open(uri, rerank=True, cache_dir=str(tmp_path / "local"), threads=1)
    try:                                   # in this process: the same re-ranked answer
        mine = local.search(q, k=50, nprobe=4, rerank=True)
        for a, b in zip(mine, exact):
            np.testing.assert_array_equal(a, b)
    finally:
        local.close()


def test_status_and_bad_requests_do_not_hurt_servers(served):
    import ray
    uri, _ = served
    rows = server_status(uri)
    assert [(x["shard"], x["replica"], x["healthy"]) for x in rows] == [(s, rep, True) for s in range(3) for rep in range(2)]
    r = Retriever.connect(uri)
    q = np.zeros((2, DIM), np.float32)
    for bad, match in [(np.zeros((2, DIM + 1), np.float32), r"shape \(n, 32\)"),
                       (np.zeros((0, DIM), np.float32), "empty batch"),
                       (np.array([[np.nan] * DIM], np.float32), "NaN or inf"),
                       (np.array([[np.inf] * DIM], np.float32), "NaN or inf"),
                       (q.astype(np.int64), "floating point")]:
        with pytest.raises(RequestError, match=match):
            r.search(bad, k=5, nprobe=2)
    with pytest.raises(RequestError, match="k must be an integer from 1 to 65,536"):
        r.search(q, k=10**7, nprobe=2)
    with pytest.raises(RequestError, match="nprobe"):
        r.search(q, k=5, nprobe=0)
    # sent straight to a server, bypassing the client's checks: a clear error, and it keeps serving
    h = find_servers(uri)[0][0]
    with pytest.raises(ray.exceptions.RayTaskError, match="NaN or inf"):
        ray.get(h.search.remote(np.full((1, DIM), np.nan, np.float32), 5, 2))
    assert ray.get(h.ping.remote())
    assert r.search(q, k=5, nprobe=2).ids.shape == (2, 5)


def test_rerank_on_a_server_without_it_is_a_clear_error(synth, tmp_path, ray_cluster):
    uri = indexed(synth, tmp_path / "ds", "IVF16,Flat", "l2", 1)
    start_servers(uri, cache_dir=str(tmp_path / "cache"), detached=False)
    try:
        with pytest.raises(RequestError, match="started without it.*--rerank"):
            Retriever.connect(uri).search(np.zeros((1, DIM), np.float32), k=5, nprobe=1, rerank=True)
    finally:
        stop_servers(uri)


def test_killed_replicas_failover_then_clear_error_or_partial(synth, tmp_path, ray_cluster):
    import ray
    uri = indexed(synth, tmp_path / "ds", "IVF16,Flat", "l2", 3)
    start_servers(uri, replicas=2, cache_dir=str(tmp_path / "cache"), detached=False)
    try:
        r = Retriever.connect(uri, hedge_after=1.0, deadline=30.0)
        keys, _ = columns(uri)
        q = keys[::300]
        want = r.search(q, k=20, nprobe=4)
        errors, done = [], []

        def load():
            for _ in range(60):
                try:
                    res = r.search(q, k=20, nprobe=4)
                    np.testing.assert_array_equal(res.dist, want.dist)
                    done.append(1)
                except Exception as e:  # noqa: BLE001 - any failure fails the test below
                    errors.append(e)
        t = threading.Thread(target=load)
        t.start()
        while len(done) < 10 and t.is_alive():
            pass
        servers = find_servers(uri)
        ray.kill(servers[1][0], no_restart=True)                        # mid-load
        t.join()
        assert not errors and len(done) == 60
        ray.kill(servers[1][1], no_restart=True)                        # shard 1 has no replica left
        with pytest.raises(RetrieverError, match=r"index shards \[1\].*no live replica.*allow_partial"):
            r.search(q, k=20, nprobe=4)
        part = r.search(q, k=20, nprobe=4, allow_partial=True)
        assert part.partial and part.missing_shards == [1]
        lo, hi = load_manifest(Storage.from_uri(uri)).index_shards[1]["first_id"], None
        hi = lo + load_manifest(Storage.from_uri(uri)).index_shards[1]["num_ids"]
        assert not np.any((part.ids >= lo) & (part.ids < hi))
        status = {(x["shard"], x["replica"]): x["healthy"] for x in server_status(uri)}
        assert status[(1, None)] is False and status[(0, 0)] and status[(2, 1)]
        # `knnlm serve` restarts the missing servers: the same client finds them by name again
        start_servers(uri, replicas=2, cache_dir=str(tmp_path / "cache"), detached=False)
        again = r.search(q, k=20, nprobe=4)
        np.testing.assert_array_equal(again.dist, want.dist)
        np.testing.assert_array_equal(again.ids, want.ids)
        assert not again.partial and again.missing_shards == []
    finally:
        stop_servers(uri)


def test_restarted_server_reloads_and_answers_identically(synth, tmp_path, ray_cluster):
    import ray
    uri = indexed(synth, tmp_path / "ds", "IVF16,PQ4", "l2", 2)
    cache = tmp_path / "cache"
    start_servers(uri, cache_dir=str(cache), detached=False)
    try:
        keys, _ = columns(uri)
        q = keys[::500] + 0.02
        want = Retriever.connect(uri).search(q, k=30, nprobe=4)
        h = find_servers(uri)[0][0]
        pid = ray.get(h.info.remote())["pid"]
        import signal
        import time
        os.kill(pid, signal.SIGKILL)                                     # a crash: Ray restarts the actor
        t0 = time.time()
        while True:
            try:
                if ray.get(h.info.remote(), timeout=10)["pid"] != pid:
                    break
            except Exception:  # noqa: BLE001 - restarting
                pass
            assert time.time() - t0 < 60, "the server was not restarted"
            time.sleep(0.2)
        got = Retriever.connect(uri).search(q, k=30, nprobe=4)
        np.testing.assert_array_equal(got.dist, want.dist)
        np.testing.assert_array_equal(got.ids, want.ids)
    finally:
        stop_servers(uri)
    # a new node: an empty cache, everything fetched from storage again (checksum-verified)
    shutil.rmtree(cache)
    start_servers(uri, cache_dir=str(cache), detached=False)
    try:
        got = Retriever.connect(uri).search(q, k=30, nprobe=4)
        np.testing.assert_array_equal(got.dist, want.dist)
        np.testing.assert_array_equal(got.ids, want.ids)
        assert any(f.endswith(".faiss") for f in os.listdir(next(cache.iterdir())))
    finally:
        stop_servers(uri)


def test_connect_errors(synth, tmp_path, ray_cluster, monkeypatch):
    import ray
    uri = indexed(synth, tmp_path / "ds", "IVF16,Flat", "l2", 1)
    with pytest.raises(RetrieverError, match="no index servers.*knnlm serve"):
        Retriever.connect(uri)
    bare = tmp_path / "bare"
    shutil.copytree(synth, bare)
    with pytest.raises(RetrieverError, match="no index shards: run `knnlm train-index` and `knnlm add`"):
        Retriever.connect(str(bare))
    start_servers(uri, cache_dir=str(tmp_path / "cache"), detached=False)
    try:
        monkeypatch.setattr(ray, "__version__", "0.0.1")
        with pytest.raises(RetrieverError, match=r"this client runs Ray 0\.0\.1, but the index servers.*install ray=="):
            Retriever.connect(uri)
    finally:
        monkeypatch.undo()
        stop_servers(uri)


def test_cli_serve_status_stop_and_query(synth, tmp_path, ray_cluster, capsys):
    from cluster.cli import main
    uri = indexed(synth, tmp_path / "ds", "IVF16,PQ4", "l2", 2)
    keys, values = columns(uri)
    np.save(tmp_path / "q.npy", keys[:50])
    # embedded servers for the call (Ray already up here: reused)
    assert main(["query", uri, "--queries", str(tmp_path / "q.npy"), "--k", "8", "--nprobe", "4",
                 "--out", str(tmp_path / "r.npz"), "--cache-dir", str(tmp_path / "cache")]) == 0
    out = np.load(tmp_path / "r.npz")
    assert out["dist"].shape == out["ids"].shape == out["values"].shape == (50, 8)
    assert np.array_equal(out["values"], values[out["ids"]]) and not out["partial"]
    assert not find_servers(uri)                                          # embedded servers are gone
    # detached servers on "the cluster", then status, query through them, and stop
    gcs = ray_cluster.get_runtime_context().gcs_address
    assert main(["serve", uri, "--address", gcs, "--replicas", "2", "--cache-dir", str(tmp_path / "cache")]) == 0
    capsys.readouterr()
    assert main(["serve", uri, "--status", "--address", gcs]) == 0
    assert capsys.readouterr().out.count(" ok ") == 4
    assert main(["query", uri, "--queries", str(tmp_path / "q.npy"), "--k", "8", "--nprobe", "4",
                 "--out", str(tmp_path / "r2.npz"), "--address", gcs]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "r2.npz")["dist"], out["dist"])
    assert main(["serve", uri, "--stop", "--address", gcs]) == 0
    assert "stopped 4 index servers" in capsys.readouterr().out
    assert main(["query", uri, "--queries", str(tmp_path / "q.npy"), "--out", str(tmp_path / "r3.npz"),
                 "--address", gcs]) == 2
    assert "no index servers" in capsys.readouterr().err


@pytest.mark.s3
def test_servers_fetch_shards_from_s3(synth, tmp_path, s3_bucket, ray_cluster):
    from conftest import upload_dir
    local = indexed(synth, tmp_path / "ds", "IVF16,PQ4", "l2", 2)
    uri = upload_dir(local, s3_bucket, "ds")
    keys, _ = columns(local)
    q = keys[::700]
    results = []
    for u in (local, uri):
        start_servers(u, cache_dir=str(tmp_path / "cache"), detached=False)
        try:
            results.append(Retriever.connect(u).search(q, k=16, nprobe=4))
        finally:
            stop_servers(u)
    np.testing.assert_array_equal(results[0].dist, results[1].dist)
    np.testing.assert_array_equal(results[0].ids, results[1].ids)


def test_one_quantizer_is_checked_not_assumed():
    """LocalRetriever shares the coarse search only between shards whose quantizers hold the same
    centroids: copies of one trained index do, two trainings do not."""
    import faiss
    from types import SimpleNamespace

    from retriever.local import _one_quantizer
    x = np.random.default_rng(0).normal(size=(2000, 8)).astype(np.float32)
    a = faiss.index_factory(8, "IVF16,Flat")
    a.train(x)
    b = faiss.index_factory(8, "IVF16,Flat")
    b.cp.seed = 7
    b.train(x[::-1].copy())
    shard = lambda ix: SimpleNamespace(index=ix)          # noqa: E731 - what _one_quantizer reads of a shard
    assert _one_quantizer([shard(a), shard(faiss.clone_index(a))])
    assert not _one_quantizer([shard(a), shard(b)])

"""Serving follows versions: servers started on the test Ray switch, blue/green, to each newly published
version (a removal, an appended range of ids, a removal again) while two clients send queries; no query
fails and every answer is wholly the answer of the one version it is tagged with.

The versions are published with builder.versions.publish, as `knnlm ingest` / `knnlm remove` do: the
datastore is built whole (2 + 2 index shards over its ids), then its manifest is cut back to the first
two index shards' ids (version 1); version 3 appends the rest (its key shards and index shards)."""
import json
import threading
import time

import numpy as np
import pytest

from builder.add import add_stage
from builder.config import AddConfig, TrainConfig
from builder.layout import MANIFEST
from builder.lease import Lease
from builder.manifest import Manifest, load_manifest
from builder.rows import iter_range
from builder.storage import Storage
from builder.synthetic import write_synthetic_datastore
from builder.train import train_stage
from builder.versions import load_version, publish
from retriever.fleet import controller, find_all, parse_name
from retriever.merge import merge_topk
from retriever.router import Retriever, controller_status, find_servers, start_servers, stop_servers
from retriever.server import ShardServer

DIM, N, BASE = 32, 12000, 7600         # 7 key shards of 1900 ids; index shards of 3800: 2 in version 1, 4 from 3
K, NPROBE = 10, 4
WATCH, GRACE, REFRESH = 0.3, 2.0, 0.2


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The whole datastore (version 1 as built): IVF-Flat, 4 index shards; its keys."""
    uri = str(tmp_path_factory.mktemp("sv") / "ds")
    write_synthetic_datastore(uri, N, DIM, shard_rows=1900, row_group_rows=500, seed=11)
    train_stage(TrainConfig(datastore=uri, index_factory="IVF16,Flat", metric="l2", train_size=4000, trainer="faiss"))
    add_stage(AddConfig(datastore=uri, shard_size=3800, encoder="faiss"))
    st = Storage.from_uri(uri)
    m = load_manifest(st)
    keys = np.concatenate([p[1]["key"] for p in iter_range(st, m, 0, m.num_keys, ("key",))]).astype(np.float32)
    return uri, m.to_json(), keys


def copy(m: Manifest) -> Manifest:
    return Manifest.from_dict(json.loads(m.to_json()))


def fresh_datastore(full, dst) -> str:
    """A copy of the built datastore whose manifest.json is version 1: the first BASE ids only."""
    import shutil
    src, text, _ = full
    shutil.copytree(src, dst)
    st = Storage.from_uri(str(dst))
    m = Manifest.from_dict(json.loads(text))
    m.shards = [s for s in m.shards if s["first_id"] < BASE]
    m.index_shards = [s for s in m.index_shards if s["first_id"] < BASE]
    m.num_keys = BASE
    assert sum(s["num_rows"] for s in m.shards) == BASE == sum(s["num_ids"] for s in m.index_shards)
    m.validate()
    st.write_text(MANIFEST, m.to_json())
    return st.uri


def publish_next(uri: str, kind: str, removed: list, appended: bool = False, full_text: str | None = None) -> int:
    """Publish the next version: the current one (or, appended, the whole built datastore) with these
    removed id ranges."""
    st = Storage.from_uri(uri)
    with Lease(st, 30.0, what="test publish") as lease:
        base = load_manifest(st)
        new = Manifest.from_dict(json.loads(full_text)) if appended else copy(base)
        new.removed = {"ranges": removed, "num_keys": int(sum(b - a for a, b in removed))} if removed else None
        return publish(st, lease, base, new, {"kind": kind}).version


def expected(uri: str, version: int, batches: list[np.ndarray], cache_dir: str) -> list[tuple]:
    """The single-process answer of `version` to each batch: its shards' ShardServer cores, merged."""
    m = load_version(Storage.from_uri(uri), version)
    cores = [ShardServer(uri, s, cache_dir, device="cpu", threads=1, version=version)
             for s in range(len(m.index_shards))]
    out = []
    for q in batches:
        got = [c.search(q, K, NPROBE) for c in cores]
        out.append(merge_topk([g[0] for g in got], [g[1] for g in got], [g[2] for g in got], K, m.index["metric"]))
    return out


def queries(keys: np.ndarray, n_batches: int, seed: int) -> list[np.ndarray]:
    """Batches of 6 queries near keys all over the ids (removed ones and appended ones included)."""
    rng = np.random.default_rng(seed)
    ids = np.concatenate([rng.integers(100, 900, 2 * n_batches), rng.integers(5000, 5600, 2 * n_batches),
                          rng.integers(8000, 9000, n_batches), rng.integers(0, N, n_batches)])
    rng.shuffle(ids)
    q = keys[ids] + rng.normal(0, 0.05, (len(ids), DIM)).astype(np.float32)
    return [q[i * 6:(i + 1) * 6] for i in range(n_batches)]


class Clients:
    """Two clients, each with its own Retriever, sending their batches round and round (a pause between
    two) until stopped; every answer recorded with its version, every failure kept."""

    def __init__(self, uri: str, batches: list[np.ndarray], clients: int = 2, pause: float = 0.02):
        self.uri, self.batches, self.pause = uri, batches, pause
        self.answers: list[tuple[int, object]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(c,), daemon=True) for c in range(clients)]

    def _run(self, c: int) -> None:
        try:
            r = Retriever.connect(self.uri, hedge_after=2.0, deadline=60.0, refresh=REFRESH)
        except Exception as e:  # noqa: BLE001 - any failure fails the test
            self.errors.append(f"client {c}: connect: {type(e).__name__}: {e}")
            return
        i = c
        while not self.stop.is_set():
            b = i % len(self.batches)
            try:
                res = r.search(self.batches[b], k=K, nprobe=NPROBE)
                with self.lock:
                    self.answers.append((b, res))
            except Exception as e:  # noqa: BLE001 - any failure fails the test
                self.errors.append(f"client {c} batch {b}: {type(e).__name__}: {e}")
            i += 1
            time.sleep(self.pause)

    def seen(self) -> set:
        with self.lock:
            return {res.version for _, res in self.answers}

    def wait_seen(self, version: int, timeout: float = 120.0) -> float:
        """Until some answer of `version` came back, and 10 more answers after it; seconds to the first."""
        t0 = time.monotonic()
        while version not in self.seen():
            assert time.monotonic() - t0 < timeout, f"no answer of version {version} in {timeout}s: {self.errors[:3]}"
            time.sleep(0.1)
        first = time.monotonic() - t0
        n = len(self.answers)
        while len(self.answers) < n + 10:
            assert time.monotonic() - t0 < timeout and not self.errors, self.errors[:3]
            time.sleep(0.05)
        return first

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(120)


def check_answers(clients: Clients, want: dict[int, list]) -> dict[int, int]:
    """Every answer tagged with a version and byte-identical to that version's own answer; counts per version."""
    assert not clients.errors, clients.errors[:5]
    per = {}
    for b, res in clients.answers:
        assert res.version in want, f"an answer tagged with version {res.version!r}"
        d, i, v = want[res.version][b]
        assert not res.partial
        np.testing.assert_array_equal(res.ids, i, err_msg=f"version {res.version} batch {b}")
        np.testing.assert_array_equal(res.dist, d)
        np.testing.assert_array_equal(res.values, v)
        per[res.version] = per.get(res.version, 0) + 1
    return per


def wait_versions(uri: str, versions: set, timeout: float = 60.0) -> None:
    """Until exactly these versions have servers (the older ones stopped after the grace period)."""
    t0 = time.monotonic()
    while set(find_all(uri)) != versions:
        assert time.monotonic() - t0 < timeout, f"servers of versions {sorted(find_all(uri))}, not {sorted(versions)}"
        time.sleep(0.2)


def test_server_names_carry_the_version():
    from retriever.fleet import actor_name, controller_name
    name = actor_name("0123456789abcdef", 12, 3, 1)
    assert name == "knnlm-0123456789abcdef-v12-s00003-r001"
    assert parse_name(name) == ("0123456789abcdef", 12, 3, 1)
    assert parse_name(controller_name("0123456789abcdef")) is None
    assert parse_name("knnlm-0123456789abcdef-s00003-r001") is None        # the unversioned names of before


@pytest.mark.slow
def test_servers_follow_versions_under_load(full, tmp_path, ray_cluster, capsys):
    from cluster.cli import main
    uri = fresh_datastore(full, tmp_path / "ds")
    _, full_text, keys = full
    cache = str(tmp_path / "cache")
    batches = queries(keys, 12, seed=1)
    plan = [("remove", [[100, 900], [5000, 5600]], False),                 # version 2
            ("ingest", [[100, 900], [5000, 5600]], True),                  # version 3: ids BASE.. appended
            ("remove", [[100, 900], [5000, 5600], [8000, 9000]], False)]   # version 4
    want = {1: expected(uri, 1, batches, cache)}
    t0 = time.monotonic()
    start_servers(uri, cache_dir=cache, detached=True, watch=WATCH, grace=GRACE)
    try:
        with Clients(uri, batches) as clients:
            clients.wait_seen(1)
            switch_s = []
            for kind, removed, appended in plan:
                v = publish_next(uri, kind, removed, appended, full_text)
                t1 = time.monotonic()
                want[v] = expected(uri, v, batches, cache)
                t2 = time.monotonic()
                switch_s.append(round(t2 - t1 + clients.wait_seen(v), 1))
            wait_versions(uri, {4})                                     # the old versions' servers are gone
            clients.wait_seen(4)
        elapsed = time.monotonic() - t0
        per = check_answers(clients, want)
        assert set(per) == {1, 2, 3, 4}, per
        # the versions' answers differ: removed ids never come back, appended ones do
        assert any(not np.array_equal(want[1][b][1], want[2][b][1]) for b in range(len(batches)))
        for b in range(len(batches)):
            ids2, ids3, ids4 = want[2][b][1], want[3][b][1], want[4][b][1]
            for ids in (ids2, ids3, ids4):
                assert not np.any(((ids >= 100) & (ids < 900)) | ((ids >= 5000) & (ids < 5600)))
            assert not np.any((ids4 >= 8000) & (ids4 < 9000))
            assert ids2.max() < BASE
        assert any(np.any(want[3][b][1] >= BASE) for b in range(len(batches)))
        # `knnlm serve --status`: the controller's version and each server's
        assert main(["serve", uri, "--status"]) == 0
        out = capsys.readouterr().out
        assert "controller: serving version 4 (watching every 0.3s)" in out, out
        rows = [line.split() for line in out.splitlines()[2:]]
        assert [(r[0], r[1], r[3]) for r in rows] == [("4", str(s), "ok") for s in range(4)], out
        assert controller_status(uri)["error"] == ""
        print(f"versions 1-4 served to {len(clients.answers)} batches in {elapsed:.1f}s: {per}; publish to first "
              f"answer of versions 2-4: {switch_s}s")
    finally:
        stop_servers(uri)
    assert not find_all(uri)


@pytest.mark.slow
def test_replica_killed_during_a_switch_fails_no_query(full, tmp_path, ray_cluster):
    """Two replicas per shard; while version 2's servers start, one of them is killed (Ray restarts it on
    version 2), and one of version 1's too: no query fails, the switch happens. Then the controller
    crashes: restarted by Ray, it finds version 2 served by the running servers, which keep serving."""
    import ray
    uri = fresh_datastore(full, tmp_path / "ds")
    _, _, keys = full
    cache = str(tmp_path / "cache")
    batches = queries(keys, 8, seed=2)
    want = {1: expected(uri, 1, batches, cache)}
    start_servers(uri, replicas=2, cache_dir=cache, detached=True, watch=WATCH, grace=GRACE)
    try:
        with Clients(uri, batches) as clients:
            clients.wait_seen(1)
            ray.kill(find_servers(uri, 1)[0][1], no_restart=False)          # version 1: a crash mid-load
            v = publish_next(uri, "remove", [[100, 900], [5000, 5600]])
            want[v] = expected(uri, v, batches, cache)
            t0 = time.monotonic()
            while not find_servers(uri, 2).get(1, {}).get(0):
                assert time.monotonic() - t0 < 60, "version 2's servers did not appear"
                time.sleep(0.05)
            victim = find_servers(uri, 2)[1][0]
            ray.kill(victim, no_restart=False)                              # version 2 starting: killed
            assert controller_status(uri)["version"] == 1                   # (before the switch)
            clients.wait_seen(2)
            wait_versions(uri, {2})
            pids = {ray.get(h.info.remote())["pid"] for reps in find_servers(uri, 2).values() for h in reps.values()}
            ray.kill(controller(uri), no_restart=False)                     # the controller crashes: Ray restarts it
            t0 = time.monotonic()
            while (controller_status(uri) or {}).get("version") != 2:        # recovered from the running servers
                assert time.monotonic() - t0 < 60, controller_status(uri)
                time.sleep(0.2)
            clients.wait_seen(2)
        assert {ray.get(h.info.remote())["pid"] for reps in find_servers(uri, 2).values()
                for h in reps.values()} == pids                              # its servers kept serving
        per = check_answers(clients, want)
        assert set(per) == {1, 2}, per
        status = controller_status(uri)
        assert status["failed_switches"] == 0 and status["error"] == "", status     # the killed one was waited for
        assert ray.get(victim.info.remote(), timeout=60)["version"] == 2   # restarted on its own version
    finally:
        stop_servers(uri)
    assert not find_all(uri)

"""Serving and evaluation under real faults (tests/serve_faults.py's scenarios on the embedded Ray):
SIGKILLed index-server replicas under a two-client load, a shard that loses every replica, eval
workers and index servers SIGKILLed during `knnlm eval`, a failed first fetch of an index shard,
and the embedded Ray of `knnlm serve` reached with address "auto"."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from conftest import REPO, write_text
from serve_faults import (
    SERVER_TITLE,
    cluster_workers,
    eval_worker_kills,
    replica_kill_under_load,
    server_pid,
    shard_loss,
    sigkill,
    title,
)
from test_knnlm import (
    EVAL,
    ds,  # noqa: F401 - fixture: a tiny GPT-2 datastore (IVF4,Flat over 2 index shards)
)
from test_retriever import indexed, synth  # noqa: F401 - fixture

from builder.manifest import load_manifest
from builder.storage import Storage
from retriever import find_servers, start_servers, stop_servers
from retriever.server import ServerError, fetch_cached


def gcs(ray_cluster) -> str:
    return ray_cluster.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def flat2(synth, tmp_path_factory, ray_cluster):  # noqa: F811
    """IVF-Flat over 2 index shards."""
    root = tmp_path_factory.mktemp("flat2")
    return indexed(synth, root / "ds", "IVF16,Flat", "l2", 2)


@pytest.fixture(scope="module")
def served2(flat2, tmp_path_factory):
    """A copy of flat2 served with 2 replicas per shard, then its index files removed from storage: every
    server restarted by a test (a SIGKILLed replica, a re-created one) can only come back from the
    node's verified cache, as a restart must (no second download)."""
    root = tmp_path_factory.mktemp("served2")
    uri, cache = str(root / "ds"), str(root / "cache")
    shutil.copytree(flat2, uri)
    start_servers(uri, replicas=2, cache_dir=cache, detached=False)
    for s in load_manifest(Storage.from_uri(uri)).index_shards:
        os.remove(os.path.join(uri, s["path"]))
    yield uri, cache
    stop_servers(uri)


def test_replica_sigkill_under_two_client_load_loses_no_query(served2, ray_cluster):
    uri, cache = served2
    r = replica_kill_under_load(gcs(ray_cluster), uri, cache_dir=cache, batches=24, batch_size=32, seed=3)
    print("ROW", r)
    d = r["detail"]
    assert r["injected"] == 1 and r["recovered"] == 1, r
    assert r["failed_queries"] == 0 and d["differing_queries"] == 0 and not d["errors"], r
    assert d["killed_after_batches"] is not None and d["killed_after_batches"] < 48   # mid-load
    assert d["queries"] == 2 * 24 * 32
    assert sum(len(v) for v in find_servers(uri).values()) == 4       # the killed replica is back (from the cache)


def test_shard_loses_every_replica_restart_then_clear_error_or_partial(served2, ray_cluster):
    uri, cache = served2
    r = shard_loss(gcs(ray_cluster), uri, cache_dir=cache, seed=2)
    print("ROW", r)
    assert r["failed_queries"] == 0, r                                 # SIGKILLed: waited for the restart
    assert r["detail"]["clear_error"] and r["detail"]["partial_flagged"] and r["detail"]["restored"], r
    assert f"index shards [{r['detail']['shard']}]" in r["detail"]["error"]
    assert r["injected"] == 4 and r["recovered"] == 4
    assert r["detail"]["error_s"] < 20                                 # removed for good: no wait for a restart


def test_server_process_title_and_cluster_filter(served2, ray_cluster):
    """The kill helpers find our servers by title among this cluster's workers only."""
    uri, _ = served2
    pids = {server_pid(h) for reps in find_servers(uri).values() for h in reps.values()}
    assert len(pids) == 4 and all(SERVER_TITLE in title(p) for p in pids)
    assert pids <= set(cluster_workers(gcs(ray_cluster), SERVER_TITLE))
    assert not cluster_workers("127.0.0.1:1", SERVER_TITLE)            # another cluster: none of ours
    assert not sigkill(os.getpid(), SERVER_TITLE)                       # never a process of another title


def test_fetch_cached_retries_a_failed_first_fetch(flat2, tmp_path):
    """The object briefly missing, then briefly corrupt: the fetch tries again and caches the verified
    file; a file that stays corrupt is a clear ServerError naming it, nothing cached."""
    uri = str(tmp_path / "ds")
    shutil.copytree(flat2, uri)
    st = Storage.from_uri(uri)
    s = load_manifest(st).index_shards[1]
    path = os.path.join(uri, s["path"])
    with open(path, "rb") as f:
        good = f.read()
    for broken in ("missing", "truncated"):
        if broken == "missing":
            os.remove(path)
        else:
            write_text(path, good[:len(good) // 2])
        fixer = threading.Timer(0.6, lambda: write_text(path, good))
        fixer.start()
        cache = str(tmp_path / f"cache-{broken}")
        try:
            got = fetch_cached(st, s["path"], s["checksum"], cache)
        finally:
            fixer.join()
        with open(got, "rb") as f:
            assert f.read() == good and os.path.exists(got + ".ok")
    write_text(path, good[:-1] + bytes([good[-1] ^ 1]))                # corrupt for good
    with pytest.raises(ServerError, match=rf"{s['path']} does not match its manifest checksum"):
        fetch_cached(st, s["path"], s["checksum"], str(tmp_path / "cache-bad"))
    assert not [f for f in os.listdir(tmp_path / "cache-bad") if not f.startswith(".")]


@pytest.fixture(scope="module")
def eval_corpus(tmp_path_factory):
    """48 short documents: enough chunks (16 targets each) for three kills to land mid-eval on a fast machine."""
    root = tmp_path_factory.mktemp("evalc")
    docs = [f"{EVAL[i % 2]} Number {i} of the river and the dog." for i in range(48)]
    return write_text(root / "eval.jsonl", "\n".join(json.dumps({"text": t}) for t in docs) + "\n")


def test_eval_survives_several_worker_kills_and_a_server_kill(ds, eval_corpus, tmp_path, ray_cluster):  # noqa: F811
    """Three SIGKILLs of the eval worker (more than Ray's old budget of 2 restarts) and one of the only
    replica of an index server (the router waits for its restart), at seeded random moments: the
    same tokens and perplexities as the uninterrupted eval."""
    _, out, _ = ds
    r = eval_worker_kills(gcs(ray_cluster), out, [eval_corpus], worker_kills=3, server_kills=1, replicas=1,
                          seed=5, cache_dir=str(tmp_path / "srv"), lam=0.3, temperature=2.0, k=8, nprobe=4,
                          chunk_targets=16, max_delay=0.2)
    d = r["detail"]
    print("ROW", r)
    assert len(d["worker_kills"]) == 3 and len(d["server_kills"]) == 1, r
    assert d["same"] and r["recovered"] == 4 and r["failed_queries"] == 0, r
    assert d["faulted"]["tokens"] == d["clean"]["tokens"] > 100


@pytest.mark.slow
def test_embedded_serve_runs_until_ctrl_c_and_auto_reaches_it(flat2, tmp_path):
    """`knnlm serve DS --replicas 2 --cache-dir D` without --address: an embedded Ray that a separate
    `ray.init(address="auto")` + `Retriever.connect(DS)` reaches; SIGTERM stops it as Ctrl-C does. (A private TMPDIR
    keeps "auto" away from the other Rays on this machine.)"""
    uri = flat2
    tmp = tempfile.mkdtemp(prefix="sf-", dir="/tmp")                  # short: Ray's socket paths live under it
    env = dict(os.environ, TMPDIR=tmp, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RAY_ADDRESS", None)
    try:
        srv, lines = _serve(uri, env, "--replicas", "2", "--cache-dir", str(tmp_path / "cache"))
        try:
            client = ("import ray, sys, numpy as np\nfrom retriever import Retriever\nray.init(address='auto')\n"
                      "r = Retriever.connect(sys.argv[1])\nres = r.search(np.zeros((3, 32), np.float32), k=4, nprobe=2)\n"
                      "print('OK', res.ids.shape, sum(len(v) for v in r.servers.values()))\n")
            c = subprocess.run([sys.executable, "-c", client, uri], env=env, capture_output=True, text=True,
                               timeout=120, check=False)
            assert "OK (3, 4) 4" in c.stdout, c.stdout + c.stderr
        finally:
            rest = _stop(srv)        # SIGTERM (a service manager): the path of Ctrl-C (KeyboardInterrupt)
        assert srv.returncode == 0 and "stopped" in rest, "".join(lines) + rest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _serve(uri: str, env: dict, *extra: str) -> tuple[subprocess.Popen, list[str]]:
    """`knnlm serve URI` in its own session, once it says it serves (its lines so far)."""
    srv = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", uri, *extra], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, t0 = [], time.time()
    for line in srv.stdout:
        lines.append(line)
        if "Ctrl-C stops" in line:
            break
        assert time.time() - t0 < 180, "".join(lines)
    assert srv.poll() is None, "".join(lines)
    return srv, lines


def _stop(srv: subprocess.Popen) -> str:
    srv.send_signal(15)
    try:
        rest, _ = srv.communicate(timeout=60)
    finally:
        if srv.poll() is None:
            os.killpg(srv.pid, 9)
            srv.wait()
    return rest


def test_warm_evaluator_of_serve_runs_eval_with_the_in_process_numbers(ds, tmp_path):  # noqa: F811
    """`knnlm serve DS` keeps a warm evaluator (torch, transformers, the LM loaded); `knnlm eval DS --address
    auto` from another folder, with relative paths, runs on it: the in-process run's numbers, a client that
    never imports torch, a second call on the same evaluator, a user error as one line, and --workers (or
    `knnlm serve --no-evaluator`) evaluating in the client."""
    from retriever.config import EvalConfig
    from retriever.evaluate import evaluate
    _, out, evalf = ds
    cfg = dict(lam=0.3, temperature=2.0, k=8, nprobe=4)
    ref = evaluate(EvalConfig(datastore=out, corpus=[evalf], cache_dir=str(tmp_path / "c0"), **cfg))
    client = tmp_path / "client"
    client.mkdir()
    shutil.copy(evalf, client / "text.jsonl")
    tmp = tempfile.mkdtemp(prefix="sf-", dir="/tmp")                  # short: Ray's socket paths live under it
    env = dict(os.environ, TMPDIR=tmp, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RAY_ADDRESS", None)

    def knnlm_eval(*extra: str) -> subprocess.CompletedProcess:           # every path relative to the client
        return subprocess.run([sys.executable, "-X", "importtime", "-m", "cluster.cli", "eval",
                               os.path.relpath(out, client), "--corpus",
                               "text.jsonl", "--lambda", "0.3", "--temperature", "2", "--k", "8", "--nprobe", "4",
                               "--address", "auto", *extra], cwd=client, env=env, capture_output=True, text=True,
                              timeout=300, check=False)
    try:
        srv, lines = _serve(out, env, "--cache-dir", str(tmp_path / "c1"))
        try:
            # ready, and at a plain process's priority (an embedded Ray's workers run at niceness 0, not 15)
            assert any(ln.startswith("warm evaluator: pid") and "model loaded" in ln and "nice" not in ln
                       for ln in lines), "".join(lines)
            for call in (1, 2):
                r = knnlm_eval("--out", "r.json", *(("--report", "rep") if call == 2 else ()))
                assert r.returncode == 0, r.stdout + r.stderr[-3000:]
                assert "evaluating on the warm evaluator" in r.stderr
                imported = {ln.split("|")[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
                assert "torch" not in imported and "transformers" not in imported      # the client stays lean
                got = json.loads((client / "r.json").read_text())      # --out: relative to the client's folder
                assert got["profile"]["evaluator"]["warm"] and got["profile"]["evaluator"]["call"] == call
                assert got["tokens"] == ref.tokens
                assert got["base_ppl"] == pytest.approx(ref.base_ppl, rel=1e-9)
                assert got["knnlm_ppl"] == pytest.approx(ref.knnlm_ppl, rel=1e-9)
            # --report DIR, relative to the client's folder, written by the evaluator
            page = client / "rep" / "index.html"
            assert page.exists() and got["report"]["path"] == str(page) and f"report: {page}" in r.stdout
            run = (client / "rep" / "data" / "run.js").read_text()
            assert json.loads(run[len("knnlmRun("):-3])["run"]["knnlm_ppl"] == got["knnlm_ppl"]
            bad = knnlm_eval("--mode", "stream")                         # a user error, raised on the evaluator
            assert bad.returncode == 2, bad.stdout + bad.stderr[-3000:]
            assert "knnlm eval: error: --mode stream: the datastore's keys were built in document mode" in bad.stderr
            assert "Traceback" not in bad.stderr
            st = subprocess.run([sys.executable, "-m", "cluster.cli", "serve", out, "--address", "auto", "--status"],
                                env=env, capture_output=True, text=True, timeout=120, check=False)
            assert st.returncode == 0 and "warm evaluator: pid" in st.stdout, st.stdout + st.stderr[-2000:]
            assert "3 evaluations so far" in st.stdout, st.stdout      # two, and the refused one
            own = knnlm_eval("--workers", "1", "--out", "w.json")     # Ray workers asked for: not the evaluator
            assert own.returncode == 0 and "warm evaluator" not in own.stderr, own.stderr[-3000:]
            assert "evaluator" not in json.loads((client / "w.json").read_text())["profile"]
        finally:
            rest = _stop(srv)
        assert "stopped" in rest
        srv, lines = _serve(out, env, "--cache-dir", str(tmp_path / "c1"), "--no-evaluator")
        try:
            assert not any("warm evaluator" in ln for ln in lines)
            r = knnlm_eval("--out", "n.json")
            assert r.returncode == 0 and "warm evaluator" not in r.stderr, r.stderr[-3000:]
            got = json.loads((client / "n.json").read_text())
            assert got["knnlm_ppl"] == pytest.approx(ref.knnlm_ppl, rel=1e-9) and "evaluator" not in got["profile"]
        finally:
            _stop(srv)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

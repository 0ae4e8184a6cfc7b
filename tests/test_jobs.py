"""`knnlm submit/status/logs` against a real Ray head (with its dashboard) started on 127.0.0.1.

The head is private to this module: its own --temp-dir (so `ray.init()` elsewhere in the
session never finds it: Ray auto-connects only to the cluster recorded in the *default*
temp dir's ray_current_cluster, or RAY_ADDRESS, neither of which it touches), its own ports
(the dashboard agent's default 52365 would clash with other Rays on this machine), and it is
stopped by killing exactly its own process tree (`ray stop` would stop every Ray here).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest
import yaml
from conftest import REPO, TRAIN_TEXT, _free_port, write_text
from ray_nodes import alive as _alive
from ray_nodes import descendants as _descendants

from builder.runtime import ClusterError
from cluster.cli import dispatch, make_parser, subcommands
from cluster.jobs import (
    ENTRYPOINT,
    META_PIPELINE,
    connect_jobs,
    follow_job,
    job_runtime_env,
    knnlm_jobs,
    load_for_submit,
    pipeline_key,
    stage_working_dir,
)

pytestmark = pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")  # Ray's job SDK

CLUSTER_SECRET = "cluster-own-secret-chain"        # what the head's environment holds
SUBMITTER_SECRET = f"submitter-secret-{uuid.uuid4().hex}"   # what the submitting shell holds: must never travel


def knnlm(*argv: str) -> tuple[int, str, str]:
    """Run a job subcommand in-process: (exit status, stdout, stderr); a ClusterError propagates."""
    a = make_parser().parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = dispatch(a)
    return rc, out.getvalue(), err.getvalue()


class Head:
    def __init__(self, address: str, temp_dir: str, proc: subprocess.Popen):
        self.address, self.temp_dir, self.proc = address, temp_dir, proc


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` with the dashboard on 127.0.0.1 and free ports; yields a Head."""
    tmp = tempfile.mkdtemp(prefix="knnlm-rh-", dir="/tmp")   # short: Ray's socket paths live under it
    dash = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(AWS_SECRET_ACCESS_KEY=CLUSTER_SECRET, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))  # jobs run `python`
    # SIGINT stops the head (see the teardown): re-enabled, since a pytest started in the background
    # by a shell inherits SIGINT ignored
    launcher = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "from ray.scripts.scripts import main; sys.exit(main())")
    cmd = [sys.executable, "-c", launcher,
           "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={_free_port()}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--dashboard-agent-listen-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
           "--num-cpus=2", f"--temp-dir={tmp}", "--disable-usage-stats"]
    log_path = os.path.join(tmp, "head.log")
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"

    def head_log() -> str:
        with open(log_path, errors="replace") as f:
            return f.read()[-3000:]
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError("ray start --head exited:\n" + head_log())
            try:
                with urllib.request.urlopen(address + "/api/version", timeout=2):
                    break
            except urllib.error.HTTPError:     # 401: token auth is on, but the dashboard answers
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("the Ray dashboard did not come up:\n" + head_log())
                time.sleep(0.5)
        client = connect_jobs(address)
        while True:                            # the job agent starts a moment after the dashboard
            try:
                client.list_jobs()
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        yield Head(address, tmp, proc)
    finally:
        # Ctrl-C on `ray start --block` shuts its node down (~2 s); whatever of its tree is left
        # after 15 s is killed. Only this tree: other Rays on the machine are left alone.
        pids = _descendants(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGINT)
        end = time.time() + 15
        while time.time() < end and any(_alive(p) for p in pids):
            time.sleep(0.2)
        for pid in pids:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def submitter_secret():
    """The submitting shell holds AWS credentials of its own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_SECRET_ACCESS_KEY", SUBMITTER_SECRET)
        yield


def write_pipeline(root, gpt2_model: str, corpus: list[str] | None = None, **index) -> str:
    """A tiny pipeline: document-mode build with the tiny GPT-2, IVF4,Flat in 2 index shards."""
    if corpus is None:
        corpus = [write_text(root / "corpus" / f"d{i}.txt", " ".join(TRAIN_TEXT[i:] + TRAIN_TEXT[:i]))
                  for i in range(len(TRAIN_TEXT))]
    spec = {"datastore": "ds",                       # relative: next to the file, written out absolute
            "build": {"corpus": corpus, "model": gpt2_model, "window": 32, "min_context": 8, "unit_tokens": 256,
                      "batch_size": 4},
            "index": {"factory": "IVF4,Flat", "train_size": 2000, "shards": 2, "trainer": "faiss",
                      "encoder": "faiss", **index}}
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


# ---------------------------------------------------------------------------------------------
# no cluster needed


def test_address_that_does_not_answer():
    dead = f"http://127.0.0.1:{_free_port()}"
    t0 = time.time()
    with pytest.raises(ClusterError) as e:
        knnlm("status", "some-job", "--address", dead)
    msg = str(e.value)
    assert dead in msg and "does not answer" in msg and "http://HEAD:8265" in msg and "ray status" in msg
    assert "Traceback" not in msg and time.time() - t0 < 15
    for bad in ("ray://127.0.0.1:10001", "auto"):
        with pytest.raises(ClusterError, match="Jobs API URL of the cluster's dashboard"):
            knnlm("logs", "x", "--address", bad)


def test_help_says_address_is_the_jobs_api_url():
    sub = subcommands(make_parser())
    for name in ("submit", "status", "logs"):
        text = " ".join(sub[name].format_help().split())
        assert "Jobs API URL" in text and "ray job submit --address" in text and "NOT the ray.init" in text


def test_config_error_before_anything_is_submitted(tmp_path, gpt2_model):
    path = write_pipeline(tmp_path, gpt2_model, factory="IVF4,Flat")
    with open(path) as f:
        spec = yaml.safe_load(f)
    spec["index"]["factroy"] = spec["index"].pop("factory")
    with open(path, "w") as f:
        yaml.safe_dump(spec, f)
    from builder.config import ConfigError
    with pytest.raises(ConfigError, match="unknown key 'index.factroy'"):   # before any connection
        knnlm("submit", path, "--address", f"http://127.0.0.1:{_free_port()}")


def test_inputs_are_checked_on_the_cluster_not_here(tmp_path, gpt2_model):
    """A path that exists on the cluster only is no error on the submitting machine: submit checks the
    file's keys and values here, and the job's `knnlm run` checks its inputs there."""
    path = write_pipeline(tmp_path, gpt2_model, corpus=["/data/on-the-cluster/*.txt"])
    assert load_for_submit(path).build.corpus == ["/data/on-the-cluster/*.txt"]
    from builder.config import ConfigError
    from cluster.pipeline_file import load_pipeline
    with pytest.raises(ConfigError, match=r"build.corpus: /data/on-the-cluster/\*.txt: no file matches"):
        load_pipeline(path)


def test_job_key_and_runtime_env_carry_no_credentials(tmp_path, gpt2_model):
    path = write_pipeline(tmp_path, gpt2_model)
    with submitter_secret():
        p = load_for_submit(path)
        key = pipeline_key(p)
        assert key == pipeline_key(load_for_submit(path)) and key.startswith("knnlm-ds-")
        assert p.datastore == str(tmp_path / "ds") and p.address == "auto"
        env = job_runtime_env(str(tmp_path))
        assert set(env) == {"working_dir"} and SUBMITTER_SECRET not in json.dumps(env)
    # the job's entrypoint names the driver module, which the staged folder holds
    wd = stage_working_dir(p, str(tmp_path / "job"))
    driver = ENTRYPOINT.split(" -m ")[1].split()[0]
    assert (tmp_path / "job" / (driver.replace(".", "/") + ".py")).is_file()
    assert sorted(os.listdir(wd)) == ["builder", "cluster", "pipeline.yaml", "retriever"]


# ---------------------------------------------------------------------------------------------
# against the head


@pytest.fixture(scope="module")
def done_job(ray_head, gpt2_model, tmp_path_factory):
    """One tiny pipeline submitted and followed to the end: (pipeline path, rc, stdout, stderr, seconds)."""
    root = tmp_path_factory.mktemp("e2e")
    path = write_pipeline(root, gpt2_model)
    t0 = time.time()
    with submitter_secret():
        rc, out, err = knnlm("submit", path, "--address", ray_head.address)
    return path, rc, out, err, time.time() - t0


def test_submit_follows_and_builds_the_datastore(done_job, ray_head):
    path, rc, out, err, _ = done_job
    assert rc == 0, out + err
    job_id = out.splitlines()[0]
    assert job_id == pipeline_key(load_for_submit(path))
    assert f"as job {job_id}" in err and "SUCCEEDED" in err
    assert "[1/3] build" in out and "[3/3] add" in out and "pipeline done" in out     # the followed log
    from builder.key_shards import verify_key_shards
    from builder.manifest import load_manifest
    from builder.storage import Storage
    st = Storage.from_uri(os.path.join(os.path.dirname(path), "ds"))
    m = load_manifest(st)
    assert m.num_keys > 100 and len(m.index_shards) == 2 and m.index["factory"] == "IVF4,Flat"
    assert not verify_key_shards(st, m)
    assert m.pipeline["datastore"] == os.path.join(os.path.dirname(path), "ds")


def test_status_and_logs_of_the_job(done_job, ray_head):
    job_id = done_job[2].splitlines()[0]
    rc, out, _ = knnlm("status", job_id, "--address", ray_head.address)
    assert rc == 0 and f"{job_id}: SUCCEEDED" in out and "datastore:" in out
    rc, out, _ = knnlm("status", job_id, "--address", ray_head.address, "--json")
    d = json.loads(out)
    assert d["status"] == "SUCCEEDED" and d["metadata"][META_PIPELINE] == job_id
    rc, out, _ = knnlm("status", "--address", ray_head.address)
    assert job_id in out
    rc, out, _ = knnlm("logs", job_id, "--address", ray_head.address)
    assert rc == 0 and "pipeline done" in out
    with pytest.raises(ClusterError, match="no job 'knnlm-nope'"):
        knnlm("status", "knnlm-nope", "--address", ray_head.address)


def test_resubmitting_a_finished_pipeline_does_nothing(done_job, ray_head):
    path = done_job[0]
    rc, out, _ = knnlm("submit", path, "--address", ray_head.address)
    assert rc == 0 and "nothing to do" in out and "SUCCEEDED" in out
    client = connect_jobs(ray_head.address)
    assert len(knnlm_jobs(client, pipeline_key(load_for_submit(path)))) == 1


def test_credentials_never_travel(done_job, ray_head):
    _, _, out, err, _ = done_job
    job_id = out.splitlines()[0]
    client = connect_jobs(ray_head.address)
    info = client.get_job_info(job_id)
    assert set(info.runtime_env) == {"working_dir"}
    assert SUBMITTER_SECRET not in json.dumps(info.model_dump(mode="json"))
    assert SUBMITTER_SECRET not in client.get_job_logs(job_id) and SUBMITTER_SECRET not in out + err
    # a job with the same runtime env sees the cluster's credentials, not the submitter's
    with submitter_secret(), tempfile.TemporaryDirectory() as tmp:
        wd = stage_working_dir(load_for_submit(done_job[0]), os.path.join(tmp, "job"))
        jid = client.submit_job(entrypoint="python -c \"import os; print('secret:', os.environ.get("
                                           "'AWS_SECRET_ACCESS_KEY'))\"", runtime_env=job_runtime_env(wd))
    deadline = time.time() + 60
    while not client.get_job_status(jid).is_terminal() and time.time() < deadline:
        time.sleep(0.5)
    logs = client.get_job_logs(jid)
    assert f"secret: {CLUSTER_SECRET}" in logs and SUBMITTER_SECRET not in logs


def test_failed_job_is_a_clear_error(ray_head, gpt2_model, tmp_path):
    missing = str(tmp_path / "not-on-the-cluster.txt")
    path = write_pipeline(tmp_path, gpt2_model, corpus=[missing])
    rc, out, err = knnlm("submit", path, "--address", ray_head.address, "--no-follow")
    job_id = out.strip()
    assert rc == 0 and "--follow" in err
    rc, out, err = knnlm("submit", path, "--address", ray_head.address, "--no-follow")   # same pipeline again
    assert out.strip() == job_id and "already running" in err      # not a second job
    with pytest.raises(ClusterError) as e:
        knnlm("logs", job_id, "--address", ray_head.address, "--follow")
    msg = str(e.value)
    assert f"job {job_id} FAILED" in msg and "knnlm run: error:" in msg and missing in msg
    assert f"build.corpus: {missing}: no such file or directory" in msg      # checked on the cluster, by key
    assert f"knnlm logs {job_id} --address {ray_head.address}" in msg
    rc, out, _ = knnlm("status", job_id, "--address", ray_head.address)
    assert "FAILED" in out and missing in out
    with pytest.raises(ClusterError) as e:               # a failed pipeline is retried as a new job
        knnlm("submit", path, "--address", ray_head.address)
    assert f"job {job_id}-2 FAILED" in str(e.value) and "last lines of its log" not in str(e.value)


class Proxy:
    """A TCP relay to `port` on 127.0.0.1 that can be cut, as a dropped network would."""

    def __init__(self, port: int):
        self.up, self.socks = port, []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                down, _ = self.listener.accept()
                up = socket.create_connection(("127.0.0.1", self.up))
            except OSError:
                return
            self.socks += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b):
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def cut(self, listener: bool = True):
        """Drop every open connection; with listener=False new ones still get through."""
        socks, self.socks = self.socks, []
        for s in [self.listener, *socks] if listener else socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def test_lost_connection_does_not_stop_the_job(ray_head, tmp_path):
    """A dropped connection, then a Ctrl-C, while following: both stop following, never the job;
    a stream that drops while the Jobs API still answers is reopened without repeating the log."""
    client = connect_jobs(ray_head.address)
    release = tmp_path / "release"                     # the job runs until the test creates this file
    with tempfile.TemporaryDirectory() as wd:
        jid = client.submit_job(entrypoint=f"python -u -c \"import os, time; print('started'); "
                                           f"[time.sleep(0.2) for _ in range(600) if not os.path.exists('{release}')]; "
                                           "print('finished')\"", runtime_env=job_runtime_env(wd))
    proxy = Proxy(int(ray_head.address.rsplit(":", 1)[1]))

    class CutWhenStarted(io.StringIO):
        def write(self, s):
            n = super().write(s)
            if "\nstarted\n" in self.getvalue():
                proxy.cut()
            return n

    with pytest.raises(ClusterError) as e:
        follow_job(connect_jobs(proxy.address), jid, proxy.address, out=CutWhenStarted(), reconnect_s=1.0)
    assert f"lost the connection to {proxy.address} while following job {jid}" in str(e.value)
    assert "keeps running" in str(e.value) and f"knnlm logs {jid} --address {proxy.address} --follow" in str(e.value)
    assert client.get_job_status(jid).value == "RUNNING"

    cli = ("import argparse, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "  # see ray_head
           "from cluster.cli import dispatch, make_parser; sys.exit(dispatch(make_parser().parse_args(sys.argv[1:])))")
    follower = subprocess.Popen(
        [sys.executable, "-c", cli, "logs", jid, "--follow", "--address", ray_head.address],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while (line := follower.stdout.readline()).strip() != "started":
        assert line, follower.stderr.read()
    follower.send_signal(signal.SIGINT)                 # Ctrl-C: stop following
    _, err = follower.communicate(timeout=30)
    assert follower.returncode == 130, err
    assert "keeps running" in err and f"knnlm logs {jid} --address {ray_head.address} --follow" in err
    assert client.get_job_status(jid).value == "RUNNING"

    flaky = Proxy(int(ray_head.address.rsplit(":", 1)[1]))

    class DropOnce(io.StringIO):
        def write(self, s):
            before = "\nstarted\n" in self.getvalue()
            n = super().write(s)
            if not before and "\nstarted\n" in self.getvalue():
                flaky.cut(listener=False)
                release.touch()
            return n

    out = DropOnce()
    info = follow_job(connect_jobs(flaky.address), jid, flaky.address, out=out, reconnect_s=20.0)
    assert info.status.value == "SUCCEEDED"
    lines = out.getvalue().splitlines()
    assert lines.count("started") == 1 and lines.count("finished") == 1
    flaky.cut()


def test_a_second_run_on_the_same_datastore_is_refused_by_the_lease(ray_head, gpt2_model, tmp_path):
    """Another pipeline (another job id) for a datastore whose build is running fails inside the
    cluster on the build's lease, and says so on the submitting terminal."""
    from builder.lease import Lease
    from builder.storage import Storage
    path = write_pipeline(tmp_path, gpt2_model)
    holder = Lease(Storage.from_uri(str(tmp_path / "ds")), ttl=2.0)    # a live build of that datastore
    holder.acquire()
    try:
        with pytest.raises(ClusterError) as e:
            knnlm("submit", path, "--address", ray_head.address)
    finally:
        holder.release()
    assert "FAILED on the cluster (exit code 2)" in str(e.value) and "another build is running" in str(e.value)

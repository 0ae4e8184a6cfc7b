"""The fault suite's runner: the pipeline on a LocalCluster (tests/ray_nodes.py), broken on purpose.

The datastore and the corpus live only on S3 (`s3_endpoint`: the moto server, or a fault proxy in front
of it), so no stage relies on another node's local files (the model is an installed input, on every
node's disk). Each stage is a real driver subprocess (`python -m cluster.cli STAGE ... --address`).

    suite = Suite(cluster, bucket, Params(...), s3_endpoint=url)
    ref = suite.reference()                       # an uninterrupted run: timings and checksums
    rows = [SCENARIOS[name](suite) for name in ("worker_kills", "driver_kills", "node_kill")]
    print(summary_table(rows)); write_results(rows, path, params)

Each faulty run goes to a fresh S3 prefix and is compared with the reference: key shard, trained index and
index shard checksums, num_keys, and the (doc, pos) of every key row read back from the shards (keys
lost / duplicated). `register(name)` adds a scenario (serving faults, S3 faults: other modules).
"""
from __future__ import annotations

import collections
import datetime
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_KEYS = ("fault", "injected", "recovered", "extra_s", "keys_lost", "keys_duplicated", "failed_queries", "notes")
STAGES = ("build", "train-index", "add")


@dataclass
class Params:
    corpus: str                      # a local file or folder: uploaded to s3://BUCKET/corpus/
    model: str
    build: list = field(default_factory=list)     # extra flags of each stage
    train: list = field(default_factory=lambda: ["--index-factory", "IVF4,Flat", "--train-size", "2000"])
    add: list = field(default_factory=lambda: ["--index-shards", "2"])
    workers: int = 2                 # key workers and add tasks at a time
    lease_ttl: float = 6.0           # short: a rerun after a killed driver waits this long for its lease
    worker_kills_build: int = 2
    worker_kills_add: int = 1
    driver_kills: int = 2            # at random moments (one more is placed in the manifest commit)
    seed: int = 0
    stage_timeout: float = 900.0
    eval_corpus: str | None = None   # a local file, uploaded to s3://BUCKET/eval/: the serving scenarios' text
    eval_options: dict = field(default_factory=lambda: {"k": 16, "nprobe": 4})
    eval_worker_kills: int = 2       # eval workers SIGKILLed during an eval (serving scenarios)
    eval_server_kills: int = 1       # ... and index servers


@dataclass
class Run:
    prefix: str
    seconds: dict = field(default_factory=dict)       # stage -> seconds (reruns included)
    attempts: dict = field(default_factory=dict)      # stage -> driver runs
    log: str = ""

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


class StageFailed(RuntimeError):
    pass


class Suite:
    def __init__(self, cluster, bucket: str, params: Params, s3_endpoint: str | None = None,
                 workdir: str | None = None, env: dict | None = None, proxy=None):
        self.cluster, self.bucket, self.p = cluster, bucket, params
        self.proxy = proxy               # the FaultProxy every S3 request goes through (tests/s3_proxy.py), if any
        self.rng = random.Random(params.seed)
        self.workdir = workdir or tempfile.mkdtemp(prefix="knnlm-faults-")
        self.fault_file = os.path.join(self.workdir, "fault.txt")
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        self.env.update(PYTHONPATH=REPO, RAY_AUTH_MODE="token", HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
                        KNNLM_FAULT_FILE=self.fault_file, TOKENIZERS_PARALLELISM="false", **(env or {}))
        if s3_endpoint:
            self.env["AWS_ENDPOINT_URL"] = s3_endpoint
        self.corpus_uri = self._upload_corpus()
        self.eval_uri = self._upload(params.eval_corpus, "eval") if params.eval_corpus else None
        self.ref: Run | None = None
        self.ref_facts: dict | None = None
        self._ref_eval = None
        self.logs: dict[str, str] = {}   # every driver's whole output (searched for credentials)

    # ---- storage -----------------------------------------------------------------------------

    def _s3(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.env.get("AWS_ENDPOINT_URL"))

    def _upload_corpus(self) -> str:
        s3, src = self._s3(), self.p.corpus
        files = [src] if os.path.isfile(src) else sorted(os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs)
        base = os.path.dirname(src) if os.path.isfile(src) else src
        for f in files:
            s3.upload_file(f, self.bucket, "corpus/" + os.path.relpath(f, base))
        return f"s3://{self.bucket}/corpus/" + (os.path.basename(src) if os.path.isfile(src) else "")

    def _upload(self, path: str, prefix: str) -> str:
        self._s3().upload_file(path, self.bucket, f"{prefix}/{os.path.basename(path)}")
        return f"s3://{self.bucket}/{prefix}/{os.path.basename(path)}"

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def fresh(self, name: str) -> str:
        return f"runs/{name}-{uuid.uuid4().hex[:8]}"

    # ---- drivers -----------------------------------------------------------------------------

    def command(self, stage: str, prefix: str) -> list[str]:
        ds, common = self.uri(prefix), ["--address", self.cluster.address, "--lease-ttl", str(self.p.lease_ttl)]
        if stage == "build":
            return ["build", "--corpus", self.corpus_uri, "--model", self.p.model, "--out", ds, "--workers",
                    str(self.p.workers), "--no-progress", *common, *self.p.build]
        if stage == "train-index":
            return ["train-index", ds, *common, *self.p.train]
        return ["add", ds, "--workers", str(self.p.workers), *common, *self.p.add]

    def start(self, stage: str, prefix: str, logf) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "cluster.cli", *self.command(stage, prefix)], cwd=REPO,
                                env=self.env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)

    def stage(self, run: Run, stage: str, during=None, kill_driver_at: list | None = None) -> None:
        """Run one stage to success: `during(proc)` runs in a thread while the driver does (worker kills);
        each time in `kill_driver_at` (seconds after a driver starts) SIGKILLs that driver, and the same
        command is run again. A driver that exits non-zero by itself (or by a fault hook) is rerun too,
        at most 3 times beyond the planned kills."""
        kills = list(kill_driver_at or [])
        t0, tries, spare = time.perf_counter(), 0, 3
        while True:
            tries += 1
            with tempfile.TemporaryFile() as logf:
                proc = self.start(stage, run.prefix, logf)
                th = threading.Thread(target=during, args=(proc,), daemon=True) if during else None
                if th:
                    th.start()
                killed = False
                if kills:
                    at = kills.pop(0)
                    try:
                        proc.wait(timeout=at)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)   # the driver (its own session), not the cluster
                        killed = True
                try:
                    rc = proc.wait(timeout=self.p.stage_timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    rc = proc.wait()
                if th:
                    th.join(timeout=60)
                logf.seek(0)
                out = logf.read().decode(errors="replace")
            self.logs[f"{run.prefix} {stage} try {tries}"] = out
            run.log += f"\n=== {stage} try {tries} rc={rc}{' (driver killed)' if killed else ''}\n{out[-4000:]}"
            if rc == 0 and not killed:
                break
            if not killed:
                spare -= 1
                if spare < 0:
                    raise StageFailed(f"{stage} of {run.prefix} failed {tries} times; last log:\n{out[-3000:]}")
        run.seconds[stage] = run.seconds.get(stage, 0.0) + time.perf_counter() - t0
        run.attempts[stage] = tries

    def pipeline(self, name: str, hooks: dict | None = None) -> Run:
        """build -> train-index -> add into a fresh prefix; hooks: stage -> dict(during=..., kill_driver_at=...)."""
        run = Run(self.fresh(name))
        for st in STAGES:
            self.stage(run, st, **(hooks or {}).get(st, {}))
        return run

    # ---- results -----------------------------------------------------------------------------

    def facts(self, prefix: str) -> dict:
        """What must not change: checksums and counts from the manifest, and every key row's (doc, pos)."""
        import pyarrow.parquet as pq

        from builder.storage import Storage
        storage = Storage.from_uri(self.uri(prefix))
        m = json.loads(storage.read_text("manifest.json"))
        ids, rows = [], collections.Counter()
        for s in m["shards"]:
            t = pq.read_table(io.BytesIO(storage.read_bytes(s["path"])), columns=["doc", "pos"])
            ids.extend(range(s["first_id"], s["first_id"] + t.num_rows))
            rows.update(zip(t.column("doc").to_pylist(), t.column("pos").to_pylist()))
        return {"num_keys": m["num_keys"], "shards": [(s["path"], s["num_rows"], s["first_id"], s["checksum"])
                                                      for s in m["shards"]],
                "index": m["index"]["checksum"] if m.get("index") else None,
                "index_shards": [(s["path"], s["first_id"], s["num_ids"], s["checksum"])
                                 for s in m.get("index_shards") or []],
                "ids": ids, "rows": rows}

    def compare(self, prefix: str) -> dict:
        """{keys_lost, keys_duplicated, same_bytes, diffs} of a run against the reference."""
        got, ref = self.facts(prefix), self.ref_facts
        ids = collections.Counter(got["ids"])
        lost = sum(max(0, n - got["rows"].get(r, 0)) for r, n in ref["rows"].items())
        dup = sum(max(0, n - ref["rows"].get(r, 0)) for r, n in got["rows"].items())
        dup += sum(n - 1 for n in ids.values() if n > 1)
        lost += sum(1 for i in range(ref["num_keys"]) if i not in ids)
        diffs = [k for k in ("num_keys", "shards", "index", "index_shards") if got[k] != ref[k]]
        if sorted(ids) != list(range(got["num_keys"])):
            diffs.append("ids")
        return {"keys_lost": lost, "keys_duplicated": dup, "same_bytes": not diffs, "diffs": diffs}

    def reference(self) -> Run:
        self.ref = self.pipeline("reference")
        self.ref_facts = self.facts(self.ref.prefix)
        if sorted(self.ref_facts["ids"]) != list(range(self.ref_facts["num_keys"])):
            raise StageFailed("the reference run's key ids are not 0..num_keys-1")
        return self.ref

    def connect(self) -> None:
        """This process on the cluster (the serving scenarios query and evaluate from here)."""
        from serve_faults import ensure_ray
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        ensure_ray(self.cluster.address)

    def eval(self, prefix: str, cache_dir: str | None = None):
        """`knnlm eval` of the eval corpus on the datastore at `prefix`, its servers started for the call
        (one replica per shard, fetching their index shards from S3 into `cache_dir`, fresh by default)."""
        from retriever.config import EvalConfig
        from retriever.evaluate import evaluate
        from retriever.router import start_servers, stop_servers
        self.connect()
        uri = self.uri(prefix)
        start_servers(uri, replicas=1, cache_dir=cache_dir or tempfile.mkdtemp(dir=self.workdir), detached=True)
        try:
            return evaluate(EvalConfig(datastore=uri, corpus=[self.eval_uri], address=self.cluster.address,
                                       **self.p.eval_options))
        finally:
            stop_servers(uri)

    def ref_eval(self):
        if self._ref_eval is None:
            self._ref_eval = self.eval(self.ref.prefix)
        return self._ref_eval

    def row(self, fault: str, run: Run, injected: int, notes: str = "", failed_queries: int = 0) -> dict:
        c = self.compare(run.prefix)
        notes = "; ".join(x for x in (notes, "" if c["same_bytes"] else f"DIFFERS: {c['diffs']}") if x)
        return {"fault": fault, "injected": injected, "recovered": injected if c["same_bytes"] else 0,
                "extra_s": round(run.total - self.ref.total, 1), "keys_lost": c["keys_lost"],
                "keys_duplicated": c["keys_duplicated"], "failed_queries": failed_queries, "notes": notes,
                "seconds": {k: round(v, 1) for k, v in run.seconds.items()}, "prefix": run.prefix}

    # ---- fault helpers -----------------------------------------------------------------------

    def killer(self, title: str, n: int, gap: tuple[float, float], counter: list, victims: list):
        """A `during` hook: n times, once a process whose title holds `title` has been up for a random
        gap (seeded), SIGKILL one of them (seeded choice). Stops when the driver exits."""
        rng = random.Random(self.rng.random())

        def run(proc: subprocess.Popen) -> None:
            for _ in range(n):
                wait = rng.uniform(*gap)
                seen = None
                while proc.poll() is None:
                    pids = sorted(self.cluster.pids(title))
                    if pids and seen is None:
                        seen = time.monotonic()
                    if pids and time.monotonic() - seen >= wait:
                        pid = rng.choice(pids)
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            continue
                        counter.append(1)
                        victims.append(pid)
                        break
                    time.sleep(0.1)
                if proc.poll() is not None:
                    return
        return run


# ---------------------------------------------------------------------------------------------
# scenarios: each takes a Suite (whose reference has run) and returns a summary row

SCENARIOS: dict = {}


def register(name: str):
    def deco(fn):
        SCENARIOS[name] = fn
        return fn
    return deco


@register("worker_kills")
def worker_kills(suite: Suite) -> dict:
    """Key workers killed during the build, add tasks during the add; the same bytes at the end."""
    p, killed, victims = suite.p, [], []
    kb, ka = [], []
    hooks = {"build": {"during": suite.killer("KeyWorker", p.worker_kills_build, (0.5, 3.0), kb, victims)},
             "add": {"during": suite.killer("add_shard", p.worker_kills_add, (0.2, 1.5), ka, victims)}}
    run = suite.pipeline("worker-kills", hooks)
    killed = len(kb) + len(ka)
    return suite.row("worker kill (KeyWorker, add_shard)", run, killed,
                     f"{len(kb)} key workers during build, {len(ka)} add tasks during add "
                     f"(planned {p.worker_kills_build}+{p.worker_kills_add})")


@register("driver_kills")
def driver_kills(suite: Suite) -> dict:
    """The driver SIGKILLed at random moments of build / train-index / add, each followed by a rerun."""
    n, ref = suite.p.driver_kills, suite.ref
    stages = [STAGES[i % 3] for i in range(n)]
    hooks: dict = {}
    for st in stages:
        hooks.setdefault(st, {"kill_driver_at": []})
        hooks[st]["kill_driver_at"].append(round(suite.rng.uniform(0.25, 0.85) * ref.seconds[st], 2))
    run = suite.pipeline("driver-kills", hooks)
    at = {st: h["kill_driver_at"] for st, h in hooks.items()}
    return suite.row("driver kill (SIGKILL + rerun)", run, n, f"kills at seconds {at}")


@register("commit_kill")
def commit_kill(suite: Suite, which: tuple = (0, 1)) -> list[dict]:
    """The build's driver dies inside the manifest commit (builder/faults.py hook "commit"): once just
    before manifest.json is written (which 0), once just after it, before the clean-up (which 1); each
    time a rerun."""
    run = run2 = None
    notes = {}
    for ident in which:
        marker = os.path.join(suite.workdir, f"commit-{ident}-{uuid.uuid4().hex[:6]}")
        with open(suite.fault_file, "w") as f:
            f.write(f"commit:{ident}:{marker}")
        try:
            if ident == 0:
                run = Run(suite.fresh("commit-kill"))
                suite.stage(run, "build")
            else:         # the second commit of the same prefix would not happen: a fresh build
                run2 = Run(suite.fresh("commit-kill-after"))
                suite.stage(run2, "build")
        finally:
            os.remove(suite.fault_file)
        notes[ident] = f"commit:{ident} {'fired' if os.path.exists(marker) else 'DID NOT FIRE'}"
        fired = os.path.exists(marker)
        if fired:
            os.remove(marker)
        for st in STAGES[1:]:
            suite.stage(run if ident == 0 else run2, st)
    rows = []
    if run is not None:
        rows.append(suite.row("driver kill in manifest commit (before write)", run, 1, notes[0]))
    if run2 is not None:
        rows.append(suite.row("driver kill in manifest commit (after write)", run2, 1, notes[1]))
    for r in rows:
        if "DID NOT FIRE" in r["notes"]:
            r["recovered"] = r["injected"] = 0
    return rows


@register("node_kill")
def node_kill(suite: Suite) -> dict:
    """A whole worker node (raylet and workers) SIGKILLed while the build's key workers run on it; the
    build finishes on the node that is left. A replacement node is started afterwards."""
    c = suite.cluster
    info = {}
    rng = random.Random(suite.rng.random())

    def during(proc):
        wait, seen = rng.uniform(0.5, 2.0), None
        while proc.poll() is None:
            pids = c.pids("KeyWorker")
            nodes = sorted({c.node_of(pid) for pid in pids} - {None, 0})
            if nodes and seen is None:
                seen = time.monotonic()
            if nodes and time.monotonic() - seen >= wait:
                i = nodes[0]
                info["node"], info["pids"] = c.nodes[i].name, len(c.kill_node(i))
                return
            time.sleep(0.1)

    run = Run(suite.fresh("node-kill"))
    suite.stage(run, "build", during=during)
    for st in STAGES[1:]:
        suite.stage(run, st)
    injected = 1 if info else 0
    row = suite.row("worker node kill (raylet + workers)", run, injected,
                    f"killed {info.get('node')} ({info.get('pids')} processes) mid-build" if info else "NOT INJECTED")
    c.add_node(num_cpus=suite.cluster.worker_specs[0].get("num_cpus", 2))
    return row


S3_FAULTS = {"503": 0.025, "500": 0.025, "reset": 0.025, "truncate": 0.025}   # 10% of requests fail


@register("s3_faults")
def s3_faults(suite: Suite) -> dict:
    """10% of S3 requests fail (2.5% each: 503 SlowDown, 500, connection reset after the server acted,
    a GET body cut short) and 5% are slowed, during build, train-index and add, then while index servers
    fetch their shards and an eval runs: the same bytes, and the same perplexities to 1e-9."""
    proxy = suite.proxy
    if proxy is None:
        raise StageFailed("s3_faults needs the suite's fault proxy (Suite(..., proxy=FaultProxy))")
    ref_eval = suite.ref_eval() if suite.eval_uri else None
    proxy.reset_counts()
    proxy.reseed(suite.p.seed)
    proxy.set_rates({**S3_FAULTS, "latency": 0.05})
    try:
        run = suite.pipeline("s3-faults")
        counts = dict(proxy.counts)
        t = time.perf_counter()
        got = suite.eval(run.prefix) if ref_eval is not None else None
        run.seconds["eval"] = time.perf_counter() - t
    finally:
        proxy.set_rates({})
    serving = dict(proxy.counts)
    injected = sum(serving.get(k, 0) for k in S3_FAULTS)
    r = suite.row("S3 requests failing (10%: 503, 500, reset, truncated body)", run, injected,
                  f"{serving.get('requests', 0)} requests: {', '.join(f'{serving.get(k, 0)} {k}' for k in (*S3_FAULTS, 'latency'))}"
                  f" ({sum(counts.get(k, 0) for k in S3_FAULTS)} in build/train-index/add)")
    r["extra_s"] = round(r["extra_s"] - (ref_eval.seconds if ref_eval is not None else 0.0), 1)
    if got is not None:
        same = (got.tokens == ref_eval.tokens and abs(got.base_ppl / ref_eval.base_ppl - 1) <= 1e-9
                and abs(got.knnlm_ppl / ref_eval.knnlm_ppl - 1) <= 1e-9)
        r["notes"] += (f"; eval under faults: {got.tokens} tokens, kNN-LM ppl {got.knnlm_ppl:.9f} "
                       f"(clean {ref_eval.knnlm_ppl:.9f})")
        if not same:
            r["recovered"] = 0
            r["notes"] += " DIFFERS"
    return r


@register("replica_kill")
def replica_kill(suite: Suite) -> dict:
    """Two clients send a bounded query load while one index-server replica is SIGKILLed: 0 failed
    queries, every answer byte-identical (tests/serve_faults.py)."""
    from serve_faults import replica_kill_under_load
    suite.connect()
    return replica_kill_under_load(suite.cluster.address, suite.uri(suite.ref.prefix),
                                   cache_dir=tempfile.mkdtemp(dir=suite.workdir), seed=suite.p.seed)


@register("shard_loss")
def shard_loss(suite: Suite) -> dict:
    """Every replica of one shard gone: restarted and waited for; removed for good: a clear error, or a
    flagged partial result with allow_partial (tests/serve_faults.py)."""
    from serve_faults import shard_loss as scenario
    suite.connect()
    return scenario(suite.cluster.address, suite.uri(suite.ref.prefix), cache_dir=tempfile.mkdtemp(dir=suite.workdir),
                    seed=suite.p.seed + 1)


@register("eval_kills")
def eval_kills(suite: Suite) -> dict:
    """`knnlm eval` with evaluation workers and an index server SIGKILLed at random moments: the same
    perplexities to 1e-9 (tests/serve_faults.py)."""
    from serve_faults import eval_worker_kills
    suite.connect()
    return eval_worker_kills(suite.cluster.address, suite.uri(suite.ref.prefix), [suite.eval_uri],
                             worker_kills=suite.p.eval_worker_kills, server_kills=suite.p.eval_server_kills,
                             seed=suite.p.seed, cache_dir=tempfile.mkdtemp(dir=suite.workdir),
                             **suite.p.eval_options)


@register("corruption")
def corruption(suite: Suite) -> list[dict]:
    """One flipped byte in a key shard, an index shard and manifest.json of the reference datastore (each
    restored after): `knnlm verify` and the stage that reads the file fail naming it; nothing is served."""
    from builder.storage import Storage
    st = Storage.from_uri(suite.uri(suite.ref.prefix))
    m = json.loads(st.read_text("manifest.json"))
    ds = suite.uri(suite.ref.prefix)
    def serve(*flags):        # servers on the cluster, a fresh cache: they read the files from S3
        return ["serve", ds, *flags, "--address", suite.cluster.address, "--cache-dir",
                tempfile.mkdtemp(dir=suite.workdir)]
    # the readers: servers keeping the keys for --rerank read every key shard; servers load index shards;
    # every command reads the manifest
    readers = {"key shard": (m["shards"][len(m["shards"]) // 2]["path"], serve("--rerank")),
               "index shard": (m["index_shards"][0]["path"], serve()),
               "manifest": ("manifest.json", ["info", ds])}
    rows = []
    for what, (rel, reader) in readers.items():
        t = time.perf_counter()
        orig = st.read_bytes(rel)
        bad = bytearray(orig)
        at = len(bad) // 2 if what != "manifest" else orig.index(b'"num_rows"') + len('"num_rows": ')
        bad[at] ^= 0x01 if what != "manifest" else 0x03      # in the manifest: a digit stays a digit
        st.write_bytes(rel, bytes(bad))
        named, out = [], {}
        try:
            for argv in (["verify", ds], reader):
                p = subprocess.run([sys.executable, "-m", "cluster.cli", *argv], cwd=REPO, env=suite.env,
                                   capture_output=True, text=True, timeout=600)
                text = p.stdout + p.stderr
                out[argv[0]] = text.strip().splitlines()[-1:] or [""]
                named.append(p.returncode != 0 and rel in text and "Traceback" not in text)
        finally:
            st.write_bytes(rel, orig)
            if reader[0] == "serve":
                subprocess.run([sys.executable, "-m", "cluster.cli", "serve", ds, "--stop", "--address",
                                suite.cluster.address], cwd=REPO, env=suite.env, capture_output=True, timeout=300)
        ok = all(named)
        rows.append({"fault": f"one flipped byte in a {what}", "injected": 1, "recovered": int(ok),
                     "extra_s": round(time.perf_counter() - t, 1), "keys_lost": 0, "keys_duplicated": 0,
                     "failed_queries": 0, "notes": f"{rel}: " + "; ".join(f"{k}: {v[0][:160]}" for k, v in out.items())})
    return rows


def secret_leaks(secret: str, paths: list[str], texts: dict[str, str] | None = None, storage_uris=()) -> list[str]:
    """Where `secret` appears: files under `paths` (the nodes' Ray logs, the drivers' logs), `texts`
    (name -> text), and every object under `storage_uris` (manifests, commit records, leases)."""
    from builder.storage import Storage
    hits, raw = [], secret.encode()
    for root in paths:
        for d, _, fs in os.walk(root):
            for f in fs:
                try:
                    with open(os.path.join(d, f), "rb") as fh:
                        if raw in fh.read():
                            hits.append(os.path.join(d, f))
                except OSError:
                    pass
    hits += [name for name, text in (texts or {}).items() if secret in text]
    for uri in storage_uris:
        st = Storage.from_uri(uri)
        for rel in st.list(""):
            if not rel.endswith((".parquet", ".faiss", ".bin", ".ivfdata")) and raw in st.read_bytes(rel):
                hits.append(st.url(rel))
    return hits


# ---------------------------------------------------------------------------------------------
# the table and the result file


def flatten(rows: list) -> list[dict]:
    out = []
    for r in rows:
        out.extend(r if isinstance(r, list) else [r])
    return out


def summary_table(rows: list) -> str:
    rows = flatten(rows)
    head = ["fault", "injected", "recovered", "extra_s", "keys_lost", "keys_duplicated", "failed_queries"]
    cells = [[str(r.get(k, "")) for k in head] for r in rows]
    total = ["total", *(str(sum(r.get(k, 0) for r in rows)) for k in ("injected", "recovered")),
             f"{sum(r.get('extra_s', 0) for r in rows):.1f}",
             *(str(sum(r.get(k, 0) for r in rows)) for k in ("keys_lost", "keys_duplicated", "failed_queries"))]
    widths = [max(len(x) for x in col) for col in zip(head, *cells, total)]

    def line(vals):
        return "| " + " | ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    out = [line(head), sep, *(line(c) for c in cells), sep, line(total)]
    notes = [f"- {r['fault']}: {r['notes']}" for r in rows if r.get("notes")]
    return "\n".join(out + ([""] + notes if notes else []))


def all_recovered(rows: list) -> bool:
    rows = flatten(rows)
    return all(r["recovered"] == r["injected"] and r["injected"] > 0 and r["keys_lost"] == 0
               and r["keys_duplicated"] == 0 and r["failed_queries"] == 0 for r in rows)


def write_results(rows: list, path: str | None = None, params: dict | None = None, machine: dict | None = None,
                  reference: dict | None = None, extra: dict | None = None) -> str:
    """bench/results/faults-<date>.json (or `path`): date, machine, parameters, reference run, rows."""
    rows = flatten(rows)
    if path is None:
        path = os.path.join(REPO, "bench", "results", f"faults-{datetime.date.today().isoformat()}.json")
    result = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine or {},
              "load_average": os.getloadavg(), "parameters": params or {}, "reference": reference or {},
              "rows": rows, "all_recovered": all_recovered(rows), "argv": sys.argv, **(extra or {})}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps(result, indent=1, default=str) + "\n")
    return path


def params_dict(p: Params) -> dict:
    return asdict(p)

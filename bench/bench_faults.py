"""The fault suite, in full: `python bench/bench_faults.py` (add --quick for a tiny corpus and model).

A 3-node Ray cluster on this machine (tests/ray_nodes.py), the datastore and the corpus on a moto S3
server, the pipeline build -> train-index -> add run by driver subprocesses; an uninterrupted reference
run, then the scenarios of tests/faultsuite.py, each compared byte for byte with it. Prints the summary
table and writes bench/results/faults-<date>.json. Not collected by pytest.

Where `unshare -n` is permitted (root, or user namespaces), the suite re-executes itself in a private
network namespace whose only interface is loopback: Ray 2.60's C++ servers (GCS, raylet, object manager,
core workers) bind 0.0.0.0 whatever --node-ip-address says, and there that reaches nothing but this
machine's loopback. Every listening socket of the run is checked and reported (`network` in the result).
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, HERE)

from faultsuite import (SCENARIOS, Params, Suite, all_recovered, params_dict, secret_leaks, summary_table,  # noqa: E402
                        write_results)
from ray_nodes import (RAY_CORE, LocalCluster, descendants, exposure, free_port, loopback_only,  # noqa: E402
                       loopback_up, netns_prefix)
from s3_proxy import FaultProxy  # noqa: E402

SECRET = "faults-secret-never-logged"
IN_NETNS = "KNNLM_FAULTS_IN_NETNS"     # set in the re-executed suite inside its network namespace
ALL = "worker_kills,driver_kills,commit_kill,node_kill,s3_faults,replica_kill,shard_loss,eval_kills,corruption"

SHARED = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared")


def head_of(path: str, fraction: float, work: str) -> str:
    """The first `fraction` of a text file's lines (an eval run several times per scenario stays short)."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    out = os.path.join(work, f"head-{os.path.basename(path)}")
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(lines[: int(len(lines) * fraction)])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a tiny corpus and model, few kills")
    ap.add_argument("--scenarios", default=ALL, help="comma-separated, in order; commit_kill:0 kills the driver only "
                                                     "before manifest.json is written (default: before and after)")
    ap.add_argument("--out", default=None, help="result file (default bench/results/faults-<date>.json)")
    ap.add_argument("--netns", choices=("auto", "on", "off"), default="auto",
                    help="run the whole suite (S3 server, proxy, every node, every driver) in a private network "
                         "namespace whose only interface is loopback, so that no port of it is reachable from "
                         "outside, Ray's own gRPC servers included, which bind 0.0.0.0 (auto: where `unshare -n` "
                         "is permitted)")
    a = ap.parse_args()
    if os.environ.get(IN_NETNS) == "1":
        loopback_up()                    # a fresh namespace has `lo` down
    elif a.netns != "off":
        prefix = netns_prefix()
        if prefix is not None:
            os.environ[IN_NETNS] = "1"
            sys.stdout.flush()
            os.execvp(prefix[0], [*prefix, sys.executable, os.path.abspath(__file__), *sys.argv[1:]])
        if a.netns == "on":
            print("--netns on: this machine does not permit `unshare -n` (root) or `unshare -rn` (user "
                  "namespaces)", file=sys.stderr)
            return 2
        print("warning: no private network namespace here (`unshare -n` is not permitted): Ray's gRPC "
              "servers will bind every interface", file=sys.stderr)
    in_netns = loopback_only()
    port = free_port()
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # every S3 request (drivers, every node's workers, this process) goes through the fault proxy, its
    # rates 0 except in the s3_faults scenario
    proxy = FaultProxy(f"http://127.0.0.1:{port}", seed=0)
    os.environ.update(AWS_ENDPOINT_URL=proxy.start(), AWS_ACCESS_KEY_ID="faults-key",
                      AWS_SECRET_ACCESS_KEY=SECRET, AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1",
                      RAY_AUTH_MODE="token")
    work = tempfile.mkdtemp(prefix="knnlm-bench-faults-")
    try:
        deadline = time.time() + 60
        while True:                      # moto answers a few seconds after it starts
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or moto.poll() is not None:
                    raise RuntimeError("the moto server did not start")
                time.sleep(0.3)
        import boto3
        bucket = f"faults-{uuid.uuid4().hex[:8]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        if a.quick:
            keep = dict(os.environ)
            import conftest                  # the tests' tiny models; importing it points AWS_ENDPOINT_URL at
            conftest.S3_PROXY.stop()         # the tests' own proxy: undone
            os.environ.clear()
            os.environ.update(keep)
            from conftest import TRAIN_TEXT, make_tiny_model
            model = make_tiny_model(os.path.join(work, "model"), "gpt2")
            corpus = os.path.join(work, "corpus.txt")
            with open(corpus, "w") as f:
                f.write("".join(" ".join(TRAIN_TEXT[(i + j) % 5] for j in range(3)) + "\n\n" for i in range(60)))
            evalf = os.path.join(work, "eval.txt")
            with open(evalf, "w") as f:
                f.write("".join(" ".join(TRAIN_TEXT[(i + 2 * j) % 5] for j in range(3)) + "\n\n" for i in range(10)))
            p = Params(corpus=corpus, model=model,
                       build=["--window", "32", "--min-context", "8", "--mode", "stream", "--unit-tokens", "300"],
                       train=["--index-factory", "IVF4,Flat", "--train-size", "1000", "--min-points-per-centroid", "1"],
                       eval_corpus=evalf)
        else:
            p = Params(corpus=os.path.join(SHARED, "data", "wikitext-2-splits", "train.txt"),
                       model=os.path.join(SHARED, "models", "gpt2-wikitext2-small"),
                       build=["--mode", "stream", "--window", "512", "--min-context", "256", "--unit-tokens", "65536"],
                       train=["--index-factory", "IVF1024,PQ32", "--train-size", "100000"],
                       add=["--index-shards", "2"], worker_kills_build=10, worker_kills_add=4, driver_kills=3,
                       lease_ttl=15.0, stage_timeout=3600,
                       eval_corpus=head_of(os.path.join(SHARED, "data", "wikitext-2-splits", "valid.txt"), 0.25, work),
                       eval_options={"k": 1024, "nprobe": 32, "lam": 0.25, "temperature": 1.0},
                       eval_worker_kills=6, eval_server_kills=1)   # 10 + 4 + 6 = 20 worker kills
        with LocalCluster(env={"AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"]}) as c:
            suite = Suite(c, bucket, p, workdir=work, proxy=proxy)
            ref = suite.reference()
            print(f"reference: {ref.seconds} ({suite.ref_facts['num_keys']} keys)", flush=True)
            # every listening socket of the run: the cluster's nodes and workers, moto, the proxy (this
            # process), looked at after the reference run and again at the end (servers and eval workers)
            ports = [exposure(c.all_pids() + descendants(os.getpid()))]
            rows = []
            for spec in a.scenarios.split(","):
                name, _, which = spec.partition(":")
                t = time.perf_counter()
                r = SCENARIOS[name](suite, which=(int(which),)) if which else SCENARIOS[name](suite)
                rows.extend(r if isinstance(r, list) else [r])
                print(f"{name}: {time.perf_counter() - t:.0f}s", flush=True)
                print(summary_table(rows[-1:] if not isinstance(r, list) else r), flush=True)
            # security: the secret of the AWS chain in no log (every node's Ray logs, every driver's output),
            # manifest, commit record or lease of any datastore of the run
            logs = {f"driver log of {k}": v for k, v in suite.logs.items()}
            searched = [n.temp_dir for n in c.nodes]
            leaks = secret_leaks(SECRET, searched, logs, [f"s3://{bucket}/runs"])
            ports.append(exposure(c.all_pids() + descendants(os.getpid())))
            import ray
            if ray.is_initialized():     # the serving scenarios connected this process: disconnect before the
                ray.shutdown()           # cluster stops, or its client dies with the GCS (exit status 1)
        print(summary_table(rows))
        machine = {}
        try:
            from bench_build import machine_info
            machine = machine_info("cpu")
        except Exception:
            pass
        network = {"private_namespace": in_netns, "interfaces": "lo only" if in_netns else "host",
                   "listening": max(p["listening"] for p in ports), "loopback": max(p["loopback"] for p in ports),
                   "any_address_in_loopback_only_ns": max(p["any_address_in_loopback_only_ns"] for p in ports),
                   "exposed": sorted({tuple(x) for p in ports for x in p["exposed"]})}
        print(f"listening sockets: {network['listening']} ({network['loopback']} on 127.0.0.1, "
              f"{network['any_address_in_loopback_only_ns']} on 0.0.0.0 in a namespace with only `lo`); "
              f"reachable from outside: {network['exposed'] or 'none'}")
        print(f"credential leaks (the secret searched in {len(searched)} nodes' Ray logs, {len(logs)} driver logs "
              f"and every non-data object of the bucket): {leaks or 'none'}")
        path = write_results(rows, a.out, params_dict(p), machine, {"seconds": ref.seconds,
                                                                    "num_keys": suite.ref_facts["num_keys"]},
                             extra={"credential_leaks": leaks, "s3_requests": dict(proxy.counts),
                                    "network": network})
        print(f"wrote {path}")
        # exposed sockets fail the suite, except Ray's own where no namespace could be made (`--netns auto`
        # on a machine that does not permit one): those are reported, as the warning above said
        ray_only = all(any(t in title for t in RAY_CORE) for *_, title in network["exposed"])
        exposed_ok = not network["exposed"] or (not in_netns and a.netns == "auto" and ray_only)
        return 0 if all_recovered(rows) and not leaks and exposed_ok else 1
    finally:
        proxy.stop()
        moto.terminate()


if __name__ == "__main__":
    sys.exit(main())

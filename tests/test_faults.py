"""The fault suite's quick subset, run as its users run it: `python bench/bench_faults.py --quick`, a real
3-node Ray cluster on this machine (tests/ray_nodes.py), the datastore and corpus on a moto S3 server behind
the fault proxy, the tiny GPT-2; a whole worker node killed mid-build, compared byte for byte with an
uninterrupted run. CI runs this one scenario only (each one is a build, train-index and add of its own, and
the whole quick suite took 5-15 minutes of CI): worker kills, S3 faults and driver kills have in-process
tests of their own (test_build, test_index, test_ingest, test_s3_faults, test_serve_faults), and
`python bench/bench_faults.py --quick` runs every scenario, the manifest-commit kill included, on the cluster. Where `unshare -n` is permitted the suite runs in a private network namespace with only
a loopback interface, and no listening socket of the run may be reachable from outside this machine."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from ray_nodes import RAY_CORE, exposure, loopback_only, netns_available

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_exposure_tells_loopback_from_any_address(tmp_path):
    """The check the suite relies on: a socket on 0.0.0.0 in this (host) namespace is exposed, one on
    127.0.0.1 is not, and in a namespace with only `lo` a socket on 0.0.0.0 is not either."""
    import socket
    with socket.socket() as lo, socket.socket() as anyaddr:
        lo.bind(("127.0.0.1", 0))
        lo.listen()
        anyaddr.bind(("0.0.0.0", 0))
        anyaddr.listen()
        got = exposure([os.getpid()])
        lo_port, any_port = lo.getsockname()[1], anyaddr.getsockname()[1]
    exposed = [(ip, p) for _, ip, p, _ in got["exposed"]]      # (this process may hold Ray's own ports too)
    if loopback_only():
        assert got["any_address_in_loopback_only_ns"] >= 1 and not exposed
    else:
        assert ("0.0.0.0", any_port) in exposed
        assert ("127.0.0.1", lo_port) not in exposed
    assert got["loopback"] >= 1
    if netns_available():
        code = ("import os, socket, sys; sys.path.insert(0, sys.argv[1]); from ray_nodes import exposure, "
                "loopback_up; loopback_up(); s = socket.socket(); s.bind(('0.0.0.0', 0)); s.listen(); "
                "print(exposure([os.getpid()]))")
        from ray_nodes import netns_prefix
        out = subprocess.run([*netns_prefix(), sys.executable, "-c", code, os.path.join(REPO, "tests")],
                             capture_output=True, text=True, check=True).stdout
        assert "'any_address_in_loopback_only_ns': 1" in out and "'exposed': []" in out, out


def test_quick_suite_recovers_a_node_kill_and_exposes_no_port(tmp_path):
    out = tmp_path / "faults.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench_faults.py"), "--quick",
                           "--scenarios", "node_kill", "--out", str(out)],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=2400)
    print(proc.stdout[-6000:])
    assert out.exists(), proc.stdout[-4000:]
    res = json.loads(out.read_text())
    faults = {r["fault"].split(" (")[0]: r for r in res["rows"]}
    assert "worker node kill" in faults, sorted(faults)
    assert res["all_recovered"], proc.stdout[-4000:]
    for r in res["rows"]:
        assert r["injected"] > 0 and r["recovered"] == r["injected"], r
        assert r["keys_lost"] == r["keys_duplicated"] == r["failed_queries"] == 0, r
    assert res["credential_leaks"] == []
    net = res["network"]
    if netns_available():                 # Ray's gRPC servers bind 0.0.0.0: only in a loopback-only namespace
        assert net["private_namespace"] and net["any_address_in_loopback_only_ns"] > 0, net
        assert net["exposed"] == [], net
    else:                                 # no namespace here: only Ray's own servers may be exposed
        assert all(any(t in title for t in RAY_CORE) for *_, title in net["exposed"]), net
    assert proc.returncode == 0, proc.stdout[-4000:]

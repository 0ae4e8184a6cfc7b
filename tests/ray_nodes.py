"""A real multi-node Ray cluster on this machine: a head and worker nodes, each its own `ray start`.

    with LocalCluster(workers=[{"num_cpus": 2}, {"num_cpus": 2}], env={...}) as c:
        subprocess.run([..., "--address", c.address])       # a driver on the cluster
        c.pids("KeyWorker")                                  # Ray workers by process title
        c.kill_node(1)                                       # a preempted node: raylet + workers, SIGKILL

Every node has its own --temp-dir (short, under /tmp: Ray's socket paths are length-limited; Ray
2.60 accepts --temp-dir on worker nodes too), its own ports, all chosen free and bound on 127.0.0.1
(GCS, dashboard, dashboard agent http/grpc, runtime-env agent, ray client server, node manager,
object manager, metrics export, and a worker port range), and its own explicit environment
(AWS_* for the S3 server, HF_HUB_OFFLINE=1, RAY_USAGE_STATS_ENABLED=0, KNNLM_FAULT_FILE ...).
Token authentication stays as configured (~/.ray/auth_token). The head has no CPUs (no work runs on
it), so that losing one worker node leaves the other to finish the work.

Stopping kills exactly this cluster's process trees (SIGINT to each `ray start --block`, then
SIGKILL to what is left): never `ray stop`, which stops every Ray on the machine.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

# `ray start --block` with SIGINT re-enabled (a pytest started in the background by a shell inherits it
# ignored) and a longer wait for its raylet to register: `ray start` gives a worker node's raylet a fixed
# 30 s, and on a loaded machine (2 cores shared by several test runs) its dashboard agent alone can take
# a minute to start. The wait is stretched to NODE_START_S by retrying `services.get_node` inside.
NODE_START_S = 300
LAUNCHER = f"""
import os, signal, sys, time
os.environ["PYTHONUNBUFFERED"] = "1"
signal.signal(signal.SIGINT, signal.default_int_handler)
import ray._private.services as services
_get_node = services.get_node
def get_node(*a, **k):
    end = time.monotonic() + {NODE_START_S}
    while True:
        try:
            return _get_node(*a, **k)
        except RuntimeError:
            if time.monotonic() > end:
                raise
            time.sleep(1)
services.get_node = get_node
from ray.scripts.scripts import main
sys.exit(main())
"""
NODE_IP = "127.0.0.2"     # see the module docstring
# the titles of Ray 2.60's C++ servers' processes (GCS, raylet, object manager, core workers' gRPC), which
# bind every interface whatever --node-ip-address says
RAY_CORE = ("gcs_server", "raylet", "ray::", "DashboardAgent", "default_worker.py")
WORKER_PORTS = 24            # per node: the range its Ray worker processes bind in
NODE_ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "AWS_CA_BUNDLE", "KNNLM_FAULT_FILE", "TOKENIZERS_PARALLELISM", "HOME", "PATH", "LANG", "TMPDIR")


# ---------------------------------------------------------------------------------------------
# processes and sockets (Linux /proc)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_range(n: int, rng: random.Random) -> int:
    """The first port of n consecutive free ports (outside the ephemeral range most kernels use)."""
    for _ in range(200):
        base = rng.randrange(20000, 32000 - n)
        if all(_port_free(p) for p in range(base, base + n)):
            return base
    raise RuntimeError(f"no {n} consecutive free ports")


def descendants(pid: int) -> list[int]:
    """pid's process tree, found through parent links, children first (pid itself last)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out[::-1]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> str:
    """The process's title as ps shows it (Ray workers rewrite theirs to `ray::Class.method`)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def listening_sockets(pids: list[int]) -> list[tuple[int, str, int]]:
    """[(pid, ip, port)] of the TCP sockets in LISTEN state that these processes hold (IPv4 and IPv6)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes[link[8:-1]] = pid
    out, seen = [], set()
    for pid in sorted(set(inodes.values())):     # each process's own network namespace's tables
        for table, v6 in ((f"/proc/{pid}/net/tcp", False), (f"/proc/{pid}/net/tcp6", True)):
            with contextlib.suppress(OSError), open(table) as f:
                for line in f.readlines()[1:]:
                    parts = line.split()
                    local, state, inode = parts[1], parts[3], parts[9]
                    if state != "0A" or inode not in inodes or inode in seen:       # 0A: LISTEN
                        continue
                    seen.add(inode)
                    hexip, hexport = local.split(":")
                    out.append((inodes[inode], _ip(hexip, v6), int(hexport, 16)))
    return out


def _ip(hexip: str, v6: bool) -> str:
    raw = bytes.fromhex(hexip)
    if not v6:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))   # four host-order 32-bit words
    return socket.inet_ntop(socket.AF_INET6, words)


def interfaces(pid: int | str = "self") -> list[str]:
    """The network interfaces of the process's network namespace (/proc/PID/net/dev)."""
    with open(f"/proc/{pid}/net/dev") as f:
        return [line.split(":", 1)[0].strip() for line in f.readlines()[2:]]


def netns_id(pid: int | str = "self") -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def loopback_only(pid: int | str = "self") -> bool:
    """True when the process's network namespace has no interface but `lo`: whatever its sockets bind
    (0.0.0.0 included), nothing outside this machine's loopback can reach them."""
    return interfaces(pid) == ["lo"]


def netns_available() -> bool:
    """Whether this process may start a private network namespace (`unshare -n`: root, or a kernel that
    lets users map themselves to root in a user namespace with `unshare -rn`)."""
    return netns_prefix() is not None


def netns_prefix() -> list[str] | None:
    """The command prefix that runs a program in a new network namespace holding only a loopback
    interface (down until loopback_up() runs in it), or None where neither form is permitted."""
    if not shutil.which("unshare"):
        return None
    for prefix in (["unshare", "-n", "--"], ["unshare", "-rn", "--"]):
        if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return None


def loopback_up() -> None:
    """Bring `lo` up in this process's network namespace (a fresh one has it down), with the SIOCSIFFLAGS
    ioctl, so no `ip` binary is needed."""
    import fcntl
    import struct
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH22x", b"lo", 0)))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def exposure(pids: list[int]) -> dict:
    """Where these processes listen: {"listening": n, "loopback": n, "any_address_in_loopback_only_ns": n,
    "exposed": [(pid, ip, port, title)]}. A socket is exposed when it binds a non-loopback address in a
    network namespace that has an interface besides `lo` (reachable from another machine)."""
    socks = listening_sockets(pids)
    out = {"listening": len(socks), "loopback": 0, "any_address_in_loopback_only_ns": 0, "exposed": []}
    for pid, ip, port in socks:
        if ip.startswith("127.") or ip in ("::1", ) or ip.startswith("::ffff:127."):
            out["loopback"] += 1
        elif loopback_only(pid):
            out["any_address_in_loopback_only_ns"] += 1
        else:
            out["exposed"].append((pid, ip, port, cmdline(pid)[:120]))
    return out


# ---------------------------------------------------------------------------------------------
# the cluster


class Node:
    def __init__(self, name: str, temp_dir: str, proc: subprocess.Popen, resources: dict, ports: dict):
        self.name, self.temp_dir, self.proc, self.resources, self.ports = name, temp_dir, proc, resources, ports
        self.killed = False

    @property
    def pids(self) -> list[int]:
        """Its process tree now (the `ray start` launcher, raylet, GCS on the head, agents, workers)."""
        return [p for p in descendants(self.proc.pid) if alive(p)]

    def log(self) -> str:
        with open(os.path.join(self.temp_dir, "node.log"), errors="replace") as f:
            return f.read()[-3000:]


class LocalCluster:
    """A head (no CPUs unless head_cpus) and one node per entry of `workers` ({"num_cpus": n,
    "resources": {...}}). `env`: variables for every node on top of the safe ones from this process."""

    def __init__(self, workers: list[dict] | None = None, env: dict | None = None, head_cpus: int = 0,
                 object_store_mb: int = 256, seed: int = 0,
                 ip: str = NODE_IP):
        self.worker_specs = workers if workers is not None else [{"num_cpus": 2}, {"num_cpus": 2}]
        self.head_cpus, self.object_store_mb = head_cpus, object_store_mb
        self.rng = random.Random(seed)
        base = {k: os.environ[k] for k in NODE_ENV_KEYS if k in os.environ}
        base.update(RAY_AUTH_MODE="token", HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0",
                    PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
                    # a dead node is noticed within ~3 s, not the default ~30 s
                    RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3",
                    RAY_health_check_timeout_ms="1000",
                    # a loaded machine (2 shared cores) starts a node's dashboard agent slowly: wait for it
                    RAY_agent_register_timeout_ms="300000", RAY_raylet_start_wait_time_s="300")
        self.env = {**base, **(env or {})}
        self.ip = ip
        self.nodes: list[Node] = []
        self.used: set[int] = set()
        self.address = ""          # GCS address: what `--address` and `ray start --address` take
        self.dashboard = ""        # http://127.0.0.1:PORT

    # ---- start / stop ----------------------------------------------------------------------

    def _port(self) -> int:
        """A free port no other component of this cluster was given (the kernel may hand one out twice)."""
        while True:
            p = free_port()
            if p not in self.used:
                self.used.add(p)
                return p

    def _start_node(self, name: str, head: bool, num_cpus: int, resources: dict) -> Node:
        tmp = tempfile.mkdtemp(prefix=f"krn-{name}-", dir="/tmp")
        wbase = free_port_range(WORKER_PORTS, self.rng)
        self.used.update(range(wbase, wbase + WORKER_PORTS))
        ports = {k: self._port() for k in ("node_manager", "object_manager", "metrics_export",
                                           "dashboard_agent_listen", "dashboard_agent_grpc", "runtime_env_agent")}
        ports.update(min_worker=wbase, max_worker=wbase + WORKER_PORTS - 1)
        cmd = [sys.executable, "-c", LAUNCHER, "start", "--block", f"--node-ip-address={self.ip}",
               f"--num-cpus={num_cpus}", "--num-gpus=0", f"--resources={json.dumps(resources)}",
               f"--temp-dir={tmp}", f"--object-store-memory={self.object_store_mb * 2**20}",
               f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}",
               f"--metrics-export-port={ports['metrics_export']}",
               f"--dashboard-agent-listen-port={ports['dashboard_agent_listen']}",
               f"--dashboard-agent-grpc-port={ports['dashboard_agent_grpc']}",
               f"--runtime-env-agent-port={ports['runtime_env_agent']}",
               f"--min-worker-port={ports['min_worker']}", f"--max-worker-port={ports['max_worker']}",
               "--disable-usage-stats"]
        if head:
            ports.update(gcs=self._port(), dashboard=self._port(), client_server=self._port())
            cmd += ["--head", f"--port={ports['gcs']}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={ports['dashboard']}", f"--ray-client-server-port={ports['client_server']}"]
        else:
            cmd += [f"--address={self.address}"]
        with open(os.path.join(tmp, "node.log"), "wb") as logf:
            proc = subprocess.Popen(cmd, cwd=tmp, env=self.env, stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        return Node(name, tmp, proc, {"CPU": num_cpus, **resources}, ports)

    def start(self, timeout: float = 400.0) -> "LocalCluster":
        try:
            head = self._start_node("head", True, self.head_cpus, {"knnlm_head": 1})
            self.nodes.append(head)
            self.address = f"{self.ip}:{head.ports['gcs']}"
            self.dashboard = f"http://127.0.0.1:{head.ports['dashboard']}"
            self._wait_nodes(1, timeout)
            for i, spec in enumerate(self.worker_specs):   # one at a time: a loaded machine starts them slowly
                self.nodes.append(self._start_node(f"w{i + 1}", False, spec.get("num_cpus", 1),
                                                   {f"knnlm_node_{i + 1}": 1, **spec.get("resources", {})}))
                self._wait_nodes(len(self.nodes), timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def add_node(self, num_cpus: int = 2, resources: dict | None = None, timeout: float = 400.0) -> Node:
        """One more worker node (e.g. a replacement for a killed one)."""
        i = len(self.nodes)
        node = self._start_node(f"w{i}", False, num_cpus, {f"knnlm_node_{i}": 1, **(resources or {})})
        self.nodes.append(node)
        self._wait_nodes(sum(1 for n in self.nodes if not n.killed), timeout)
        return node

    def live_nodes(self, at_least: int = 0, timeout: float = 60.0) -> int:
        """Nodes the GCS reports alive; with at_least, waits (up to timeout) until that many are. Asked
        from one subprocess (a GCS client, no ray.init: this process keeps no Ray and stays light)."""
        code = ("import sys, time; from ray._raylet import GcsClient\n"
                "want, end = int(sys.argv[2]), time.time() + float(sys.argv[3])\n"
                "while True:\n"
                "    try:\n"
                "        n = sum(1 for x in GcsClient(address=sys.argv[1]).get_all_node_info(timeout=10).values()"
                " if x.state == 0)\n"
                "    except Exception as e:\n"
                "        n = -1; err = e\n"
                "    if n >= want or time.time() > end: break\n"
                "    time.sleep(1)\n"
                "print(n)\n")
        r = subprocess.run([sys.executable, "-c", code, self.address, str(at_least), str(timeout)], env=self.env,
                           capture_output=True, text=True, timeout=timeout + 60)
        try:
            return int(r.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise RuntimeError(f"cannot ask the cluster at {self.address}: {r.stderr[-1500:]}") from None

    def _wait_nodes(self, n: int, timeout: float) -> None:
        deadline = time.time() + timeout
        while True:
            for node in self.nodes:
                if not node.killed and node.proc.poll() is not None:
                    raise RuntimeError(f"ray start ({node.name}) exited:\n{node.log()}")
            if self.live_nodes(n, timeout=10) >= n:
                return
            if time.time() > deadline:
                raise RuntimeError(f"the cluster did not reach {n} nodes in {timeout:.0f}s:\n"
                                   + "\n".join(f"--- {x.name}\n{x.log()}" for x in self.nodes))

    def stop(self) -> None:
        """SIGINT every `ray start --block` (worker nodes first), then SIGKILL what is left of their trees."""
        trees = {node.name: node.pids for node in self.nodes}
        for node in reversed(self.nodes):
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.proc.pid, signal.SIGINT)
        pids = [p for t in trees.values() for p in t]
        end = time.time() + 15
        while time.time() < end and any(alive(p) for p in pids):
            time.sleep(0.2)
        for pid in pids:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.proc.wait(timeout=10)
            if not os.environ.get("KNNLM_KEEP_RAY_TMP"):
                shutil.rmtree(node.temp_dir, ignore_errors=True)
        self.nodes = []

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- faults ----------------------------------------------------------------------------

    def all_pids(self) -> list[int]:
        return [p for node in self.nodes for p in node.pids]

    def pids(self, title: str) -> list[int]:
        """Live processes of this cluster whose title/command line contains `title` (e.g. "KeyWorker",
        "IndexServer", "add_shard")."""
        return [p for p in self.all_pids() if title in cmdline(p)]

    def kill_node(self, i: int) -> list[int]:
        """SIGKILL node i (1.. for worker nodes): its `ray start`, raylet, agents and every worker, at
        once, like a preempted machine. Returns the pids killed."""
        node = self.nodes[i]
        pids = node.pids
        for p in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
        node.killed = True
        with contextlib.suppress(Exception):
            node.proc.wait(timeout=10)
        return pids

    def node_of(self, pid: int) -> int | None:
        for i, node in enumerate(self.nodes):
            if pid in node.pids:
                return i
        return None

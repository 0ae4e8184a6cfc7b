"""The Ray side: an embedded local Ray by default, or attach to an existing cluster."""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager

from builder.errors import KnnlmError

log = logging.getLogger(__name__)
PACKAGES = ("builder", "retriever", "cluster")      # shipped to the cluster's workers, in layer order


class ClusterError(KnnlmError, RuntimeError):
    pass


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, system_config: dict | None = None):
    """Yield with Ray initialised. Reuses an already-initialised Ray (tests, notebooks);
    otherwise starts an embedded local Ray (address None; with Ray's `system_config`) or attaches to
    `address`, and shuts down what it started."""
    import ray

    started = False
    if not ray.is_initialized():
        if address:
            connect_ray(address)
        else:
            os.environ.setdefault("RAY_DEDUP_LOGS", "1")
            # "local": a new instance even where a cluster's address is recorded on this machine (ray.init's
            # default attaches to the latest one, a stale record included: it then hung on a dead cluster)
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=True, _system_config=system_config)
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def connect_ray(address: str) -> None:
    """Connect to the Ray cluster at `address` (as ray.init takes it), shipping this package's code
    to its workers (they need torch, faiss etc. installed). Errors say what to fix."""
    import ray

    check_reachable(address)
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True,
                 # folders, not module objects: a job's runtime env is deep-copied to merge it, and modules
                 # do not pickle
                 runtime_env={"py_modules": package_dirs()})
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "version" in str(e).lower() and ("mismatch" in str(e).lower() or "differ" in str(e).lower()):
            raise ClusterError(f"--address {address}: the cluster runs another Ray version than this client "
                               f"(ray {ray.__version__}); install the cluster's version here: {msg}") from None
        raise ClusterError(f"--address {address}: cannot connect to the Ray cluster: {msg}") from None


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """A ClusterError at once when nothing listens at a HOST:PORT (or ray://HOST:PORT) address: ray.init
    would otherwise wait a minute or more for a GCS that is not there. Other forms (auto, local) pass."""
    import socket

    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit() or "/" in hostport:
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return
    except OSError as e:
        raise ClusterError(f"--address {address}: nothing answers at {host}:{port} ({e.strerror or e}); "
                           "start the cluster (`ray start --head`) or fix the address") from None


def package_dirs() -> list[str]:
    """The folders of this project's packages (builder, retriever, cluster) that exist beside this one:
    what a Ray job or a connected driver ships to the cluster's workers. Found by path, not by import,
    so the bottom layer does not import the layers above it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return [os.path.join(root, name) for name in PACKAGES if os.path.isfile(os.path.join(root, name, "__init__.py"))]


def cluster_resources() -> tuple[int, int]:
    """(CPUs, GPUs) of the connected cluster."""
    import ray
    r = ray.cluster_resources()
    return int(r.get("CPU", 0)), int(r.get("GPU", 0))


def max_node_cpus() -> int:
    """CPUs of the largest live node (a worker's threads must fit on one node)."""
    import ray
    return max([int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")] or [1])


def unwrap_task_error(e: BaseException, what: str, user_errors: tuple, cls: type[Exception]) -> Exception:
    """A Ray task/actor error as `cls`: a user error (bad input) keeps its own message, naming
    `what`; anything else says it failed on a Ray worker. Never a worker's traceback."""
    cause = getattr(e, "cause", None) or e
    if isinstance(cause, user_errors):
        return cls(f"{what}: {cause}")
    return cls(f"{what} failed on a Ray worker: {type(cause).__name__}: {cause}")

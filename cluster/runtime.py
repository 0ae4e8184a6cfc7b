"""The Ray side: an embedded local Ray by default, or attach to an existing cluster."""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    pass


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None):
    """Yield with Ray initialised. Reuses an already-initialised Ray (tests, notebooks);
    otherwise starts an embedded local Ray (address None) or attaches to `address`, and
    shuts down what it started."""
    import ray

    started = False
    if not ray.is_initialized():
        kw: dict = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": True}
        if address:
            import builder
            import cluster
            import retriever
            # ship this package's code to the cluster's workers (they need torch etc. installed)
            kw["runtime_env"] = {"py_modules": [builder, cluster, retriever]}
            try:
                ray.init(address=address, **kw)
            except Exception as e:
                raise ClusterError(f"--address {address}: cannot connect to the Ray cluster: {e}") from None
        else:
            os.environ.setdefault("RAY_DEDUP_LOGS", "1")
            ray.init(num_cpus=num_cpus, **kw)
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


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

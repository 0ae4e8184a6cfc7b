"""The client's side of the warm evaluator (retriever/evaluator.py): find the datastore's evaluator on
the connected cluster and hand it an evaluation. Imports no torch: a `knnlm eval` that the evaluator
runs starts, connects and hands over in about 1 s.

The evaluator is used only where it reads the same files as the client: on the client's node, or when
every input is a URI (s3://); otherwise (or with no evaluator, or one that fails) the caller evaluates
itself. What crosses is plain data (the result's JSON, its table, or a user error's message), so the
client never unpickles a class that imports torch.
"""
from __future__ import annotations

import importlib
import logging
import os
from dataclasses import replace

from builder.errors import KnnlmError
from builder.storage import Storage
from retriever.fleet import NAMESPACE, ask, cause, evaluator, evaluator_name

log = logging.getLogger(__name__)
BODY = "retriever.evaluator"       # the evaluator's body (torch, transformers): loaded in its own process only


class WarmEvaluator:
    """The warm evaluator's actor: a shell around `retriever.evaluator.WarmEvaluatorImpl`, so that a client,
    which loads an actor's class to call it, loads this module and not torch."""

    def __init__(self, uri: str, cache_dir: str | None = None):
        self.impl = importlib.import_module(BODY).WarmEvaluatorImpl(uri, cache_dir)

    def info(self) -> dict:
        return self.impl.info()

    def ready(self) -> dict:
        return self.impl.ready()

    def evaluate(self, cfg) -> dict:
        return self.impl.evaluate(cfg)


def start_evaluator(uri: str, detached: bool, cache_dir: str | None = None):
    """The datastore's warm evaluator (the running one, else one started here, preloading meanwhile)."""
    import ray
    opts = dict(name=evaluator_name(uri), namespace=NAMESPACE, max_restarts=-1, max_task_retries=0, max_concurrency=4, num_cpus=0,
                get_if_exists=True)
    if detached:
        opts["lifetime"] = "detached"
    return ray.remote(WarmEvaluator).options(**opts).remote(uri, cache_dir)


def evaluator_info(uri: str, timeout: float = 10.0) -> dict | None:
    """The warm evaluator's `info` (None: none runs; {"error": ...}: it does not answer)."""
    h = evaluator(Storage.from_uri(uri).uri)
    return None if h is None else ask(h, "info", timeout, "the evaluator", pid=None)


def _local(p: str) -> bool:
    return "://" not in p


def _absolute(cfg, uri: str):
    """cfg with its local paths absolute (the datastore's: `uri`): the evaluator's working directory is not
    the client's."""
    absolute = lambda p: os.path.abspath(p) if p and _local(p) else p        # noqa: E731
    model = cfg.model
    if model and os.path.isdir(os.path.expanduser(model)):
        model = os.path.abspath(os.path.expanduser(model))
    return replace(cfg, datastore=uri, corpus=[absolute(p) for p in cfg.corpus], model=model,
                   save_neighbours=absolute(cfg.save_neighbours), report=absolute(cfg.report),
                   cache_dir=absolute(cfg.cache_dir))


def evaluate_warm(cfg) -> dict | None:
    """The evaluation run by the datastore's warm evaluator on the cluster at cfg.address (connected):
    {"result", "table"}; None when there is none this call can use (see the module docstring)."""
    import ray
    import ray.exceptions as rex
    uri = Storage.from_uri(cfg.datastore).uri
    h = evaluator(uri)
    if h is None:
        return None
    try:
        info = ray.get(h.info.remote(), timeout=30)
    except (rex.RayError, TimeoutError) as e:
        log.warning("the warm evaluator of %s does not answer (%s): evaluating here", uri, type(cause(e)).__name__)
        return None
    inputs = [cfg.datastore, *cfg.corpus, cfg.save_neighbours or "", cfg.report or "", cfg.model or ""]
    if info["node"] != ray.get_runtime_context().get_node_id() and any(p and _local(p) for p in inputs):
        log.info("the warm evaluator of %s runs on another node and this evaluation reads local paths: evaluating "
                 "here", uri)
        return None
    log.info("evaluating on the warm evaluator of %s (pid %s)", uri, info["pid"])
    try:
        out = ray.get(h.evaluate.remote(_absolute(cfg, uri)))
    except rex.RayError as e:
        log.warning("the warm evaluator of %s failed (%s: %s): evaluating here", uri, type(cause(e)).__name__,
                    str(cause(e)).splitlines()[0] if str(cause(e)) else "")
        return None
    if "error" in out:
        raise KnnlmError(out["error"])
    return out

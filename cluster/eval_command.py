"""`knnlm eval`'s handler, kept clear of torch: with `--address`, an evaluation that the datastore's warm
evaluator runs (retriever/warm.py, retriever/evaluator.py) needs neither torch nor transformers, 2 s of
imports for a client that then only waits. `retriever.evaluate` (which imports both) is loaded by name
only where this process evaluates itself."""
from __future__ import annotations

import importlib

from builder.runtime import ray_session
from builder.storage import write_json_file
from retriever.config import EvalConfig
from retriever.warm import evaluate_warm

IN_PROCESS = "retriever.evaluate"       # the evaluation itself: loaded when it runs here


def eval_(cfg: EvalConfig) -> int:
    out = None
    if cfg.address is not None and cfg.workers is None:     # the datastore's warm evaluator, where one runs
        with ray_session(cfg.address):
            out = evaluate_warm(cfg)
    if out is None:
        res = importlib.import_module(IN_PROCESS).evaluate(cfg)
        out = {"result": res.to_json(), "table": res.table()}
    print(out["table"])
    if cfg.out:
        write_json_file(cfg.out, out["result"])
    if out["result"].get("report"):
        print(report_line(out["result"]["report"]))
    return 0


def report_line(info: dict) -> str:
    """A report's line (`knnlm eval --report`, `knnlm report`): where it is and how big."""
    return (f"report: {info['path']} ({info['files']} files, {info['bytes'] / 1e6:.1f} MB for {info['tokens']:,} "
            f"scored tokens: {info['bytes_per_token']:.0f} bytes per token)")

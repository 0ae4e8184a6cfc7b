"""`knnlm run PIPELINE.yaml`: a whole datastore from one file.

    datastore: s3://bucket/wt103          # where everything goes (a local path or s3://)
    address: null                         # a Ray cluster (as ray.init takes it); null: embedded local Ray
    build:   {corpus: [...], model: ..., key_layer: ffn_input, window: 1024, mode: stream, ...}
    index:   {factory: IVF4096,PQ64, train_size: 1000000, shards: 8, ...}
    ingest:  {corpus: [day2/], name: day2}                                          # optional
    tune:    {valid: [valid.txt], test: [test.txt], record: true, plots: ./plots}      # optional
    eval:    {corpus: [test.txt], lambda: null, temperature: null, k: 1024, out: ...}  # optional
    serve:   {replicas: 1, rerank: false}                                             # optional

The stages run in order, build → train-index → add → ingest → tune → eval → serve, each the same
function its own subcommand runs, so each is resumable and skips what is already committed:
rerunning a finished pipeline does nothing but check. A file that asks for something other than
what the datastore holds (another model, factory, layout) is refused by the stage, naming the
field. The resolved file (every default filled in) is stored in the manifest as `pipeline`.

Every key has a default (cluster/pipeline_spec.py derives the sections from the stages' config
dataclasses; `knnlm run --help` lists them); an unknown key is an error naming it and the closest
valid key. Keys use the subcommands' option names with `_` for `-`. cluster/pipeline_file.py reads
the file: relative paths are relative to its folder, and the inputs it names (corpus, valid and
test files, a local model folder) are checked when it is loaded, before any Ray or model work.
This module runs it.
"""
from __future__ import annotations

import json
import logging
import time

from builder.add import add_stage
from builder.build import build
from builder.config import ConfigError
from builder.ingest import ingest
from builder.layout import INDEX_LEASE, NEIGHBOUR_CACHE_META, neighbour_cache_dir
from builder.lease import Lease
from builder.manifest import load_manifest, write_manifest
from builder.runtime import ray_session
from builder.storage import NotFound, Storage, expand_inputs
from builder.train import train_on_cluster, train_stage
from cluster.eval_command import report_line
from cluster.pipeline_spec import Pipeline, as_keys
from retriever.config import EvalConfig, TuneConfig
from retriever.evaluate import evaluate, write_json
from retriever.router import start_servers
from retriever.warm import start_evaluator
from retriever.tune import tune_caches

log = logging.getLogger(__name__)


def run_pipeline(p: Pipeline) -> dict:
    """Run every stage (see the module docstring); returns {stage: summary or result}."""
    cfgs = p.stage_configs()
    out: dict = {}
    stages = ["build", "train-index", "add"] + [s for s in ("ingest", "tune", "eval", "serve") if getattr(p, s)]
    t_all = time.perf_counter()
    with ray_session(p.address):
        for i, stage in enumerate(stages, 1):
            t0 = time.perf_counter()
            log.info("[%d/%d] %s", i, len(stages), stage)
            try:
                out[stage] = _stage(p, stage, cfgs)
            except ConfigError as e:      # the stage refuses the file: name its keys, not the stage's flags
                section = {"train-index": "index", "add": "index"}.get(stage, stage)
                raise ConfigError(f"{p.source}: {stage}: {as_keys(str(e), section)}"
                                  + ("\n(--force is an option of the stage's own command, "
                                     f"`knnlm {stage} {p.datastore} --force`)" if "--force" in str(e) else "")
                                  ) from None
            summary = out[stage] if isinstance(out[stage], str) else _short(out[stage])
            log.info("[%d/%d] %s: %s (%.1fs)", i, len(stages), stage, summary, time.perf_counter() - t0)
    log.info("pipeline done in %.1fs: %s", time.perf_counter() - t_all, p.datastore)
    return out


def _stage(p: Pipeline, stage: str, cfgs: dict):
    if stage == "build":
        return build(cfgs["build"]).summary()
    if stage in ("train-index", "add") and (changed := _changed_since_build(p)):
        return changed
    if stage == "ingest":
        return ingest(cfgs["ingest"]).summary()
    if stage == "train-index":
        return (train_on_cluster(cfgs["index"], p.address) if p.address else train_stage(cfgs["index"])).summary()
    if stage == "add":
        summary = add_stage(cfgs["add"]).summary()
        record_pipeline(p)
        return summary
    if stage == "tune":
        return _tune(p)
    if stage == "eval":
        return _eval(p, cfgs["eval"])
    if stage == "serve":
        if p.serve.evaluator:            # first: its model loads while the servers start
            start_evaluator(Storage.from_uri(p.datastore).uri, detached=True)
        servers = start_servers(p.datastore, replicas=p.serve.replicas, rerank=p.serve.rerank, device=p.serve.device,
                                detached=True, watch=p.serve.watch, grace=p.serve.grace)
        return (f"{sum(len(r) for r in servers.values())} index servers running on {p.address}"
                + (" with a warm evaluator" if p.serve.evaluator else ""))
    raise ValueError(f"unknown stage {stage!r}")


def _changed_since_build(p: Pipeline) -> str | None:
    """Why the index stages are left as they are, or None: once an ingestion, a removal or a compaction was
    published, the datastore's index covers its current keys (an ingestion encodes its own) and index.train_size
    or index.shards, planned over the keys of the build, would no longer match it."""
    m = load_manifest(Storage.from_uri(p.datastore))
    if m.version > 1 and m.index and m.index_shards:
        return (f"version {m.version} of the datastore has a trained index and {len(m.index_shards)} index shards; "
                "left as they are")
    return None


def record_pipeline(p: Pipeline) -> None:
    """Store the resolved pipeline in the manifest (under the index lease: stages rewrite the manifest too)."""
    st = Storage.from_uri(p.datastore)
    with Lease(st, 60.0, INDEX_LEASE, "pipeline record") as lease:
        m = load_manifest(st)
        want = p.resolved()
        if m.pipeline != want:
            m.pipeline = want
            lease.check()
            write_manifest(st, m)


def _caches(p: Pipeline) -> dict[str, str]:
    st = Storage.from_uri(p.datastore)
    return {split: st.url(neighbour_cache_dir(split)) for split in ("valid", "test")}


def _tune(p: Pipeline) -> dict:
    """Neighbour caches of tune.valid and tune.test (kept under DATASTORE/eval/ and reused when they
    exist with the same k and nprobe), then λ/T/k tuned on valid, reported on test."""
    t = p.tune
    caches = _caches(p)
    for split, corpus in (("valid", t.valid), ("test", t.test)):
        uri = caches[split]
        try:
            meta = json.loads(Storage.from_uri(uri).read_text(NEIGHBOUR_CACHE_META))
        except NotFound:
            meta = None
        if meta and (meta.get("k"), meta.get("nprobe"), meta.get("corpus")) == (t.k, t.nprobe, expand_inputs(corpus)):
            log.info("tune: reusing the %s neighbour cache %s", split, uri)
            continue
        Storage.from_uri(uri).delete_prefix("")
        r = evaluate(EvalConfig(datastore=p.datastore, corpus=corpus, format=t.format, lam=0.25, temperature=1.0,
                                k=t.k, nprobe=t.nprobe, address=p.address, workers=t.workers, save_neighbours=uri))
        log.info("tune: %s cached (%d tokens, base ppl %.3f)", split, r.tokens, r.base_ppl)
    res = tune_caches(TuneConfig(valid=caches["valid"], test=caches["test"], plots=t.plots, out=t.out,
                                 record=p.datastore if t.record else None))
    res.pop("table", None)
    return res


def _eval(p: Pipeline, cfg: EvalConfig) -> dict:
    res = evaluate(cfg)
    log.info("eval:\n%s", res.table())
    if res.report:
        log.info("eval: %s", report_line(res.report))
    if cfg.out:
        write_json(res, cfg.out)
    return res.to_json()


def _short(d: dict) -> str:
    if "knnlm_ppl" in d:
        return f"base ppl {d['base_ppl']:.3f} → kNN-LM ppl {d['knnlm_ppl']:.3f} over {d['tokens']:,} tokens"
    if "lambda" in d:
        return (f"lambda={d['lambda']:g}, T={d['temperature']:g}, k={d['k']}: test ppl {d['test_base_ppl']:.3f} → "
                f"{d['test_ppl']:.3f}")
    return json.dumps(d)[:200]

"""The handlers of the retrieval commands: `knnlm serve`, `query`, `tune`, `generate`, `neighbours` and `report`
(`eval`'s is cluster/eval_command.py, which stays clear of torch). Each takes its command's config
(retriever/config.py) and prints what it found; cluster/cli.py loads this module when one of them runs."""
from __future__ import annotations

import json
import os
import signal
import time

import numpy as np

from builder.config import ConfigError
from builder.manifest import load_manifest
from builder.runtime import connect_ray, ray_session
from builder.storage import Storage
from cluster.eval_command import report_line
from retriever.config import GenerateConfig, NeighboursConfig, QueryConfig, ReportConfig, ServeConfig, TuneConfig
from retriever.evaluate import knnlm_settings
from retriever.generate import generate as generate_text
from retriever.provenance import neighbours as find_neighbours
from retriever.report import report_from_cache
from retriever.router import Retriever, controller_status, server_status, serving, start_servers, stop_servers
from retriever.server import RequestError, check_request
from retriever.tune import tune_caches
from retriever.warm import evaluator_info, start_evaluator


def _print_status(rows: list[dict], ctl: dict | None = None) -> int:
    """The servers' table (and the controller's line); how many servers of the served version are down."""
    if ctl is not None:
        follow = "pinned" if ctl.get("pinned") else f"watching every {ctl.get('watch')}s"
        retiring = "".join(f"; version {v}'s servers stop in {t}s" for v, t in (ctl.get("retiring") or {}).items())
        print(f"controller: serving version {ctl.get('version')} ({follow}){retiring}"
              + (f"; error: {ctl['error']}" if ctl.get("error") else ""))
    print(f"{'version':>7} {'shard':>5} {'replica':>7} {'health':<8} {'ids':>23} {'removed':>8} {'device':<6} "
          f"{'rerank':<6} note")
    bad = 0
    for r in rows:
        ids = f"{r['first_id']:,}..{r['first_id'] + r['num_ids'] - 1:,}" if "first_id" in r else ""
        note = r.get("error", f"pid {r.get('pid')}, loaded in {r.get('load_seconds')}s")
        if not r.get("serving", True):
            note += " (previous version)"
        print(f"{'' if r.get('version') is None else r['version']:>7} {r['shard']:>5} "
              f"{'' if r['replica'] is None else r['replica']:>7} "
              f"{'ok' if r['healthy'] else 'DOWN':<8} {ids:>23} {r.get('removed_ids', ''):>8} {r.get('device', ''):<6} "
              f"{str(r.get('rerank', '')):<6} {note}")
        bad += not r["healthy"] and r.get("serving", True)
    return bad


def serve(a: ServeConfig) -> int:
    if a.status or a.stop:
        import ray
        if not ray.is_initialized():
            connect_ray(a.address or "auto")
        if a.stop:
            print(f"stopped {stop_servers(a.datastore)} index servers of {a.datastore}")
            return 0
        bad = _print_status(server_status(a.datastore), controller_status(a.datastore))
        info = evaluator_info(a.datastore)
        if info is not None:
            _print_evaluator(info)
        return 2 if bad else 0
    # an embedded Ray's workers are this service's compute (servers, evaluator): at the priority of a plain
    # `knnlm eval` process, not Ray's default niceness 15 (a forward measured 20% slower at 15 on the bench VM)
    with ray_session(a.address, system_config={"worker_niceness": 0}) as ray:
        # the evaluator first: its imports and model load overlap the servers' start
        evaluator = start_evaluator(Storage.from_uri(a.datastore).uri, a.address is not None, a.cache_dir) \
            if a.evaluator else None
        start_servers(a.datastore, replicas=a.replicas, rerank=a.rerank, device=a.device, cache_dir=a.cache_dir,
                      threads=a.threads, detached=a.address is not None, watch=a.watch, grace=a.grace)
        _print_status(server_status(a.datastore), controller_status(a.datastore))
        if evaluator is not None:
            _print_evaluator(ray.get(evaluator.ready.remote()))    # ready: its model loaded
        if a.address is not None:
            print(f"the servers run on the cluster; `knnlm serve {a.datastore} --address {a.address} --stop` "
                  "removes them")
            return 0
        gcs = ray.get_runtime_context().gcs_address
        published = _publish_address(gcs)
        print("serving on an embedded Ray (reach it with --address auto); Ctrl-C stops", flush=True)
        signal.signal(signal.SIGTERM, _interrupt)    # `kill`, a service manager: stopped as by Ctrl-C
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            stop_servers(a.datastore)
            print("stopped")
            return 0
        finally:
            _unpublish_address(published, gcs)


def _print_evaluator(info: dict) -> None:
    """The warm evaluator's line (`knnlm serve`, `--status`): its model loaded, or why not."""
    state = (f"model loaded in {info['loaded_seconds']}s, {info['calls']} evaluations so far"
             if info.get("loaded_seconds") is not None else
             f"could not preload the model: {info['error']}" if info.get("error") else "loading its model")
    nice = f", nice {info['nice']}" if info.get("nice") else ""       # (Ray's workers on a cluster: 15 by default)
    print(f"warm evaluator: pid {info['pid']}{nice}, {state}; `knnlm eval --address` runs on it", flush=True)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _publish_address(gcs: str) -> str:
    """Record the embedded Ray as this machine's latest cluster, as `ray start` does: `ray.init(address="auto")`
    then reaches it even where other Ray instances run (without the record, "auto" takes any of them)."""
    from ray._common.utils import get_ray_address_file
    path = get_ray_address_file(None)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(gcs)
    os.replace(tmp, path)
    return path


def _unpublish_address(path: str, gcs: str) -> None:
    """Remove the record, unless another cluster has replaced it since."""
    try:
        with open(path) as f:
            if f.read().strip() == gcs:
                os.remove(path)
    except OSError:
        pass


def check_queries(a: QueryConfig, q, dim: int) -> None:
    """The servers' own request checks, before any server starts, naming the flag: the array (shape,
    dtype, NaN/inf) is --queries', the rest --k's (its upper limit is the servers')."""
    try:
        check_request(q, dim, 1, a.nprobe)
    except RequestError as e:
        raise ConfigError(f"--queries {a.queries}: {e}") from None
    try:
        check_request(q[:1], dim, a.k, a.nprobe)
    except RequestError as e:
        raise ConfigError(f"--k {a.k}: {e}") from None


def query(a: QueryConfig) -> int:
    try:
        q = np.load(a.queries, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--queries {a.queries}: cannot read a numpy array ({e})") from None
    check_queries(a, q, load_manifest(Storage.from_uri(a.datastore)).dim)
    with serving(a.datastore, a.address, a.rerank, a.cache_dir):
        r = Retriever.connect(a.datastore)
        parts = [r.search(q[i:i + a.batch_size], a.k, a.nprobe, rerank=a.rerank, allow_partial=a.allow_partial)
                 for i in range(0, max(len(q), 1), a.batch_size)]
    missing = sorted({s for p in parts for s in p.missing_shards})
    np.savez(a.out, dist=np.concatenate([p.dist for p in parts]), ids=np.concatenate([p.ids for p in parts]),
             values=np.concatenate([p.values for p in parts]), partial=bool(missing),
             missing_shards=np.array(missing, np.int64))
    print(f"{len(q):,} queries, k={a.k}, nprobe={a.nprobe}: wrote {a.out}" +
          (f" (PARTIAL: shards {missing} did not answer)" if missing else ""))
    return 0


def tune(a: TuneConfig) -> int:
    res = tune_caches(a)
    print(f"chosen on {res['valid_tokens']:,} validation tokens: lambda={res['lambda']:g}, "
          f"T={res['temperature']:g}, k={res['k']}")
    print(f"validation ppl {res['valid_base_ppl']:.3f} -> {res['valid_ppl']:.3f}")
    if a.test:
        print(f"test ppl       {res['test_base_ppl']:.3f} -> {res['test_ppl']:.3f} ({res['test_tokens']:,} tokens; "
              f"the paper's lambda=0.25, T=1: {res['test_paper_ppl']:.3f})")
    for path in res.get("plots", []):
        print(f"plot: {path}")
    if a.record:
        print(f"recorded in {a.record}/manifest.json: `knnlm eval` now defaults to these values")
    return 0


def report(a: ReportConfig) -> int:
    print(report_line(report_from_cache(a)))
    return 0


def generate(a: GenerateConfig) -> int:
    lam, temp, k = knnlm_settings(load_manifest(Storage.from_uri(a.datastore)), a.lam, a.temperature, a.k)
    g = generate_text(a.datastore, a.prompt, lam, temp, k, a.nprobe, a.max_new_tokens, a.sample, a.seed, a.compare,
                      a.address, a.cache_dir, model=a.model)   # refuses another model than the datastore's
    print(f"kNN-LM (lambda={lam:g}, T={temp:g}, k={k}): {g['tokenizer'].decode(g['knnlm'][0])}")
    if a.compare:
        print(f"base LM: {g['tokenizer'].decode(g['base'][0])}")
    return 0


def neighbours(a: NeighboursConfig) -> int:
    rows = find_neighbours(a.datastore, a.text, k=a.k, nprobe=a.nprobe, context=a.context, model=a.model,
                           address=a.address, cache_dir=a.cache_dir)
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        print(f"[{r['position']}] {r['prefix']!r} -> {r['token']!r}")
        for n in r["neighbours"]:
            mark = "*" if n["matches"] else " "
            print(f"   {mark}{n['rank']:>3} d={n['distance']:<10.4g} -> {n['next_token']!r:<12} doc {n['doc']} pos "
                  f"{n['pos']}: ...{n['context'][-80:]!r}")
    return 0

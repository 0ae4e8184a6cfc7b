"""The handlers of the retrieval commands: `knnlm serve`, `query`, `eval`, `tune`, `generate` and
`neighbours`. Each takes its command's config (retriever/config.py) and prints what it found;
cluster/cli.py loads this module when one of them runs."""
from __future__ import annotations

import json
import time

import numpy as np

from builder.config import ConfigError
from builder.manifest import load_manifest
from builder.runtime import connect_ray, ray_session
from builder.storage import Storage
from retriever.config import EvalConfig, GenerateConfig, NeighboursConfig, QueryConfig, ServeConfig, TuneConfig
from retriever.evaluate import evaluate, knnlm_settings, write_json
from retriever.generate import generate as generate_text
from retriever.provenance import neighbours as find_neighbours
from retriever.router import Retriever, server_status, serving, start_servers, stop_servers
from retriever.tune import tune_caches


def _print_status(rows: list[dict]) -> int:
    print(f"{'shard':>5} {'replica':>7} {'health':<8} {'ids':>23} {'device':<6} {'rerank':<6} note")
    bad = 0
    for r in rows:
        ids = f"{r['first_id']:,}..{r['first_id'] + r['num_ids'] - 1:,}" if "first_id" in r else ""
        note = r.get("error", f"pid {r.get('pid')}, loaded in {r.get('load_seconds')}s")
        print(f"{r['shard']:>5} {'' if r['replica'] is None else r['replica']:>7} "
              f"{'ok' if r['healthy'] else 'DOWN':<8} {ids:>23} {r.get('device', ''):<6} {str(r.get('rerank', '')):<6} "
              f"{note}")
        bad += not r["healthy"]
    return bad


def serve(a: ServeConfig) -> int:
    if a.status or a.stop:
        import ray
        if not ray.is_initialized():
            connect_ray(a.address or "auto")
        if a.stop:
            print(f"stopped {stop_servers(a.datastore)} index servers of {a.datastore}")
            return 0
        return 2 if _print_status(server_status(a.datastore)) else 0
    with ray_session(a.address):
        start_servers(a.datastore, replicas=a.replicas, rerank=a.rerank, device=a.device, cache_dir=a.cache_dir,
                      threads=a.threads, detached=a.address is not None)
        _print_status(server_status(a.datastore))
        if a.address is not None:
            print(f"the servers run on the cluster; `knnlm serve {a.datastore} --address {a.address} --stop` "
                  "removes them")
            return 0
        print("serving on an embedded Ray (reach it with --address auto); Ctrl-C stops", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            stop_servers(a.datastore)
            print("stopped")
            return 0


def query(a: QueryConfig) -> int:
    try:
        q = np.load(a.queries, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--queries {a.queries}: cannot read a numpy array ({e})") from None
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


def eval_(cfg: EvalConfig) -> int:
    res = evaluate(cfg)
    print(res.table())
    if cfg.out:
        write_json(res, cfg.out)
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

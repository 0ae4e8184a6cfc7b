"""The `knnlm` command line: one console script, one subcommand per stage."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from builder.errors import KnnlmError
from builder.storage import write_json_file
from cluster.jobs import add_job_commands

log = logging.getLogger("knnlm")


def _add_build(sub) -> None:
    from builder.config import DEVICES, FORMATS, KEY_LAYERS, MODES, BuildConfig
    d = BuildConfig.__dataclass_fields__
    p = sub.add_parser(
        "build", help="compute a datastore's keys from a corpus into shards (resumable)",
        description="Build a kNN-LM datastore: tokenize the corpus with the model's tokenizer, compute one key "
                    "per token (the LM's hidden state at --key-layer for the context before it) on Ray workers, "
                    "and write Parquet shards plus manifest.json under --out. Rerunning the same command resumes "
                    "an interrupted build; rerunning a finished one does nothing.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--corpus", nargs="+", required=True, metavar="PATH_OR_URI",
                   help="input files, directories, globs (sorted) or s3:// URIs/prefixes, in corpus order")
    p.add_argument("--model", required=True, help="Hugging Face causal LM: local directory or hub id")
    p.add_argument("--out", required=True, metavar="URI", help="datastore root: a local path, file:// or s3://bucket/prefix")
    p.add_argument("--key-layer", choices=KEY_LAYERS, default=d["key_layer"].default,
                   help="ffn_input: input of the last block's feed-forward (after its layer norm; the paper's best); "
                        "final_hidden: input of the LM head")
    p.add_argument("--window", type=int, default=None,
                   help="tokens per forward window (default: the model's maximum positions, capped at 1024)")
    p.add_argument("--min-context", type=int, default=None,
                   help="tokens of context a window re-reads from the previous one (default: window/2)")
    p.add_argument("--mode", choices=MODES, default=d["mode"].default,
                   help="document: each document is its own sequence; stream: each input file is one sequence "
                        "and contexts run across its documents (WikiText-103 style)")
    p.add_argument("--format", choices=FORMATS, default=d["format"].default,
                   help="auto: .jsonl/.json → jsonl, .parquet → parquet, .tokens → wikitext, else text "
                        "(a text file is one document; wikitext: a line ' = Title = ' starts an article)")
    p.add_argument("--text-field", default=d["text_field"].default, help="JSONL field / Parquet column holding the text")
    p.add_argument("--shard-rows", type=int, default=d["shard_rows"].default, help="most rows per shard file")
    p.add_argument("--unit-tokens", type=int, default=d["unit_tokens"].default,
                   help="keys per work unit (the unit of dispatch, retry and resume)")
    p.add_argument("--row-group-rows", type=int, default=d["row_group_rows"].default,
                   help="Parquet row group size (the granularity of index-training samples)")
    p.add_argument("--workers", type=int, default=None,
                   help="key workers (default: one per GPU of the cluster, else one CPU worker using all cores)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address as ray.init takes it (e.g. ray://head:10001 or auto); "
                        "default: start an embedded local Ray")
    p.add_argument("--device", choices=DEVICES, default=d["device"].default)
    p.add_argument("--compute-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="dtype of the forward pass (auto: bfloat16 on GPU, float32 on CPU); keys are stored as float16")
    p.add_argument("--batch-size", type=int, default=d["batch_size"].default, help="windows per forward pass")
    p.add_argument("--lease-ttl", type=float, default=d["lease_ttl"].default,
                   help="seconds after its last renewal when a dead build's lease may be taken over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_build)


def _cmd_build(a) -> int:
    from builder.build import build
    from builder.config import BuildConfig
    cfg = BuildConfig(corpus=a.corpus, model=a.model, out=a.out, key_layer=a.key_layer, window=a.window,
                      min_context=a.min_context, mode=a.mode, format=a.format, text_field=a.text_field,
                      shard_rows=a.shard_rows, unit_tokens=a.unit_tokens, row_group_rows=a.row_group_rows,
                      workers=a.workers, address=a.address, device=a.device, compute_dtype=a.compute_dtype,
                      batch_size=a.batch_size, lease_ttl=a.lease_ttl,
                      progress=not a.no_progress and sys.stderr.isatty())
    res = build(cfg)
    print(res.summary())
    return 0


def _add_train_index(sub) -> None:
    from builder.config import DEVICES, TrainConfig
    d = TrainConfig.__dataclass_fields__
    p = sub.add_parser(
        "train-index", help="train a FAISS index (IVF-PQ by default) on a uniform sample of a datastore's keys",
        description="Sample --train-size keys uniformly at random across the whole datastore (whole random row "
                    "groups, then rows within them; seeded), train --index-factory on them (on a GPU when there is "
                    "one), and store the trained, empty index at the datastore root, recorded in manifest.json as "
                    "`index`. Rerunning with the same settings does nothing; different settings are refused unless "
                    "--force, which retrains and drops the index shards built from the old index.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("datastore", metavar="DATASTORE_URI", help="a datastore root (local path or s3://) built by knnlm build")
    p.add_argument("--train-size", type=int, default=d["train_size"].default,
                   help="keys to sample (all keys if the datastore has fewer)")
    p.add_argument("--index-factory", default=d["index_factory"].default,
                   help="faiss index factory string with an IVF layer, e.g. IVF4096,PQ64, OPQ64,IVF4096,PQ64 or "
                        "IVF1024,Flat (PQ sub-quantizers must divide the key dim)")
    p.add_argument("--metric", choices=("l2", "ip"), default=d["metric"].default,
                   help="l2: squared L2 distance (the kNN-LM paper's); ip: inner product")
    p.add_argument("--seed", type=int, default=d["seed"].default, help="seed of the sample and of the k-means")
    p.add_argument("--trainer", choices=("auto", "faiss", "torch", "faiss-gpu"), default=d["trainer"].default,
                   help="auto: faiss's GPU k-means if faiss has GPU support, else torch on a CUDA GPU, else faiss "
                        "on the CPU; torch: coarse and PQ k-means in torch (GPU if visible, else CPU)")
    p.add_argument("--device", choices=DEVICES, default=d["device"].default)
    p.add_argument("--read-factor", type=float, default=d["read_factor"].default,
                   help="rows read (whole row groups) per sampled key: more spreads the sample over more of the "
                        "datastore, at that many times the read")
    p.add_argument("--min-points-per-centroid", type=int, default=d["min_points_per_centroid"].default,
                   help="training keys needed per IVF centroid (faiss warns below 39)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for faiss/torch (default: all cores)")
    p.add_argument("--address", default=None,
                   help="run the training as one Ray task on this cluster (on a GPU node if it has GPUs), "
                        "a Ray address as ray.init takes it; default: in this process")
    p.add_argument("--force", action="store_true", help="retrain even if an index with other settings exists "
                                                        "(drops its index shards)")
    p.add_argument("--lease-ttl", type=float, default=d["lease_ttl"].default,
                   help="seconds after its last renewal when a dead run's lease may be taken over")
    p.set_defaults(func=_cmd_train_index)


def _cmd_train_index(a) -> int:
    from builder.config import TrainConfig
    from builder.train import train_on_cluster, train_stage
    cfg = TrainConfig(datastore=a.datastore, train_size=a.train_size, index_factory=a.index_factory, metric=a.metric,
                      seed=a.seed, trainer=a.trainer, device=a.device, read_factor=a.read_factor,
                      min_points_per_centroid=a.min_points_per_centroid, force=a.force, threads=a.threads,
                      lease_ttl=a.lease_ttl)
    print((train_on_cluster(cfg, a.address) if a.address else train_stage(cfg)).summary())
    return 0


def _add_add(sub) -> None:
    from builder.config import DEVICES, AddConfig
    d = AddConfig.__dataclass_fields__
    p = sub.add_parser(
        "add", help="encode every key into index shards (contiguous global-id ranges) on Ray workers",
        description="Split the datastore into contiguous global-id ranges and encode each into its own copy of the "
                    "trained index (knnlm train-index) on Ray workers, with the datastore's global ids; each index "
                    "shard is a plain FAISS file listed in manifest.json as `index_shards`. Interrupted runs resume "
                    "from the committed shards; rerunning a finished add does nothing.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("datastore", metavar="DATASTORE_URI")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--index-shards", type=int, default=None, metavar="N", help="N near-equal id ranges")
    g.add_argument("--shard-size", type=int, default=None, metavar="ROWS",
                   help=f"ranges of ROWS ids (default when neither is given: {AddConfig.DEFAULT_SHARD_SIZE:,})")
    p.add_argument("--workers", type=int, default=None,
                   help="concurrent add tasks (default: one per GPU of the cluster, else one per node)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU cores per add task (default: a node's cores shared by the tasks on it)")
    p.add_argument("--encoder", choices=("auto", "faiss", "torch", "faiss-gpu"), default=d["encoder"].default,
                   help="auto: faiss GPU if available, else torch on a CUDA GPU, else faiss on the CPU")
    p.add_argument("--device", choices=DEVICES, default=d["device"].default)
    p.add_argument("--address", default=None,
                   help="Ray cluster address as ray.init takes it (e.g. ray://head:10001 or auto); "
                        "default: start an embedded local Ray")
    p.add_argument("--merge", action="store_true",
                   help="also merge the shards into one index over on-disk inverted lists (index/merged.faiss + "
                        "index/merged.ivfdata) for single-node serving")
    p.add_argument("--force", action="store_true", help="rebuild the shards even if others exist")
    p.add_argument("--lease-ttl", type=float, default=d["lease_ttl"].default,
                   help="seconds after its last renewal when a dead run's lease may be taken over")
    p.set_defaults(func=_cmd_add)


def _cmd_add(a) -> int:
    from builder.add import add_stage
    from builder.config import AddConfig
    cfg = AddConfig(datastore=a.datastore, index_shards=a.index_shards, shard_size=a.shard_size, workers=a.workers,
                    threads=a.threads, encoder=a.encoder, device=a.device, address=a.address, merge=a.merge,
                    force=a.force, lease_ttl=a.lease_ttl)
    print(add_stage(cfg).summary())
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="start (or --status, --stop) the index servers of a datastore on a Ray cluster",
        description="Start one index server per index shard and replica: named, detached Ray actors that fetch their "
                    "shard into a local cache (checksum-verified), memory-map it and hold the values (token ids) of "
                    "their id range. Clients on the cluster find them by name (retriever.Retriever.connect, knnlm "
                    "query --address). With --address the servers stay on the cluster after this command returns; "
                    "without it an embedded local Ray is started and the servers live until Ctrl-C (other commands "
                    "reach them with --address auto).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("datastore", metavar="DATASTORE_URI")
    p.add_argument("--replicas", type=int, default=1, help="servers per index shard (on different nodes if possible)")
    p.add_argument("--rerank", action="store_true",
                   help="also keep each range's fp16 keys locally (memory-mapped) so requests can ask for exact "
                        "re-ranking of their candidates")
    p.add_argument("--address", default=None, help="Ray cluster address as ray.init takes it (e.g. auto, "
                                                    "ray://head:10001); default: an embedded local Ray")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: faiss GPU when faiss has GPU support and the cluster GPUs (k <= 2048 there)")
    p.add_argument("--cache-dir", default=None, help="local cache of index shards and values on each node "
                                                     "(default: $KNNLM_CACHE or ~/.cache/knnlm)")
    p.add_argument("--threads", type=int, default=None, help="faiss threads per server (default: all cores)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--status", action="store_true", help="report every shard and replica's health and exit")
    g.add_argument("--stop", action="store_true", help="remove this datastore's servers from the cluster and exit")
    p.set_defaults(func=_cmd_serve)


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


def _cmd_serve(a) -> int:
    import time

    from builder.runtime import connect_ray, ray_session
    from retriever.router import server_status, start_servers, stop_servers
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
            print(f"the servers run on the cluster; `knnlm serve {a.datastore} --address {a.address} --stop` removes them")
            return 0
        print("serving on an embedded Ray (reach it with --address auto); Ctrl-C stops", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            stop_servers(a.datastore)
            print("stopped")
            return 0


def _add_query(sub) -> None:
    p = sub.add_parser(
        "query", help="search a datastore's sharded index for a batch of query vectors (.npy → .npz)",
        description="Search float32 (n, dim) queries through the router: the global top-k of each query over every "
                    "index shard. Writes dist (float32; squared L2 for an l2 index, as FAISS returns it, or inner "
                    "product), ids (int64 global ids) and values (int32 token ids), each (n, k), to --out; missing "
                    "results are id/value -1 and dist +inf (l2) or -inf (ip). Uses the running servers with "
                    "--address, else starts embedded ones for the call.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("datastore", metavar="DATASTORE_URI")
    p.add_argument("--queries", required=True, metavar="Q.npy", help="float32 array of shape (n, dim)")
    p.add_argument("--k", type=int, default=1024, help="neighbours per query")
    p.add_argument("--nprobe", type=int, default=32, help="inverted lists probed per query")
    p.add_argument("--out", required=True, metavar="R.npz")
    p.add_argument("--rerank", action="store_true", help="re-rank each shard's candidates by exact distance")
    p.add_argument("--allow-partial", action="store_true",
                   help="return results from the shards that answer, flagged partial, instead of failing")
    p.add_argument("--batch-size", type=int, default=1024, help="queries per router call")
    p.add_argument("--address", default=None, help="a Ray cluster with running servers of this datastore")
    p.add_argument("--cache-dir", default=None, help="cache of the embedded servers (no --address)")
    p.set_defaults(func=_cmd_query)


def _cmd_query(a) -> int:
    import numpy as np

    from builder.config import ConfigError
    from retriever.router import Retriever, serving
    try:
        q = np.load(a.queries, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--queries {a.queries}: cannot read a numpy array ({e})") from None
    if a.batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive integer (got {a.batch_size})")
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


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="base LM and kNN-LM perplexity of evaluation text",
        description="Score every token of the evaluation text that would get a key (the datastore's tokenizer, "
                    "windows, key layer and mode) with the base LM and with the kNN-LM: p = lambda * p_kNN + "
                    "(1 - lambda) * p_LM, p_kNN(y) proportional to the sum over the k neighbours with value y of "
                    "exp(-d/T), d the squared L2 distance FAISS returns (exp(s/T) for inner product). LM workers are "
                    "Ray actors (one per GPU, else one using the CPUs); their queries go to the index servers in "
                    "batches.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("datastore", metavar="DATASTORE_URI")
    p.add_argument("--corpus", nargs="+", required=True, metavar="PATH_OR_URI", help="evaluation text, read like "
                   "build corpora (same formats)")
    p.add_argument("--model", default=None, help="default: the model recorded in the manifest (must be the same)")
    p.add_argument("--lambda", dest="lam", type=float, default=None,
                   help="interpolation weight of p_kNN (default: the value `knnlm tune` recorded, else 0.25)")
    p.add_argument("--temperature", type=float, default=None,
                   help="softmax temperature of p_kNN (default: the value `knnlm tune` recorded, else 1.0)")
    p.add_argument("--k", type=int, default=None, help="neighbours (default: the value `knnlm tune` recorded, else 1024)")
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--save-neighbours", default=None, metavar="URI",
                   help="also store, per token, the LM log-prob of the target and the k distances and values "
                        "(Parquet; see retriever/tune.py) for `knnlm tune`")
    p.add_argument("--rerank", choices=("exact",), default=None,
                   help="exact: re-rank the k retrieved candidates by exact distance (servers need --rerank)")
    p.add_argument("--mode", choices=("stream", "document"), default=None, help="default: the manifest's")
    p.add_argument("--format", choices=("auto", "text", "wikitext", "jsonl", "parquet"), default="auto")
    p.add_argument("--text-field", default="text")
    p.add_argument("--address", default=None, help="a Ray cluster with running servers of this datastore "
                                                   "(default: embedded servers started for the call)")
    p.add_argument("--workers", type=int, default=None, help="LM workers (default: one per GPU, else one)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--cache-dir", default=None, help="cache of the embedded servers")
    p.add_argument("--out", default=None, metavar="FILE.json", help="also write the results as JSON")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(a) -> int:
    from retriever.evaluate import EvalConfig, evaluate, write_json
    cfg = EvalConfig(datastore=a.datastore, corpus=a.corpus, model=a.model, lam=a.lam, temperature=a.temperature,
                     k=a.k, nprobe=a.nprobe, rerank=a.rerank == "exact", mode=a.mode, format=a.format,
                     text_field=a.text_field, address=a.address, workers=a.workers, batch_size=a.batch_size,
                     cache_dir=a.cache_dir, save_neighbours=a.save_neighbours)
    res = evaluate(cfg)
    print(res.table())
    if a.out:
        write_json(res, a.out)
    return 0


def _add_tune(sub) -> None:
    p = sub.add_parser(
        "tune", help="choose lambda, T and k on cached neighbours (knnlm eval --save-neighbours), in seconds",
        description="Search lambda (0 to 0.95), the temperature T (log-spaced around the typical nearest distance, "
                    "and 1.0) and k (powers of two up to the cached k) on the validation cache, pick the lowest "
                    "validation perplexity, and report it on the test cache, without the LM or the index.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--valid", required=True, metavar="CACHE", help="neighbour cache of the validation text")
    p.add_argument("--test", default=None, metavar="CACHE", help="neighbour cache of the test text")
    p.add_argument("--out", default=None, metavar="FILE.json", help="the choice, the figures and the whole grid")
    p.add_argument("--plots", default=None, metavar="DIR", help="PNG plots: perplexity vs lambda, vs k")
    p.add_argument("--record", default=None, metavar="DATASTORE_URI",
                   help="store the choice in this datastore's manifest as `knnlm eval`'s default")
    p.set_defaults(func=_cmd_tune)


def _cmd_tune(a) -> int:
    from builder.config import ConfigError
    from retriever.tune import plot, read_cache, record, tune
    try:
        valid = read_cache(a.valid)
        test = read_cache(a.test) if a.test else None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    res = tune(valid, test)
    print(f"chosen on {res['valid_tokens']:,} validation tokens: lambda={res['lambda']:g}, "
          f"T={res['temperature']:g}, k={res['k']}")
    print(f"validation ppl {res['valid_base_ppl']:.3f} -> {res['valid_ppl']:.3f}")
    if test is not None:
        print(f"test ppl       {res['test_base_ppl']:.3f} -> {res['test_ppl']:.3f} ({res['test_tokens']:,} tokens; "
              f"the paper's lambda=0.25, T=1: {res['test_paper_ppl']:.3f})")
    if a.plots:
        for path in plot(res, a.plots):
            print(f"plot: {path}")
    if a.out:
        write_json_file(a.out, res)
    if a.record:
        record(a.record, res)
        print(f"recorded in {a.record}/manifest.json: `knnlm eval` now defaults to these values")
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with the kNN-LM (and, with --compare, without it)",
                       description="Run model.generate() with a LogitsProcessor that replaces each step's "
                                   "distribution by the kNN-LM's (retriever.generate.KNNLMLogitsProcessor).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("datastore", metavar="DATASTORE_URI")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--lambda", dest="lam", type=float, default=None, help="default: tuned, else 0.25")
    p.add_argument("--temperature", type=float, default=None, help="kNN temperature T (default: tuned, else 1.0)")
    p.add_argument("--k", type=int, default=None, help="default: tuned, else 1024")
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", action="store_true", help="also print the base LM's generation")
    p.add_argument("--model", default=None, help="default: the manifest's model")
    p.add_argument("--address", default=None)
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(a) -> int:
    from builder.manifest import load_manifest
    from builder.storage import Storage
    from retriever.evaluate import check_model, knnlm_settings
    from retriever.generate import generate
    st = Storage.from_uri(a.datastore)
    m = load_manifest(st)
    info = check_model(a.model, m)
    lam, temp, k = knnlm_settings(m, a.lam, a.temperature, a.k)
    g = generate(st.uri, info.path, m.key_layer, a.prompt, lam, temp, k, a.nprobe, a.max_new_tokens, a.sample,
                 a.seed, a.compare, a.address, a.cache_dir)
    print(f"kNN-LM (lambda={lam:g}, T={temp:g}, k={k}): {g['tokenizer'].decode(g['knnlm'][0])}")
    if a.compare:
        print(f"base LM: {g['tokenizer'].decode(g['base'][0])}")
    return 0


def _add_neighbours(sub) -> None:
    p = sub.add_parser("neighbours", help="show, for each position of a text, the retrieved neighbours and the "
                                          "datastore context they come from",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("datastore", metavar="DATASTORE_URI")
    p.add_argument("--text", required=True)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--context", type=int, default=24, help="datastore tokens shown before each neighbour's token")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--model", default=None)
    p.add_argument("--address", default=None)
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=_cmd_neighbours)


def _cmd_neighbours(a) -> int:
    from retriever.provenance import neighbours
    rows = neighbours(a.datastore, a.text, k=a.k, nprobe=a.nprobe, context=a.context, model=a.model,
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


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print a datastore's manifest summary (or the whole manifest with --json)")
    p.add_argument("datastore", metavar="DATASTORE_URI")
    p.add_argument("--json", action="store_true", help="print the whole manifest")
    p.set_defaults(func=_cmd_info)


def _cmd_info(a) -> int:
    from builder.manifest import load_manifest
    from builder.storage import Storage
    m = load_manifest(Storage.from_uri(a.datastore))
    if a.json:
        print(m.to_json())
        return 0
    summary = {"num_keys": m.num_keys, "dim": m.dim, "shards": len(m.shards), "model": m.model["name"],
               "key_layer": m.key_layer, "key_module": m.key_module, "window": m.window,
               "min_context": m.min_context, "mode": m.mode, "compute_dtype": m.compute_dtype,
               "documents": m.corpus.get("num_documents"), "skipped_documents": m.corpus.get("skipped_documents")}
    if m.index:
        summary["index"] = {k: m.index.get(k) for k in ("path", "factory", "metric", "train_size", "seed", "trainer")}
    if m.index_shards:
        summary["index_shards"] = len(m.index_shards)
    if m.index_merged:
        summary["index_merged"] = m.index_merged["path"]
    print(json.dumps(summary, indent=1))
    return 0


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check every shard of a datastore against its manifest",
                       description="Read every shard and check it exists, its sha256 checksum, its row count and "
                                   "its key width against manifest.json, and that global ids are contiguous; "
                                   "likewise the index files (trained index, index shards, merged index). "
                                   "Exit status 0 if all is well, 2 otherwise (each problem is listed).")
    p.add_argument("datastore", metavar="DATASTORE_URI")
    p.add_argument("--threads", type=int, default=8, help="shards read in parallel")
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(a) -> int:
    from builder.manifest import load_manifest
    from builder.shards import verify_shards
    from builder.storage import Storage
    st = Storage.from_uri(a.datastore)
    m = load_manifest(st)  # also checks that ids are contiguous
    from builder.add import verify_index_files
    problems = verify_shards(st, m, threads=a.threads)
    index_problems = verify_index_files(st, m)
    for p in problems + index_problems:
        print(f"knnlm verify: {st.url(p.split(':', 1)[0])}:{p.split(':', 1)[1]}", file=sys.stderr)
    if problems:
        print(f"knnlm verify: {len(problems)} of {len(m.shards)} shards have problems; rebuild into a new --out "
              "or restore them", file=sys.stderr)
    if index_problems:
        print(f"knnlm verify: {len(index_problems)} index files have problems; rerun `knnlm train-index --force` "
              "or `knnlm add --force`", file=sys.stderr)
    if problems or index_problems:
        return 2
    n_index = (1 if m.index else 0) + len(m.index_shards or []) + (2 if m.index_merged else 0)
    print(f"ok: {m.num_keys:,} keys in {len(m.shards)} shards" + (f" and {n_index} index files" if n_index else "")
          + ", checksums match")
    return 0


def _pipeline_reference() -> str:
    """Every key of a pipeline file with its default (the --help epilog of `knnlm run`)."""
    from dataclasses import MISSING, fields

    from cluster.pipeline import OPTIONAL, SECTIONS, yaml_keys
    lines = ["pipeline file keys (defaults):", "  datastore: (required) output URI, a local path or s3://bucket/prefix",
             "  address: null (a Ray cluster as ray.init takes it; null: an embedded local Ray)"]
    for name, cls in SECTIONS.items():
        lines.append(f"  {name}:" + ("  (optional section)" if name in OPTIONAL else ""))
        keys = yaml_keys(name)
        for f in fields(cls):
            d = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING
                                                             else None)
            shown = "(required)" if d in ("", []) and f.name in ("corpus", "model", "valid", "test") else json.dumps(d)
            lines.append(f"    {keys[f.name]}: {shown}")
    return "\n".join(lines)


def _add_run(sub) -> None:
    p = sub.add_parser(
        "run", help="run a whole pipeline from a YAML file: build, train-index, add (and tune, eval, serve)",
        description="Run the stages a pipeline file describes, in order: build -> train-index -> add -> tune -> "
                    "eval -> serve (the last three when their sections are present). Each stage is the same "
                    "function as its own subcommand: resumable, skipping what is already committed, refusing a "
                    "file that asks for something other than what the datastore holds. The resolved file is "
                    "stored in the manifest as `pipeline`. The same file runs on a laptop (embedded Ray, local "
                    "paths) or a cluster (`address:` or --address, s3:// URIs). Relative paths in the file are "
                    "relative to its folder. The inputs it names (build.corpus, tune.valid, tune.test, "
                    "eval.corpus, a local build.model) are checked when it is loaded, before any work. Keys "
                    "are the subcommands' options with _ for -.",
        epilog=_pipeline_reference(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pipeline", metavar="PIPELINE.yaml")
    p.add_argument("--address", default=None,
                   help="a Ray cluster address as ray.init takes it (e.g. auto or ray://head:10001), overriding "
                        "the file's `address`")
    p.add_argument("--check", action="store_true", help="only read and check the file; print it resolved")
    p.add_argument("--out", default=None, metavar="FILE.json", help="write every stage's summary/result as JSON")
    p.set_defaults(func=_cmd_run)


def _cmd_run(a) -> int:
    from cluster.pipeline import load_pipeline, run_pipeline
    pl = load_pipeline(a.pipeline, a.address)
    if a.check:
        import yaml
        print(yaml.safe_dump(pl.resolved(), sort_keys=False), end="")
        return 0
    res = run_pipeline(pl)
    for stage, r in res.items():
        print(f"{stage}: {r if isinstance(r, str) else json.dumps(r, default=str)[:300]}")
    if a.out:
        write_json_file(a.out, res)
    return 0


def _add_demo(sub) -> None:
    from cluster.demo import DemoConfig
    d = DemoConfig.__dataclass_fields__
    p = sub.add_parser(
        "demo", help="the whole product end to end on this machine, offline: WikiText-2, a small GPT-2 trained on "
                     "the fly, build, index, serve, tune, eval, generate",
        description="Run the kNN-LM end to end on one machine with no network: the WikiText-2 text shipped with "
                    "knnlm (CC BY-SA 3.0) split by article into train/valid/test; a small GPT-2 trained on the "
                    "train part (cached for the next run) unless --model; then build -> train-index -> add -> "
                    "tune -> eval through `knnlm run` (OUT/pipeline.yaml), ending with the base vs kNN-LM "
                    "perplexity table, the plots and a sample generated with and without the datastore. About "
                    "10 minutes on 2 CPU cores the first time (6 of them training the model), 4 once the model is "
                    "cached.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=d["out"].default,
                   help="where everything goes (data/, datastore/, pipeline.yaml, plots/, results.json), relative "
                        "to the current folder")
    p.add_argument("--model", default=None,
                   help="a causal LM (local folder or hub id, e.g. gpt2 where the hub is reachable) instead of "
                        "training the small GPT-2")
    p.add_argument("--corpus", nargs="+", default=None, metavar="PATH_OR_URI",
                   help="your text instead of WikiText-2, split by article (' = Title = ' lines) or by "
                        "blank-line paragraph: i %% 10 == 0 -> test, 5 -> valid, else train")
    p.add_argument("--epochs", type=float, default=d["epochs"].default, help="training epochs of the small GPT-2")
    p.add_argument("--index-factory", default=None,
                   help="default: IVF1024 with fast-scan PQ (dim/4 sub-quantizers of 4 bits), fast on a CPU")
    p.add_argument("--window", type=int, default=None, help="forward window (default: the model's positions)")
    p.add_argument("--prompt", default=None, help="generation prompt (default: the start of the first test article)")
    p.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"].default)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(a) -> int:
    from cluster.demo import DemoConfig, report, run_demo
    r = run_demo(DemoConfig(out=a.out, model=a.model, corpus=a.corpus, epochs=a.epochs, index_factory=a.index_factory,
                            window=a.window, prompt=a.prompt, max_new_tokens=a.max_new_tokens))
    print(report(r))
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knnlm", description="Build and serve kNN-LM datastores at scale.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    _add_run(sub)
    add_job_commands(sub)
    _add_build(sub)
    _add_train_index(sub)
    _add_add(sub)
    _add_serve(sub)
    _add_query(sub)
    _add_eval(sub)
    _add_tune(sub)
    _add_generate(sub)
    _add_neighbours(sub)
    _add_info(sub)
    _add_verify(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="knnlm: %(levelname)s: %(message)s" if args.verbose else "knnlm: %(message)s")
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "filelock", "httpx", "huggingface_hub", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except KnnlmError as e:
        if args.verbose:
            raise
        print(f"knnlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"knnlm {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

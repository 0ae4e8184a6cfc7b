"""The handlers of the datastore commands: `knnlm build`, `train-index`, `add`, `ingest`, `remove`, `compact`,
`info`, `verify` and `run` (a pipeline file). Each takes its command's config (builder/config.py, cluster/config.py),
runs the stage and prints its summary; cluster/cli.py loads this module when one of them runs."""
from __future__ import annotations

import json
import sys

from builder.add import add_stage, verify_index_files
from builder.build import build as build_stage
from builder.compact import compact as compact_stage
from builder.config import (AddConfig, BuildConfig, CompactConfig, InfoConfig, IngestConfig, RemoveConfig, TrainConfig,
                            VerifyConfig)
from builder.ingest import ingest as ingest_stage
from builder.key_shards import verify_key_shards
from builder.manifest import load_manifest
from builder.remove import remove as remove_stage
from builder.storage import Storage, write_json_file
from builder.train import train_on_cluster, train_stage
from builder.versions import history
from cluster.config import RunConfig
from cluster.pipeline import run_pipeline
from cluster.pipeline_file import load_pipeline


def build(cfg: BuildConfig) -> int:
    cfg.progress = cfg.progress and sys.stderr.isatty()
    print(build_stage(cfg).summary())
    return 0


def train_index(cfg: TrainConfig) -> int:
    print((train_on_cluster(cfg, cfg.address) if cfg.address else train_stage(cfg)).summary())
    return 0


def add(cfg: AddConfig) -> int:
    print(add_stage(cfg).summary())
    return 0


def ingest(cfg: IngestConfig) -> int:
    cfg.progress = cfg.progress and sys.stderr.isatty()
    print(ingest_stage(cfg).summary())
    return 0


def _version_line(e: dict) -> str:
    """One version of `knnlm info`'s history: what made it, its size and time."""
    what = {"build": lambda: f"build of {e.get('inputs', '?')} inputs",
            "ingest": lambda: f"ingest {e.get('name')}: +{e.get('keys_added', 0):,} keys",
            "remove": lambda: f"remove {e.get('source') or e.get('docs') or ''}".rstrip() +
                              (f": -{e['keys_removed']:,} keys" if e.get("keys_removed") is not None else ""),
            "compact": lambda: "compact"}.get(e.get("kind"), lambda: str(e.get("kind")))()
    return f"v{e.get('version')} {e.get('at') or '?'} {what} ({e.get('num_keys', 0):,} keys)"


def remove(cfg: RemoveConfig) -> int:
    print(remove_stage(cfg).summary())
    return 0


def compact(cfg: CompactConfig) -> int:
    print(compact_stage(cfg).summary())
    return 0


def info(a: InfoConfig) -> int:
    m = load_manifest(Storage.from_uri(a.datastore))
    if a.json:
        print(m.to_json())
        return 0
    summary = {"num_keys": m.num_keys, "dim": m.dim, "shards": len(m.shards), "model": m.model["name"],
               "key_layer": m.key_layer, "key_module": m.key_module, "window": m.window,
               "min_context": m.min_context, "mode": m.mode, "compute_dtype": m.compute_dtype,
               "documents": m.corpus.get("num_documents"), "skipped_documents": m.corpus.get("skipped_documents")}
    summary["removed_keys"] = (m.removed or {}).get("num_keys", 0)        # until `knnlm compact`
    if m.removals:
        summary["removals"] = [{k: r.get(k) for k in ("version", "at", "source", "docs", "num_docs", "num_keys",
                                                      "compacted") if r.get(k) is not None} for r in m.removals]
    if m.index:
        summary["index"] = {k: m.index.get(k) for k in ("path", "factory", "metric", "train_size", "seed", "trainer")}
    if m.index_shards:
        summary["index_shards"] = len(m.index_shards)
    if m.index_merged:
        summary["index_merged"] = m.index_merged["path"]
    summary["version"] = m.version
    summary["versions"] = [_version_line(e) for e in history(m)]
    print(json.dumps(summary, indent=1))
    return 0


def verify(a: VerifyConfig) -> int:
    st = Storage.from_uri(a.datastore)
    m = load_manifest(st)  # also checks that ids are contiguous
    problems = verify_key_shards(st, m, threads=a.threads)
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


def run(a: RunConfig) -> int:
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

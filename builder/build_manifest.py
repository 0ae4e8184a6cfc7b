"""The build's last step: the manifest assembled from the units' commit records, then committed.

The manifest is written last (after a lease check: only the lease holder commits); once it exists
it is the truth, so the build's progress records, unlisted shards and abandoned uploads go.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import time

from builder.build_errors import BuildError
from builder.config import BuildConfig
from builder.faults import maybe_fault
from builder.key_shards import SHARD_FORMAT
from builder.layout import BUILD_REQUEST, KEY_SHARDS_DIR, MANIFEST, UNITS_DIR, unit_record_path
from builder.lease import Lease
from builder.manifest import Manifest, package_versions
from builder.modelinfo import ModelInfo
from builder.storage import Storage
from builder.unit import UnitSpan

RECORD_READERS = 16              # a resumed build reads thousands of small unit records: in parallel


def read_unit_records(storage: Storage, units: list[UnitSpan], records: dict[int, dict]) -> None:
    """Add to `records` (unit id → commit record) those of units an earlier run committed."""
    missing = [u.id for u in units if u.id not in records]
    with cf.ThreadPoolExecutor(RECORD_READERS) as pool:
        for uid, text in zip(missing, pool.map(lambda i: storage.read_text(unit_record_path(i)), missing)):
            records[uid] = json.loads(text)


def assemble_manifest(cfg: BuildConfig, info: ModelInfo, ident: dict, metas: list[dict], units: list[UnitSpan],
                      records: dict[int, dict], *, window: int, min_context: int, compute_dtype: str,
                      device: str, num_skipped: int, stage_ends: dict) -> Manifest:
    """The manifest of a build whose units are all committed (`records` holds every unit's record).

    Shards are listed in unit order, which is corpus order, with first_id the running row count; the files'
    entries come from their tokens metas' counts (builder/seqs.py)."""
    total = sum(m["num_targets"] for m in metas)
    shards, first_id = [], 0
    for u in units:
        for s in records[u.id]["shards"]:
            shards.append({"path": s["path"], "num_rows": s["num_rows"], "first_id": first_id,
                           "checksum": s["checksum"]})
            first_id += s["num_rows"]
    if first_id != total:
        raise BuildError(f"internal error: shards hold {first_id} rows, the plan has {total} targets")
    files = []
    for m in metas:
        files.append({k: m[k] for k in ("uri", "format", "bytes", "sha256", "num_records", "num_tokens", "tokens")}
                     | {"num_sequences": m["num_sequences"], "num_keys": m["num_targets"], "skipped": m["num_skipped"]})
    manifest = Manifest(
        num_keys=total, dim=info.hidden_size, model=info.model_dict(), tokenizer=info.tokenizer_dict(),
        key_layer=cfg.key_layer, key_module=info.key_module, window=window, min_context=min_context, mode=cfg.mode,
        compute_dtype=compute_dtype,
        corpus={"inputs": cfg.corpus, "format": cfg.format, "text_field": cfg.text_field, "files": files,
                "num_documents": sum(m["num_records"] for m in metas) if cfg.mode == "document" else len(metas),
                "skipped_documents": num_skipped,
                "stream_record_separator": "\\n\\n" if cfg.mode == "stream" else None},
        shards=shards, identity=ident, shard_format=SHARD_FORMAT,
        build={"shard_rows": cfg.shard_rows, "unit_tokens": cfg.unit_tokens, "row_group_rows": cfg.row_group_rows,
               "num_units": len(units), "device": device,
               "stage_end_seconds": {k: round(v, 2) for k, v in stage_ends.items()},
               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": _versions()})
    manifest.validate()
    return manifest


def commit_manifest(storage: Storage, lease: Lease, manifest: Manifest) -> None:
    """Write manifest.json (fenced by the lease), then drop what only an unfinished build needs."""
    lease.check()  # fencing: only the lease holder commits
    maybe_fault("commit", 0)      # tests: the driver dies just before the manifest is written
    storage.write_text(MANIFEST, manifest.to_json())
    maybe_fault("commit", 1)      # tests: ... just after it, before the clean-up below
    # the manifest is the truth now: drop progress records and shards no manifest lists
    listed = {s["path"] for s in manifest.shards}
    for p in storage.list(KEY_SHARDS_DIR):
        if p not in listed:
            storage.delete(p)
    storage.delete_prefix(UNITS_DIR)
    storage.delete(BUILD_REQUEST)
    storage.cleanup_incomplete()  # uploads abandoned by workers that died during this run


def _versions() -> dict:
    return package_versions(("knnlm-datastore", "torch", "transformers", "tokenizers", "pyarrow", "ray"))

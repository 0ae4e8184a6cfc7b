"""`knnlm train-index`: a uniform sample of the datastore's keys → a trained, empty FAISS index.

    index/trained-<sha256[:12]>.faiss   the trained index (a plain FAISS file: faiss.read_index)
    manifest.json `index`               {path, factory, metric, train_size, seed, sample_checksum,
                                         checksum, ...}

The file's name carries its checksum, so a retrain (`--force`) writes a new file, switches the
manifest to it atomically, and only then deletes the old index and the index shards built from
it: a run killed at any point leaves a manifest that points at a complete, matching index.
Rerunning with the same parameters does nothing; different parameters are refused unless --force.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from builder.config import ConfigError, TrainConfig
from builder.errors import KnnlmError
from builder.index import (
    check_factory,
    check_train_size,
    fastscan_factory,
    index_from_bytes,
    index_to_bytes,
    metric_name,
    quantization_error,
    resolve_backend,
    train_index,
)
from builder.key_shards import checksum
from builder.layout import INDEX_DIR, INDEX_LEASE, INDEX_WORK_DIR, trained_index_path
from builder.lease import Lease
from builder.manifest import Manifest, ManifestError, load_manifest, package_versions, write_manifest
from builder.runtime import ClusterError, cluster_resources, max_node_cpus, ray_session
from builder.sample import sample_checksum, sample_keys
from builder.storage import NotFound, Storage

log = logging.getLogger(__name__)

# what a rerun must match (field → flag)
TRAIN_IDENTITY = {"factory": "--index-factory", "metric": "--metric", "train_size": "--train-size",
                  "seed": "--seed", "read_factor": "--read-factor"}
QERR_KEYS = 20000  # keys of the sample on which the quantization error is reported


class IndexBuildError(KnnlmError, RuntimeError):
    """An index stage failed for a reason stated in the message; nothing partial was committed."""


@dataclass
class TrainResult:
    manifest: Manifest
    already_done: bool = False
    seconds: float = 0.0
    stats: dict | None = None

    def summary(self) -> str:
        ix = self.manifest.index
        if self.already_done:
            return (f"the index is already trained ({ix['factory']}, {ix['metric']}, {ix['train_size']:,} keys, "
                    f"seed {ix['seed']}): {ix['path']}; nothing to do")
        return (f"trained {ix['factory']} ({ix['metric']}) on {ix['train_size']:,} sampled keys with "
                f"{ix['trainer']} on {ix['device']} in {self.seconds:.1f}s "
                f"(sample {ix['seconds']['sample']:.1f}s, train {ix['seconds']['train']:.1f}s): {ix['path']}")


def drop_index_files(storage: Storage, keep: set[str]) -> int:
    """Delete everything under index/ and _index/ (but the lease) that is not in `keep`."""
    n = 0
    for p in storage.list(INDEX_DIR) + storage.list(INDEX_WORK_DIR):
        if p not in keep and p != INDEX_LEASE:
            storage.delete(p)
            n += 1
    return n


def _want(cfg: TrainConfig, n_train: int) -> dict:
    return {"factory": cfg.index_factory, "metric": cfg.metric, "train_size": n_train, "seed": cfg.seed,
            "read_factor": cfg.read_factor}


def _diffs(have: dict, want: dict) -> list[str]:
    return [f"{k} ({TRAIN_IDENTITY[k]}): the index has {have.get(k)!r}, this run asks for {want[k]!r}"
            for k in TRAIN_IDENTITY if have.get(k) != want[k]]


def train_stage(cfg: TrainConfig) -> TrainResult:
    """Sample, train and commit the index (or do nothing / refuse, see the module docstring)."""
    t0 = time.perf_counter()
    storage = Storage.from_uri(cfg.datastore)
    m = load_manifest(storage)
    info = check_factory(cfg.index_factory, m.dim, cfg.metric)
    n_train = min(cfg.train_size, m.num_keys)
    check_train_size(info, n_train, m.num_keys, cfg.min_points_per_centroid)
    backend, device = resolve_backend(cfg.trainer, cfg.device, "--trainer", info.fastscan)
    want = _want(cfg, n_train)
    if m.index and not cfg.force:
        diffs = _diffs(m.index, want)
        if not diffs:
            if not storage.exists(m.index["path"]):
                raise IndexBuildError(f"{storage.url(m.index['path'])}, the trained index the manifest lists, is "
                                      "missing: rerun with --force to train it again")
            return TrainResult(m, already_done=True)
        n_shards = len(m.index_shards or [])
        raise ConfigError(f"{storage.uri} already has a trained index with different settings: " +
                          "; ".join(diffs) + ". Rerun with the original settings, or add --force to retrain "
                          f"(which also drops the {n_shards} index shards built from the old index).")

    with Lease(storage, cfg.lease_ttl, INDEX_LEASE, "index build") as lease:
        m = load_manifest(storage)  # as of now, under the lease
        if cfg.threads:
            import faiss
            faiss.omp_set_num_threads(cfg.threads)
        t_sample = time.perf_counter()
        ids, keys = sample_keys(storage, m, n_train, cfg.seed, cfg.read_factor)
        x = keys.astype(np.float32)                                   # (n, dim) fp32 for faiss/torch
        if not np.isfinite(x).all():
            bad = int(ids[~np.isfinite(x).all(1)][0])
            raise IndexBuildError(f"key {bad} of {storage.uri} is not finite: the datastore is corrupted "
                                  f"(run `knnlm verify {storage.uri}`)")
        digest = sample_checksum(ids, keys)
        del keys
        t_train = time.perf_counter()
        index = train_index(x, cfg.index_factory, cfg.metric, cfg.seed, backend, device)
        t_done = time.perf_counter()
        qerr = quantization_error(index, x[:: max(1, len(x) // QERR_KEYS)][:QERR_KEYS])
        data = index_to_bytes(index)
        index_checksum = checksum(data)
        path = trained_index_path(index_checksum)
        storage.write_bytes(path, data)
        retrained = m.index is not None
        m.index = want | {
            "path": path, "sample_checksum": digest, "checksum": index_checksum, "bytes": len(data), "dim": m.dim,
            "nlist": info.nlist, "code_size": info.code_size, "trainer": backend, "device": device,
            "quantization": {k: round(v, 6) for k, v in qerr.items()},
            "seconds": {"sample": round(t_train - t_sample, 2), "train": round(t_done - t_train, 2)},
            "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": _versions()}
        m.index_shards = None
        m.index_merged = None
        lease.check()  # fencing: only the lease holder commits
        write_manifest(storage, m)
        dropped = drop_index_files(storage, {path})
        if retrained:
            log.info("retrained: dropped the old index and %d files built from it", dropped)
    log.info("index quantization error on %d sampled keys: coarse %.4g, reconstruction %.4g (mean |x|^2 %.4g)",
             min(len(x), QERR_KEYS), qerr["coarse_mse"], qerr["reconstruction_mse"], qerr["mean_sq_norm"])
    return TrainResult(m, seconds=time.perf_counter() - t0, stats=qerr)


def train_on_cluster(cfg: TrainConfig, address: str | None):
    """Run `train_stage` as one Ray task on the cluster at `address` (on a GPU node when the
    cluster has GPUs): the sample is read and the index trained there, not on the driver."""
    import ray

    with ray_session(address):
        cpus, gpus = cluster_resources()
        want_gpu = (gpus > 0 and cfg.device in ("auto", "cuda") and cfg.trainer != "faiss"
                    and not fastscan_factory(cfg.index_factory))   # fast-scan trains on the CPU
        if cfg.device == "cuda" and gpus == 0:
            raise ClusterError("--device cuda: the Ray cluster has no GPUs")
        task = ray.remote(train_stage).options(num_cpus=min(cfg.threads or max_node_cpus(), max_node_cpus()),
                                               num_gpus=1 if want_gpu else 0, max_retries=5)
        try:
            return ray.get(task.remote(cfg))
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if e.cause is not None else e
            if isinstance(cause, (ConfigError, ManifestError, IndexBuildError, ValueError, RuntimeError)):
                raise cause from None
            raise IndexBuildError(f"train-index failed on the cluster: {type(cause).__name__}: {cause}") from None


def load_trained_index(storage: Storage, m: Manifest):
    """The manifest's trained index, checked: present, checksum, dim and metric."""
    if not m.index:
        raise IndexBuildError(f"{storage.uri} has no trained index: run `knnlm train-index {storage.uri}` first")
    try:
        data = storage.read_bytes(m.index["path"])
    except NotFound:
        raise IndexBuildError(f"{storage.url(m.index['path'])}, the trained index the manifest lists, is missing: "
                              f"rerun `knnlm train-index {storage.uri} --force`") from None
    if checksum(data) != m.index["checksum"]:
        raise IndexBuildError(f"{storage.url(m.index['path'])} does not match the manifest's checksum (corrupted or "
                              f"replaced): rerun `knnlm train-index {storage.uri} --force`")
    index = index_from_bytes(data, storage.url(m.index["path"]))
    if index.d != m.dim:
        raise ManifestError(f"{storage.url(m.index['path'])} indexes vectors of dim {index.d}, but the datastore's "
                            f"keys have dim {m.dim}")
    if metric_name(index.metric_type) != m.index["metric"]:
        raise ManifestError(f"{storage.url(m.index['path'])} uses metric {metric_name(index.metric_type)}, the "
                            f"manifest says {m.index['metric']}")
    return index


def _versions() -> dict:
    return package_versions(("knnlm-datastore", "faiss-cpu", "faiss-gpu-cu12", "torch", "numpy"))


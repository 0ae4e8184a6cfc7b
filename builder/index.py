"""The FAISS index core: validate a factory, train it on a sample, encode keys into it.

Pure functions over numpy arrays and faiss indexes; builder/train.py and builder/add.py
wrap them with storage, the manifest and Ray.

Trainers and encoders (`auto` picks the first that applies):
- `faiss-gpu`: faiss's own GPU k-means / GPU add, when faiss was built with GPU support;
- `torch`: the coarse and PQ k-means, the coarse assignment and the PQ codes in torch
  (builder/torch_train.py, builder/torch_encoder.py) on a CUDA GPU, loaded into the faiss
  index (faiss-gpu wheels are tied to CUDA versions and often missing on a cluster); also runs
  on the CPU, which tests use;
- `faiss`: faiss on the CPU.
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from builder.config import METRICS, TRAINERS, ConfigError
from builder.index_files import (  # noqa: F401 - names of this module's API too
    _PQ,
    IndexFileError,
    faiss_gpus,
    fastscan_factory,
    file_sha256,
    index_from_bytes,
    index_to_bytes,
    is_fastscan,
    read_index_file,
)
from builder.torch_encoder import TorchEncoder
from builder.torch_train import train_index_torch

log = logging.getLogger(__name__)

MIN_POINTS_PER_CENTROID = 39  # faiss warns below this many training points per centroid


def faiss_metric(metric: str) -> int:
    import faiss
    return {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}[metric]


def metric_name(metric_type: int) -> str:
    import faiss
    return {faiss.METRIC_L2: "l2", faiss.METRIC_INNER_PRODUCT: "ip"}.get(metric_type, str(metric_type))


@dataclass
class FactoryInfo:
    factory: str
    nlist: int
    pq_m: int | None = None        # product quantizer sub-quantizers (IVF-PQ)
    pq_nbits: int | None = None
    code_size: int = 0             # bytes per vector in the inverted lists (without the id)
    fastscan: bool = False         # "PQ<M>x4fs": 4-bit PQ scanned with SIMD lookups (faiss, CPU only)


_IVF = re.compile(r"^IVF(\d+)(_.*)?$")
_OPQ = re.compile(r"^OPQ(\d+)(?:_(\d+))?$")
_PCA = re.compile(r"^PCAW?R?(\d+)$")


def check_factory(factory: str, dim: int, metric: str) -> FactoryInfo:
    """Validate an index factory string against the datastore's dim before any work.

    Raises ConfigError naming --index-factory: a PQ whose sub-quantizers do not divide the
    (transformed) dim, an index without an IVF layer (shards need its inverted lists), or
    anything faiss itself rejects."""
    import faiss

    if metric not in METRICS:
        raise ConfigError(f"--metric: unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    flag = f"--index-factory {factory}"
    parts = [p.strip() for p in factory.split(",")]
    d = dim
    nlist = pq_m = pq_nbits = None
    fastscan = False
    for p in parts:
        if mo := _OPQ.match(p):
            m_, d_out = int(mo.group(1)), int(mo.group(2) or d)
            if d % m_:
                raise ConfigError(f"{flag}: OPQ{m_} needs a dim divisible by {m_}, but the datastore's keys have "
                                  f"dim {d}")
            d = d_out
        elif mo := _PCA.match(p):
            d = int(mo.group(1))
        elif mo := _IVF.match(p):
            nlist = int(mo.group(1))
        elif mo := _PQ.match(p):
            pq_m, pq_nbits = int(mo.group(1)), int(mo.group(2) or 8)
            fastscan = (mo.group(3) or "").startswith("fs")
            if d % pq_m:
                divisors = [m for m in (8, 16, 32, 48, 64, 96, 128) if d % m == 0]
                raise ConfigError(f"{flag}: PQ{pq_m} needs the vector dim to be divisible by {pq_m}, but it is {d}"
                                  f" (the datastore's dim {dim}" + (" after the transform)" if d != dim else ")") +
                                  (f"; PQ{divisors[-1]} or PQ{divisors[0]} would fit" if divisors else ""))
    if nlist is None:
        raise ConfigError(f"{flag}: the index needs an IVF layer (e.g. IVF4096,PQ64 or IVF1024,Flat): index shards "
                          "are ranges of global ids in its inverted lists, searched and merged shard by shard")
    try:
        index = faiss.index_factory(dim, factory, faiss_metric(metric))
    except RuntimeError as e:
        msg = str(e).split("Error:", 1)[-1].strip().splitlines()[0]
        raise ConfigError(f"{flag}: faiss cannot build it for dim {dim}: {msg}") from None
    ivf = faiss.extract_index_ivf(index)
    return FactoryInfo(factory, nlist, pq_m, pq_nbits, int(ivf.code_size), fastscan)


def check_train_size(info: FactoryInfo, n_train: int, num_keys: int,
                     min_points_per_centroid: int = MIN_POINTS_PER_CENTROID) -> None:
    """Refuse a sample too small for the k-means: say how many keys are needed and suggest an
    nlist that fits."""
    need = info.nlist * min_points_per_centroid
    if n_train < need:
        fit = 2 ** int(math.floor(math.log2(max(n_train // max(min_points_per_centroid, 1), 1))))
        new = re.sub(r"IVF\d+", f"IVF{fit}", info.factory, count=1)
        src = (f"the datastore has only {num_keys:,} keys" if n_train == num_keys
               else f"--train-size is {n_train:,}")
        raise ConfigError(
            f"--index-factory {info.factory}: {info.nlist:,} IVF centroids need at least {need:,} training keys "
            f"({min_points_per_centroid} per centroid, --min-points-per-centroid), but {src}: use "
            f"--index-factory {new} (nlist {fit:,} fits {n_train:,} keys)" +
            ("" if n_train == num_keys else f" or a larger --train-size (up to {num_keys:,})"))
    if info.pq_nbits is not None and n_train < 2 ** info.pq_nbits:
        raise ConfigError(f"--index-factory {info.factory}: PQ with {info.pq_nbits} bits trains "
                          f"{2 ** info.pq_nbits} centroids per sub-quantizer and needs at least that many training "
                          f"keys, but has {n_train:,}")


# ---------------------------------------------------------------------------------------------
# training


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def resolve_backend(choice: str, device: str, flag: str, fastscan: bool = False) -> tuple[str, str]:
    """(backend, torch device) for a --trainer/--encoder choice and a --device.

    Fast-scan indexes (…x4fs) are trained and encoded by faiss on the CPU: neither faiss's GPU
    indexes nor the torch path know their blocked code layout."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device: choose one of auto, cpu, cuda (got {device!r})")
    if fastscan:
        if choice in ("auto", "faiss"):
            return "faiss", "cpu"
        raise ConfigError(f"{flag} {choice}: a fast-scan index (PQ<M>x4fs) is trained and encoded by faiss on the "
                          f"CPU; use {flag} faiss or auto")
    gpu_ok = device in ("auto", "cuda")
    if choice == "auto":
        if gpu_ok and faiss_gpus() > 0:
            return "faiss-gpu", "cuda"
        if gpu_ok and _cuda():
            return "torch", "cuda"
        if device == "cuda":
            raise ConfigError("--device cuda: no CUDA GPU is visible here")
        return "faiss", "cpu"
    if choice == "faiss-gpu" and faiss_gpus() == 0:
        raise ConfigError(f"{flag} faiss-gpu: this faiss has no GPU support (install the `gpu` extra, "
                          f"or use {flag} torch)")
    if choice == "torch":
        if device == "cuda" and not _cuda():
            raise ConfigError("--device cuda: no CUDA GPU is visible to torch here")
        return "torch", ("cuda" if gpu_ok and _cuda() else "cpu")
    if choice not in TRAINERS:
        raise ConfigError(f"{flag}: choose one of {', '.join(TRAINERS)} (got {choice!r})")
    return choice, ("cuda" if choice == "faiss-gpu" else "cpu")


def new_index(factory: str, dim: int, metric: str, seed: int):
    """An untrained index with every k-means seeded by `seed`.

    Polysemous training (a Hamming-order permutation of the PQ centroids, which the factory turns
    on for "PQ<M>" and only polysemous search uses) is off: it cost 10-20x the PQ training itself
    here and changes no search result of ours."""
    import faiss
    index = faiss.index_factory(dim, factory, faiss_metric(metric))
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.seed = seed
    if hasattr(ivf, "pq"):
        ivf.pq.cp.seed = seed
    if hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False
    return index


def train_index(x: np.ndarray, factory: str, metric: str, seed: int, backend: str = "faiss",
                device: str = "cpu"):
    """A trained, empty index from the (n, d) float32 sample `x`."""
    import faiss
    index = new_index(factory, x.shape[1], metric, seed)
    t0 = time.perf_counter()
    if backend == "faiss":
        index.train(x)
    elif backend == "faiss-gpu":
        gpu = faiss.index_cpu_to_all_gpus(index)
        gpu.train(x)
        index = faiss.index_gpu_to_cpu(gpu)
    elif backend == "torch":
        train_index_torch(index, x, device=device, seed=seed)
    else:
        raise ValueError(f"unknown trainer {backend!r}")
    log.info("trained %s on %d keys with %s (%s) in %.1fs", factory, len(x), backend, device, time.perf_counter() - t0)
    return index


def apply_pretransform(index, x: np.ndarray) -> np.ndarray:
    """x (n, d) float32 through the index's pre-transforms (OPQ, PCA), if any."""
    import faiss
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexPreTransform):
        for i in range(idx.chain.size()):
            x = faiss.downcast_VectorTransform(idx.chain.at(i)).apply(np.ascontiguousarray(x))
    return x


def quantization_error(index, x: np.ndarray) -> dict:
    """Mean squared distance of x (n, d) float32 to its coarse centroid and to its decoded code:
    how well an index fits the keys (lower is better; compare trainers on the same x)."""
    import faiss
    ivf = faiss.extract_index_ivf(index)
    xt = apply_pretransform(index, x)                               # (n, d') as the IVF sees it
    _, assign = ivf.quantizer.search(np.ascontiguousarray(xt), 1)
    cent = ivf.quantizer.reconstruct_batch(assign[:, 0])
    coarse = float(np.mean(((xt - cent) ** 2).sum(1)))
    recon = float(np.mean(((x - index.sa_decode(index.sa_encode(x))) ** 2).sum(1)))
    return {"coarse_mse": coarse, "reconstruction_mse": recon, "mean_sq_norm": float(np.mean((x ** 2).sum(1)))}


# ---------------------------------------------------------------------------------------------
# encoding


class Encoder:
    """Adds (ids, keys) batches to a copy of a trained index with one backend."""

    def __init__(self, trained, backend: str = "faiss", device: str = "cpu"):
        import faiss
        self.backend, self.device = backend, device
        self.index = faiss.clone_index(trained)
        if backend == "faiss-gpu":
            self.res = faiss.StandardGpuResources()
            self.gpu = faiss.index_cpu_to_gpu(self.res, 0, self.index)
        elif backend == "torch":
            self.torch = TorchEncoder(trained, device)   # centroids stay on the device across batches

    def add(self, ids: np.ndarray, keys: np.ndarray) -> None:
        """ids (n,) int64 global ids; keys (n, d) float16 or float32."""
        import faiss
        x = np.ascontiguousarray(keys, dtype=np.float32)          # (n, d) fp32: faiss's input type
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if self.backend == "faiss":
            self.index.add_with_ids(x, ids)
        elif self.backend == "faiss-gpu":
            self.gpu.add_with_ids(x, ids)
        elif self.backend == "torch":
            codes = self.torch.encode(x)                                 # (n, sa_code_size) uint8
            faiss.extract_index_ivf(self.index).add_sa_codes(codes, ids)
        else:
            raise ValueError(f"unknown encoder {self.backend!r}")

    def result(self):
        """The filled index (on the CPU)."""
        import faiss
        if self.backend == "faiss-gpu":
            self.index = faiss.index_gpu_to_cpu(self.gpu)
        return self.index


def add_batches(trained, batches: Iterable[tuple[np.ndarray, np.ndarray]], backend: str = "faiss",
                device: str = "cpu"):
    """A copy of `trained` holding every (ids, keys) batch, encoded with `backend`."""
    enc = Encoder(trained, backend, device)
    for ids, keys in batches:
        enc.add(ids, keys)
    return enc.result()


# ---------------------------------------------------------------------------------------------
# files


def ivf_contents(index) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{list number: (ids (n,) int64, codes (n, code_size) uint8)} of the non-empty lists: what
    an index holds, independent of the order of the adds."""
    import faiss
    ivf = faiss.extract_index_ivf(index)
    inv = ivf.invlists
    packer = ivf.get_CodePacker() if is_fastscan(index) else None   # blocks of 32 interleaved 4-bit codes
    out = {}
    for lst in range(ivf.nlist):
        n = inv.list_size(lst)
        if n == 0:
            continue
        ids = faiss.rev_swig_ptr(inv.get_ids(lst), n).copy()
        if packer is None:
            codes = faiss.rev_swig_ptr(inv.get_codes(lst), n * inv.code_size).reshape(n, inv.code_size).copy()
        else:
            blocks = -(-n // packer.nvec)
            raw = faiss.rev_swig_ptr(inv.get_codes(lst), blocks * packer.block_size).copy()
            codes = np.empty((blocks, packer.nvec, packer.code_size), np.uint8)
            for b in range(blocks):                                 # unpack_all unpacks one block
                packer.unpack_all(faiss.swig_ptr(raw[b * packer.block_size:]), faiss.swig_ptr(codes[b]))
            codes = codes.reshape(-1, packer.code_size)[:n]
        out[lst] = (ids, codes)
    return out

"""`--trainer torch`: an untrained faiss IVF index trained like `index.train(x)`, with the k-means in torch.

The coarse k-means and the PQ sub-quantizers' k-means (batched over the sub-spaces) run in
builder/kmeans.py on a CUDA GPU, or on the CPU; the centroids are loaded back into the faiss
index, so search, `add_sa_codes` and index IO stay faiss.

What is reproduced from faiss (IndexIVF.cpp, IndexIVFPQ.cpp, impl/ProductQuantizer.cpp):

- IndexIVF.train: the coarse k-means uses the index's `cp` (niter 10, spherical and
  inner-product assignment for METRIC_INNER_PRODUCT); a quantizer that is already trained is kept;
- the PQ is trained on the residuals of at most `pq.cp.max_points_per_centroid * ksub` vectors
  (rand_perm(n, 1234) subsample), each sub-quantizer with `pq.cp` (niter 25); polysemous
  training (faiss, CPU) when the index asks for it; `precompute_table()` when by_residual;
- pre-transforms (OPQ, PCA, ...) are trained by faiss on CPU (IndexPreTransform::train order),
  then applied in torch; a trained one is kept.
"""
from __future__ import annotations

import logging
import time

import faiss
import numpy as np
import torch

from builder.kmeans import exact_fp32, lloyd, nearest, subsample
from builder.torch_ivf import TorchTransform, coarse_quantizer, flat_centroids, transformed_batches, unwrap

logger = logging.getLogger(__name__)


def train_index_torch(index, x: np.ndarray, device: str = "cpu", seed: int = 1234) -> None:
    """Train an untrained IVF index in place like `index.train(x)`, with the k-means in torch.

    index: from faiss.index_factory(d, "IVF<nlist>,Flat" | "IVF<nlist>,PQ<M>[x<nbits>]" |
    "OPQ<M>[_<d2>],IVF<nlist>,PQ<M>" | "PCA<d2>,IVF..." ..., METRIC_L2 | METRIC_INNER_PRODUCT).
    x: (n, d) training vectors. `seed` stands for faiss's default seed 1234 everywhere (coarse
    and PQ clustering, the PQ training subsample): with 1234 the random choices are faiss's own.
    Pre-transforms are trained by faiss on CPU. Unsupported index types raise ValueError.
    """
    outer, chain, ivf = unwrap(index, "train_index_torch")
    dev = torch.device(device)
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != outer.d:
        raise ValueError(f"train_index_torch: expected (n, {outer.d}) training vectors, got {x.shape}")
    t0 = time.time()
    with exact_fp32(), torch.no_grad():
        # pre-transforms: each trained by faiss on the output of the ones before it, applied in torch
        if chain:
            x = np.ascontiguousarray(x, dtype=np.float32)
            for vt in chain:
                if not vt.is_trained:
                    logger.info("training %s on %d vectors (faiss, CPU)", type(vt).__name__, x.shape[0])
                    vt.train(x)
                x = np.concatenate([xb.cpu().numpy() for _, xb in
                                    transformed_batches(x, [TorchTransform(vt, dev)], dev, 65536)])
        _train_ivf(ivf, x, dev, seed)
        outer.is_trained = True
    logger.info("trained %s in %.1f s on %s", type(ivf).__name__, time.time() - t0, dev)


def _stage(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """Training vectors on the device, or left in host memory (chunks copied per pass) when
    they would take more than half of the free GPU memory."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if t.nbytes > free // 2:
            logger.info("training vectors (%.1f GB) stay in host memory; chunks go to %s on each pass",
                        t.nbytes / 1e9, device)
            return t
    return t.to(device)


def _cp_checks(cp, what: str) -> None:
    """Clustering options the torch path does not reproduce."""
    init = getattr(cp, "init_method", 0)  # newer faiss; older versions only have random init
    if init != getattr(faiss, "ClusteringInitMethod_RANDOM", 0):
        raise ValueError(f"{what}: init_method {init} (only RANDOM is reproduced); use the faiss trainer")
    for opt in ("int_centroids", "use_faster_subsampling", "use_super_kmeans", "frozen_centroids"):
        if getattr(cp, opt, False):
            raise ValueError(f"{what}: ClusteringParameters.{opt} is not reproduced; use the faiss trainer")


def _lloyd_cp(x: torch.Tensor, k: int, cp, seed: int, ip: bool, dev: torch.device) -> torch.Tensor:
    """lloyd() with a faiss ClusteringParameters' settings: x (M, n, d) → (M, k, d) on dev."""
    return lloyd(x, k, cp.niter, seed, bool(cp.spherical), ip, dev, cp.nredo,
                 getattr(cp, "early_stop_threshold", 0.0))  # older faiss has no early stop


def _train_ivf(ivf, x: np.ndarray, dev: torch.device, seed: int) -> None:
    """IndexIVF::train: Level1Quantizer::train_q1, then train_encoder on a subsample."""
    n, d = x.shape
    nlist = ivf.nlist
    q, ip = coarse_quantizer(ivf)
    qta = ivf.quantizer_trains_alone
    if (ord(qta) if isinstance(qta, str) else int(qta)) != 0:
        raise ValueError(f"train_index_torch: quantizer_trains_alone={qta!r} is not reproduced; use the faiss trainer")

    if q.is_trained and q.ntotal == nlist:
        logger.info("IVF quantizer does not need training")
        centroids = torch.from_numpy(flat_centroids(q)).to(dev)
    else:
        cp = ivf.cp
        _cp_checks(cp, "IVF coarse quantizer")
        if n < nlist:
            raise ValueError(f"IVF{nlist} needs at least {nlist} training vectors, got {n}")
        keep = subsample(n, nlist * cp.max_points_per_centroid, seed)
        xs = _stage(x if keep is None else x[keep], dev)  # (n', d)
        logger.info("training the level-1 quantizer: %d vectors in %dD to %d lists (%s)",
                    xs.shape[0], d, nlist, "inner product, spherical" if ip else "L2")
        centroids = _lloyd_cp(xs.unsqueeze(0), nlist, cp, seed, ip, dev)[0]  # (nlist, d)
        del xs
        q.reset()
        q.add(np.ascontiguousarray(centroids.cpu().numpy()))
        q.is_trained = True

    if isinstance(ivf, faiss.IndexIVFPQ):
        _train_pq(ivf, x, centroids, ip, dev, seed)
    ivf.is_trained = True


def _train_pq(ivf, x: np.ndarray, centroids: torch.Tensor, ip: bool, dev: torch.device, seed: int) -> None:
    """IndexIVFPQ::train_encoder on residuals of (a subsample of) x; centroids (nlist, d) on dev."""
    pq = ivf.pq
    M, ksub, dsub = pq.M, pq.ksub, pq.dsub
    _cp_checks(pq.cp, "PQ")
    keep = subsample(x.shape[0], pq.cp.max_points_per_centroid * ksub, seed)  # fvecs_maybe_subsample
    xt = torch.from_numpy(np.ascontiguousarray(x if keep is None else x[keep], dtype=np.float32)).to(dev)
    n = xt.shape[0]
    if n < ksub:
        raise ValueError(f"PQ{M}x{pq.nbits} needs at least {ksub} training vectors, got {n}")
    if ivf.by_residual:
        a = nearest(xt.unsqueeze(0), centroids.unsqueeze(0), ip)[0]
        xt = xt - centroids[a]  # (n, d) residuals
    logger.info("training PQ%dx%d on %d %s", M, pq.nbits, n, "residuals" if ivf.by_residual else "vectors")
    sub = xt.view(n, M, dsub).transpose(0, 1)  # (M, n, dsub), a view: chunks are gathered per pass
    pc = _lloyd_cp(sub, ksub, pq.cp, seed, False, dev)  # (M, ksub, dsub); PQ sub-spaces are always L2
    faiss.copy_array_to_vector(np.ascontiguousarray(pc.cpu().numpy()).ravel(), pq.centroids)
    if ivf.do_polysemous_training:
        pt = ivf.polysemous_training if ivf.polysemous_training is not None else faiss.PolysemousTraining()
        logger.info("polysemous training of the PQ (faiss, CPU)")
        xr = np.ascontiguousarray(xt.cpu().numpy())
        pt.optimize_pq_for_hamming(pq, n, faiss.swig_ptr(xr))
    if ivf.by_residual:
        ivf.precompute_table()

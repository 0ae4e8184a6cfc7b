"""The torch path for FAISS IVF indexes: k-means, training and encoding in torch.

Used when faiss-gpu is not installed: the heavy parts of `index.train(x)` and `index.sa_encode(x)`
(the coarse k-means, the PQ sub-quantizer k-means, the coarse assignment, PQ encoding) run in
torch on a CUDA GPU, or on CPU. Results are loaded back into the faiss index, so search,
`add_sa_codes` and index IO stay faiss.

What is reproduced from faiss (Clustering.cpp, impl/ClusteringHelpers.cpp, IndexIVF.cpp,
IndexIVFPQ.cpp, impl/ProductQuantizer.cpp):

- Clustering: more than k * max_points_per_centroid points → the first ones of
  `faiss.rand_perm(n, seed)`; initial centroids = rows `rand_perm(n, seed + 1)[:k]`; Lloyd
  iterations; an empty cluster takes a copy of a large one with a symmetric (1 ± 1/1024)
  perturbation, donors drawn with faiss's own random stream; `spherical` renormalises the
  centroids after init and after every update and assigns by inner product (like faiss.Kmeans);
  a run stops when its objective changes by at most cp.early_stop_threshold (0: not at all)
  or its assignment no longer changes. Same seed → same subsample and same initial centroids.
- IndexIVF.train: the coarse k-means uses the index's `cp` (niter 10, spherical and
  inner-product assignment for METRIC_INNER_PRODUCT); the PQ is trained on the residuals of
  at most `pq.cp.max_points_per_centroid * ksub` vectors (rand_perm(n, 1234) subsample),
  each sub-quantizer with `pq.cp` (niter 25); polysemous training (faiss, CPU) when the
  index asks for it; `precompute_table()` when by_residual.
- Pre-transforms (OPQ, PCA, ...) are trained by faiss on CPU, then applied in torch.

Not bit-exact: sums are accumulated in float64 in another order and distances come from
another GEMM, so centroids agree with faiss to float rounding, and a point almost equidistant
from two centroids may be assigned differently.
"""
from __future__ import annotations

import contextlib
import logging
import time

import faiss
import numpy as np
import torch

logger = logging.getLogger(__name__)

# Budget for one chunk of the (rows, k) float32 distance matrix.
DIST_CHUNK_BYTES = 1 << 30
# faiss split_clusters: "a bit above machine epsilon for float16".
_EPS = 1.0 / 1024.0
# faiss Clustering: seed offset between redos.
_REDO_SEED_STRIDE = 15486557


# ------------------------------------------------------------------ helpers


@contextlib.contextmanager
def _exact_fp32():
    """Full fp32 matmuls: TF32 (if a caller enabled it) would move near-tie assignments."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


def _rand_perm(n: int, seed: int, head: int) -> np.ndarray:
    """The first `head` entries of faiss.rand_perm(n, seed), int64: the rows faiss's Clustering
    and fvecs_maybe_subsample draw."""
    if n > np.iinfo(np.int32).max:
        raise ValueError(f"{n} training points: faiss's rand_perm handles at most 2**31 - 1; subsample first")
    perm = np.empty(n, dtype=np.int32)
    faiss.rand_perm(faiss.swig_ptr(perm), n, int(seed))
    return perm[:head].astype(np.int64)


def _subsample(n: int, nmax: int, seed: int) -> np.ndarray | None:
    """Rows faiss keeps when it caps a training set at nmax (None: all of them)."""
    if n <= nmax:
        return None
    logger.info("sampling %d / %d training points", nmax, n)
    return _rand_perm(n, seed, nmax)


class _FaissRandom:
    """The stream of faiss::RandomGenerator(seed).rand_float().

    faiss uses std::mt19937 seeded with (uint32)seed; numpy's legacy RandomState seeds its
    MT19937 the same way, so the raw 32-bit outputs are equal. rand_float = raw / 2**32 in float32.
    """

    def __init__(self, seed: int):
        _, key, pos, *_ = np.random.RandomState(seed & 0xFFFFFFFF).get_state()
        self._bits = np.random.MT19937()
        self._bits.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": pos}}
        self._buf = np.empty(0, np.float32)

    def peek(self, n: int) -> np.ndarray:
        """The next n floats, not consumed."""
        if self._buf.size < n:
            raw = self._bits.random_raw(max(n - self._buf.size, 4096))
            self._buf = np.concatenate([self._buf, raw.astype(np.float32) / np.float32(2.0**32)])
        return self._buf[:n]

    def skip(self, n: int) -> None:
        self._buf = self._buf[n:]


def _split_plan(counts: np.ndarray, n: int) -> list[tuple[int, int]]:
    """faiss detail::split_clusters, the bookkeeping part.

    counts: (k,) float32 cluster sizes (faiss's `hassign`), updated in place. For each empty
    cluster ci in order, walk cj = 0, 1, ... drawing r until r < (counts[cj] - 1) / (n - k)
    (at most 10 k draws, then the largest cluster); ci gets half of cj's points.
    Returns the (ci, cj) pairs: ci becomes a perturbed copy of cj.
    """
    k = counts.size
    empty = np.flatnonzero(counts == 0)
    if empty.size == 0:
        return []
    rng = _FaissRandom(1234)
    denom = np.float64(np.float32(n - k))
    pairs = []
    for ci in empty:
        p = ((counts.astype(np.float64) - 1.0) / denom).astype(np.float32)  # (k,) split probability
        cj = -1
        for _ in range(10):  # 10 sweeps over the clusters = faiss's max_tries (10 k)
            hit = np.flatnonzero(rng.peek(k) < p)
            if hit.size:
                cj = int(hit[0])
                rng.skip(cj + 1)
                break
            rng.skip(k)
        if cj < 0:
            cj = int(np.argmax(counts))
        pairs.append((int(ci), cj))
        counts[ci] = counts[cj] / np.float32(2)
        counts[cj] -= counts[ci]
    return pairs


def _apply_splits(c: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
    """c (k, d): c[ci] = c[cj] * (1 ± eps), c[cj] *= (1 ∓ eps), alternating over dimensions."""
    if not pairs:
        return
    d = c.shape[1]
    up = torch.full((d,), 1 + _EPS, dtype=c.dtype, device=c.device)
    up[1::2] = 1 - _EPS
    down = torch.full((d,), 1 - _EPS, dtype=c.dtype, device=c.device)
    down[1::2] = 1 + _EPS
    for ci, cj in pairs:  # in order: a donor may be split twice
        c[ci] = c[cj] * up
        c[cj] *= down


def _renorm(c: torch.Tensor) -> torch.Tensor:
    """faiss fvec_renorm_L2 on the last dimension (zero rows stay zero)."""
    nr = (c * c).sum(-1, keepdim=True)
    inv = torch.where(nr > 0, 1.0 / torch.sqrt(nr), torch.ones_like(nr))
    return c * inv


def _accumulate(sums: torch.Tensor, ids: torch.Tensor, x: torch.Tensor, sort: bool | None = None) -> None:
    """sums[ids[i]] += x[i]; sums (K, d) float64, ids (B,) int64, x (B, d) float32.

    Deterministic on every device. CPU index_add_ is sequential; CUDA index_add_ uses float
    atomics whose order varies, so there: sort by id, float64 prefix sums, differences at the
    segment ends, then one add per distinct id.
    """
    if sort is None:
        sort = sums.device.type != "cpu"
    if not sort:  # float32 within the chunk (as faiss does): CPU index_add_ is slow in float64
        sums += torch.zeros(sums.shape, dtype=x.dtype).index_add_(0, ids, x)
        return
    ids_sorted, order = torch.sort(ids, stable=True)
    cs = x.index_select(0, order).double().cumsum_(0)  # (B, d) float64
    uniq, cnt = torch.unique_consecutive(ids_sorted, return_counts=True)
    ends = cnt.cumsum(0) - 1  # last row of each id's segment
    seg = cs.index_select(0, ends)
    seg[1:] -= cs.index_select(0, ends[:-1])
    sums.index_add_(0, uniq, seg)


def _nearest_block(xb: torch.Tensor, c: torch.Tensor, cn: torch.Tensor | None, ip: bool):
    """xb (M, B, d), c (M, k, d), cn (M, k) = ||c||^2 → best (M, B), idx (M, B) int64.

    L2: argmin of ||c||^2 - 2 x·c (||x||^2 is constant per row; best is the full distance).
    IP: argmax of x·c (faiss IndexFlatIP).
    """
    if ip:
        return torch.bmm(xb, c.transpose(1, 2)).max(2)
    dis = torch.baddbmm(cn.unsqueeze(1), xb, c.transpose(1, 2), alpha=-2.0)  # (M, B, k)
    best, idx = dis.min(2)
    best = (best + (xb * xb).sum(2)).clamp_min_(0)  # faiss clamps roundoff negatives
    return best, idx


def _rows_per_chunk(m: int, k: int, d: int) -> int:
    """Rows per pass so that the (M, B, k) float32 distances plus the chunk's copies (float32
    vectors, float64 prefix sums) stay within DIST_CHUNK_BYTES."""
    return max(1, DIST_CHUNK_BYTES // (4 * m * (k + 4 * d)))


def _nearest(x: torch.Tensor, c: torch.Tensor, ip: bool) -> torch.Tensor:
    """x (M, n, d) on any device, c (M, k, d) on the compute device → (M, n) int64 there."""
    m, n, d = x.shape
    cn = None if ip else (c * c).sum(2)
    bs = _rows_per_chunk(m, c.shape[1], d)
    out = torch.empty((m, n), dtype=torch.int64, device=c.device)
    for i0 in range(0, n, bs):
        xb = x[:, i0:i0 + bs].to(c.device, torch.float32)
        out[:, i0:i0 + bs] = _nearest_block(xb, c, cn, ip)[1]
    return out


# ------------------------------------------------------------------ k-means


def _lloyd(x: torch.Tensor, k: int, niter: int, seed: int, spherical: bool, ip: bool,
           device: torch.device, nredo: int = 1, early_stop: float = 0.0) -> torch.Tensor:
    """M independent faiss Clustering runs on already-subsampled data.

    x: (M, n, d) on any device (chunks are copied to `device`) → (M, k, d) float32 on `device`.
    A run stops (its centroids freeze) when its objective changes by at most `early_stop`
    (relative; faiss's early_stop_threshold) or its assignment did not change at all.
    """
    m, n, d = x.shape
    if n == k:  # faiss: "just copying" the training set, no iteration, no renormalisation
        return x.to(device, torch.float32, copy=True)
    if n < k * 39:
        logger.warning("clustering %d points to %d centroids: please provide at least %d training points",
                       n, k, k * 39)
    t0 = time.time()
    bs = _rows_per_chunk(m, k, d)
    offsets = (torch.arange(m, device=device) * k).unsqueeze(1)  # (M, 1): flat cluster id = m*k + j
    best_obj = best_c = None
    it, obj = -1, torch.zeros(m, dtype=torch.float64, device=device)
    for redo in range(nredo):
        init = torch.from_numpy(_rand_perm(n, seed + 1 + redo * _REDO_SEED_STRIDE, k))
        c = x[:, init.to(x.device)].to(device, torch.float32, copy=True)  # (M, k, d)
        if spherical:
            c = _renorm(c)
        prev = torch.full((m, n), -1, dtype=torch.int32, device=device)  # last assignment
        done = torch.zeros(m, dtype=torch.bool, device=device)  # runs that have stopped
        prev_obj = None
        for it in range(niter):
            cn = None if ip else (c * c).sum(2)  # (M, k)
            sums = torch.zeros((m * k, d), dtype=torch.float64, device=device)
            counts = torch.zeros(m * k, dtype=torch.int64, device=device)
            obj = torch.zeros(m, dtype=torch.float64, device=device)
            changed = torch.zeros(m, dtype=torch.bool, device=device)
            for i0 in range(0, n, bs):
                xb = x[:, i0:i0 + bs].to(device, torch.float32)  # (M, B, d)
                best, a = _nearest_block(xb, c, cn, ip)  # (M, B)
                obj += best.sum(1, dtype=torch.float64)
                a32 = a.to(torch.int32)
                changed |= (a32 != prev[:, i0:i0 + bs]).any(1)
                prev[:, i0:i0 + bs] = a32
                flat = (a + offsets).reshape(-1)
                counts += torch.bincount(flat, minlength=m * k)
                _accumulate(sums, flat, xb.reshape(-1, d))
            cnt = counts.view(m, k, 1).double()
            c_new = torch.where(cnt > 0, sums.view(m, k, d) / cnt.clamp_min(1), 0).float()
            nsplit = 0
            if bool((counts == 0).any()):
                cnt_np = counts.view(m, k).cpu().numpy().astype(np.float32)
                for j in range(m):
                    pairs = _split_plan(cnt_np[j], n)
                    _apply_splits(c_new[j], pairs)
                    nsplit += len(pairs)
            if spherical:
                c_new = _renorm(c_new)
            c = torch.where(done.view(m, 1, 1), c, c_new)
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("k-means iteration %d: objective %.6g, %d splits", it, obj.sum().item(), nsplit)
            # faiss: stop when |obj - prev_obj| <= early_stop_threshold * |prev_obj|; an unchanged
            # assignment is a fixed point (further passes would change nothing)
            stop = ~changed
            if prev_obj is not None:
                stop |= (prev_obj != 0) & ((obj - prev_obj).abs() <= early_stop * prev_obj.abs())
            done |= stop
            prev_obj = obj
            if bool(done.all()):
                break
        if nredo > 1:  # keep the best run per sub-space (objective of its last assignment pass)
            if best_obj is None:
                best_obj, best_c = obj, c
            else:
                better = obj > best_obj if ip else obj < best_obj
                best_obj = torch.where(better, obj, best_obj)
                best_c = torch.where(better.view(m, 1, 1), c, best_c)
    if nredo > 1:
        c = best_c
    logger.info("k-means: %d x %d points in %dD to %d centroids, %d iterations, objective %.6g, %.1f s",
                m, n, d, k, it + 1, obj.sum().item(), time.time() - t0)
    return c


def _check_float_tensor(x: torch.Tensor, ndim: int, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != ndim or not x.is_floating_point():
        raise ValueError(f"{name}: expected a {ndim}-D floating point torch.Tensor")


def kmeans(x: torch.Tensor, k: int, niter: int = 25, seed: int = 1234, max_points_per_centroid: int = 256,
           spherical: bool = False, nredo: int = 1) -> torch.Tensor:
    """faiss.Kmeans(d, k, niter=niter, seed=seed, ...) in torch.

    x: (n, d) float on any device → (k, d) float32 centroids on x.device. Deterministic for a
    given seed and device. `spherical`: unit-norm centroids, assignment by inner product.
    """
    _check_float_tensor(x, 2, "kmeans")
    return kmeans_batched(x.unsqueeze(0), k, niter, seed, max_points_per_centroid, spherical, nredo)[0]


def kmeans_batched(x: torch.Tensor, k: int, niter: int = 25, seed: int = 1234,
                   max_points_per_centroid: int = 256, spherical: bool = False, nredo: int = 1) -> torch.Tensor:
    """M independent k-means at once (the sub-spaces of a product quantizer), batched matmuls.

    x: (M, n, dsub) → (M, k, dsub) float32 on x.device; sub-space m gives what kmeans(x[m]) gives
    (faiss's ProductQuantizer trains every sub-space with the same seed).
    """
    _check_float_tensor(x, 3, "kmeans_batched")
    n = x.shape[1]
    if n < k:
        raise ValueError(f"k-means with k={k} needs at least {k} training points, got {n}")
    keep = _subsample(n, k * max_points_per_centroid, seed)
    if keep is not None:
        x = x.index_select(1, torch.from_numpy(keep).to(x.device))
    with _exact_fp32(), torch.no_grad():
        return _lloyd(x, k, niter, seed, spherical, spherical, x.device, nredo)


# ------------------------------------------------------------------ faiss index plumbing

_SUPPORTED = "IVF<nlist>,Flat and IVF<nlist>,PQ<M>[x<nbits>][np] with a flat L2/IP quantizer, " \
             "optionally after pre-transforms (OPQ, PCA, RR, L2norm, ...)"

# faiss class → the index_factory part that makes it
_FACTORY_PART = {
    "IndexIVFScalarQuantizer": "SQ<qtype>",
    "IndexIVFPQR": "PQ<M>+<M2>",
    "IndexIVFPQFastScan": "PQ<M>x4fs",
    "IndexIVFFlatDedup": "FlatDedup",
    "IndexIVFResidualQuantizer": "RQ",
    "IndexIVFLocalSearchQuantizer": "LSQ",
    "IndexIVFProductResidualQuantizer": "PRQ",
    "IndexIVFProductLocalSearchQuantizer": "PLSQ",
    "IndexIVFSpectralHash": "ITQ,SH",
    "IndexIVFRaBitQ": "RaBitQ",
    "IndexHNSWFlat": "HNSW<M>",
    "IndexFlat": "Flat",
    "IndexPQ": "PQ<M> (no IVF)",
    "IndexRefine": "Refine(...)",
    "IndexRefineFlat": "RFlat",
    "IndexIDMap": "IDMap",
    "IndexIDMap2": "IDMap2",
    "IndexPreTransform": "nested pre-transforms",
}
# coarse quantizer class → the IVF factory part that makes it
_QUANTIZER_PART = {
    "IndexHNSWFlat": "IVF<nlist>_HNSW<M>",
    "IndexNSGFlat": "IVF<nlist>_NSG<R>",
    "MultiIndexQuantizer": "IMI2x<nbits>",
    "IndexResidualQuantizer": "RCQ / IVF<nlist>(RQ...)",
}


def _unsupported(what: object, fn: str, detail: str = "", quantizer: bool = False) -> ValueError:
    name = type(what).__name__
    part = (_QUANTIZER_PART.get(name, f"IVF<nlist>(<{name} quantizer>)") if quantizer
            else _FACTORY_PART.get(name, name))
    return ValueError(f"{fn}: unsupported index part {part!r} ({name}{'; ' + detail if detail else ''}); "
                      f"the torch path handles {_SUPPORTED}. Use the faiss trainer (index.train / "
                      f"index.sa_encode) for this index.")


def _unwrap(index, fn: str):
    """index → (outer index, [VectorTransform], IndexIVFFlat | IndexIVFPQ), checked."""
    outer = faiss.downcast_index(index)
    chain = []
    inner = outer
    if isinstance(outer, faiss.IndexPreTransform):
        chain = [faiss.downcast_VectorTransform(outer.chain.at(i)) for i in range(outer.chain.size())]
        inner = faiss.downcast_index(outer.index)
    if type(inner) not in (faiss.IndexIVFFlat, faiss.IndexIVFPQ):
        raise _unsupported(inner, fn)
    ivf = inner
    if ivf.metric_type not in (faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT):
        raise _unsupported(ivf, fn, f"metric {ivf.metric_type}, only L2 and INNER_PRODUCT")
    q = faiss.downcast_index(ivf.quantizer)
    if type(q) not in (faiss.IndexFlat, faiss.IndexFlatL2, faiss.IndexFlatIP) or \
            q.metric_type not in (faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT):
        raise _unsupported(q, fn, "the coarse quantizer must be a flat L2 or IP index", quantizer=True)
    if isinstance(ivf, faiss.IndexIVFPQ) and ivf.pq.train_type != faiss.ProductQuantizer.Train_default:
        raise _unsupported(ivf, fn, f"ProductQuantizer train_type {ivf.pq.train_type}")
    return outer, chain, ivf


def _flat_centroids(q) -> np.ndarray:
    return q.reconstruct_n(0, q.ntotal)  # (ntotal, d) float32


class _Transform:
    """A trained faiss VectorTransform applied in torch (LinearTransform: y = x A^T + b;
    L2 NormalizationTransform), or by faiss on CPU for the other kinds."""

    def __init__(self, vt, device: torch.device):
        self.vt = vt
        self.kind = "faiss"
        if isinstance(vt, faiss.LinearTransform):
            self.kind = "linear"
            self.A = torch.from_numpy(faiss.vector_to_array(vt.A).reshape(vt.d_out, vt.d_in)).to(device)
            self.b = torch.from_numpy(faiss.vector_to_array(vt.b)).to(device) if vt.have_bias else None
        elif isinstance(vt, faiss.NormalizationTransform) and vt.norm == 2.0:
            self.kind = "l2norm"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (B, d_in) → (B, d_out) float32
        if self.kind == "linear":
            return x @ self.A.T if self.b is None else torch.addmm(self.b, x, self.A.T)
        if self.kind == "l2norm":
            return _renorm(x)
        return torch.from_numpy(self.vt.apply(np.ascontiguousarray(x.cpu().numpy()))).to(x.device)


def _apply_chain(chain: list[_Transform], x: np.ndarray, device: torch.device, batch_size: int = 65536) -> np.ndarray:
    """x (n, d_in) float32 → (n, d_out) float32, in torch on device, by batches."""
    if not chain:
        return x
    out = []
    for i0 in range(0, x.shape[0], batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[i0:i0 + batch_size], dtype=np.float32)).to(device)
        for t in chain:
            xb = t(xb)
        out.append(xb.cpu().numpy())
    return np.concatenate(out)


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


# ------------------------------------------------------------------ training


def train_index_torch(index, x: np.ndarray, device: str = "cpu", seed: int = 1234) -> None:
    """Train an untrained IVF index in place like `index.train(x)`, with the k-means in torch.

    index: from faiss.index_factory(d, "IVF<nlist>,Flat" | "IVF<nlist>,PQ<M>[x<nbits>]" |
    "OPQ<M>[_<d2>],IVF<nlist>,PQ<M>" | "PCA<d2>,IVF..." ..., METRIC_L2 | METRIC_INNER_PRODUCT).
    x: (n, d) training vectors. `seed` stands for faiss's default seed 1234 everywhere (coarse
    and PQ clustering, the PQ training subsample): with 1234 the random choices are faiss's own.
    Pre-transforms are trained by faiss on CPU. Unsupported index types raise ValueError.
    """
    outer, chain, ivf = _unwrap(index, "train_index_torch")
    dev = torch.device(device)
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != outer.d:
        raise ValueError(f"train_index_torch: expected (n, {outer.d}) training vectors, got {x.shape}")
    t0 = time.time()
    with _exact_fp32(), torch.no_grad():
        # pre-transforms: trained by faiss (IndexPreTransform::train order), applied in torch
        if chain:
            x = np.ascontiguousarray(x, dtype=np.float32)
            for vt in chain:
                if not vt.is_trained:
                    logger.info("training %s on %d vectors (faiss, CPU)", type(vt).__name__, x.shape[0])
                    vt.train(x)
                x = _apply_chain([_Transform(vt, dev)], x, dev)
        _train_ivf(ivf, x, dev, seed)
        outer.is_trained = True
    logger.info("trained %s in %.1f s on %s", type(ivf).__name__, time.time() - t0, dev)


def _train_ivf(ivf, x: np.ndarray, dev: torch.device, seed: int) -> None:
    """IndexIVF::train: Level1Quantizer::train_q1, then train_encoder on a subsample."""
    n, d = x.shape
    nlist = ivf.nlist
    q = faiss.downcast_index(ivf.quantizer)
    ip = q.metric_type == faiss.METRIC_INNER_PRODUCT
    qta = ivf.quantizer_trains_alone
    if (ord(qta) if isinstance(qta, str) else int(qta)) != 0:
        raise ValueError(f"train_index_torch: quantizer_trains_alone={qta!r} is not reproduced; use the faiss trainer")

    if q.is_trained and q.ntotal == nlist:
        logger.info("IVF quantizer does not need training")
        centroids = torch.from_numpy(_flat_centroids(q)).to(dev)
    else:
        cp = ivf.cp
        _cp_checks(cp, "IVF coarse quantizer")
        if n < nlist:
            raise ValueError(f"IVF{nlist} needs at least {nlist} training vectors, got {n}")
        keep = _subsample(n, nlist * cp.max_points_per_centroid, seed)
        xs = _stage(x if keep is None else x[keep], dev)  # (n', d)
        logger.info("training the level-1 quantizer: %d vectors in %dD to %d lists (%s)",
                    xs.shape[0], d, nlist, "inner product, spherical" if ip else "L2")
        centroids = _lloyd(xs.unsqueeze(0), nlist, cp.niter, seed, bool(cp.spherical), ip, dev, cp.nredo,
                           getattr(cp, "early_stop_threshold", 0.0))[0]
        del xs
        q.reset()
        q.add(np.ascontiguousarray(centroids.cpu().numpy()))
        q.is_trained = True

    if isinstance(ivf, faiss.IndexIVFPQ):
        _train_pq(ivf, x, centroids, ip, dev, seed)
    ivf.is_trained = True


def _train_pq(ivf, x: np.ndarray, centroids: torch.Tensor, ip: bool, dev: torch.device, seed: int) -> None:
    """IndexIVFPQ::train_encoder on residuals of (a subsample of) x."""
    pq = ivf.pq
    M, ksub, dsub = pq.M, pq.ksub, pq.dsub
    _cp_checks(pq.cp, "PQ")
    keep = _subsample(x.shape[0], pq.cp.max_points_per_centroid * ksub, seed)  # fvecs_maybe_subsample
    xt = torch.from_numpy(np.ascontiguousarray(x if keep is None else x[keep], dtype=np.float32)).to(dev)
    n = xt.shape[0]
    if n < ksub:
        raise ValueError(f"PQ{M}x{pq.nbits} needs at least {ksub} training vectors, got {n}")
    if ivf.by_residual:
        a = _nearest(xt.unsqueeze(0), centroids.unsqueeze(0), ip)[0]
        xt = xt - centroids[a]  # (n, d) residuals
    logger.info("training PQ%dx%d on %d %s", M, pq.nbits, n, "residuals" if ivf.by_residual else "vectors")
    sub = xt.view(n, M, dsub).transpose(0, 1)  # (M, n, dsub), a view: chunks are gathered per pass
    pc = _lloyd(sub, ksub, pq.cp.niter, seed, bool(pq.cp.spherical), False, dev, pq.cp.nredo,
                getattr(pq.cp, "early_stop_threshold", 0.0))  # (M, ksub, dsub)
    faiss.copy_array_to_vector(np.ascontiguousarray(pc.cpu().numpy()).ravel(), pq.centroids)
    if ivf.do_polysemous_training:
        pt = ivf.polysemous_training if ivf.polysemous_training is not None else faiss.PolysemousTraining()
        logger.info("polysemous training of the PQ (faiss, CPU)")
        xr = np.ascontiguousarray(xt.cpu().numpy())
        pt.optimize_pq_for_hamming(pq, n, faiss.swig_ptr(xr))
    if ivf.by_residual:
        ivf.precompute_table()


# ------------------------------------------------------------------ encoding


def _pack_codes(codes: np.ndarray, nbits: int) -> np.ndarray:
    """(B, M) sub-quantizer indices → (B, ceil(M nbits / 8)) uint8, faiss PQEncoderGeneric order
    (code m at bit m*nbits of a little-endian bit stream)."""
    if nbits == 8:
        return codes.astype(np.uint8)
    bits = (codes[:, :, None] >> np.arange(nbits)) & 1  # (B, M, nbits), LSB first
    return np.packbits(bits.reshape(codes.shape[0], -1).astype(np.uint8), axis=1, bitorder="little")


class TorchEncoder:
    """A trained IVF index's encoder on a torch device: vectors → faiss standalone codes.

    Holds the transforms, coarse centroids and PQ centroids on `device`, so repeated calls
    (one per datastore shard) do not copy them again.
    """

    def __init__(self, index, device: str = "cpu"):
        outer, chain, ivf = _unwrap(index, "encode_torch")
        if not (outer.is_trained and ivf.is_trained):
            raise ValueError("encode_torch: the index is not trained")
        self.device = dev = torch.device(device)
        self.d = outer.d
        self.chain = [_Transform(vt, dev) for vt in chain]
        q = faiss.downcast_index(ivf.quantizer)
        self.ip = q.metric_type == faiss.METRIC_INNER_PRODUCT
        self.centroids = torch.from_numpy(_flat_centroids(q)).to(dev)  # (nlist, d)
        self.coarse_size = ivf.coarse_code_size()
        self.pq = None
        if isinstance(ivf, faiss.IndexIVFPQ):
            pq = ivf.pq
            self.pq = torch.from_numpy(faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)).to(dev)
            self.nbits = pq.nbits
            self.by_residual = bool(ivf.by_residual)
        self.code_size = outer.sa_code_size()
        assert self.code_size == self.coarse_size + ivf.code_size

    def _batches(self, x: np.ndarray, batch_size: int):
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"expected (n, {self.d}) vectors, got {x.shape}")
        for i0 in range(0, x.shape[0], batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[i0:i0 + batch_size], dtype=np.float32)).to(self.device)
            for t in self.chain:
                xb = t(xb)
            yield i0, xb, _nearest(xb.unsqueeze(0), self.centroids.unsqueeze(0), self.ip)[0]

    def assign(self, x: np.ndarray, batch_size: int = 65536) -> np.ndarray:
        """(n, d) → (n,) int64 inverted list numbers (quantizer.assign after the pre-transforms)."""
        out = np.empty(len(x), dtype=np.int64)
        with _exact_fp32(), torch.no_grad():
            for i0, _, a in self._batches(x, batch_size):
                out[i0:i0 + len(a)] = a.cpu().numpy()
        return out

    def encode(self, x: np.ndarray, batch_size: int = 65536) -> np.ndarray:
        """(n, d) → (n, sa_code_size) uint8, equal to index.sa_encode(x)."""
        out = np.empty((len(x), self.code_size), dtype=np.uint8)
        with _exact_fp32(), torch.no_grad():
            for i0, xb, a in self._batches(x, batch_size):
                rows = slice(i0, i0 + len(a))
                # list number: coarse_code_size() little-endian bytes
                out[rows, :self.coarse_size] = a.cpu().numpy().astype("<i8").view(np.uint8).reshape(-1, 8)[
                    :, :self.coarse_size]
                if self.pq is None:  # IVF-Flat: the raw float32 vector
                    out[rows, self.coarse_size:] = xb.cpu().numpy().astype("<f4").view(np.uint8)
                    continue
                r = xb - self.centroids[a] if self.by_residual else xb  # (B, d)
                M, _, dsub = self.pq.shape
                sub = r.view(-1, M, dsub).transpose(0, 1)  # (M, B, dsub)
                codes = _nearest(sub, self.pq, False).T  # (B, M)
                out[rows, self.coarse_size:] = _pack_codes(codes.cpu().numpy(), self.nbits)
        return out


def encode_torch(index, x: np.ndarray, device: str = "cpu", batch_size: int = 65536) -> np.ndarray:
    """index.sa_encode(x) computed in torch on `device`: (n, d) → (n, index.sa_code_size()) uint8.

    Codes are the list number (coarse_code_size() bytes, little-endian) then the flat vector
    (IVF-Flat) or the PQ code of the residual (IVF-PQ), after any pre-transform; add them with
    faiss.extract_index_ivf(index).add_sa_codes(codes, ids).
    """
    return TorchEncoder(index, device).encode(x, batch_size)


def assign_torch(index, x: np.ndarray, device: str = "cpu", batch_size: int = 65536) -> np.ndarray:
    """(n, d) → (n,) int64 inverted list of each vector, computed in torch on `device`."""
    return TorchEncoder(index, device).assign(x, batch_size)

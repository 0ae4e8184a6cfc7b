"""faiss's k-means (faiss::Clustering) in torch, on a CUDA GPU or on the CPU.

The k-means of the torch trainer (builder/torch_train.py: the coarse quantizer, the PQ
sub-quantizers batched over the sub-spaces) and the nearest-centroid search the torch encoder
(builder/torch_encoder.py) shares with it. It exists because faiss-gpu wheels are tied to CUDA
versions and are often missing on a cluster.

What is reproduced from faiss (Clustering.cpp, impl/ClusteringHelpers.cpp):

- more than k * max_points_per_centroid points → the first ones of `faiss.rand_perm(n, seed)`;
- initial centroids = rows `rand_perm(n, seed + 1)[:k]`; Lloyd iterations;
- an empty cluster takes a copy of a large one with a symmetric (1 ± 1/1024) perturbation,
  donors drawn with faiss's own random stream;
- `spherical` renormalises the centroids after init and after every update and assigns by inner
  product (like faiss.Kmeans);
- a run stops when its objective changes by at most cp.early_stop_threshold (0: not at all) or
  its assignment no longer changes; `nredo` keeps the best run.

Same seed → same subsample and same initial centroids. Not bit-exact: sums are accumulated in
float64 in another order and distances come from another GEMM, so centroids agree with faiss to
float rounding, and a point almost equidistant from two centroids may be assigned differently.

Why not faiss.contrib.clustering.kmeans with a torch DatasetAssign (the faiss.contrib.torch
pattern): it draws its initial centroids and split donors with numpy's RandomState (not faiss's
rand_perm / RandomGenerator), does not subsample, has no spherical mode (needed for inner-product
indexes), nredo or early stop, and runs one k-means at a time: M sequential runs for a product
quantizer. bench/bench_kmeans.py (2 CPU cores, 2026-12-01, bench/results/kmeans-cpu-2026-12-01*.json):
same quantization error within 1% in every case; time 0.75x ours on tests' 10k x 32 to 32,
0.61x on 200k x 256 to 1024 (one run), but 1.87x on 8 PQ sub-spaces (batched here). Replacing
this one would lose faiss's init and splits (the trainer's documented contract) and the PQ
batching, so it stays.
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


# ------------------------------------------------------------------ faiss's random choices


def _rand_perm(n: int, seed: int, head: int) -> np.ndarray:
    """The first `head` entries of faiss.rand_perm(n, seed), int64: the rows faiss's Clustering
    and fvecs_maybe_subsample draw."""
    if n > np.iinfo(np.int32).max:
        raise ValueError(f"{n} training points: faiss's rand_perm handles at most 2**31 - 1; subsample first")
    perm = np.empty(n, dtype=np.int32)
    faiss.rand_perm(faiss.swig_ptr(perm), n, int(seed))
    return perm[:head].astype(np.int64)


def subsample(n: int, nmax: int, seed: int) -> np.ndarray | None:
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


# ------------------------------------------------------------------ nearest centroid, sums


@contextlib.contextmanager
def exact_fp32():
    """Full fp32 matmuls: TF32 (if a caller enabled it) would move near-tie assignments."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


def renorm(c: torch.Tensor) -> torch.Tensor:
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


def nearest(x: torch.Tensor, c: torch.Tensor, ip: bool) -> torch.Tensor:
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


def lloyd(x: torch.Tensor, k: int, niter: int, seed: int, spherical: bool, ip: bool,
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
            c = renorm(c)
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
                c_new = renorm(c_new)
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
    keep = subsample(n, k * max_points_per_centroid, seed)
    if keep is not None:
        x = x.index_select(1, torch.from_numpy(keep).to(x.device))
    with exact_fp32(), torch.no_grad():
        return lloyd(x, k, niter, seed, spherical, spherical, x.device, nredo)

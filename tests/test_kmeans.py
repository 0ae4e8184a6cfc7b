"""The torch path for FAISS IVF indexes against faiss itself: k-means (builder/kmeans.py), training
(builder/torch_train.py) and encoding (builder/torch_encoder.py).

Small seeded Gaussian mixtures; faiss-trained reference indexes are built once per module.
"""
from __future__ import annotations

import functools

import faiss
import numpy as np
import pytest
import torch

from builder import kmeans as km
from builder.kmeans import kmeans, kmeans_batched
from builder.torch_encoder import assign_torch, encode_torch
from builder.torch_train import train_index_torch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
N, D = 10000, 32
L2, IP = faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT

# a cheap polysemous training, shared by the faiss and torch trainers (the default one takes ~15 s here)
_PT = faiss.PolysemousTraining()
_PT.n_iter = 20000
_PT.n_redo = 1


@functools.lru_cache(None)
def gmm(n: int = N, d: int = D, seed: int = 0) -> np.ndarray:
    """(n, d) float32: 100 anisotropic Gaussian blobs."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(100, d)) * 3
    scales = rng.uniform(0.5, 2.0, size=d)
    return (centers[rng.integers(0, 100, n)] + rng.normal(size=(n, d)) * scales).astype(np.float32)


def sq_err(x: np.ndarray, c: np.ndarray) -> float:
    """Mean squared distance to the nearest centroid."""
    return float(faiss.knn(x, np.ascontiguousarray(c), 1)[0].mean())


def same_rows(a: np.ndarray, b: np.ndarray, dim: int, tol: float = 1e-4) -> float:
    """Fraction of centroids (rows of `dim` values) equal to float rounding. Not all of them:
    a near-tie assigned the other way (another GEMM, another summation order) moves a few."""
    a, b = a.reshape(-1, dim), b.reshape(-1, dim)
    return float(np.mean(np.abs(a - b).max(1) <= tol))


def make_index(factory: str, metric: int):
    index = faiss.index_factory(D, factory, metric)
    if isinstance(index, faiss.IndexPreTransform):
        vt = faiss.downcast_VectorTransform(index.chain.at(0))
        if isinstance(vt, faiss.OPQMatrix):  # fewer OPQ iterations: its faiss training dominates otherwise
            vt.niter, vt.niter_pq_0 = 4, 10
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if getattr(ivf, "do_polysemous_training", False):
        ivf.polysemous_training = _PT
    return index


@functools.lru_cache(None)
def faiss_trained(factory: str, metric: int):
    index = make_index(factory, metric)
    index.train(gmm())
    return index


@functools.lru_cache(None)
def torch_trained(factory: str, metric: int, device: str):
    index = make_index(factory, metric)
    train_index_torch(index, gmm(), device=device)
    return index


def transformed(index, x: np.ndarray) -> np.ndarray:
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            x = index.chain.at(i).apply(x)
    return x


def coarse_error(index, x: np.ndarray) -> float:
    """Mean squared distance of each (transformed) vector to the centroid of its list."""
    q = faiss.extract_index_ivf(index).quantizer
    xt = transformed(index, x)
    _, a = q.search(xt, 1)
    return float(((xt - q.reconstruct_n(0, q.ntotal)[a[:, 0]]) ** 2).sum(1).mean())


def recon_error(index, x: np.ndarray) -> float:
    return float(np.mean(((x - index.sa_decode(index.sa_encode(x))) ** 2).sum(1)))


def copy_index(index):
    return faiss.deserialize_index(faiss.serialize_index(index))  # clone_index lacks some transforms


def add_codes(index, codes: np.ndarray):
    """A copy of index with codes added through add_sa_codes (ids 0..n-1)."""
    out = copy_index(index)
    ivf = faiss.extract_index_ivf(out)
    ivf.add_sa_codes(codes, np.arange(len(codes), dtype=np.int64))
    out.ntotal = ivf.ntotal
    return out


def add_vectors(index, x: np.ndarray):
    out = copy_index(index)
    out.add(x)
    return out


def search(index, q: np.ndarray, k: int = 10):
    faiss.extract_index_ivf(index).nprobe = 8
    return index.search(q, k)


# ------------------------------------------------------------------ kmeans


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spherical", [False, True])
def test_kmeans_matches_faiss(device, spherical):
    x = gmm()
    # k=32: 10000 > 32 * 256 points, so the faiss subsample path runs too
    ref = faiss.Kmeans(D, 32, niter=25, seed=1234, spherical=spherical)
    ref.train(x)
    c = kmeans(torch.from_numpy(x).to(device), 32, spherical=spherical)
    assert c.shape == (32, D) and c.dtype == torch.float32 and c.device.type == device
    c = c.cpu().numpy()
    if spherical:
        np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1, rtol=1e-5)
        ours, theirs = (x @ c.T).max(1).mean(), (x @ ref.centroids.T).max(1).mean()
        assert ours >= 0.97 * theirs, (ours, theirs)
    else:
        ours, theirs = sq_err(x, c), sq_err(x, ref.centroids)
        assert ours <= 1.03 * theirs, (ours, theirs)
    if device == "cpu":  # same subsample, same initial points, same updates
        assert same_rows(c, ref.centroids, D) >= 0.9


@pytest.mark.parametrize("device", DEVICES)
def test_kmeans_deterministic(device):
    x = torch.from_numpy(gmm(3000)).to(device)
    a, b = kmeans(x, 50, niter=10), kmeans(x, 50, niter=10)
    assert torch.equal(a, b)
    assert not torch.equal(a, kmeans(x, 50, niter=10, seed=4321))


def test_kmeans_needs_k_points():
    with pytest.raises(ValueError, match="at least 100 training points, got 99"):
        kmeans(torch.randn(99, 4), 100)
    with pytest.raises(ValueError, match="at least 100 training points"):
        kmeans_batched(torch.randn(2, 99, 4), 100)


@pytest.mark.parametrize("device", DEVICES)
def test_kmeans_batched_matches_single(device):
    x = torch.from_numpy(gmm(4000).reshape(4000, 4, 8).transpose(1, 0, 2).copy()).to(device)  # (4, 4000, 8)
    cb = kmeans_batched(x, 64, niter=15)
    assert cb.shape == (4, 64, 8)
    for m in range(4):
        torch.testing.assert_close(cb[m], kmeans(x[m], 64, niter=15), atol=1e-5, rtol=1e-5)
        ref = faiss.Kmeans(8, 64, niter=15, seed=1234)
        xm = x[m].cpu().numpy()
        ref.train(xm)
        assert sq_err(xm, cb[m].cpu().numpy()) <= 1.03 * sq_err(xm, ref.centroids)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_clusters_split_like_faiss(device):
    # 40 distinct points (a third with a little noise) into 64 clusters: duplicate initial
    # centroids, empty clusters, splits
    rng = np.random.default_rng(1)
    base = rng.normal(size=(40, 8))
    noisy = rng.random((3000, 1)) < 0.3
    x = (base[rng.integers(0, 40, 3000)] + noisy * rng.normal(size=(3000, 8)) * 0.3).astype(np.float32)
    ref = faiss.Kmeans(8, 64, niter=25, seed=1234)
    ref.train(x)
    assert sum(s["nsplit"] for s in ref.iteration_stats) > 0
    c = kmeans(torch.from_numpy(x).to(device), 64).cpu().numpy()
    assert sq_err(x, c) <= 1.03 * sq_err(x, ref.centroids)
    if device == "cpu":  # faiss's donor draws reproduced
        assert same_rows(c, ref.centroids, 8) >= 0.9


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_passes_and_fp16_input(device, monkeypatch):
    """A small distance budget (many chunks per pass) gives the same centroids and codes."""
    x = gmm(3000)
    xt = torch.from_numpy(x).to(device)
    whole = kmeans(xt, 40, niter=10)
    index = faiss_trained("IVF64,PQ8np", IP)
    codes = encode_torch(index, x, device=device)
    monkeypatch.setattr(km, "DIST_CHUNK_BYTES", 1 << 16)  # ~90 rows per chunk
    torch.testing.assert_close(kmeans(xt, 40, niter=10), whole, atol=1e-4, rtol=1e-4)
    assert np.mean((encode_torch(index, x, device=device) == codes).all(1)) >= 0.999
    half = kmeans(xt.half(), 40, niter=10)  # fp16 keys: converted chunk by chunk
    assert half.dtype == torch.float32
    assert sq_err(x, half.cpu().numpy()) <= 1.01 * sq_err(x, whole.cpu().numpy())


def test_faiss_random_stream():
    ref = faiss.RandomGenerator(1234)
    expected = np.array([ref.rand_float() for _ in range(5000)], dtype=np.float32)
    rng = km._FaissRandom(1234)
    np.testing.assert_array_equal(rng.peek(3000), expected[:3000])
    rng.skip(1234)
    np.testing.assert_array_equal(rng.peek(5000 - 1234), expected[1234:])


def test_sorted_accumulate_matches_index_add(monkeypatch):
    """The sort + prefix-sum accumulation used off-CPU, checked on CPU."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (5000,), generator=g)
    x = torch.randn(5000, 7, generator=g) * 10
    a = torch.zeros(50, 7, dtype=torch.float64)
    b = torch.zeros(50, 7, dtype=torch.float64)
    km._accumulate(a, ids, x, sort=False)
    km._accumulate(b, ids, x, sort=True)
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-5)

    xs = torch.from_numpy(gmm(3000))
    default = kmeans(xs, 40, niter=10)
    plain = km._accumulate
    monkeypatch.setattr(km, "_accumulate", lambda s, i, v: plain(s, i, v, sort=True))
    torch.testing.assert_close(kmeans(xs, 40, niter=10), default, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ training

TRAIN_CONFIGS = [
    ("IVF64,Flat", L2),
    ("IVF64,PQ8", L2),  # with (cheap) polysemous training, as the factory asks
    ("IVF64,PQ8np", IP),
    ("OPQ8,IVF64,PQ8np", L2),
]
CONFIG_IDS = [f"{f}-{'IP' if m == IP else 'L2'}" for f, m in TRAIN_CONFIGS]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("factory,metric", TRAIN_CONFIGS, ids=CONFIG_IDS)
def test_train_matches_faiss(factory, metric, device):
    x = gmm()
    ref, ours = faiss_trained(factory, metric), torch_trained(factory, metric, device)
    assert ours.is_trained and faiss.extract_index_ivf(ours).is_trained
    ce_ref, ce = coarse_error(ref, x), coarse_error(ours, x)
    re_ref, re = recon_error(ref, x), recon_error(ours, x)
    assert ce <= 1.05 * ce_ref, (ce, ce_ref)
    assert re <= 1.05 * re_ref, (re, re_ref)
    ivf_ref = faiss.downcast_index(faiss.extract_index_ivf(ref))
    ivf = faiss.downcast_index(faiss.extract_index_ivf(ours))
    if isinstance(ivf, faiss.IndexIVFPQ):
        assert ivf.use_precomputed_table == ivf_ref.use_precomputed_table
        assert ivf.precomputed_table.size() == ivf_ref.precomputed_table.size()
    if device == "cpu":  # the same training, to float rounding
        q, q_ref = ivf.quantizer, ivf_ref.quantizer
        assert same_rows(q.reconstruct_n(0, q.ntotal), q_ref.reconstruct_n(0, q_ref.ntotal), q.d) >= 0.9
        if isinstance(ivf, faiss.IndexIVFPQ):  # polysemous training included: same permutation
            assert same_rows(faiss.vector_to_array(ivf.pq.centroids), faiss.vector_to_array(ivf_ref.pq.centroids),
                             ivf.pq.dsub) >= 0.9


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("factory,metric", TRAIN_CONFIGS, ids=CONFIG_IDS)
def test_search_after_add_sa_codes(factory, metric, device):
    x = gmm()
    ours = torch_trained(factory, metric, device)
    by_codes = add_codes(ours, encode_torch(ours, x, device=device))
    by_add = add_vectors(ours, x)
    assert by_codes.ntotal == by_add.ntotal == N
    q = x[:200]
    d1, i1 = search(by_codes, q)
    d2, i2 = search(by_add, q)
    assert np.mean((i1 == i2).all(1)) >= 0.99
    # as good as the faiss-trained index: each query (a stored vector) finds itself
    _, i_ref = search(add_vectors(faiss_trained(factory, metric), x), q)
    self_hits = np.mean((i1 == np.arange(200)[:, None]).any(1))
    ref_hits = np.mean((i_ref == np.arange(200)[:, None]).any(1))
    assert self_hits >= ref_hits - 0.03, (self_hits, ref_hits)


def opq_and_centroids(index) -> tuple[np.ndarray, np.ndarray]:
    """(OPQ matrix A (d_out * d_in,), coarse centroids (nlist, d)) of an OPQ,IVF index."""
    vt = faiss.downcast_VectorTransform(faiss.downcast_index(index).chain.at(0))
    q = faiss.extract_index_ivf(index).quantizer
    return faiss.vector_to_array(vt.A), q.reconstruct_n(0, q.ntotal)


def test_train_with_trained_quantizer_and_pretransform():
    """Trained parts are kept (as faiss does): only the PQ is trained.

    A new index gets the reference's trained OPQ matrix and coarse centroids (a deserialised
    copy would hold a plain LinearTransform, whose train() does nothing), then is trained on the
    reference's training vectors in another order: k-means picks its initial centroids by row
    number, so a retrained OPQ matrix or quantizer would differ from the reference's, while
    the PQ reaches the same error."""
    x = gmm()
    ref = faiss_trained("OPQ8,IVF64,PQ8np", L2)
    opq_ref, centroids_ref = opq_and_centroids(ref)
    index = make_index("OPQ8,IVF64,PQ8np", L2)
    opq = faiss.downcast_VectorTransform(index.chain.at(0))
    assert isinstance(opq, faiss.OPQMatrix)
    faiss.copy_array_to_vector(opq_ref, opq.A)
    opq.set_is_orthonormal()  # what train() sets too: sa_decode inverts by the transpose
    opq.is_trained = True
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.quantizer.add(centroids_ref)
    assert not index.is_trained and not ivf.is_trained
    train_index_torch(index, x[np.random.default_rng(1).permutation(len(x))])
    assert index.is_trained and ivf.is_trained
    opq_ours, centroids_ours = opq_and_centroids(index)
    np.testing.assert_array_equal(opq_ours, opq_ref)
    np.testing.assert_array_equal(centroids_ours, centroids_ref)
    assert abs(recon_error(index, x) - recon_error(ref, x)) <= 0.01 * recon_error(ref, x)


@pytest.mark.parametrize("factory", ["IVF64,SQ8", "IVF64_HNSW32,Flat", "IVF64,PQ8x4fs", "IVF64,PQ4+8",
                                     "HNSW32", "IVF64,RQ2x4"])
def test_unsupported_index_types(factory):
    index = faiss.index_factory(D, factory)
    with pytest.raises(ValueError, match="faiss trainer"):
        train_index_torch(index, gmm(2000))
    with pytest.raises(ValueError, match="faiss trainer"):
        encode_torch(index, gmm(10))


def test_unsupported_metric_and_bad_input():
    with pytest.raises(ValueError, match="metric"):
        train_index_torch(faiss.index_factory(D, "IVF16,Flat", faiss.METRIC_L1), gmm(2000))
    with pytest.raises(ValueError, match=r"\(n, 32\)"):
        train_index_torch(faiss.index_factory(D, "IVF16,Flat"), gmm(2000)[:, :8])
    with pytest.raises(ValueError, match="at least 64 training vectors"):
        train_index_torch(faiss.index_factory(D, "IVF64,Flat"), gmm(50))
    with pytest.raises(ValueError, match="not trained"):
        encode_torch(faiss.index_factory(D, "IVF64,Flat"), gmm(10))


# ------------------------------------------------------------------ encoding

ENCODE_CONFIGS = TRAIN_CONFIGS + [
    ("IVF300,Flat", IP),  # 2-byte list numbers
    ("PCA16,IVF64,PQ4x6np", L2),  # bit-packed 6-bit codes after a PCA
    ("L2norm,IVF64,PQ8x4", IP),  # 4-bit codes, polysemous
]
ENCODE_IDS = [f"{f}-{'IP' if m == IP else 'L2'}" for f, m in ENCODE_CONFIGS]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("factory,metric", ENCODE_CONFIGS, ids=ENCODE_IDS)
def test_encode_matches_sa_encode(factory, metric, device):
    x = gmm()
    index = faiss_trained(factory, metric)
    expected = index.sa_encode(x)
    codes = encode_torch(index, x, device=device, batch_size=3000)  # several batches
    assert codes.dtype == np.uint8 and codes.shape == (N, index.sa_code_size())
    assert np.mean((codes == expected).all(1)) >= 0.999
    _, lists = faiss.extract_index_ivf(index).quantizer.search(transformed(index, x), 1)
    assert np.mean(assign_torch(index, x, device=device) == lists[:, 0]) >= 0.999
    # the codes, added, search like index.add
    q = x[::50]
    d1, i1 = search(add_codes(index, codes), q)
    d2, i2 = search(add_vectors(index, x), q)
    assert np.mean((i1 == i2).all(1)) >= 0.99
    np.testing.assert_allclose(d1[(i1 == i2).all(1)], d2[(i1 == i2).all(1)], rtol=1e-5, atol=1e-4)

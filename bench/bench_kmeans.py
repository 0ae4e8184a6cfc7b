#!/usr/bin/env python
"""Benchmark: our torch k-means (builder/kmeans.py) against faiss's contrib k-means driven by torch.

The question (should the torch trainer use faiss.contrib.clustering.kmeans instead of its own?):
the issue's rule is to switch where the contrib k-means reaches the same quantization error
(within 1%) and speed (within 20%). Every figure is a ratio against our k-means measured in the
same run on the same data (these machines are noisy); absolute figures go to
bench/results/kmeans-<device>-<YYYY-MM-DD>.json with the machine and the load average.

Implementations, each on the same vectors with the same seed and iterations:

- `ours` (the baseline): builder.kmeans.kmeans / kmeans_batched, what `--trainer torch` runs;
- `contrib-torch`: faiss.contrib.clustering.kmeans with a torch-native DatasetAssign (the
  faiss.contrib.torch pattern, with the nearest-centroid search as torch GEMMs, so it runs on
  any torch device); it neither subsamples nor batches sub-spaces, so it gets our subsample
  (faiss's rand_perm rows) and runs one sub-space after the other;
- `contrib-faissknn`: the same with faiss.contrib.torch.clustering.DatasetAssign as shipped
  (faiss.knn on the tensors: faiss's CPU search on CPU tensors, faiss-gpu's on CUDA ones);
- `faiss`: faiss.Kmeans (C++, CPU), the k-means ours reproduces: the reference error.

Cases (--cases): `test` is tests/test_kmeans.py's (10k x 32 to 32 centroids, 25 iterations:
the subsample path); `coarse` is an IVF1024 coarse quantizer on 200k x 256 keys (10
iterations, faiss's IVF default); `pq` is a PQ8 of 64-dim vectors (8 sub-spaces of 8 dims,
256 centroids each, 10k training vectors, 25 iterations): the sub-space shape of
bench_index.py's `--dim 256 --factory IVF1024,PQ32`, with fewer sub-spaces and vectors so that
it runs in a minute on 2 cores. Keys come from builder.synthetic (a mixture of Gaussians).
Quantization error: mean squared distance of every vector to its nearest centroid (for `pq`,
summed over the sub-spaces: the PQ's reconstruction error).

    python bench/bench_kmeans.py --cases test,pq            # best of 2: ~3 min on 2 busy cores
    python bench/bench_kmeans.py --cases coarse --impls contrib-torch --repeats 1
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_build import machine_info  # noqa: E402
from common import write_result  # noqa: E402
from faiss.contrib import clustering as contrib  # noqa: E402
from faiss.contrib.torch import clustering as contrib_torch  # noqa: E402

from builder.kmeans import kmeans, kmeans_batched, subsample  # noqa: E402
from builder.synthetic import synthetic_keys  # noqa: E402

log = logging.getLogger("bench_kmeans")

# name → (n, d, k, niter, sub-spaces M: the k-means runs on d / M-dim slices, one per sub-space)
CASES = {
    "test": (10_000, 32, 32, 25, 1),
    "coarse": (200_000, 256, 1024, 10, 1),
    "pq": (10_000, 64, 256, 25, 8),
}
IMPLS = ("ours", "contrib-torch", "contrib-faissknn", "faiss")
RULE = {True: "met", False: "not met", None: ""}


class TorchDatasetAssign(contrib_torch.DatasetAssign):
    """faiss.contrib.torch's DatasetAssign with the search in torch: x (n, d) float32 on a device."""

    def perform_search(self, centroids: torch.Tensor):
        """→ (D (n, 1) squared distances, I (n, 1) int64), as faiss.knn(x, centroids, 1) gives."""
        cn = (centroids * centroids).sum(1)                   # (k,)
        D = torch.empty(len(self.x), 1, device=self.x.device)
        ind = torch.empty(len(self.x), 1, dtype=torch.int64, device=self.x.device)
        bs = max(1, (1 << 28) // (4 * len(centroids)))        # rows per (rows, k) float32 block: 256 MB
        for i0 in range(0, len(self.x), bs):
            xb = self.x[i0:i0 + bs]
            best, idx = torch.addmm(cn, xb, centroids.T, alpha=-2.0).min(1)
            D[i0:i0 + bs, 0] = (best + (xb * xb).sum(1)).clamp_min_(0)
            ind[i0:i0 + bs, 0] = idx
        return D, ind


def contrib_kmeans(x: torch.Tensor, k: int, niter: int, seed: int, assign_cls) -> torch.Tensor:
    """faiss.contrib.clustering.kmeans on x (n, d) → (k, d) centroids (torch)."""
    with contextlib.redirect_stdout(io.StringIO()):          # it prints "preproc..." unconditionally
        return contrib.kmeans(k, assign_cls(x), niter=niter, seed=seed, verbose=False)


def run(impl: str, x: np.ndarray, k: int, niter: int, m: int, seed: int) -> tuple[np.ndarray, float]:
    """One k-means of x (n, d) → ((M, k, d / M) centroids, seconds)."""
    n, d = x.shape
    sub = np.ascontiguousarray(x.reshape(n, m, d // m).transpose(1, 0, 2))   # (M, n, dsub)
    t0 = time.perf_counter()
    if impl == "ours":
        xt = torch.from_numpy(sub)
        c = (kmeans(xt[0], k, niter, seed) if m == 1 else kmeans_batched(xt, k, niter, seed)).reshape(m, k, -1)
        c = c.numpy()
    elif impl == "faiss":
        out = []
        for j in range(m):
            km = faiss.Kmeans(d // m, k, niter=niter, seed=seed)
            km.train(sub[j])
            out.append(km.centroids)
        c = np.stack(out)
    else:
        cls = TorchDatasetAssign if impl == "contrib-torch" else contrib_torch.DatasetAssign
        keep = subsample(n, k * 256, seed)                    # faiss's subsample; contrib has none
        out = []
        for j in range(m):                                    # contrib: one sub-space at a time
            xj = torch.from_numpy(sub[j] if keep is None else np.ascontiguousarray(sub[j][keep]))
            out.append(contrib_kmeans(xj, k, niter, seed, cls).numpy())
        c = np.stack(out)
    return c, time.perf_counter() - t0


def quantization_error(x: np.ndarray, c: np.ndarray) -> float:
    """x (n, d), c (M, k, d / M) → mean over vectors of the squared distance to the nearest
    centroid, summed over the M sub-spaces."""
    n, d = x.shape
    m = c.shape[0]
    sub = x.reshape(n, m, d // m)
    return float(sum(faiss.knn(np.ascontiguousarray(sub[:, j]), np.ascontiguousarray(c[j]), 1)[0].mean()
                     for j in range(m)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--cases", default="test,coarse,pq", help=f"of {', '.join(CASES)}")
    ap.add_argument("--impls", default=",".join(IMPLS), help="implementations; `ours` is always run")
    ap.add_argument("--repeats", type=int, default=2, help="best of N, order alternated")
    ap.add_argument("--seed", type=int, default=1234, help="k-means seed (faiss's default)")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--result", default=None, help="result file or directory (default bench/results/)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("builder").setLevel(logging.WARNING)
    machine = machine_info("cpu")
    machine["faiss"] = faiss.__version__
    nproc = machine["nproc"]
    torch.set_num_threads(nproc)
    faiss.omp_set_num_threads(nproc)
    load_before = os.getloadavg()
    t_all = time.perf_counter()
    impls = ["ours"] + [i for i in a.impls.split(",") if i and i != "ours"]
    figures: dict = {}
    for case in [c for c in a.cases.split(",") if c]:
        n, d, k, niter, m = CASES[case]
        rng = np.random.default_rng(a.data_seed)
        centers = rng.standard_normal((max(256, k // 4), d), dtype=np.float32)
        x = synthetic_keys(n, d, a.data_seed + 1, centers).astype(np.float32)   # (n, d)
        run("ours", x[:min(n, 20 * k)], k, 2, m, a.seed)                       # warm-up: threads, allocator
        times: dict[str, list[float]] = {i: [] for i in impls}
        errors: dict[str, float] = {}
        for r in range(a.repeats):                                               # alternate: drift hits all alike
            for impl in (impls if r % 2 == 0 else impls[::-1]):
                c, t = run(impl, x, k, niter, m, a.seed)
                times[impl].append(t)
                errors[impl] = quantization_error(x, c)
                log.info("%s %s (repeat %d): %.2f s, error %.6g", case, impl, r + 1, t, errors[impl])
        base_t, base_e = min(times["ours"]), errors["ours"]
        figures[case] = {
            "n": n, "d": d, "k": k, "niter": niter, "subspaces": m, "all_seconds": times,
            "impls": {i: {"seconds": min(times[i]), "quantization_error": errors[i],
                          "time_ratio_vs_ours": min(times[i]) / base_t,
                          "error_ratio_vs_ours": errors[i] / base_e,
                          "within_rule": (bool(errors[i] <= 1.01 * base_e and min(times[i]) <= 1.2 * base_t)
                                          if i.startswith("contrib") else None)}
                      for i in impls}}
    total = time.perf_counter() - t_all
    params = vars(a) | {"threads": nproc, "cases_spec": {c: CASES[c] for c in figures}}
    path, result = write_result("kmeans", "cpu", machine, load_before, params, figures, total, a.result)

    print(f"\n{machine['hostname']}: {nproc} CPUs ({machine['cpu_model']}), torch {machine['torch']}, "
          f"faiss {faiss.__version__}; load {load_before[0]:.2f} before, {result['load_average_after'][0]:.2f} after")
    print("ratios against ours (same run): time (lower is faster), quantization error (lower is better)")
    for case, f in figures.items():
        print(f"\n{case}: {f['n']:,} x {f['d']} to {f['k']} centroids"
              + (f" in {f['subspaces']} sub-spaces" if f["subspaces"] > 1 else "") + f", {f['niter']} iterations")
        print(f"  {'':<18} {'seconds':>8} {'time':>7} {'error':>12} {'error':>7}  rule (1% error, 20% time)")
        for i, v in f["impls"].items():
            print(f"  {i:<18} {v['seconds']:>8.2f} {v['time_ratio_vs_ours']:>7.2f} {v['quantization_error']:>12.6g} "
                  f"{v['error_ratio_vs_ours']:>7.4f}  {RULE[v['within_rule']]}")
    print(f"\nresult: {path} (bench took {total:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

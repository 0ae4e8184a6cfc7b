"""A faiss IVF index as the torch path sees it: its parts checked, its pre-transforms in torch.

Shared by the torch trainer (builder/torch_train.py) and the torch encoder
(builder/torch_encoder.py): both take an index from faiss.index_factory apart into
(outer index, [VectorTransform], IndexIVFFlat | IndexIVFPQ), refuse what they do not reproduce
with a message naming the factory part and the faiss trainer, and apply the trained
pre-transforms (OPQ/PCA matrices, L2 normalisation) in torch on the compute device.
"""
from __future__ import annotations

import faiss
import numpy as np
import torch

from builder.kmeans import renorm

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


def unwrap(index, fn: str):
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
    q, _ = coarse_quantizer(ivf)
    if type(q) not in (faiss.IndexFlat, faiss.IndexFlatL2, faiss.IndexFlatIP) or \
            q.metric_type not in (faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT):
        raise _unsupported(q, fn, "the coarse quantizer must be a flat L2 or IP index", quantizer=True)
    if isinstance(ivf, faiss.IndexIVFPQ) and ivf.pq.train_type != faiss.ProductQuantizer.Train_default:
        raise _unsupported(ivf, fn, f"ProductQuantizer train_type {ivf.pq.train_type}")
    return outer, chain, ivf


def coarse_quantizer(ivf):
    """ivf → (its flat quantizer, downcast; True when it assigns by inner product)."""
    q = faiss.downcast_index(ivf.quantizer)
    return q, q.metric_type == faiss.METRIC_INNER_PRODUCT


def flat_centroids(q) -> np.ndarray:
    return q.reconstruct_n(0, q.ntotal)  # (ntotal, d) float32


class TorchTransform:
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
            return renorm(x)
        return torch.from_numpy(self.vt.apply(np.ascontiguousarray(x.cpu().numpy()))).to(x.device)


def transformed_batches(x: np.ndarray, chain: list[TorchTransform], device: torch.device, batch_size: int):
    """x (n, d_in) → (row offset, (B, d_out) float32 on device) per batch of rows, through the chain."""
    for i0 in range(0, x.shape[0], batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[i0:i0 + batch_size], dtype=np.float32)).to(device)
        for t in chain:
            xb = t(xb)
        yield i0, xb

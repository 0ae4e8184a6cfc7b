"""`--encoder torch`: a trained faiss IVF index's `sa_encode` (and coarse assignment) in torch.

What `knnlm add --encoder torch` runs (through builder.index.Encoder): vectors → faiss
standalone codes on a CUDA GPU, or on the CPU, added with
faiss.extract_index_ivf(index).add_sa_codes(codes, ids). Codes are the list number
(coarse_code_size() bytes, little-endian) then the flat vector (IVF-Flat) or the PQ code of the
residual (IVF-PQ, faiss's PQEncoderGeneric bit order), after any pre-transform. The nearest
centroids come from builder/kmeans.py's search, so a near-tie may go the other way than in faiss
(another GEMM): tests/test_kmeans.py asks for at least 99.9% identical codes.
"""
from __future__ import annotations

import faiss
import numpy as np
import torch

from builder.kmeans import exact_fp32, nearest
from builder.torch_ivf import TorchTransform, coarse_quantizer, flat_centroids, transformed_batches, unwrap


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
        outer, chain, ivf = unwrap(index, "encode_torch")
        if not (outer.is_trained and ivf.is_trained):
            raise ValueError("encode_torch: the index is not trained")
        self.device = dev = torch.device(device)
        self.d = outer.d
        self.chain = [TorchTransform(vt, dev) for vt in chain]
        q, self.ip = coarse_quantizer(ivf)
        self.centroids = torch.from_numpy(flat_centroids(q)).to(dev)  # (nlist, d)
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
        """→ (row offset, (B, d') transformed vectors, (B,) int64 list numbers) on the device."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"expected (n, {self.d}) vectors, got {x.shape}")
        for i0, xb in transformed_batches(x, self.chain, self.device, batch_size):
            yield i0, xb, nearest(xb.unsqueeze(0), self.centroids.unsqueeze(0), self.ip)[0]

    def assign(self, x: np.ndarray, batch_size: int = 65536) -> np.ndarray:
        """(n, d) → (n,) int64 inverted list numbers (quantizer.assign after the pre-transforms)."""
        out = np.empty(len(x), dtype=np.int64)
        with exact_fp32(), torch.no_grad():
            for i0, _, a in self._batches(x, batch_size):
                out[i0:i0 + len(a)] = a.cpu().numpy()
        return out

    def encode(self, x: np.ndarray, batch_size: int = 65536) -> np.ndarray:
        """(n, d) → (n, sa_code_size) uint8, equal to index.sa_encode(x)."""
        out = np.empty((len(x), self.code_size), dtype=np.uint8)
        with exact_fp32(), torch.no_grad():
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
                codes = nearest(sub, self.pq, False).T  # (B, M)
                out[rows, self.coarse_size:] = _pack_codes(codes.cpu().numpy(), self.nbits)
        return out


def encode_torch(index, x: np.ndarray, device: str = "cpu", batch_size: int = 65536) -> np.ndarray:
    """index.sa_encode(x) computed in torch on `device`: (n, d) → (n, index.sa_code_size()) uint8.

    Add the codes with faiss.extract_index_ivf(index).add_sa_codes(codes, ids).
    """
    return TorchEncoder(index, device).encode(x, batch_size)


def assign_torch(index, x: np.ndarray, device: str = "cpu", batch_size: int = 65536) -> np.ndarray:
    """(n, d) → (n,) int64 inverted list of each vector, computed in torch on `device`."""
    return TorchEncoder(index, device).assign(x, batch_size)

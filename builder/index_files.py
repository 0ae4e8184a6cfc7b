"""FAISS index files and kinds: reading, writing and checking them, with no torch.

What index servers and their clients need of builder/index.py (which imports torch for its torch
trainer and encoder: 1.2 s of every process's start): builder/index.py re-exports these names."""
from __future__ import annotations

import hashlib
import re

import numpy as np

from builder.errors import KnnlmError

_PQ = re.compile(r"^PQ(\d+)(?:x(\d+))?(np|fs|fsr)?$")


def fastscan_factory(factory: str) -> bool:
    """Whether a factory string asks for a fast-scan PQ ("PQ64x4fs", "PQ32x4fsr")."""
    return any((mo := _PQ.match(p.strip())) is not None and (mo.group(3) or "").startswith("fs")
               for p in factory.split(","))


def is_fastscan(index) -> bool:
    """Whether the IVF layer of `index` is a fast-scan one (IndexIVFFastScan: blocked 4-bit codes)."""
    import faiss
    return isinstance(faiss.downcast_index(faiss.extract_index_ivf(index)), faiss.IndexIVFFastScan)


def faiss_gpus() -> int:
    import faiss
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def index_to_bytes(index) -> bytes:
    import faiss
    return faiss.serialize_index(index).tobytes()


class IndexFileError(KnnlmError, ValueError):
    """A file that faiss cannot read as an index (corrupted, replaced, another format). Index files are
    only ever parsed by faiss (never unpickled), after their manifest checksum was checked."""


def _unreadable(name: str, e: Exception) -> IndexFileError:
    msg = (str(e).split("Error:", 1)[-1].strip().splitlines() or [""])[0][:200]
    return IndexFileError(f"{name}: not a readable FAISS index ({msg}); run `knnlm verify` on its datastore")


def index_from_bytes(data: bytes, name: str = "index"):
    import faiss
    try:
        return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as e:
        raise _unreadable(name, e) from None


def read_index_file(path: str, flags: int = 0, name: str | None = None):
    """faiss.read_index, its failure an IndexFileError naming `name` (the stored file) or `path`."""
    import faiss
    try:
        return faiss.read_index(path, flags)
    except RuntimeError as e:
        raise _unreadable(name or path, e) from None


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()

"""The index on a datastore built from real text: WikiText-2 valid (57,067 keys) with the shared
small GPT-2 (../shared/models/gpt2-wikitext2-small, 256-dim keys)."""
import json
import os

import numpy as np
import pytest

from builder.add import add_stage, load_merged_index
from builder.build import build
from builder.config import AddConfig, BuildConfig, TrainConfig
from builder.key_shards import read_shard
from builder.manifest import load_manifest
from builder.storage import Storage
from builder.train import train_stage

REPORT = os.path.join(os.environ.get("TMPDIR", "/tmp"), "knnlm-index-real-text.json")


@pytest.fixture(scope="module")
def wt2(tmp_path_factory, ray_cluster, shared_model, wikitext_splits):
    root = tmp_path_factory.mktemp("wt2")
    out = str(root / "ds")
    build(BuildConfig(corpus=[os.path.join(wikitext_splits, "valid.txt")], model=shared_model, out=out,
                      format="wikitext", mode="stream", window=512, min_context=256, progress=False))
    st = Storage.from_uri(out)
    m = load_manifest(st)
    keys = np.concatenate([read_shard(st.read_bytes(s["path"]), m.dim, ("key",))["key"] for s in m.shards])
    return root, out, keys.astype(np.float32)


def index_copy(root, out: str, name: str) -> str:
    import shutil
    dst = str(root / name)
    shutil.copytree(out, dst)
    return dst


def exact_topk(keys: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    import faiss
    flat = faiss.IndexFlatL2(keys.shape[1])
    flat.add(keys)
    return flat.search(q, k)[1]


@pytest.mark.slow
def test_real_text_ivf_flat_self_retrieval_and_ivfpq_recall(wt2):
    root, out, keys = wt2
    assert len(keys) == 57067 and keys.shape[1] == 256
    rng = np.random.default_rng(0)
    qids = rng.choice(len(keys), 500, replace=False)
    q = keys[qids]
    report = {"datastore": "wikitext-2 valid, gpt2-wikitext2-small (4 layers, 256 dims)", "num_keys": len(keys),
              "queries": 500}

    # IVF-Flat: each key finds itself among its 10 nearest
    flat = index_copy(root, out, "flat")
    train_stage(TrainConfig(datastore=flat, index_factory="IVF1024,Flat", train_size=57067, trainer="faiss"))
    add_stage(AddConfig(datastore=flat, index_shards=2, encoder="faiss", merge=True))
    st = Storage.from_uri(flat)
    index = load_merged_index(st, load_manifest(st), str(root / "flat-local"))
    index.nprobe = 8
    _, ids = index.search(q, 10)
    self_hit = float(np.mean([qid in row for qid, row in zip(qids, ids)]))
    report["ivf_flat"] = {"factory": "IVF1024,Flat", "nprobe": 8, "self_in_top10": self_hit}
    assert self_hit >= 0.95, self_hit

    # IVF-PQ: top-1024 recall against exact search (reported; the paper's setting is k=1024, nprobe=32)
    pq = index_copy(root, out, "pq")
    train_stage(TrainConfig(datastore=pq, index_factory="IVF1024,PQ32", train_size=57067, trainer="faiss"))
    add_stage(AddConfig(datastore=pq, index_shards=2, encoder="faiss", merge=True))
    st = Storage.from_uri(pq)
    index = load_merged_index(st, load_manifest(st), str(root / "pq-local"))
    exact = exact_topk(keys, q, 1024)
    report["ivf_pq"] = {"factory": "IVF1024,PQ32", "k": 1024}
    for nprobe in (8, 32):
        index.nprobe = nprobe
        _, ids = index.search(q, 1024)
        recall = float(np.mean([len(np.intersect1d(a, b)) / 1024 for a, b in zip(ids, exact)]))
        report["ivf_pq"][f"recall@1024_nprobe{nprobe}"] = recall
        _, ids10 = index.search(q, 10)
        report["ivf_pq"][f"self_in_top10_nprobe{nprobe}"] = float(np.mean([a in r for a, r in zip(qids, ids10)]))
    print("\n" + json.dumps(report, indent=1))
    with open(REPORT, "w") as f:
        json.dump(report, f, indent=1)
    assert report["ivf_pq"]["recall@1024_nprobe32"] > 0.6   # measured 0.85; the figure is reported

"""Index stages: uniform sampling, train-index, distributed add, merge, errors.

Most tests use synthetic datastores in the builder's exact format (builder/synthetic.py): no
model needed, seconds to write. The real-text test builds WikiText-2 with the shared small GPT-2.
"""
import json
import os
import shutil

import numpy as np
import pytest

from builder.add import add_stage, load_merged_index, plan_ranges
from builder.config import AddConfig, BuildConfig, ConfigError, TrainConfig
from builder.index import add_batches, check_factory, check_train_size, fastscan_factory, ivf_contents, resolve_backend
from builder.key_shards import ShardError, checksum, read_shard
from builder.manifest import ManifestError, load_manifest, write_manifest
from builder.rows import RowGroups, iter_key_range, row_groups
from builder.sample import plan_sample, sample_keys
from builder.storage import Storage
from builder.synthetic import write_synthetic_datastore
from builder.train import IndexBuildError, load_trained_index, train_stage

DIM = 32
FACTORY_PQ = "IVF16,PQ4"     # dsub 8: faiss's PQ training is slow on tiny sub-vectors
FACTORY_FLAT = "IVF16,Flat"
FACTORY_FS = "IVF16,PQ8x4fs"   # fast-scan: 4-bit codes in blocks of 32 (faiss, CPU only)


def all_keys(uri: str) -> np.ndarray:
    st = Storage.from_uri(uri)
    m = load_manifest(st)
    return np.concatenate([read_shard(st.read_bytes(s["path"]), m.dim, ("key",))["key"] for s in m.shards])


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A 12,000-key synthetic datastore (7 shards of 2,000 rows max, row groups of 500)."""
    root = tmp_path_factory.mktemp("synth") / "ds"
    write_synthetic_datastore(str(root), 12000, DIM, shard_rows=1900, row_group_rows=500, seed=3)
    return str(root)


def fresh_copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def tcfg(uri, **kw) -> TrainConfig:
    args = dict(datastore=uri, train_size=4000, index_factory=FACTORY_PQ, seed=1, trainer="faiss", lease_ttl=3.0)
    args.update(kw)
    return TrainConfig(**args)


def acfg(uri, **kw) -> AddConfig:
    args = dict(datastore=uri, index_shards=3, encoder="faiss", lease_ttl=3.0)
    args.update(kw)
    return AddConfig(**args)


# ---- sampling ------------------------------------------------------------------------------


def layout(sizes_per_shard: list[int], rgr: int) -> RowGroups:
    shard, group, first, rows = [], [], [], []
    fid = 0
    for i, n in enumerate(sizes_per_shard):
        for g in range(-(-n // rgr)):
            shard.append(i), group.append(g), first.append(fid + g * rgr), rows.append(min(rgr, n - g * rgr))
        fid += n
    return RowGroups(*(np.array(a, np.int64) for a in (shard, group, first, rows)))


def test_plan_sample_is_uniform_over_shards():
    """Over many seeds, each shard is sampled in proportion to its size (a z-test per shard on the
    per-trial counts, which are clustered by row group), each id at most once, and the read stays
    near read_factor × the sample."""
    sizes = [5000, 1200, 7300, 300, 4096, 9000, 2500, 6600]
    rg = layout(sizes, 256)
    total = sum(sizes)
    bounds = np.cumsum([0] + sizes)
    n, trials = 800, 400
    counts = np.zeros((trials, len(sizes)))
    reads = []
    for seed in range(trials):
        groups, ids = plan_sample(rg, n, seed, read_factor=4.0)
        assert len(ids) == n and len(np.unique(ids)) == n and np.all(np.diff(ids) > 0)
        assert 0 <= ids.min() and ids.max() < total
        chosen = np.zeros(total, bool)
        for g in groups:
            chosen[rg.first_id[g]:rg.first_id[g] + rg.num_rows[g]] = True
        assert chosen[ids].all()                      # every sampled id lies in a group that is read
        reads.append(rg.num_rows[groups].sum())
        counts[seed] = np.histogram(ids, bins=bounds)[0]
    assert 3 * n < np.mean(reads) < 6 * n and max(reads) < total   # p carries a 4σ margin over n/total
    expected = n * np.array(sizes) / total
    z = (counts.mean(0) - expected) / (counts.std(0) / np.sqrt(trials))
    assert np.all(np.abs(z) < 4), z


def test_plan_sample_short_row_groups_are_not_oversampled():
    """Rows of short row groups (each shard's last) are as likely as any: with uniform group
    selection they were over-sampled by about 1/(groups read)."""
    rg = layout([256 * 3 + 40] * 60, 256)             # 60 short groups of 40 rows among 240 groups
    short = np.zeros(rg.num_rows.sum(), bool)
    for g in np.flatnonzero(rg.num_rows < 256):
        short[rg.first_id[g]:rg.first_id[g] + rg.num_rows[g]] = True
    frac = np.array([short[plan_sample(rg, 400, seed, read_factor=4.0)[1]].mean() for seed in range(1500)])
    z = (frac.mean() - short.mean()) / (frac.std() / np.sqrt(len(frac)))
    assert abs(z) < 4, (frac.mean(), short.mean(), z)


def test_plan_sample_reproducible_and_small_datastores():
    rg = layout([3000, 3000, 1000], 500)
    a, b = plan_sample(rg, 700, 42), plan_sample(rg, 700, 42)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(plan_sample(rg, 700, 43)[1], a[1])
    groups, ids = plan_sample(rg, 10**6, 0)              # more than the datastore: every key
    assert np.array_equal(ids, np.arange(7000)) and len(groups) == len(rg.num_rows)


def test_plan_sample_spreads_over_row_groups():
    """The sample comes from about read_factor × train_size / B row groups of B rows, each holding
    about B / read_factor of its rows: as many runs of neighbouring text as the read allows."""
    rg = layout([120_000], 200)                          # 600 row groups of 200 rows
    n, f = 3000, 4.0
    expect = len(rg.num_rows) * f * (n + 4 * np.sqrt(n) + 16) / 120_000     # Σ π_g ≈ 64.7 groups read
    used, most = [], []
    for seed in range(20):
        groups, ids = plan_sample(rg, n, seed, read_factor=f)
        used.append(len(groups))
        most.append(np.bincount(rg.of(ids)).max())
    assert abs(np.mean(used) - expect) < 0.1 * expect and min(used) >= 0.7 * expect, (np.mean(used), expect)
    assert max(most) < 2 * 200 / f                       # no group gives much more than B / read_factor


def test_default_layout_spreads_an_at_scale_sample():
    """With the default --row-group-rows, --read-factor and --train-size, a 3B-key datastore's
    sample comes from thousands of row groups (16,384-row groups gave ~245: a coarse quantizer 9%
    worse than a row-uniform sample's on WikiText-2, bench/bench_sample.py)."""
    fields = {**BuildConfig.__dataclass_fields__, **TrainConfig.__dataclass_fields__}
    rgr, f, n = (fields[k].default for k in ("row_group_rows", "read_factor", "train_size"))
    g = -(-3_000_000_000 // rgr)
    first = np.arange(g, dtype=np.int64) * rgr
    rg = RowGroups(np.zeros(g, np.int64), np.arange(g, dtype=np.int64), first,
                   np.minimum(rgr, 3_000_000_000 - first))
    groups, ids = plan_sample(rg, n, seed=0, read_factor=f)
    assert len(ids) == n and len(groups) >= 3000, len(groups)


def test_sample_keys_reads_the_sampled_rows(synth):
    st = Storage.from_uri(synth)
    m = load_manifest(st)
    ids, keys = sample_keys(st, m, 1500, seed=5, read_factor=2.0)
    ref = all_keys(synth)
    assert keys.dtype == np.float16 and keys.shape == (1500, DIM)
    np.testing.assert_array_equal(keys, ref[ids])
    ids2, _ = sample_keys(st, m, 1500, seed=5, read_factor=2.0)
    assert np.array_equal(ids, ids2)
    rg = row_groups(m)
    assert rg.num_rows.sum() == m.num_keys and len(rg.num_rows) == sum(-(-s["num_rows"] // 500) for s in m.shards)


# ---- factory and training-size checks ---------------------------------------------------------


def test_factory_validation_messages():
    with pytest.raises(ConfigError, match=r"PQ7 needs the vector dim to be divisible by 7, but it is 32.*PQ"):
        check_factory("IVF16,PQ7", 32, "l2")
    with pytest.raises(ConfigError, match="needs an IVF layer"):
        check_factory("PQ8", 32, "l2")
    with pytest.raises(ConfigError, match="faiss cannot build it"):
        check_factory("IVF16,Bogus9", 32, "l2")
    with pytest.raises(ConfigError, match="--metric"):
        check_factory("IVF16,PQ8", 32, "cosine")
    with pytest.raises(ConfigError, match="OPQ5 needs a dim divisible by 5"):
        check_factory("OPQ5,IVF16,PQ4", 32, "l2")
    info = check_factory("OPQ8,IVF16,PQ8", 32, "ip")
    assert (info.nlist, info.pq_m, info.pq_nbits, info.code_size) == (16, 8, 8, 8)
    info = check_factory("IVF4096,PQ64", 1024, "l2")
    with pytest.raises(ConfigError, match=r"at least 159,744 training keys.*only 57,067 keys.*IVF1024,PQ64"):
        check_train_size(info, 57067, 57067)
    with pytest.raises(ConfigError, match=r"--train-size is 100,000.*larger --train-size"):
        check_train_size(info, 100000, 3_000_000)
    check_train_size(info, 1_000_000, 3_000_000)
    fs = check_factory("IVF16,PQ8x4fs", 32, "l2")
    assert (fs.pq_m, fs.pq_nbits, fs.code_size, fs.fastscan) == (8, 4, 4, True) and not info.fastscan
    assert fastscan_factory("OPQ8,IVF16,PQ8x4fsr") and not fastscan_factory("IVF16,PQ8")
    # fast-scan trains and encodes with faiss on the CPU: auto picks it, GPU/torch are refused by flag
    assert resolve_backend("auto", "auto", "--trainer", fastscan=True) == ("faiss", "cpu")
    with pytest.raises(ConfigError, match=r"--encoder torch: a fast-scan index.*--encoder faiss or auto"):
        resolve_backend("torch", "auto", "--encoder", fastscan=True)


# ---- train-index ----------------------------------------------------------------------------


def test_train_index_records_manifest_and_reruns(synth, tmp_path):
    uri = fresh_copy(synth, tmp_path / "ds")
    res = train_stage(tcfg(uri))
    m = load_manifest(Storage.from_uri(uri))
    ix = m.index
    for k in ("path", "factory", "metric", "train_size", "seed", "sample_checksum", "checksum"):
        assert k in ix, k
    assert (ix["factory"], ix["metric"], ix["train_size"], ix["seed"]) == (FACTORY_PQ, "l2", 4000, 1)
    import faiss
    index = faiss.read_index(os.path.join(uri, ix["path"]))        # a plain FAISS file
    assert index.is_trained and index.ntotal == 0 and index.d == DIM
    assert checksum(open(os.path.join(uri, ix["path"]), "rb").read()) == ix["checksum"]
    assert "trained" in res.summary()
    # same settings: nothing to do; the same sample on a copy (reproducible from the seed)
    again = train_stage(tcfg(uri))
    assert again.already_done and load_manifest(Storage.from_uri(uri)).index == ix
    other = fresh_copy(synth, tmp_path / "other")
    train_stage(tcfg(other))
    assert load_manifest(Storage.from_uri(other)).index["sample_checksum"] == ix["sample_checksum"]
    # different settings: refused, naming the flag and both values
    with pytest.raises(ConfigError, match=r"metric \(--metric\): the index has 'l2', this run asks for 'ip'"):
        train_stage(tcfg(uri, metric="ip"))
    with pytest.raises(ConfigError, match=r"--train-size"):
        train_stage(tcfg(uri, train_size=3000))
    # --force retrains and drops the index shards built from the old index
    add_stage(acfg(uri, index_shards=2))
    old = load_manifest(Storage.from_uri(uri))
    assert len(old.index_shards) == 2
    train_stage(tcfg(uri, metric="ip", force=True))
    new = load_manifest(Storage.from_uri(uri))
    assert new.index["metric"] == "ip" and new.index_shards is None and new.index["path"] != ix["path"]
    left = sorted(os.listdir(os.path.join(uri, "index")))
    assert left == [os.path.basename(new.index["path"])]


# ---- add ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(synth, tmp_path_factory):
    """{factory: datastore copy with that index trained}."""
    out = {}
    for f in (FACTORY_PQ, FACTORY_FLAT, FACTORY_FS):
        uri = fresh_copy(synth, tmp_path_factory.mktemp("trained") / "ds")
        train_stage(tcfg(uri, index_factory=f))
        out[f] = uri
    return out


def union_contents(paths: list[str]) -> dict:
    import faiss
    merged: dict[int, list] = {}
    for p in paths:
        for lst, (ids, codes) in ivf_contents(faiss.read_index(p)).items():
            merged.setdefault(lst, []).append((ids, codes))
    return {lst: (np.concatenate([a for a, _ in v]), np.concatenate([b for _, b in v])) for lst, v in merged.items()}


def sorted_pairs(contents: dict) -> dict:
    out = {}
    for lst, (ids, codes) in contents.items():
        o = np.argsort(ids)
        out[lst] = (ids[o], codes[o])
    return out


@pytest.mark.parametrize("factory", [FACTORY_PQ, FACTORY_FLAT, FACTORY_FS])
def test_distributed_add_equals_single_process(trained, tmp_path, factory, ray_cluster):
    uri = fresh_copy(trained[factory], tmp_path / "ds")
    st = Storage.from_uri(uri)
    res = add_stage(acfg(uri, index_shards=3, workers=2, threads=1))
    m = load_manifest(st)
    assert [(s["first_id"], s["num_ids"]) for s in m.index_shards] == plan_ranges(12000, 3)
    for s in m.index_shards:
        assert set(s) >= {"path", "first_id", "num_ids", "bytes", "checksum"}
        assert checksum(st.read_bytes(s["path"])) == s["checksum"] and os.path.getsize(os.path.join(uri, s["path"])) == s["bytes"]
    assert res.shards_run == 3 and "added 12,000 ids" in res.summary()
    # single process, same trained index, every key in one add
    single = add_batches(load_trained_index(st, m), [(np.arange(12000), all_keys(uri))])
    want = sorted_pairs(ivf_contents(single))
    got = sorted_pairs(union_contents([os.path.join(uri, s["path"]) for s in m.index_shards]))
    assert want.keys() == got.keys()
    for lst in want:
        np.testing.assert_array_equal(got[lst][0], want[lst][0])
        np.testing.assert_array_equal(got[lst][1], want[lst][1])
    # each shard holds exactly its own id range
    import faiss
    for s in m.index_shards:
        ids = np.concatenate([v[0] for v in ivf_contents(faiss.read_index(os.path.join(uri, s["path"]))).values()])
        assert ids.min() == s["first_id"] and ids.max() == s["first_id"] + s["num_ids"] - 1 and len(ids) == s["num_ids"]
    # rerun: nothing to do; a different layout is refused; --force rebuilds it
    assert add_stage(acfg(uri, index_shards=3)).already_done
    assert add_stage(acfg(uri, index_shards=None)).already_done
    with pytest.raises(ConfigError, match="already has 3 shards.*asks for 2 shards.*--force"):
        add_stage(acfg(uri, index_shards=2))
    res = add_stage(acfg(uri, index_shards=None, shard_size=5000, force=True))
    m = load_manifest(st)
    assert [(s["first_id"], s["num_ids"]) for s in m.index_shards] == [(0, 5000), (5000, 5000), (10000, 2000)]
    assert sorted(os.listdir(os.path.join(uri, "index", "shards"))) == [f"0000{i}-of-00003.faiss" for i in range(3)]
    assert not os.path.exists(os.path.join(uri, "_index"))


def id_codes(contents: dict) -> dict[int, tuple[int, bytes]]:
    return {int(i): (lst, c.tobytes()) for lst, (ids, codes) in contents.items() for i, c in zip(ids, codes)}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_torch_encoder_add_matches_faiss(trained, tmp_path, device, ray_cluster):
    """The torch encoder (the GPU path, here on `device`) through the distributed add: every id once,
    and the same list and code as faiss's CPU add for at least 99.9% of ids."""
    uri = fresh_copy(trained[FACTORY_PQ], tmp_path / "ds")
    add_stage(acfg(uri, index_shards=2, encoder="torch", device=device))
    st = Storage.from_uri(uri)
    m = load_manifest(st)
    got = id_codes(union_contents([os.path.join(uri, s["path"]) for s in m.index_shards]))
    want = id_codes(ivf_contents(add_batches(load_trained_index(st, m), [(np.arange(12000), all_keys(uri))])))
    assert sorted(got) == list(range(12000))
    same = np.mean([got[i] == want[i] for i in range(12000)])
    assert same >= 0.999, same


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_torch_trainer_matches_faiss_training(synth, tmp_path, device):
    """train-index --trainer torch: the same sample, a quantization error within 2% of faiss's."""
    a = fresh_copy(synth, tmp_path / "a")
    b = fresh_copy(synth, tmp_path / "b")
    train_stage(tcfg(a, trainer="faiss"))
    train_stage(tcfg(b, trainer="torch", device=device))
    qa = load_manifest(Storage.from_uri(a)).index
    qb = load_manifest(Storage.from_uri(b)).index
    assert qa["sample_checksum"] == qb["sample_checksum"] and qb["trainer"] == "torch"
    for k in ("coarse_mse", "reconstruction_mse"):
        assert qb["quantization"][k] <= 1.02 * qa["quantization"][k], (k, qa["quantization"], qb["quantization"])


def test_add_resumes_after_killed_workers_and_driver(trained, tmp_path, ray_cluster):
    """A worker killed mid-shard is retried by Ray; a run that fails part-way (its worker killed with
    no retries left, like a lost driver) leaves committed shards that the rerun skips; the result
    equals a clean add."""
    from builder.faults import FAULT_ENV
    clean = fresh_copy(trained[FACTORY_PQ], tmp_path / "clean")
    add_stage(acfg(clean, index_shards=4, workers=1))
    want = load_manifest(Storage.from_uri(clean)).index_shards

    fault = os.environ[FAULT_ENV]
    uri = fresh_copy(trained[FACTORY_PQ], tmp_path / "killed")
    try:
        with open(fault, "w") as f:
            f.write(f"add:1:{tmp_path / 'marker1'}")
        add_stage(acfg(uri, index_shards=4, workers=1))            # shard 1's worker dies once; retried
        assert os.path.exists(tmp_path / "marker1")
        assert load_manifest(Storage.from_uri(uri)).index_shards == want

        uri2 = fresh_copy(trained[FACTORY_PQ], tmp_path / "failed")
        with open(fault, "w") as f:
            f.write(f"add:2:{tmp_path / 'marker2'}")
        with pytest.raises(IndexBuildError, match="index shard 2.*rerun to resume"):
            add_stage(acfg(uri2, index_shards=4, workers=1, max_retries=0, max_dispatches=1))
        m = load_manifest(Storage.from_uri(uri2))
        assert m.index_shards is None                               # nothing partial committed
        assert len(os.listdir(os.path.join(uri2, "_index", "shards"))) == 2
        with pytest.raises(ConfigError, match="unfinished add with 4 shards.*asks for 2 shards"):
            add_stage(acfg(uri2, index_shards=2))
        res = add_stage(acfg(uri2, index_shards=4, workers=1))
        assert (res.shards_run, res.shards_skipped) == (2, 2)
        assert load_manifest(Storage.from_uri(uri2)).index_shards == want
    finally:
        os.remove(fault) if os.path.exists(fault) else None


def test_add_survives_more_worker_deaths_than_ray_retries(trained, tmp_path, ray_cluster):
    """Regression (fault suite): one shard's task losing its worker more often than Ray's max_retries
    (here 3 deaths against max_retries=0) is dispatched again instead of ending the add; the result
    equals a clean add. A shard that fails every dispatch still ends it, naming the shard."""
    from builder.faults import FAULT_ENV
    clean = fresh_copy(trained[FACTORY_FLAT], tmp_path / "clean")
    add_stage(acfg(clean, index_shards=2, workers=1))
    want = load_manifest(Storage.from_uri(clean)).index_shards
    fault = os.environ[FAULT_ENV]
    try:
        uri = fresh_copy(trained[FACTORY_FLAT], tmp_path / "killed")
        with open(fault, "w") as f:
            f.write(f"add:1:{tmp_path / 'marker'}:3")
        add_stage(acfg(uri, index_shards=2, workers=1, max_retries=0))
        assert open(tmp_path / "marker").read() == "3"
        assert load_manifest(Storage.from_uri(uri)).index_shards == want

        uri2 = fresh_copy(trained[FACTORY_FLAT], tmp_path / "spent")
        with open(fault, "w") as f:
            f.write(f"add:0:{tmp_path / 'marker2'}:100")
        with pytest.raises(IndexBuildError, match="index shard 0 .*its worker died 2 times.*rerun to resume"):
            add_stage(acfg(uri2, index_shards=2, workers=1, max_retries=0, max_dispatches=2))
        assert open(tmp_path / "marker2").read() == "2"
    finally:
        os.remove(fault) if os.path.exists(fault) else None


def test_merge_on_disk_searches_like_one_index(trained, tmp_path, ray_cluster):
    uri = fresh_copy(trained[FACTORY_FLAT], tmp_path / "ds")
    res = add_stage(acfg(uri, index_shards=3, merge=True))
    assert res.merged
    st = Storage.from_uri(uri)
    m = load_manifest(st)
    assert m.index_merged["num_ids"] == 12000
    merged = load_merged_index(st, m, str(tmp_path / "local"))
    single = add_batches(load_trained_index(st, m), [(np.arange(12000), all_keys(uri))])
    q = all_keys(uri)[::97].astype(np.float32)
    for idx in (merged, single):
        idx.nprobe = 4
    d1, i1 = merged.search(q, 10)
    d2, i2 = single.search(q, 10)
    np.testing.assert_array_equal(d1, d2)
    np.testing.assert_array_equal(i1, i2)
    assert add_stage(acfg(uri, index_shards=3, merge=True)).already_done
    # a fast-scan index's blocked lists cannot go on disk: refused before any work, naming the flag
    fs = fresh_copy(trained[FACTORY_FS], tmp_path / "fs")
    with pytest.raises(ConfigError, match=r"--merge: IVF16,PQ8x4fs is a fast-scan index.*knnlm serve"):
        add_stage(acfg(fs, index_shards=3, merge=True))
    assert load_manifest(Storage.from_uri(fs)).index_shards is None


def test_iter_key_range_is_bounded_and_exact(synth):
    st = Storage.from_uri(synth)
    m = load_manifest(st)
    ref = all_keys(synth)
    for first, num in [(0, 12000), (1899, 2), (3333, 4444), (11999, 1)]:
        batches = list(iter_key_range(st, m, first, num))
        ids = np.concatenate([b[0] for b in batches])
        np.testing.assert_array_equal(ids, np.arange(first, first + num))
        np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), ref[first:first + num])
        assert max(len(b[0]) for b in batches) <= 500            # one row group at a time


# ---- errors ---------------------------------------------------------------------------------


def test_errors_are_clear(trained, tmp_path, ray_cluster):
    # no manifest
    with pytest.raises(ManifestError, match="not a finished datastore"):
        train_stage(tcfg(str(tmp_path / "nothing")))
    # no trained index
    bare = fresh_copy(os.path.dirname(trained[FACTORY_PQ]) and trained[FACTORY_PQ], tmp_path / "bare")
    st = Storage.from_uri(bare)
    m = load_manifest(st)
    m.index = None
    write_manifest(st, m)
    with pytest.raises(IndexBuildError, match="no trained index: run `knnlm train-index"):
        add_stage(acfg(bare))
    # corrupted / missing key shards: named, with the fix
    uri = fresh_copy(trained[FACTORY_PQ], tmp_path / "corrupt")
    m = load_manifest(Storage.from_uri(uri))
    bad = os.path.join(uri, m.shards[2]["path"])
    data = bytearray(open(bad, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(bad, "wb").write(bytes(data))
    with pytest.raises(IndexBuildError, match=rf"{m.shards[2]['path']}: checksum mismatch.*knnlm verify"):
        add_stage(acfg(uri, index_shards=3, max_retries=0))
    assert load_manifest(Storage.from_uri(uri)).index_shards is None
    os.remove(bad)
    with pytest.raises(IndexBuildError, match=rf"{m.shards[2]['path']}: missing"):
        add_stage(acfg(uri, index_shards=3, max_retries=0))
    with pytest.raises(ShardError, match=rf"{m.shards[2]['path']}: missing"):
        train_stage(tcfg(uri, force=True, read_factor=10.0))
    # a trained index that does not match the manifest: replaced file, other dim, other metric
    uri = fresh_copy(trained[FACTORY_PQ], tmp_path / "mismatch")
    st = Storage.from_uri(uri)
    m = load_manifest(st)
    p = os.path.join(uri, m.index["path"])
    open(p, "ab").write(b"junk")
    with pytest.raises(IndexBuildError, match="does not match the manifest's checksum.*--force"):
        add_stage(acfg(uri))
    from builder.index import index_to_bytes, new_index
    x = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
    other = new_index("IVF16,Flat", 16, "l2", 0)
    other.train(x)
    data = index_to_bytes(other)
    open(p, "wb").write(data)
    m.index["checksum"] = checksum(data)
    write_manifest(st, m)
    with pytest.raises(ManifestError, match="dim 16, but the datastore's keys have dim 32"):
        add_stage(acfg(uri))
    other = new_index("IVF16,Flat", DIM, "ip", 0)
    other.train(np.random.default_rng(0).standard_normal((2000, DIM)).astype(np.float32))
    data = index_to_bytes(other)
    open(p, "wb").write(data)
    m.index["checksum"] = checksum(data)
    write_manifest(st, m)
    with pytest.raises(ManifestError, match="uses metric ip, the manifest says l2"):
        add_stage(acfg(uri))
    # flag errors
    with pytest.raises(ConfigError, match="--index-shards or --shard-size"):
        AddConfig(datastore="x", index_shards=2, shard_size=10)
    with pytest.raises(ConfigError, match="--train-size must be a positive integer"):
        TrainConfig(datastore="x", train_size=0)


def test_a_second_index_run_is_refused_while_one_runs(trained, tmp_path):
    from builder.layout import INDEX_LEASE
    from builder.lease import Lease, LeaseError
    uri = fresh_copy(trained[FACTORY_FLAT], tmp_path / "ds")
    with Lease(Storage.from_uri(uri), 1.0, INDEX_LEASE, "index build"):     # a live holder, renewing
        with pytest.raises(LeaseError, match="another index build is running"):
            add_stage(acfg(uri, lease_ttl=1.0))
        with pytest.raises(LeaseError, match="another index build is running"):
            train_stage(tcfg(uri, index_factory=FACTORY_FLAT, force=True, lease_ttl=1.0))
    assert load_manifest(Storage.from_uri(uri)).index_shards is None


def test_train_index_on_a_cluster_task(synth, tmp_path, ray_cluster):
    """--address runs the training as a Ray task; its errors come back as the same clear errors."""
    from builder.train import train_on_cluster
    uri = fresh_copy(synth, tmp_path / "ds")
    res = train_on_cluster(tcfg(uri, index_factory=FACTORY_FLAT), None)
    assert res.manifest.index["factory"] == FACTORY_FLAT
    with pytest.raises(ConfigError, match="already has a trained index"):
        train_on_cluster(tcfg(uri, index_factory=FACTORY_PQ), None)


def test_cli_train_index_and_add(synth, tmp_path, capsys, ray_cluster):
    from cluster.cli import main
    uri = fresh_copy(synth, tmp_path / "ds")
    assert main(["train-index", uri, "--index-factory", FACTORY_FLAT, "--train-size", "3000", "--trainer", "faiss"]) == 0
    assert "trained IVF16,Flat (l2) on 3,000 sampled keys" in capsys.readouterr().out
    assert main(["train-index", uri, "--index-factory", "IVF1024,Flat"]) == 2
    err = capsys.readouterr().err
    assert "knnlm train-index: error:" in err and "IVF256,Flat" in err and "Traceback" not in err
    assert main(["add", uri, "--index-shards", "2", "--encoder", "faiss"]) == 0
    assert "into 2 index shards" in capsys.readouterr().out
    assert main(["info", uri]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["index"]["factory"] == FACTORY_FLAT and info["index_shards"] == 2
    assert main(["verify", uri]) == 0
    assert "and 3 index files, checksums match" in capsys.readouterr().out
    m = load_manifest(Storage.from_uri(uri))
    with open(os.path.join(uri, m.index_shards[1]["path"]), "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe")
    os.remove(os.path.join(uri, m.index["path"]))
    assert main(["verify", uri]) == 2
    err = capsys.readouterr().err
    assert f"{m.index_shards[1]['path']}: checksum mismatch" in err and f"{m.index['path']}: missing" in err
    assert "2 index files have problems" in err


@pytest.mark.s3
def test_s3_train_and_add_match_local(synth, tmp_path, s3_bucket, ray_cluster):
    """The same datastore on S3 (moto server): ranged row-group reads for the sample, the same trained
    index and the same index shards, byte for byte."""
    from conftest import upload_dir
    local = fresh_copy(synth, tmp_path / "ds")
    uri = upload_dir(local, s3_bucket, "ds")
    for u in (local, uri):
        train_stage(tcfg(u, read_factor=1.5))
        add_stage(acfg(u, index_shards=2))
    ml, ms = load_manifest(Storage.from_uri(local)), load_manifest(Storage.from_uri(uri))
    assert ml.index["sample_checksum"] == ms.index["sample_checksum"]
    assert ml.index["checksum"] == ms.index["checksum"]
    assert [s["checksum"] for s in ml.index_shards] == [s["checksum"] for s in ms.index_shards]
    assert add_stage(acfg(uri, index_shards=2)).already_done


def _faiss_gpus() -> int:
    from builder.index import faiss_gpus
    return faiss_gpus()


@pytest.mark.gpu
@pytest.mark.skipif(_faiss_gpus() == 0, reason="faiss has no GPU support here (the `gpu` extra)")
def test_faiss_gpu_train_and_add_match_cpu(trained, synth, tmp_path, ray_cluster):
    """faiss's own GPU trainer and encoder: quantization close to the CPU's, codes identical but for ties."""
    a = fresh_copy(synth, tmp_path / "gpu")
    train_stage(tcfg(a, trainer="faiss-gpu"))
    cpu = load_manifest(Storage.from_uri(trained[FACTORY_PQ])).index["quantization"]
    gpu = load_manifest(Storage.from_uri(a)).index["quantization"]
    assert gpu["reconstruction_mse"] <= 1.05 * cpu["reconstruction_mse"]
    uri = fresh_copy(trained[FACTORY_PQ], tmp_path / "ds")
    add_stage(acfg(uri, index_shards=2, encoder="faiss-gpu"))
    st = Storage.from_uri(uri)
    m = load_manifest(st)
    got = id_codes(union_contents([os.path.join(uri, s["path"]) for s in m.index_shards]))
    want = id_codes(ivf_contents(add_batches(load_trained_index(st, m), [(np.arange(12000), all_keys(uri))])))
    assert np.mean([got[i] == want[i] for i in range(12000)]) >= 0.999


@pytest.mark.slow
def test_add_driver_killed_then_resumed(trained, tmp_path, ray_cluster, caplog):
    """kill -9 the `knnlm add` driver mid-add: its lease stays behind; the rerun waits it out, skips
    the committed shards, and the index shards equal a clean add's."""
    import signal
    import subprocess
    import sys
    import time

    from builder.layout import INDEX_LEASE
    clean = fresh_copy(trained[FACTORY_PQ], tmp_path / "clean")
    add_stage(acfg(clean, index_shards=8, workers=1))
    want = load_manifest(Storage.from_uri(clean)).index_shards

    uri = fresh_copy(trained[FACTORY_PQ], tmp_path / "ds")
    gcs = ray_cluster.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "cluster.cli", "add", uri, "--index-shards", "8", "--workers", "1",
           "--encoder", "faiss", "--lease-ttl", "3", "--address", gcs]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    records = os.path.join(uri, "_index", "shards")
    try:
        t0 = time.time()
        while not (os.path.isdir(records) and len(os.listdir(records)) >= 3):
            assert time.time() - t0 < 120, "timed out waiting for 3 committed index shards"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    m = load_manifest(Storage.from_uri(uri))
    assert m.index_shards is None, "the add finished before it was killed"
    committed = len(os.listdir(records))
    assert os.path.exists(os.path.join(uri, INDEX_LEASE))       # the dead driver's lease is still there
    caplog.set_level("WARNING")
    res = add_stage(acfg(uri, index_shards=8, workers=1))
    assert res.shards_skipped >= committed >= 3 and res.shards_run + res.shards_skipped == 8
    assert "index build lease" in caplog.text
    assert load_manifest(Storage.from_uri(uri)).index_shards == want

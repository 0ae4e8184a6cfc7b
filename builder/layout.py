"""Where things live under a datastore root: every relative path the stages read or write.

    manifest.json                    written last; lists every shard (builder/build_manifest.py)
    tokens/<file>.bin|.json          tokenized inputs (int32 LE tokens + sequence lengths)
    shards/<unit>-<part>.parquet     key shards (deterministic names)
    _build/request.json              the identity of the build in progress
    _build/units/<unit>.json         a unit's commit record (its shards, rows, checksums)
    _build/lease.json                the build lease
    index/trained-<sha>.faiss        the trained, empty index (builder/train.py)
    index/shards/<i>-of-<n>.faiss    index shards of contiguous global-id ranges (builder/add.py)
    index/merged.faiss|.ivfdata      --merge: one index over on-disk inverted lists
    _index/add.json, _index/shards/<i>.json, _index/lease.json   an unfinished add, its lease
    eval/<split>-neighbours/         the pipeline's neighbour caches (a cache's own files below)

Folders end with "/" (what Storage.list and delete_prefix take).
"""

MANIFEST = "manifest.json"

# ---- the build (builder/build.py) ----
TOKENS_DIR = "tokens/"
KEY_SHARDS_DIR = "shards/"
BUILD_DIR = "_build/"
BUILD_REQUEST = "_build/request.json"        # the identity of an unfinished build
BUILD_LEASE = "_build/lease.json"
UNITS_DIR = "_build/units/"


def tokens_path(file_index: int) -> str:
    return f"tokens/{file_index:06d}.bin"


def tokens_meta_path(file_index: int) -> str:
    return f"tokens/{file_index:06d}.json"


def key_shard_path(unit_id: int, part: int) -> str:
    return f"shards/{unit_id:07d}-{part:03d}.parquet"


def unit_record_path(unit_id: int) -> str:
    return f"_build/units/{unit_id:07d}.json"


def unit_record_id(path: str) -> int:
    """The unit id of a path unit_record_path made (as Storage.list returns it)."""
    return int(path.rsplit("/", 1)[-1].split(".")[0])


def probe_path(token: str) -> str:
    """A throw-away object that tells whether the root is writable (Storage.check_writable)."""
    return f"_build/.probe-{token}"


# ---- the index (builder/train.py, builder/add.py) ----
INDEX_DIR = "index/"
INDEX_SHARDS_DIR = "index/shards/"
INDEX_WORK_DIR = "_index/"                   # an unfinished add's plan, records and the index lease
INDEX_RECORDS_DIR = "_index/shards/"
MERGED_INDEX = "index/merged.faiss"          # --merge: one index over on-disk inverted lists ...
MERGED_IVFDATA = "index/merged.ivfdata"      # ... stored beside it (faiss IO_FLAG_ONDISK_SAME_DIR)
INDEX_LEASE = "_index/lease.json"
ADD_REQUEST = "_index/add.json"              # the ranges of an unfinished add


def trained_index_path(checksum: str) -> str:
    """The trained, empty index, named by its content ("sha256:<hex>") so a retrain never overwrites it."""
    return f"index/trained-{checksum.split(':')[1][:12]}.faiss"


def index_shard_path(i: int, n: int) -> str:
    return f"index/shards/{i:05d}-of-{n:05d}.faiss"


def index_shard_record_path(i: int) -> str:
    return f"_index/shards/{i:05d}.json"


# ---- neighbour caches (`knnlm eval --save-neighbours`, retriever/tune.py) ----
NEIGHBOUR_CACHE_META = "cache.json"          # relative to the cache folder; written last


def neighbour_chunk_path(chunk: int) -> str:
    """One evaluation chunk's neighbours, relative to the cache folder."""
    return f"neighbours-{chunk:05d}.parquet"


def neighbour_cache_dir(split: str) -> str:
    """The pipeline's neighbour cache of a tune split ("valid", "test") under the datastore root."""
    return f"eval/{split}-neighbours"

"""Where things live under a datastore root (relative paths; see builder/build.py)."""


def tokens_path(file_index: int) -> str:
    return f"tokens/{file_index:06d}.bin"


def tokens_meta_path(file_index: int) -> str:
    return f"tokens/{file_index:06d}.json"


def shard_path(unit_id: int, part: int) -> str:
    return f"shards/{unit_id:07d}-{part:03d}.parquet"


def unit_record_path(unit_id: int) -> str:
    return f"_build/units/{unit_id:07d}.json"


# ---- the index (builder/train.py, builder/add.py) ----
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

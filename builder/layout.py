"""Where things live under a datastore root (relative paths; see builder/build.py)."""


def tokens_path(file_index: int) -> str:
    return f"tokens/{file_index:06d}.bin"


def tokens_meta_path(file_index: int) -> str:
    return f"tokens/{file_index:06d}.json"


def shard_path(unit_id: int, part: int) -> str:
    return f"shards/{unit_id:07d}-{part:03d}.parquet"


def unit_record_path(unit_id: int) -> str:
    return f"_build/units/{unit_id:07d}.json"

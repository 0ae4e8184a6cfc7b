"""Where things live under a datastore root: every relative path the stages read or write.

    manifest.json                    written last; lists every shard (builder/build_manifest.py)
    tokens/<file>.bin|.json          tokenized inputs (int32 LE tokens; the meta: counts, written last)
    tokens/<file>.seqs               its sequence table: int64 LE rows (offset, length, record), one per
                                     sequence (builder/seqs.py)
    tokens/<file>.part-<k>.bin|.seqs|.json   a large input's range k, until the join makes tokens/<file>.*
    shards/<unit>-<part>.parquet     key shards (deterministic names)
    _build/request.json              the identity of the build in progress
    _build/units/<unit>.json         a unit's commit record (its shards, rows, checksums)
    _build/lease.json                the build lease
    index/trained-<sha>.faiss        the trained, empty index (builder/train.py)
    index/shards/<i>-of-<n>.faiss    index shards of contiguous global-id ranges (builder/add.py)
    index/merged.faiss|.ivfdata      --merge: one index over on-disk inverted lists
    _index/add.json, _index/shards/<i>.json, _index/lease.json   an unfinished add, its lease
    eval/<split>-neighbours/         the pipeline's neighbour caches (a cache's own files below)
    versions/<v>.json                every published version's manifest (builder/versions.py)
    ingest/<name>/                   an ingestion (`knnlm ingest --name`): its tokens/, shards/, _build/
                                     (a build rooted there) and index/ shards; until it is published also
                                     staged.json and _index/ (its add's request and shard records)
    shards/v<v>/<unit>-<part>.parquet  key shards rewritten by the compaction that published version v

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


def tokens_seqs_path(file_index: int) -> str:
    return f"tokens/{file_index:06d}.seqs"


def seqs_beside(tokens: str) -> str:
    """The sequence table beside a tokens file (tokens/000003.bin → tokens/000003.seqs; also an ingestion's
    or a compaction's tokens file)."""
    return (tokens[:-len(".bin")] if tokens.endswith(".bin") else tokens) + ".seqs"


def tokens_part_path(file_index: int, part: int) -> str:
    """A range of a large input file tokenized alone (builder/corpus_ranges.py), before the join."""
    return f"tokens/{file_index:06d}.part-{part:05d}.bin"


def tokens_part_meta_path(file_index: int, part: int) -> str:
    return f"tokens/{file_index:06d}.part-{part:05d}.json"


def tokens_part_seqs_path(file_index: int, part: int) -> str:
    """A range's sequence table (offsets and records relative to the range)."""
    return f"tokens/{file_index:06d}.part-{part:05d}.seqs"


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
NEIGHBOUR_CACHE_TEXT = "text.parquet"        # the evaluated text (retriever/tune.py)


def neighbour_chunk_path(chunk: int) -> str:
    """One evaluation chunk's neighbours, relative to the cache folder."""
    return f"neighbours-{chunk:05d}.parquet"


def neighbour_cache_dir(split: str) -> str:
    """The pipeline's neighbour cache of a tune split ("valid", "test") under the datastore root."""
    return f"eval/{split}-neighbours"


# ---- versions (builder/versions.py, builder/ingest.py, builder/remove.py) ----
VERSIONS_DIR = "versions/"
INGEST_DIR = "ingest/"


def version_path(version: int) -> str:
    return f"versions/{version:06d}.json"


def ingest_root(name: str) -> str:
    """The folder of ingestion `name` (a build rooted there writes its tokens/, shards/ and _build/)."""
    return f"ingest/{name}"


def ingest_index_shard_path(name: str, i: int, n: int) -> str:
    return f"ingest/{name}/index/{i:05d}-of-{n:05d}.faiss"


def ingest_staged_path(name: str) -> str:
    """An unfinished ingestion's combined manifest (the current version + its keys), read by its add tasks."""
    return f"ingest/{name}/staged.json"


def ingest_index_request_path(name: str) -> str:
    """What an unfinished ingestion's index records were made for (base version, ranges, trained index)."""
    return f"ingest/{name}/_index/request.json"


def ingest_index_record_path(name: str, i: int) -> str:
    return f"ingest/{name}/_index/shards/{i:05d}.json"


def ingest_index_dir(name: str) -> str:
    return f"ingest/{name}/index/"


def compacted_shard_path(version: int, path: str) -> str:
    """Where the compaction publishing `version` writes the rewritten key shard that was at `path`."""
    return f"shards/v{version:06d}/{path.replace('/', '-')}"


def compacted_index_shard_path(version: int, i: int, n: int) -> str:
    return f"index/shards/v{version:06d}/{i:05d}-of-{n:05d}.faiss"


# ---- a report folder (`knnlm report`, `knnlm eval --report`: retriever/report.py) ----
REPORT_INDEX = "index.html"                  # the page, written last: the report is complete when it exists
REPORT_RUN = "data/run.js"                   # the run, the plots and the lists: knnlmRun({...})
REPORT_DATA_DIR = "data/"


def report_page_path(page: int) -> str:
    """One page of text with its tokens' numbers and neighbours: knnlmPage(page, {...})."""
    return f"data/page-{page:05d}.js"

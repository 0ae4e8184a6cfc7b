"""Typed, validated configuration of the datastore stages (`knnlm build`, `train-index`, `add`) and of
`knnlm info` and `verify`: each field is the one definition of its option (flag, pipeline-file key,
default, choices, help; see builder/options.py)."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from builder.errors import KnnlmError
from builder.options import opt

KEY_LAYERS = ("ffn_input", "final_hidden")
MODES = ("stream", "document")
FORMATS = ("auto", "text", "wikitext", "jsonl", "parquet")
DEVICES = ("auto", "cpu", "cuda")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
TRAINERS = ("auto", "faiss", "torch", "faiss-gpu")     # k-means of train-index (builder/index.py)
ENCODERS = TRAINERS                                     # encoding of add
METRICS = ("l2", "ip")
MAX_DEFAULT_WINDOW = 1024
ROW_GROUP_ROWS = 1024       # default rows per Parquet row group of the key shards (--row-group-rows)


class ConfigError(KnnlmError, ValueError):
    """A user-facing configuration error; the message names the flag."""


ADDRESS_HELP = "Ray cluster address as ray.init takes it (e.g. ray://head:10001 or auto)"
LEASE_TTL_HELP = "seconds after its last renewal when a dead {}'s lease may be taken over"
DATASTORE = dict(flag="datastore", metavar="DATASTORE_URI", file=False)   # the positional DATASTORE_URI


@dataclass
class BuildConfig:
    corpus: list[str] = opt(flag="--corpus", metavar="PATH_OR_URI",
                            help="input files, directories, globs (sorted) or s3:// URIs/prefixes, in corpus order")
    model: str = opt(help="Hugging Face causal LM: local directory or hub id")
    out: str = opt(metavar="URI", file=False, help="datastore root: a local path, file:// or s3://bucket/prefix")
    key_layer: str = opt("ffn_input", choices=KEY_LAYERS,
                         help="ffn_input: input of the last block's feed-forward (after its layer norm; the paper's "
                              "best); final_hidden: input of the LM head")
    window: int | None = opt(None, help="tokens per forward window",
                             default_text="the model's maximum positions, capped at 1024")
    min_context: int | None = opt(None, help="tokens of context a window re-reads from the previous one",
                                  default_text="window/2")
    mode: str = opt("document", choices=MODES,
                    help="document: each document is its own sequence; stream: each input file is one sequence "
                         "and contexts run across its documents (WikiText-103 style)")
    format: str = opt("auto", choices=FORMATS,
                      help="auto: .jsonl/.json → jsonl, .parquet → parquet, .tokens → wikitext, else text "
                           "(a text file is one document; wikitext: a line ' = Title = ' starts an article)")
    text_field: str = opt("text", help="JSONL field / Parquet column holding the text")
    shard_rows: int = opt(131072, help="most rows per shard file")
    unit_tokens: int = opt(262144, help="keys per work unit (the unit of dispatch, retry and resume)")
    # 1024, not 16384: train-index's sample comes from about read_factor × train_size / row_group_rows runs
    # of neighbouring text; at 16384 they were too few (bench/bench_sample.py: +9% coarse error on WikiText-2)
    row_group_rows: int = opt(ROW_GROUP_ROWS, help="Parquet row group size (the granularity of index-training "
                                                   "samples: smaller spreads the sample over more of the corpus)")
    workers: int | None = opt(None, help="key workers",
                              default_text="one per GPU of the cluster, else one CPU worker using all cores")
    address: str | None = opt(None, file=False, help=ADDRESS_HELP, default_text="start an embedded local Ray")
    device: str = opt("auto", choices=DEVICES, help="device of the key workers' forward pass")
    compute_dtype: str = opt("auto", choices=COMPUTE_DTYPES,
                             help="dtype of the forward pass, recorded in the manifest; evaluation, generation and "
                                  "`knnlm neighbours` compute their queries in it (auto: float32 on CPU; on GPU "
                                  "float16, or bfloat16 for a model whose config says bfloat16: see "
                                  "bench/README.md); keys are stored as float16")
    batch_size: int = opt(8, help="windows per forward pass")
    lease_ttl: float = opt(60.0, file=False, help=LEASE_TTL_HELP.format("build"))
    progress: bool = opt(True, flag="--no-progress", file=False, help="no progress bar")
    extra: dict = opt({}, flag=False, file=False)

    def __post_init__(self):
        if isinstance(self.corpus, str):
            self.corpus = [self.corpus]
        if not self.corpus:
            raise ConfigError("--corpus: at least one path or URI is required")
        if not self.model:
            raise ConfigError("--model: a model path or Hugging Face id is required")
        if not self.out:
            raise ConfigError("--out: an output URI is required")
        if self.key_layer not in KEY_LAYERS:
            raise ConfigError(f"--key-layer: unknown key layer {self.key_layer!r}; choose one of {', '.join(KEY_LAYERS)}")
        if self.mode not in MODES:
            raise ConfigError(f"--mode: unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.format not in FORMATS:
            raise ConfigError(f"--format: unknown format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.device not in DEVICES:
            raise ConfigError(f"--device: unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"--compute-dtype: choose one of {', '.join(COMPUTE_DTYPES)}")
        if self.window is not None and self.window < 2:
            raise ConfigError(f"--window must be at least 2 (got {self.window})")
        if self.min_context is not None and self.min_context < 1:
            # a target at a window's first position has its key position in the previous window
            raise ConfigError(f"--min-context must be at least 1 (got {self.min_context})")
        if self.window is not None and self.min_context is not None and self.min_context >= self.window:
            raise ConfigError(f"--min-context ({self.min_context}) must be smaller than --window ({self.window})")
        for flag, v in (("--shard-rows", self.shard_rows), ("--unit-tokens", self.unit_tokens),
                        ("--batch-size", self.batch_size), ("--row-group-rows", self.row_group_rows)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{flag} must be a positive integer (got {v!r})")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be a positive integer (got {self.workers})")
        if self.lease_ttl <= 0:
            raise ConfigError(f"--lease-ttl must be positive (got {self.lease_ttl})")

    def resolve_window(self, max_positions: int | None) -> tuple[int, int]:
        """(window, min_context) once the model's maximum positions are known."""
        window = self.window
        if window is None:
            window = min(max_positions or MAX_DEFAULT_WINDOW, MAX_DEFAULT_WINDOW)
        elif max_positions and window > max_positions:
            raise ConfigError(f"--window {window} exceeds the model's maximum positions ({max_positions})")
        min_context = window // 2 if self.min_context is None else self.min_context
        if min_context >= window:
            raise ConfigError(f"--min-context ({min_context}) must be smaller than --window ({window})")
        return window, min_context

    def to_dict(self) -> dict:
        return asdict(self)


def _positive(flag: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"{flag} must be a positive integer (got {v!r})")


@dataclass
class TrainConfig:
    """`knnlm train-index`: sample keys, train an index, store it at the datastore root."""
    datastore: str = opt(**DATASTORE, help="a datastore root (local path or s3://) built by knnlm build")
    train_size: int = opt(1_000_000, help="keys to sample (all keys if the datastore has fewer)")
    index_factory: str = opt("IVF4096,PQ64", file="factory",
                             help="faiss index factory string with an IVF layer, e.g. IVF4096,PQ64, OPQ64,IVF4096,PQ64 "
                                  "or IVF1024,Flat (PQ sub-quantizers must divide the key dim)")
    metric: str = opt("l2", choices=METRICS, help="l2: squared L2 distance (the kNN-LM paper's); ip: inner product")
    seed: int = opt(0, help="seed of the sample and of the k-means")
    trainer: str = opt("auto", choices=TRAINERS,
                       help="auto: faiss's GPU k-means if faiss has GPU support, else torch on a CUDA GPU, else faiss "
                            "on the CPU; torch: coarse and PQ k-means in torch (GPU if visible, else CPU)")
    device: str = opt("auto", choices=DEVICES, help="device of the k-means")
    read_factor: float = opt(4.0, help="rows read (whole row groups) per sampled key: more spreads the sample over "
                                       "more of the datastore, at that many times the read")
    min_points_per_centroid: int = opt(39, help="training keys needed per IVF centroid (faiss warns below 39)")
    threads: int | None = opt(None, help="CPU threads for faiss/torch", default_text="all cores")
    address: str | None = opt(None, file=False, default_text="in this process",
                              help="run the training as one Ray task on this cluster (on a GPU node if it has GPUs), "
                                   "a Ray address as ray.init takes it")
    force: bool = opt(False, file=False,
                      help="retrain even if an index with other settings exists (drops its index shards)")
    lease_ttl: float = opt(60.0, file=False, help=LEASE_TTL_HELP.format("run"))

    def __post_init__(self):
        if not self.datastore:
            raise ConfigError("DATASTORE_URI is required")
        _positive("--train-size", self.train_size)
        _positive("--min-points-per-centroid", self.min_points_per_centroid)
        if self.metric not in METRICS:
            raise ConfigError(f"--metric: unknown metric {self.metric!r}; choose l2 or ip")
        if self.trainer not in TRAINERS:
            raise ConfigError(f"--trainer: choose one of {', '.join(TRAINERS)} (got {self.trainer!r})")
        if self.device not in DEVICES:
            raise ConfigError(f"--device: choose one of {', '.join(DEVICES)} (got {self.device!r})")
        if not self.read_factor >= 1:
            raise ConfigError(f"--read-factor must be at least 1 (got {self.read_factor})")
        if self.threads is not None:
            _positive("--threads", self.threads)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"--seed must be a non-negative integer (got {self.seed!r})")
        if self.lease_ttl <= 0:
            raise ConfigError(f"--lease-ttl must be positive (got {self.lease_ttl})")


DEFAULT_SHARD_SIZE = 50_000_000


@dataclass
class AddConfig:
    """`knnlm add`: encode every key into index shards of contiguous global-id ranges."""
    datastore: str = opt(**DATASTORE)
    index_shards: int | None = opt(None, metavar="N", group="ranges", file="shards", help="N near-equal id ranges")
    shard_size: int | None = opt(None, metavar="ROWS", group="ranges", help="ranges of ROWS ids",
                                 default_text=f"{DEFAULT_SHARD_SIZE:,} when neither is given")
    workers: int | None = opt(None, help="concurrent add tasks",
                              default_text="one per GPU of the cluster, else one per node")
    threads: int | None = opt(None, help="CPU cores per add task",
                              default_text="a node's cores shared by the tasks on it")
    encoder: str = opt("auto", choices=ENCODERS,
                       help="auto: faiss GPU if available, else torch on a CUDA GPU, else faiss on the CPU")
    device: str = opt("auto", choices=DEVICES, help="device of the encoding")
    address: str | None = opt(None, file=False, help=ADDRESS_HELP, default_text="start an embedded local Ray")
    merge: bool = opt(False, help="also merge the shards into one index over on-disk inverted lists "
                                  "(index/merged.faiss + index/merged.ivfdata) for single-node serving")
    force: bool = opt(False, file=False, help="rebuild the shards even if others exist")
    lease_ttl: float = opt(60.0, file=False, help=LEASE_TTL_HELP.format("run"))
    max_retries: int = opt(3, flag=False, file=False)     # a killed add task is redone this many times by Ray,
    max_dispatches: int = opt(25, flag=False, file=False)  # and then dispatched again, up to this many times in all

    DEFAULT_SHARD_SIZE = DEFAULT_SHARD_SIZE

    def __post_init__(self):
        if not self.datastore:
            raise ConfigError("DATASTORE_URI is required")
        if self.index_shards is not None and self.shard_size is not None:
            raise ConfigError("give --index-shards or --shard-size, not both")
        for flag, v in (("--index-shards", self.index_shards), ("--shard-size", self.shard_size),
                        ("--workers", self.workers), ("--threads", self.threads)):
            if v is not None:
                _positive(flag, v)
        if self.encoder not in ENCODERS:
            raise ConfigError(f"--encoder: choose one of {', '.join(ENCODERS)} (got {self.encoder!r})")
        if self.device not in DEVICES:
            raise ConfigError(f"--device: choose one of {', '.join(DEVICES)} (got {self.device!r})")
        if self.lease_ttl <= 0:
            raise ConfigError(f"--lease-ttl must be positive (got {self.lease_ttl})")


NAME_PATTERN = r"[A-Za-z0-9._-]{1,64}"


@dataclass
class IngestConfig:
    """`knnlm ingest`: a new corpus into a finished datastore, as its next version (builder/ingest.py)."""
    datastore: str = opt(**DATASTORE, help="a finished datastore root (local path or s3://)")
    corpus: list[str] = opt(flag="--corpus", metavar="PATH_OR_URI",
                            help="the new input files, directories, globs or s3:// URIs, in corpus order")
    name: str = opt(help="the ingestion's name (letters, digits, . _ -; at most 64): it is done once per name, "
                         "a rerun resumes or does nothing")
    model: str | None = opt(None, help="the datastore's model (its weights must match the manifest's sha256)",
                            default_text="the path or name the manifest records")
    format: str | None = opt(None, choices=FORMATS, help="format of the new corpus, as build's --format",
                             default_text="the datastore's --format")
    text_field: str = opt("text", help="JSONL field / Parquet column holding the text")
    workers: int | None = opt(None, help="key workers",
                              default_text="one per GPU of the cluster, else one CPU worker using all cores")
    device: str = opt("auto", choices=DEVICES, help="device of the key workers and of the encoding")
    batch_size: int = opt(8, help="windows per forward pass")
    index_shards: int | None = opt(None, metavar="N", group="ranges", file="shards",
                                   help="N near-equal id ranges for the new keys' index shards")
    shard_size: int | None = opt(None, metavar="ROWS", group="ranges", help="index shards of ROWS new ids",
                                 default_text="the mean size of the existing index shards")
    readd: bool = opt(False, help="ingest a file that a recorded `knnlm remove` took out (refused otherwise)")
    address: str | None = opt(None, file=False, help=ADDRESS_HELP, default_text="start an embedded local Ray")
    lease_ttl: float = opt(60.0, file=False, help=LEASE_TTL_HELP.format("ingestion"))
    progress: bool = opt(True, flag="--no-progress", file=False, help="no progress bar")

    def __post_init__(self):
        if not self.datastore:
            raise ConfigError("DATASTORE_URI is required")
        if isinstance(self.corpus, str):
            self.corpus = [self.corpus]
        if not self.corpus:
            raise ConfigError("--corpus: at least one path or URI is required")
        if not isinstance(self.name, str) or not re.fullmatch(NAME_PATTERN, self.name):
            raise ConfigError(f"--name {self.name!r}: use 1 to 64 letters, digits, '.', '_' or '-'")
        if self.format is not None and self.format not in FORMATS:
            raise ConfigError(f"--format: unknown format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.device not in DEVICES:
            raise ConfigError(f"--device: unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if self.index_shards is not None and self.shard_size is not None:
            raise ConfigError("give --index-shards or --shard-size, not both")
        for flag, v in (("--batch-size", self.batch_size), ("--workers", self.workers),
                        ("--index-shards", self.index_shards), ("--shard-size", self.shard_size)):
            if v is not None:
                _positive(flag, v)
        if self.lease_ttl <= 0:
            raise ConfigError(f"--lease-ttl must be positive (got {self.lease_ttl})")


@dataclass
class InfoConfig:
    """`knnlm info`: a datastore's manifest summary."""
    datastore: str = opt(**DATASTORE)
    json: bool = opt(False, file=False, help="print the whole manifest")


@dataclass
class VerifyConfig:
    """`knnlm verify`: every shard and index file against the manifest."""
    datastore: str = opt(**DATASTORE)
    threads: int = opt(8, file=False, help="shards read in parallel")


def parse_docs(specs: list[str]) -> list[int]:
    """--docs "3 5 10-12" (or several arguments, commas allowed) → sorted distinct document indices."""
    out: set[int] = set()
    for spec in specs:
        for part in str(spec).replace(",", " ").split():
            a, sep, b = part.partition("-")
            try:
                lo, hi = int(a), int(b) if sep else int(a)
            except ValueError:
                raise ConfigError(f"--docs: {part!r} is not a document index or a range like 10-12") from None
            if lo < 0 or hi < lo:
                raise ConfigError(f"--docs: {part!r} is not a document index or an increasing range like 10-12")
            out.update(range(lo, hi + 1))
    if not out:
        raise ConfigError("--docs: at least one document index is required")
    return sorted(out)


@dataclass
class RemoveConfig:
    """`knnlm remove`: take documents out of a datastore (a new version whose servers never return their ids)."""
    datastore: str = opt(**DATASTORE)
    source: list[str] | None = opt(None, metavar="PATH_OR_URI", group="what",
                                   help="input files to remove, as given to --corpus (path or URI)")
    docs: list[str] | None = opt(None, metavar="INDICES", group="what", argparse_kw={"nargs": "+"},
                                 help='document indices (stream mode: input file indices), e.g. "3 5 10-12"')
    lease_ttl: float = opt(60.0, file=False, help=LEASE_TTL_HELP.format("run"))

    def __post_init__(self):
        if not self.datastore:
            raise ConfigError("DATASTORE_URI is required")
        if isinstance(self.source, str):
            self.source = [self.source]
        if (self.source is None) == (self.docs is None):
            raise ConfigError("give --source or --docs (one of them)")
        if self.source is not None and not self.source:
            raise ConfigError("--source: at least one path or URI is required")
        if self.docs is not None:
            self.docs = parse_docs([self.docs] if isinstance(self.docs, (str, int)) else self.docs)
        if self.lease_ttl <= 0:
            raise ConfigError(f"--lease-ttl must be positive (got {self.lease_ttl})")


@dataclass
class CompactConfig:
    """`knnlm compact`: rewrite the shards without the removed keys, renumbering ids from 0."""
    datastore: str = opt(**DATASTORE)
    address: str | None = opt(None, file=False, help=ADDRESS_HELP, default_text="start an embedded local Ray")
    workers: int | None = opt(None, help="concurrent index re-encoding tasks", default_text="one per node")
    threads: int | None = opt(None, help="CPU cores per re-encoding task",
                              default_text="a node's cores shared by the tasks on it")
    lease_ttl: float = opt(60.0, file=False, help=LEASE_TTL_HELP.format("run"))

    def __post_init__(self):
        if not self.datastore:
            raise ConfigError("DATASTORE_URI is required")
        for flag, v in (("--workers", self.workers), ("--threads", self.threads)):
            if v is not None:
                _positive(flag, v)
        if self.lease_ttl <= 0:
            raise ConfigError(f"--lease-ttl must be positive (got {self.lease_ttl})")

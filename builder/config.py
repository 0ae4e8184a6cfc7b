"""Typed, validated configuration of a datastore build (`knnlm build`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from builder.errors import KnnlmError

KEY_LAYERS = ("ffn_input", "final_hidden")
MODES = ("stream", "document")
FORMATS = ("auto", "text", "wikitext", "jsonl", "parquet")
DEVICES = ("auto", "cpu", "cuda")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
MAX_DEFAULT_WINDOW = 1024


class ConfigError(KnnlmError, ValueError):
    """A user-facing configuration error; the message names the flag."""


@dataclass
class BuildConfig:
    corpus: list[str]
    model: str
    out: str
    key_layer: str = "ffn_input"
    window: int | None = None          # None: the model's max positions, capped at 1024
    min_context: int | None = None     # None: window // 2
    mode: str = "document"
    format: str = "auto"
    text_field: str = "text"           # jsonl / parquet records
    shard_rows: int = 131072           # most rows per shard file
    unit_tokens: int = 262144          # targets per work unit (the unit of retry and resume)
    row_group_rows: int = 16384        # Parquet row group (the granularity of index sampling)
    workers: int | None = None         # None: one per GPU, else 1 CPU worker using every core
    address: str | None = None         # Ray address; None starts an embedded local Ray
    device: str = "auto"
    compute_dtype: str = "auto"        # auto: bf16 (or fp16) on GPU, fp32 on CPU
    batch_size: int = 8                # windows per forward pass
    lease_ttl: float = 60.0            # seconds after the last renewal before a lease is stale
    progress: bool = True
    extra: dict = field(default_factory=dict)

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
    datastore: str
    train_size: int = 1_000_000        # keys sampled (all keys if the datastore has fewer)
    index_factory: str = "IVF4096,PQ64"
    metric: str = "l2"
    seed: int = 0
    trainer: str = "auto"              # auto | faiss | torch | faiss-gpu
    device: str = "auto"               # auto | cpu | cuda
    read_factor: float = 4.0           # rows read per sampled key (whole row groups)
    min_points_per_centroid: int = 39  # fewer training keys per IVF centroid is an error
    force: bool = False
    threads: int | None = None         # faiss/torch threads (default: all cores)
    lease_ttl: float = 60.0

    def __post_init__(self):
        if not self.datastore:
            raise ConfigError("DATASTORE_URI is required")
        _positive("--train-size", self.train_size)
        _positive("--min-points-per-centroid", self.min_points_per_centroid)
        if self.metric not in ("l2", "ip"):
            raise ConfigError(f"--metric: unknown metric {self.metric!r}; choose l2 or ip")
        if self.trainer not in ("auto", "faiss", "torch", "faiss-gpu"):
            raise ConfigError(f"--trainer: choose one of auto, faiss, torch, faiss-gpu (got {self.trainer!r})")
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


@dataclass
class AddConfig:
    """`knnlm add`: encode every key into index shards of contiguous global-id ranges."""
    datastore: str
    index_shards: int | None = None    # N contiguous id ranges ...
    shard_size: int | None = None      # ... or ranges of this many ids (default 50M)
    workers: int | None = None         # concurrent add tasks (default: one per GPU, else one per node)
    threads: int | None = None         # cores per add task (default: the node's cores / tasks per node)
    encoder: str = "auto"              # auto | faiss | torch | faiss-gpu
    device: str = "auto"
    address: str | None = None
    merge: bool = False                # also merge the shards into one on-disk index
    force: bool = False
    lease_ttl: float = 60.0
    max_retries: int = 3               # a killed add task is redone this many times

    DEFAULT_SHARD_SIZE = 50_000_000

    def __post_init__(self):
        if not self.datastore:
            raise ConfigError("DATASTORE_URI is required")
        if self.index_shards is not None and self.shard_size is not None:
            raise ConfigError("give --index-shards or --shard-size, not both")
        for flag, v in (("--index-shards", self.index_shards), ("--shard-size", self.shard_size),
                        ("--workers", self.workers), ("--threads", self.threads)):
            if v is not None:
                _positive(flag, v)
        if self.encoder not in ("auto", "faiss", "torch", "faiss-gpu"):
            raise ConfigError(f"--encoder: choose one of auto, faiss, torch, faiss-gpu (got {self.encoder!r})")
        if self.device not in DEVICES:
            raise ConfigError(f"--device: choose one of {', '.join(DEVICES)} (got {self.device!r})")
        if self.lease_ttl <= 0:
            raise ConfigError(f"--lease-ttl must be positive (got {self.lease_ttl})")

"""The options of the retrieval commands (`knnlm serve`, `query`, `eval`, `tune`, `generate`,
`neighbours`): each field is the one definition of its option (see builder/options.py). Light: the
command line builds its parser from this module without numpy."""
from __future__ import annotations

from dataclasses import dataclass

from builder.config import COMPUTE_DTYPES, DATASTORE, DEVICES, FORMATS, MODES, ConfigError
from builder.options import opt

TUNED = "the value `knnlm tune` recorded, else {}"
CACHE_IDS = 16      # neighbours per token whose global ids a neighbour cache keeps: where a report finds their text


# the kNN-LM settings, shared by eval and generate (defaults: retriever.knnlm.PAPER_*)
def _lambda():
    return opt(None, flag="--lambda", file="lambda", help="interpolation weight of p_kNN",
               default_text=TUNED.format(0.25))


def _temperature():
    return opt(None, help="softmax temperature of p_kNN", default_text=TUNED.format(1.0))


def _k():
    return opt(None, help="neighbours", default_text=TUNED.format(1024))


def _nprobe():
    return opt(32, help="inverted lists probed per query")


def _model():
    return opt(None, file=False, help="the Hugging Face causal LM: the one the datastore was built with",
               default_text="the model recorded in the manifest")


SERVERS_ADDRESS = "a Ray cluster with running servers of this datastore"


def positive(*flags_values) -> None:
    """ConfigError naming the first flag whose value (when given) is not a positive integer."""
    for flag, v in flags_values:
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"{flag} must be a positive integer (got {v!r})")


@dataclass
class EvalConfig:
    """`knnlm eval`: base LM and kNN-LM perplexity of evaluation text."""
    datastore: str = opt(**DATASTORE)
    corpus: list[str] = opt(metavar="PATH_OR_URI", help="evaluation text, read like build corpora (same formats)")
    model: str | None = _model()
    lam: float | None = _lambda()
    temperature: float | None = _temperature()
    k: int | None = _k()
    nprobe: int = _nprobe()
    save_neighbours: str | None = opt(None, metavar="URI", file=False,
                                      help="also store, per token, the LM log-prob of the target, the k distances "
                                           "and values and the first 16 neighbours' ids, and the evaluated text "
                                           "(Parquet; see retriever/tune.py) for `knnlm tune` and `knnlm report`")
    rerank: bool = opt(False, choices=("exact",), from_cli=lambda v: v == "exact",
                       help="exact: re-rank the k retrieved candidates by exact distance (servers need --rerank)")
    mode: str | None = opt(None, choices=MODES, file=False, help="", default_text="the manifest's")
    window: int | None = opt(None, help="tokens per evaluation window (the paper: 3072)",
                             default_text="the manifest's: the build's windows")
    min_context: int | None = opt(None, help="tokens of context each window re-reads from the previous one; "
                                             "window - min_context new tokens are scored per window (the paper: "
                                             "2560, i.e. 512 new tokens)", default_text="the manifest's")
    compute_dtype: str | None = opt(None, choices=tuple(d for d in COMPUTE_DTYPES if d != "auto"), file=False,
                                    help="dtype of the queries' forward pass: the datastore's keys' own (any other "
                                         "is refused: queries must be computed as the keys were)",
                                    default_text="the manifest's")
    format: str = opt("auto", choices=FORMATS, help="the evaluation text's format, as build's --format")
    text_field: str = opt("text", file=False, help="JSONL field / Parquet column holding the text")
    address: str | None = opt(None, file=False, help=SERVERS_ADDRESS,
                              default_text="embedded servers started for the call")
    workers: int | None = opt(None, help="LM workers", default_text="one per GPU, else one")
    batch_size: int = opt(8, file=False, help="windows per forward pass")
    cache_dir: str | None = opt(None, file=False, help="cache of the embedded servers")
    out: str | None = opt(None, metavar="FILE.json", help="also write the results as JSON")
    report: str | None = opt(None, metavar="DIR", help="also write a report there: a page (DIR/index.html, opens from "
                                                      "disk) of each token's gain and the training text its nearest "
                                                      "neighbours come from, as `knnlm report` makes")
    search_batch: int = 4096
    chunk_targets: int = 8192
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self):
        if isinstance(self.corpus, str):
            self.corpus = [self.corpus]
        if not self.corpus:
            raise ConfigError("--corpus: at least one evaluation file is required")
        if self.lam is not None and not 0 <= self.lam <= 1:
            raise ConfigError(f"--lambda must be in [0, 1] (got {self.lam})")
        if self.temperature is not None and not self.temperature > 0:
            raise ConfigError(f"--temperature must be positive (got {self.temperature})")
        positive(("--k", self.k), ("--nprobe", self.nprobe), ("--batch-size", self.batch_size),
                 ("--workers", self.workers), ("--window", self.window), ("--min-context", self.min_context))
        if self.window is not None and self.min_context is not None and self.min_context >= self.window:
            raise ConfigError(f"--min-context {self.min_context} must be smaller than --window {self.window} "
                              "(each window scores window - min_context new tokens)")


@dataclass
class TuneConfig:
    """`knnlm tune`: λ, T and k chosen on cached neighbours."""
    valid: str = opt(metavar="CACHE", help="neighbour cache of the validation text")
    test: str | None = opt(None, metavar="CACHE", help="neighbour cache of the test text")
    out: str | None = opt(None, metavar="FILE.json", help="the choice, the figures and the whole grid")
    plots: str | None = opt(None, metavar="DIR", help="PNG plots: perplexity vs lambda, vs k")
    record: str | None = opt(None, metavar="DATASTORE_URI",
                             help="store the choice in this datastore's manifest as `knnlm eval`'s default")


@dataclass
class ReportConfig:
    """`knnlm report`: a static page of where the datastore helped, and which training text each prediction
    came from."""
    datastore: str = opt(**DATASTORE)
    cache: str = opt(metavar="EVAL_CACHE", help="the neighbour cache of an evaluation (`knnlm eval --save-neighbours`)")
    out: str = opt(metavar="DIR", help="the report's folder: index.html and data/ (local or s3://)")
    neighbours: int = opt(4, help=f"neighbours shown per token (at most {CACHE_IDS}: a cache keeps the ids of "
                                  "that many)")
    context: int = opt(12, help="training tokens shown before each neighbour's token (and a third as many after)")
    page_tokens: int = opt(2000, help="scored tokens per page of text (the browser draws one page at a time)")
    tune: str | None = opt(None, metavar="FILE.json", help="`knnlm tune --out`'s file: its validation curves are "
                                                          "plotted beside this text's")
    model: str | None = _model()

    def __post_init__(self):
        positive(("--neighbours", self.neighbours), ("--page-tokens", self.page_tokens))
        if self.neighbours > CACHE_IDS:
            raise ConfigError(f"--neighbours {self.neighbours}: a neighbour cache keeps the ids of the first "
                              f"{CACHE_IDS} neighbours of each token; show at most {CACHE_IDS}")
        if not isinstance(self.context, int) or isinstance(self.context, bool) or self.context < 0:
            raise ConfigError(f"--context must be a non-negative integer (got {self.context!r})")


@dataclass
class ServeConfig:
    """`knnlm serve`: the index servers of a datastore."""
    datastore: str = opt(**DATASTORE)
    replicas: int = opt(1, help="servers per index shard (on different nodes if possible)")
    rerank: bool = opt(False, help="also keep each range's fp16 keys locally (memory-mapped) so requests can ask "
                                   "for exact re-ranking of their candidates")
    address: str | None = opt(None, file=False, help="Ray cluster address as ray.init takes it (e.g. auto, "
                                                     "ray://head:10001)", default_text="an embedded local Ray")
    device: str = opt("auto", choices=DEVICES,
                      help="auto: faiss GPU when faiss has GPU support and the cluster GPUs (k <= 2048 there)")
    cache_dir: str | None = opt(None, file=False, help="local cache of index shards and values on each node",
                                default_text="$KNNLM_CACHE or ~/.cache/knnlm")
    threads: int | None = opt(None, file=False, help="faiss threads per server", default_text="all cores")
    watch: float = opt(5.0, help="seconds between two looks at the datastore's version: the servers of a newly "
                                 "published version (ingestion, removal, compaction) start, then serve; 0: serve the "
                                 "version current now, never follow")
    grace: float = opt(122.0, help="seconds the previous version's servers keep serving after a switch (clients "
                                   "still on them move to the new version)",
                       default_text="122: twice the clients' 1 s refresh plus their 120 s deadline")
    evaluator: bool = opt(True, flag="--no-evaluator",
                          help="no warm evaluator: by default one process beside the servers keeps torch, "
                               "transformers and the datastore's LM loaded, and `knnlm eval --address` hands it "
                               "its evaluation (no start-up per call)")
    status: bool = opt(False, group="action", file=False, help="report every shard and replica's health and exit")
    stop: bool = opt(False, group="action", file=False,
                     help="remove this datastore's servers from the cluster and exit")

    def __post_init__(self):
        positive(("--replicas", self.replicas), ("--threads", self.threads))
        for flag, v in (("--watch", self.watch), ("--grace", self.grace)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ConfigError(f"{flag} must be a number of seconds >= 0 (got {v!r})")


@dataclass(kw_only=True)                 # --out is required but listed after --k and --nprobe
class QueryConfig:
    """`knnlm query`: the global top-k of a batch of query vectors."""
    datastore: str = opt(**DATASTORE)
    queries: str = opt(metavar="Q.npy", help="float32 array of shape (n, dim)")
    k: int = opt(1024, help="neighbours per query")
    nprobe: int = _nprobe()
    out: str = opt(metavar="R.npz", help="the results: dist, ids, values, partial, missing_shards")
    rerank: bool = opt(False, help="re-rank the merged top-k by exact distance (the same for any index sharding)")
    allow_partial: bool = opt(False, help="return results from the shards that answer, flagged partial, instead "
                                          "of failing")
    batch_size: int = opt(1024, help="queries per router call")
    address: str | None = opt(None, help=SERVERS_ADDRESS)
    cache_dir: str | None = opt(None, help="cache of the embedded servers (no --address)")

    def __post_init__(self):
        positive(("--k", self.k), ("--nprobe", self.nprobe), ("--batch-size", self.batch_size))


@dataclass
class GenerateConfig:
    """`knnlm generate`: model.generate() with the kNN-LM's next-token distribution."""
    datastore: str = opt(**DATASTORE)
    prompt: str = opt(help="the text to continue")
    max_new_tokens: int = opt(40, help="tokens to generate")
    lam: float | None = _lambda()
    temperature: float | None = _temperature()
    k: int | None = _k()
    nprobe: int = _nprobe()
    sample: bool = opt(False, help="sample instead of greedy decoding")
    seed: int = opt(0, help="seed of the sampling")
    compare: bool = opt(False, help="also print the base LM's generation")
    model: str | None = _model()
    address: str | None = opt(None, help=SERVERS_ADDRESS, default_text="embedded servers started for the call")
    cache_dir: str | None = opt(None, help="cache of the embedded servers")

    def __post_init__(self):
        positive(("--max-new-tokens", self.max_new_tokens), ("--k", self.k), ("--nprobe", self.nprobe))
        if self.lam is not None and not 0 <= self.lam <= 1:
            raise ConfigError(f"--lambda must be in [0, 1] (got {self.lam})")
        if self.temperature is not None and not self.temperature > 0:
            raise ConfigError(f"--temperature must be positive (got {self.temperature})")


@dataclass
class NeighboursConfig:
    """`knnlm neighbours`: the retrieved neighbours of each position of a text, with their context."""
    datastore: str = opt(**DATASTORE)
    text: str = opt(help="the text whose positions are looked up")
    k: int = opt(8, help="neighbours shown per position")
    nprobe: int = _nprobe()
    context: int = opt(24, help="datastore tokens shown before each neighbour's token")
    json: bool = opt(False, help="print JSON instead of text")
    model: str | None = _model()
    address: str | None = opt(None, help=SERVERS_ADDRESS, default_text="embedded servers started for the call")
    cache_dir: str | None = opt(None, help="cache of the embedded servers")

    def __post_init__(self):
        positive(("--k", self.k), ("--nprobe", self.nprobe))
        if not isinstance(self.context, int) or self.context < 0:
            raise ConfigError(f"--context must be a non-negative integer (got {self.context!r})")

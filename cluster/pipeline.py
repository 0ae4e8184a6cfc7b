"""`knnlm run PIPELINE.yaml`: a whole datastore from one file.

    datastore: s3://bucket/wt103          # where everything goes (a local path or s3://)
    address: null                         # a Ray cluster (as ray.init takes it); null: embedded local Ray
    build:   {corpus: [...], model: ..., key_layer: ffn_input, window: 1024, mode: stream, ...}
    index:   {factory: IVF4096,PQ64, train_size: 1000000, shards: 8, ...}
    tune:    {valid: [valid.txt], test: [test.txt], record: true, plots: ./plots}      # optional
    eval:    {corpus: [test.txt], lambda: null, temperature: null, k: 1024, out: ...}  # optional
    serve:   {replicas: 1, rerank: false}                                             # optional

The stages run in order, build → train-index → add → tune → eval → serve, each the same
function its own subcommand runs, so each is resumable and skips what is already committed:
rerunning a finished pipeline does nothing but check. A file that asks for something other than
what the datastore holds (another model, factory, layout) is refused by the stage, naming the
field. The resolved file (every default filled in) is stored in the manifest as `pipeline`.

Every key has a default (see `SECTIONS`, and `knnlm run --help`); an unknown key is an error
naming it and the closest valid key. Keys use the subcommands' option names with `_` for `-`.
Relative paths are relative to the file's folder, and the inputs the file names (corpus, valid and
test files, a local model folder) are checked when it is loaded, before any Ray or model work.
"""
from __future__ import annotations

import difflib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field, fields

from builder.config import ConfigError

log = logging.getLogger(__name__)


@dataclass
class BuildSection:
    corpus: list[str] = field(default_factory=list)      # required
    model: str = ""                                     # required
    key_layer: str = "ffn_input"
    window: int | None = None
    min_context: int | None = None
    mode: str = "document"
    format: str = "auto"
    text_field: str = "text"
    shard_rows: int = 131072
    unit_tokens: int = 262144
    row_group_rows: int = 16384
    workers: int | None = None
    device: str = "auto"
    compute_dtype: str = "auto"
    batch_size: int = 8


@dataclass
class IndexSection:
    factory: str = "IVF4096,PQ64"
    train_size: int = 1_000_000
    metric: str = "l2"
    seed: int = 0
    trainer: str = "auto"
    read_factor: float = 4.0
    min_points_per_centroid: int = 39
    shards: int | None = None          # --index-shards
    shard_size: int | None = None
    encoder: str = "auto"
    device: str = "auto"
    workers: int | None = None
    threads: int | None = None
    merge: bool = False


@dataclass
class TuneSection:
    valid: list[str] = field(default_factory=list)      # required when the section is given
    test: list[str] = field(default_factory=list)
    format: str = "auto"
    k: int = 1024                      # neighbours cached per token (tuning tries k up to this)
    nprobe: int = 32
    record: bool = True                # the chosen λ, T, k become `knnlm eval`'s defaults
    plots: str | None = None           # a local folder for the PNG plots
    out: str | None = None             # a local JSON file with the whole grid
    workers: int | None = None


@dataclass
class EvalSection:
    corpus: list[str] = field(default_factory=list)     # required when the section is given
    format: str = "auto"
    lam: float | None = None           # `lambda` in the file; None: the tuned value, else 0.25
    temperature: float | None = None
    k: int | None = None
    nprobe: int = 32
    rerank: bool = False
    workers: int | None = None
    out: str | None = None             # a local JSON file, as `knnlm eval --out`


@dataclass
class ServeSection:
    replicas: int = 1
    rerank: bool = False
    device: str = "auto"


SECTIONS = {"build": BuildSection, "index": IndexSection, "tune": TuneSection, "eval": EvalSection,
            "serve": ServeSection}
OPTIONAL = ("tune", "eval", "serve")
RENAMED = {("eval", "lambda"): "lam"}          # YAML key → field (lambda is a Python keyword)


def yaml_keys(section: str) -> dict[str, str]:
    """{field: its key in the file} of a section's dataclass, in field order."""
    renamed = {f: key for (sec, key), f in RENAMED.items() if sec == section}
    return {f.name: renamed.get(f.name, f.name) for f in fields(SECTIONS[section])}


@dataclass
class Pipeline:
    datastore: str
    build: BuildSection
    index: IndexSection
    address: str | None = None
    tune: TuneSection | None = None
    eval: EvalSection | None = None
    serve: ServeSection | None = None
    source: str = "<pipeline>"

    def __post_init__(self):
        where = self.source
        if not self.datastore:
            raise ConfigError(f"{where}: `datastore` (the output URI) is required")
        if not self.build.corpus:
            raise ConfigError(f"{where}: build.corpus: at least one path or URI is required")
        if not self.build.model:
            raise ConfigError(f"{where}: build.model: a model path or Hugging Face id is required")
        if self.tune is not None and not (self.tune.valid and self.tune.test):
            raise ConfigError(f"{where}: tune needs both tune.valid and tune.test (evaluation files)")
        if self.eval is not None and not self.eval.corpus:
            raise ConfigError(f"{where}: eval.corpus: at least one evaluation file is required")
        if self.serve is not None and not self.address:
            raise ConfigError(f"{where}: serve keeps index servers running after the pipeline, which needs a "
                              "Ray cluster: set `address` (or drop `serve`; eval and tune start their own servers)")
        self.stage_configs()                               # each stage's own checks, named by key

    def resolved(self) -> dict:
        """The file with every default filled in (what the manifest stores)."""
        out = {"datastore": self.datastore, "address": self.address}
        for name in SECTIONS:
            sec = getattr(self, name)
            if sec is None:
                continue
            d = asdict(sec)
            out[name] = {key: d[f] for f, key in yaml_keys(name).items()}
        return out

    def stage_configs(self) -> dict:
        """The stages' own config objects (their __post_init__ checks every value); errors name the key."""
        from builder.config import AddConfig, BuildConfig, TrainConfig
        b, ix = self.build, self.index
        made = {}
        for name, make in (
            ("build", lambda: BuildConfig(corpus=b.corpus, model=b.model, out=self.datastore, key_layer=b.key_layer,
                                          window=b.window, min_context=b.min_context, mode=b.mode, format=b.format,
                                          text_field=b.text_field, shard_rows=b.shard_rows, unit_tokens=b.unit_tokens,
                                          row_group_rows=b.row_group_rows, workers=b.workers, address=self.address,
                                          device=b.device, compute_dtype=b.compute_dtype, batch_size=b.batch_size,
                                          progress=False)),
            ("index", lambda: TrainConfig(datastore=self.datastore, train_size=ix.train_size,
                                          index_factory=ix.factory, metric=ix.metric, seed=ix.seed,
                                          trainer=ix.trainer, device=ix.device, read_factor=ix.read_factor,
                                          min_points_per_centroid=ix.min_points_per_centroid, threads=ix.threads)),
            ("add", lambda: AddConfig(datastore=self.datastore, index_shards=ix.shards, shard_size=ix.shard_size,
                                      workers=ix.workers, threads=ix.threads, encoder=ix.encoder, device=ix.device,
                                      address=self.address, merge=ix.merge)),
        ):
            try:
                made[name] = make()
            except ConfigError as e:
                section = "index" if name == "add" else name
                raise ConfigError(f"{self.source}: {section}: {_as_keys(str(e), section)}") from None
        return made


def _as_keys(msg: str, section: str) -> str:
    """A stage's message names its flags (--train-size); in a pipeline file they are keys
    (index.train_size). Flags the file has no key for (--force) stay as they are."""
    renamed = {"index-factory": "factory", "index-shards": "shards"}
    valid = {f.name for f in fields(SECTIONS[section])}

    def key(mo):
        name = renamed.get(mo.group(1), mo.group(1).replace("-", "_"))
        return f"{section}.{name}" if name in valid else mo.group(0)
    return re.sub(r"--([a-z][a-z0-9-]*)", key, msg)


# ---------------------------------------------------------------------------------------------
# reading the file


def parse_pipeline(data, source: str = "<pipeline>") -> Pipeline:
    """A Pipeline from the YAML's mapping; unknown keys are errors naming the closest valid one."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a pipeline file is a YAML mapping (datastore:, build:, index:, ...), "
                          f"not a {type(data).__name__}")
    top = {"datastore", "address", *SECTIONS}
    for key in data:
        if key not in top:
            raise ConfigError(f"{source}: unknown key {key!r}{_closest(key, top)}")
    sections = {}
    for name, cls in SECTIONS.items():
        raw = data.get(name)
        if raw is None:
            if name in OPTIONAL:
                continue
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: {name} must be a mapping of keys, got {type(raw).__name__}")
        names = {key: f for f, key in yaml_keys(name).items()}                 # YAML key → field
        kw = {}
        for key, v in raw.items():
            if key not in names:
                raise ConfigError(f"{source}: unknown key {name + '.' + str(key)!r}"
                                  f"{_closest(key, names, prefix=name + '.')}")
            kw[names[key]] = _listify(v) if names[key] in ("corpus", "valid", "test") else v
        try:
            sections[name] = cls(**kw)
        except TypeError as e:
            raise ConfigError(f"{source}: {name}: {e}") from None
    addr = data.get("address")
    ds = data.get("datastore")
    if ds is not None and not isinstance(ds, str):
        raise ConfigError(f"{source}: datastore must be a URI string, got {ds!r}")
    return Pipeline(datastore=ds or "", address=addr, source=source, **sections)


def _listify(v):
    return [v] if isinstance(v, str) else list(v or [])


def _closest(key: str, valid, prefix: str = "") -> str:
    best = difflib.get_close_matches(str(key), sorted(valid), n=1, cutoff=0.5)
    return (f"; did you mean {prefix + best[0]!r}?" if best
            else f"; valid keys: {', '.join(prefix + v for v in sorted(valid))}")


def load_pipeline(path: str, address: str | None = None, check_inputs: bool = True) -> Pipeline:
    """Read PIPELINE.yaml: relative paths in it are relative to the file's folder, and (check_inputs)
    every input it names must exist (see `_check_inputs`), before any Ray or model work."""
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such pipeline file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        raise ConfigError(f"{path}: the pipeline file is empty")
    if isinstance(data, dict) and address:
        data = dict(data, address=address)
    return resolve_pipeline(data, path, check_inputs)


def resolve_pipeline(data, path: str, check_inputs: bool = True, check_model: bool = True) -> Pipeline:
    """The Pipeline of a file's mapping, as if read from `path` (which need not exist yet): relative
    paths resolved against its folder, then (check_inputs) its inputs checked; check_model=False
    leaves out build.model (the demo checks its inputs before it trains the model)."""
    p = parse_pipeline(data, path)
    base = os.path.dirname(os.path.abspath(path))
    p.datastore = _rel(p.datastore, base)
    p.build.corpus = [_rel(c, base) for c in p.build.corpus]
    p.build.model = model_path(p.build.model, base)
    if p.tune:
        p.tune.valid = [_rel(c, base) for c in p.tune.valid]
        p.tune.test = [_rel(c, base) for c in p.tune.test]
        p.tune.plots = p.tune.plots and _rel(p.tune.plots, base)
        p.tune.out = p.tune.out and _rel(p.tune.out, base)
    if p.eval:
        p.eval.corpus = [_rel(c, base) for c in p.eval.corpus]
        p.eval.out = p.eval.out and _rel(p.eval.out, base)
    if check_inputs:
        _check_inputs(p, check_model)
    return p


def _rel(value: str, base: str) -> str:
    """A relative local path resolved against the pipeline file's folder (~ expanded); URIs and
    absolute paths as given."""
    if not value or "://" in value:
        return value
    value = os.path.expanduser(value)
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(base, value))


HUB_ID = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?$")      # "gpt2", "meta-llama/Llama-3.2-1B"


def model_path(value: str, base: str) -> str:
    """build.model: a local folder resolved against the file's folder, or a Hugging Face hub id as
    given. A value that exists there, or that only a path can be (absolute, ./, ../, ~, more than
    one slash), is a local path; any other is a hub id."""
    if not value or "://" in value:
        return value
    path = _rel(value, base)
    if os.path.exists(path) or value.startswith((".", "/", "~")) or ".." in value or not HUB_ID.match(value):
        return path
    return value


def _check_inputs(p: Pipeline, check_model: bool = True) -> None:
    """Every input the file names exists: build.corpus, tune.valid, tune.test, eval.corpus (files,
    folders, globs, s3:// objects or prefixes, as --corpus takes them) and build.model when it is a
    local path. The error names the key and the resolved path or URI. Outputs (datastore, out,
    plots) are not checked: they are created as needed."""
    from builder.storage import StorageError, expand_inputs
    inputs = {"build.corpus": p.build.corpus}
    if p.tune:
        inputs.update({"tune.valid": p.tune.valid, "tune.test": p.tune.test})
    if p.eval:
        inputs["eval.corpus"] = p.eval.corpus
    for key, specs in inputs.items():
        try:
            expand_inputs(specs)
        except (FileNotFoundError, ValueError, StorageError) as e:     # "--corpus SPEC: why" names the flag
            raise ConfigError(f"{p.source}: {key}: {str(e).removeprefix('--corpus').lstrip(': ')}") from None
    if check_model and os.path.isabs(p.build.model):                   # resolved: a local path, not a hub id
        from builder.modelinfo import ModelError, resolve_model_dir
        try:
            resolve_model_dir(p.build.model)
        except ModelError as e:
            why = str(e).removeprefix(f"--model {p.build.model}: ")
            raise ConfigError(f"{p.source}: build.model: {p.build.model}: {why} (a local path; a Hugging Face "
                              "hub id is written 'name' or 'org/name')") from None


# ---------------------------------------------------------------------------------------------
# running it


def run_pipeline(p: Pipeline) -> dict:
    """Run every stage (see the module docstring); returns {stage: summary or result}."""
    from builder.runtime import ray_session
    cfgs = p.stage_configs()
    out: dict = {}
    stages = ["build", "train-index", "add"] + [s for s in ("tune", "eval", "serve") if getattr(p, s)]
    t_all = time.perf_counter()
    with ray_session(p.address):
        for i, stage in enumerate(stages, 1):
            t0 = time.perf_counter()
            log.info("[%d/%d] %s", i, len(stages), stage)
            try:
                out[stage] = _stage(p, stage, cfgs)
            except ConfigError as e:      # the stage refuses the file: name its keys, not the stage's flags
                section = {"train-index": "index", "add": "index"}.get(stage, stage)
                raise ConfigError(f"{p.source}: {stage}: {_as_keys(str(e), section)}"
                                  + ("\n(--force is an option of the stage's own command, "
                                     f"`knnlm {stage} {p.datastore} --force`)" if "--force" in str(e) else "")
                                  ) from None
            summary = out[stage] if isinstance(out[stage], str) else _short(out[stage])
            log.info("[%d/%d] %s: %s (%.1fs)", i, len(stages), stage, summary, time.perf_counter() - t0)
    log.info("pipeline done in %.1fs: %s", time.perf_counter() - t_all, p.datastore)
    return out


def _stage(p: Pipeline, stage: str, cfgs: dict):
    from builder.add import add_stage
    from builder.build import build
    from builder.train import train_on_cluster, train_stage
    if stage == "build":
        return build(cfgs["build"]).summary()
    if stage == "train-index":
        return (train_on_cluster(cfgs["index"], p.address) if p.address else train_stage(cfgs["index"])).summary()
    if stage == "add":
        summary = add_stage(cfgs["add"]).summary()
        record_pipeline(p)
        return summary
    if stage == "tune":
        return _tune(p)
    if stage == "eval":
        return _eval(p)
    if stage == "serve":
        from retriever.router import start_servers
        servers = start_servers(p.datastore, replicas=p.serve.replicas, rerank=p.serve.rerank, device=p.serve.device,
                                detached=True)
        return f"{sum(len(r) for r in servers.values())} index servers running on {p.address}"
    raise ValueError(f"unknown stage {stage!r}")


def record_pipeline(p: Pipeline) -> None:
    """Store the resolved pipeline in the manifest (under the index lease: stages rewrite the manifest too)."""
    from builder.layout import INDEX_LEASE
    from builder.lease import Lease
    from builder.manifest import load_manifest, write_manifest
    from builder.storage import Storage
    st = Storage.from_uri(p.datastore)
    with Lease(st, 60.0, INDEX_LEASE, "pipeline record") as lease:
        m = load_manifest(st)
        want = p.resolved()
        if m.pipeline != want:
            m.pipeline = want
            lease.check()
            write_manifest(st, m)


def _caches(p: Pipeline) -> dict[str, str]:
    from builder.storage import Storage
    st = Storage.from_uri(p.datastore)
    return {"valid": st.url("eval/valid-neighbours"), "test": st.url("eval/test-neighbours")}


def _tune(p: Pipeline) -> dict:
    """Neighbour caches of tune.valid and tune.test (kept under DATASTORE/eval/ and reused when they
    exist with the same k and nprobe), then λ/T/k tuned on valid, reported on test."""
    from builder.storage import NotFound, Storage, expand_inputs, write_json_file
    from retriever.evaluate import EvalConfig, evaluate
    from retriever.tune import plot, read_cache, record, tune
    t = p.tune
    caches = _caches(p)
    for split, corpus in (("valid", t.valid), ("test", t.test)):
        uri = caches[split]
        try:
            meta = json.loads(Storage.from_uri(uri).read_text("cache.json"))
        except NotFound:
            meta = None
        if meta and (meta.get("k"), meta.get("nprobe"), meta.get("corpus")) == (t.k, t.nprobe, expand_inputs(corpus)):
            log.info("tune: reusing the %s neighbour cache %s", split, uri)
            continue
        Storage.from_uri(uri).delete_prefix("")
        r = evaluate(EvalConfig(datastore=p.datastore, corpus=corpus, format=t.format, lam=0.25, temperature=1.0,
                                k=t.k, nprobe=t.nprobe, address=p.address, workers=t.workers, save_neighbours=uri))
        log.info("tune: %s cached (%d tokens, base ppl %.3f)", split, r.tokens, r.base_ppl)
    try:
        res = tune(read_cache(caches["valid"]), read_cache(caches["test"]))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if t.plots:
        res["plots"] = plot(res, t.plots)
    if t.out:
        write_json_file(t.out, res)
    if t.record:
        record(p.datastore, res)
    res.pop("table", None)
    return res


def _eval(p: Pipeline) -> dict:
    from retriever.evaluate import EvalConfig, evaluate, write_json
    e = p.eval
    res = evaluate(EvalConfig(datastore=p.datastore, corpus=e.corpus, format=e.format, lam=e.lam,
                              temperature=e.temperature, k=e.k, nprobe=e.nprobe, rerank=e.rerank,
                              address=p.address, workers=e.workers))
    log.info("eval:\n%s", res.table())
    if e.out:
        write_json(res, e.out)
    return res.to_json()


def _short(d: dict) -> str:
    if "knnlm_ppl" in d:
        return f"base ppl {d['base_ppl']:.3f} → kNN-LM ppl {d['knnlm_ppl']:.3f} over {d['tokens']:,} tokens"
    if "lambda" in d:
        return (f"lambda={d['lambda']:g}, T={d['temperature']:g}, k={d['k']}: test ppl {d['test_base_ppl']:.3f} → "
                f"{d['test_ppl']:.3f}")
    return json.dumps(d)[:200]

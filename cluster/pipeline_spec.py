"""What a pipeline file holds: its sections, derived from the stages' config dataclasses.

Each section's keys are the options of its stages' configs that have a file key (see
builder/options.py): build: BuildConfig; index: TrainConfig and AddConfig (`factory` and `shards`
for --index-factory and --index-shards); ingest: IngestConfig (`knnlm ingest`, after the index stages); tune: TuneStage below; eval: EvalConfig (`lambda`);
serve: ServeConfig. A key's default is its option's default; a required option (build.corpus,
build.model, eval.corpus, tune.valid, tune.test) is checked by `Pipeline`, naming the key. Light:
the command line prints `pipeline_reference()` in `knnlm run --help`.
"""
from __future__ import annotations

import json
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, make_dataclass

from builder.config import AddConfig, BuildConfig, ConfigError, IngestConfig, TrainConfig
from builder.options import default_of, file_keys, flag_name, kind, opt, options
from retriever.config import EvalConfig, ServeConfig


@dataclass
class TuneStage:
    """The pipeline's tune stage: neighbour caches of the valid and test text (`knnlm eval
    --save-neighbours`), then `knnlm tune` on them."""
    valid: list[str] = opt(help="validation text")
    test: list[str] = opt(help="test text")
    format: str = opt("auto", help="the texts' format, as build's --format")
    k: int = opt(1024, help="neighbours cached per token (tuning tries k up to this)")
    nprobe: int = opt(32, help="inverted lists probed per query")
    record: bool = opt(True, help="the chosen λ, T, k become `knnlm eval`'s defaults")
    plots: str | None = opt(None, help="a local folder for the PNG plots")
    out: str | None = opt(None, help="a local JSON file with the whole grid")
    workers: int | None = opt(None, help="LM workers")


STAGES = {"build": (BuildConfig,), "index": (TrainConfig, AddConfig), "ingest": (IngestConfig,), "tune": (TuneStage,),
          "eval": (EvalConfig,), "serve": (ServeConfig,)}
OPTIONAL = ("ingest", "tune", "eval", "serve")
REQUIRED = "(required)"


def _section_field(cls, name: str) -> tuple:
    f = next(f for f in options(cls) if f.name == name)
    d = default_of(f)
    if d is MISSING:                     # required: an empty value that Pipeline refuses, naming the key
        return name, f.type, field(default_factory=list) if kind(f) == "list" else field(default="")
    return name, f.type, field(default_factory=lambda: d) if isinstance(d, (list, dict)) else field(default=d)


def _section_class(name: str):
    keys = file_keys(*STAGES[name])
    owner = {f: next(c for c in STAGES[name] if f in {o.name for o in options(c)}) for f in keys}
    return make_dataclass(f"{name.capitalize()}Section", [_section_field(owner[f], f) for f in keys])


SECTIONS = {name: _section_class(name) for name in STAGES}


def yaml_keys(section: str) -> dict[str, str]:
    """{field: its key in the file} of a section, in field order."""
    return file_keys(*STAGES[section])


def required_keys(section: str) -> set[str]:
    return {f.name for c in STAGES[section] for f in options(c) if default_of(f) is MISSING and f.name in
            yaml_keys(section)}


def as_keys(msg: str, section: str) -> str:
    """A stage's message names its flags (--train-size); in a pipeline file they are keys
    (index.train_size), from the same option fields. Flags the file has no key for (--force) stay."""
    keys = yaml_keys(section)
    names = {flag_name(f): f"{section}.{keys[f.name]}" for c in STAGES[section] for f in options(c) if f.name in keys}
    return re.sub(r"--[a-z][a-z0-9-]*", lambda mo: names.get(mo.group(0), mo.group(0)), msg)


@dataclass
class Pipeline:
    datastore: str
    build: object
    index: object
    address: str | None = None
    ingest: object | None = None
    tune: object | None = None
    eval: object | None = None
    serve: object | None = None
    source: str = "<pipeline>"

    def __post_init__(self):
        where = self.source
        if not self.datastore:
            raise ConfigError(f"{where}: `datastore` (the output URI) is required")
        if not self.build.corpus:
            raise ConfigError(f"{where}: build.corpus: at least one path or URI is required")
        if not self.build.model:
            raise ConfigError(f"{where}: build.model: a model path or Hugging Face id is required")
        if self.ingest is not None and not (self.ingest.corpus and self.ingest.name):
            raise ConfigError(f"{where}: ingest needs ingest.corpus and ingest.name")
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
        made = {}
        common = {"datastore": self.datastore, "address": self.address}
        for stage, section, cls, extra in (
                ("build", "build", BuildConfig, {"out": self.datastore, "address": self.address, "progress": False}),
                ("index", "index", TrainConfig, {"datastore": self.datastore}),
                ("add", "index", AddConfig, common),
                ("ingest", "ingest", IngestConfig, common | {"progress": False}),
                ("eval", "eval", EvalConfig, common)):
            sec = getattr(self, section)
            if sec is None:
                continue
            own = {f.name for f in options(cls)}
            try:
                made[stage] = cls(**{f.name: getattr(sec, f.name) for f in fields(sec) if f.name in own}, **extra)
            except ConfigError as e:
                raise ConfigError(f"{self.source}: {section}: {as_keys(str(e), section)}") from None
        return made


def pipeline_reference() -> str:
    """Every key of a pipeline file with its default (the --help epilog of `knnlm run`)."""
    lines = ["pipeline file keys (defaults):", "  datastore: (required) output URI, a local path or s3://bucket/prefix",
             "  address: null (a Ray cluster as ray.init takes it; null: an embedded local Ray)"]
    for name, cls in SECTIONS.items():
        lines.append(f"  {name}:" + ("  (optional section)" if name in OPTIONAL else ""))
        required = required_keys(name)
        for f in fields(cls):
            shown = REQUIRED if f.name in required else json.dumps(default_of(f))
            lines.append(f"    {yaml_keys(name)[f.name]}: {shown}")
    return "\n".join(lines)

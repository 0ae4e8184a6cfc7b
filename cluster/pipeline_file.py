"""Reading a pipeline file (`knnlm run PIPELINE.yaml`): keys checked against the sections of
cluster/pipeline_spec.py, relative paths resolved against the file's folder, and the inputs it
names (build and ingest corpus, valid and test files, a local model folder) checked before any Ray or model work."""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import fields

from builder.config import ConfigError
from builder.model_dir import ModelError, resolve_model_dir
from builder.options import kind
from builder.storage import InputError, StorageError, expand_inputs
from cluster.pipeline_spec import OPTIONAL, SECTIONS, Pipeline, yaml_keys


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
        lists = {f.name for f in fields(cls) if kind(f) == "list"}             # a single string is a list of one
        kw = {}
        for key, v in raw.items():
            if key not in names:
                raise ConfigError(f"{source}: unknown key {name + '.' + str(key)!r}"
                                  f"{_closest(key, names, prefix=name + '.')}")
            kw[names[key]] = _listify(v) if names[key] in lists else v
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
    if p.ingest:
        p.ingest.corpus = [_rel(c, base) for c in p.ingest.corpus]
        p.ingest.model = p.ingest.model and model_path(p.ingest.model, base)
    if p.tune:
        p.tune.valid = [_rel(c, base) for c in p.tune.valid]
        p.tune.test = [_rel(c, base) for c in p.tune.test]
        p.tune.plots = p.tune.plots and _rel(p.tune.plots, base)
        p.tune.out = p.tune.out and _rel(p.tune.out, base)
    if p.eval:
        p.eval.corpus = [_rel(c, base) for c in p.eval.corpus]
        p.eval.out = p.eval.out and _rel(p.eval.out, base)
        p.eval.report = p.eval.report and _rel(p.eval.report, base)
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
    inputs = {"build.corpus": p.build.corpus}
    if p.ingest:
        inputs["ingest.corpus"] = p.ingest.corpus
    if p.tune:
        inputs.update({"tune.valid": p.tune.valid, "tune.test": p.tune.test})
    if p.eval:
        inputs["eval.corpus"] = p.eval.corpus
    for key, specs in inputs.items():
        try:
            expand_inputs(specs)
        except InputError as e:                                         # its message names the flag, --corpus
            raise ConfigError(f"{p.source}: {key}: {e.detail}") from None
        except StorageError as e:
            raise ConfigError(f"{p.source}: {key}: {e}") from None
    if check_model and os.path.isabs(p.build.model):                   # resolved: a local path, not a hub id
        try:
            resolve_model_dir(p.build.model)
        except ModelError as e:
            why = e.why or str(e)
            raise ConfigError(f"{p.source}: build.model: {p.build.model}: {why} (a local path; a Hugging Face "
                              "hub id is written 'name' or 'org/name')") from None



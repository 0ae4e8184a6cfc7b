"""One definition per option: the `knnlm` flags and the pipeline file's keys are derived from the config
dataclasses' fields (builder/options.py), with the same defaults; --help shows each default once."""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import MISSING, dataclass

import pytest
from conftest import REPO

from builder.options import add_options, default_of, file_keys, flag_name, flags, from_args, opt, options
from cluster.cli import COMMANDS, make_parser, subcommands
from cluster.pipeline_spec import SECTIONS, STAGES, as_keys, pipeline_reference, yaml_keys


def _action(parser: argparse.ArgumentParser, dest: str) -> argparse.Action:
    return next(a for a in parser._actions if a.dest == dest)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_is_a_flag_with_its_default_and_choices(name):
    parser = subcommands(make_parser())[name]
    for f in options(COMMANDS[name].options):
        if not flags(f):
            continue
        a = _action(parser, f.name)
        assert [x for x in a.option_strings] == [x for x in flags(f) if x.startswith("-")], f.name
        d = default_of(f)
        if d is MISSING:
            assert a.required or not a.option_strings, f.name
        elif not f.metadata["knnlm_option"]["from_cli"]:
            assert a.default == d, (f.name, a.default, d)
        if f.metadata["knnlm_option"]["choices"]:
            assert tuple(a.choices) == tuple(f.metadata["knnlm_option"]["choices"]), f.name


@pytest.mark.parametrize("section", list(SECTIONS))
def test_every_pipeline_key_is_an_option_with_its_default(section):
    keys = yaml_keys(section)
    by_field = {f.name: f for cls in STAGES[section] for f in options(cls)}
    for f in SECTIONS[section].__dataclass_fields__.values():
        opt_field = by_field[f.name]
        d = default_of(opt_field)
        got = f.default if f.default is not MISSING else f.default_factory()
        assert got == ([] if d is MISSING and isinstance(got, list) else "" if d is MISSING else d), f.name
        assert f"    {keys[f.name]}: " in pipeline_reference()
        # a stage's message names the flag; in the file it names the key
        assert as_keys(f"{flag_name(opt_field)} is wrong", section) == f"{section}.{keys[f.name]} is wrong"
    # the keys other tools write: unchanged names
    expect = {"build": {"corpus", "model", "key_layer", "window", "min_context", "mode", "format", "text_field",
                        "shard_rows", "unit_tokens", "row_group_rows", "workers", "device", "compute_dtype",
                        "batch_size"},
              "index": {"factory", "train_size", "metric", "seed", "trainer", "read_factor", "min_points_per_centroid",
                        "shards", "shard_size", "encoder", "device", "workers", "threads", "merge"},
              "ingest": {"corpus", "name", "model", "format", "text_field", "workers", "device", "batch_size", "shards",
                         "shard_size", "readd"},
              "tune": {"valid", "test", "format", "k", "nprobe", "record", "plots", "out", "workers"},
              "eval": {"corpus", "format", "lambda", "temperature", "k", "nprobe", "rerank", "workers", "out", "window",
                       "min_context", "report"},
              "serve": {"replicas", "rerank", "device", "watch", "grace", "evaluator"}}
    assert set(keys.values()) == expect[section]


def test_an_option_is_one_field():
    @dataclass
    class Config:
        name: str = opt(flag="name", metavar="NAME")
        size: int = opt(3, help="how many")
        lam: float | None = opt(None, flag="--lambda", file="lambda", help="weight", default_text="tuned")
        fast: bool = opt(False, file=False, help="go fast")
    p = argparse.ArgumentParser()
    add_options(p, Config)
    assert from_args(Config, p.parse_args(["x", "--lambda", "0.5", "--fast"])) == Config("x", 3, 0.5, True)
    assert file_keys(Config) == {"name": "name", "size": "size", "lam": "lambda"}
    text = " ".join(p.format_help().split())
    assert "how many (default: 3)" in text and "weight (default: tuned)" in text and "go fast" in text


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_shows_each_default_once(name):
    text = subcommands(make_parser())[name].format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    for block in re.split(r"\n  (?=-|[A-Za-z])", text.split("options:", 1)[-1]):
        assert " ".join(block.split()).count("default") <= 1, block


def test_help_loads_no_heavy_module():
    code = ("import sys, contextlib, io\nfrom cluster.cli import main\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n    main(['--help'])\n"
            "print(sorted(m for m in ('numpy', 'pyarrow', 'torch', 'ray', 'yaml', 'asyncio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

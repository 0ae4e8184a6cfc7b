"""The bad-input table: every kind of bad input, for every subcommand and the pipeline file, gives a
one-line error naming the file, flag or key, a non-zero exit, no traceback, and commits nothing.

One row per kind (`CASES`); one parametrized test runs each row through the real command line:
in-process (`cluster.cli.main`) where that is cheap, and as a real `python -m cluster.cli`
subprocess for the rows marked `subprocess` (real exit codes, real stderr). With
KNNLM_BAD_INPUT_TABLE=PATH each row's actual error line is written to PATH (JSON);
`python tests/test_bad_input_table.py [PATH]` prints the table as markdown for the README.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from builder.manifest import CHECKSUM_FIELD, content_checksum

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import REPO, make_tiny_model, make_tokenizer, start_moto, write_text

W, C = "16", "8"
GOOD = ["The quick brown fox jumps over the lazy dog. " * 4,
        "A kNN-LM interpolates a language model with nearest neighbours from a datastore. " * 3,
        "In 1998 the river flooded the valley, and 3,000 people moved to the hills. " * 3]
EVAL = "The quick brown fox jumps over the river. A language model with neighbours."


@dataclass
class Ctx:
    """What a row's setup and argv may use: a fresh folder, the tiny model, and (when the row
    needs them) a built and indexed datastore, a model of another width, an S3 bucket."""
    tmp: str
    model: str = ""
    ds: str = ""                 # a built + indexed datastore (shared by the rows: never changed)
    evalf: str = ""              # evaluation text for that datastore
    wide_model: str = ""         # a GPT-2 of hidden size 48 (the datastore's is 32)
    bucket: str = ""
    dead: str = ""               # host:port where nothing listens

    @property
    def out(self) -> str:
        return os.path.join(self.tmp, "out")

    def file(self, rel: str, content: str | bytes) -> str:
        return write_text(os.path.join(self.tmp, rel), content)

    def corpus(self) -> str:
        return self.file("corpus/a.txt", GOOD[0])

    def build(self, *corpus_and_flags: str) -> list[str]:
        """`knnlm build` into ctx.out with the tiny model: the corpus paths, then extra flags."""
        i = next((j for j, a in enumerate(corpus_and_flags) if a.startswith("--")), len(corpus_and_flags))
        flags = list(corpus_and_flags[i:])
        fixed = [a for f, v in (("--window", W), ("--min-context", C)) if f not in flags for a in (f, v)]
        return ["build", "--corpus", *corpus_and_flags[:i], "--model", self.model, "--out", self.out, *fixed,
                "--no-progress", *flags]

    def copy_ds(self, name: str = "ds") -> str:
        dst = os.path.join(self.tmp, name)
        shutil.copytree(self.ds, dst)
        return dst

    def manifest(self, ds: str) -> dict:
        with open(os.path.join(ds, "manifest.json")) as f:
            return json.load(f)

    def set_manifest(self, ds: str, m: dict | str | list) -> str:
        """Write an edited manifest. A knnlm-format dict gets a matching manifest_checksum (as a tool that
        rewrites manifests would write it), so what is refused is the content, not a stale checksum."""
        if isinstance(m, dict) and CHECKSUM_FIELD in m:
            m[CHECKSUM_FIELD] = content_checksum(m)
        with open(os.path.join(ds, "manifest.json"), "w") as f:
            f.write(m if isinstance(m, str) else json.dumps(m))
        return ds

    def queries(self, q: np.ndarray) -> str:
        path = os.path.join(self.tmp, "q.npy")
        np.save(path, q)
        return path


@dataclass
class Case:
    kind: str                                   # what is wrong
    command: str                                # the subcommand (or "run" for a pipeline file)
    argv: Callable[[Ctx], list[str]]            # sets up the input, returns the command line
    words: list[str]                            # the error line must hold each (formatted with ctx)
    needs: tuple[str, ...] = ()                 # ray, ds, wide, s3, s3auth
    # what must be left: absent: no ctx.out at all (refused before any work); out: no manifest, shard or
    # lease under ctx.out; none: nothing to check beyond ctx.ds (which every row leaves unchanged);
    # ok: the row is a success (a warning, then the build succeeds)
    commits: str = "absent"
    subprocess: bool = False                    # run as a real `python -m cluster.cli` process
    env: dict = field(default_factory=dict)     # extra environment of the subprocess
    xfail: str | None = None
    after: Callable[[Ctx], None] | None = None  # more checks once the command has failed


def q_good(c: Ctx, n: int = 3, dim: int = 32) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)


def q_nan(c: Ctx) -> np.ndarray:
    q = q_good(c)
    q[1, 3] = np.nan
    return q


def q_inf(c: Ctx) -> np.ndarray:
    q = q_good(c)
    q[2, 0] = np.inf
    return q


def query(c: Ctx, q, *flags: str) -> list[str]:
    return ["query", c.ds, "--queries", c.queries(q) if isinstance(q, np.ndarray) else q, "--out",
            os.path.join(c.tmp, "r.npz"), *flags]


def manifest_edit(c: Ctx, fn: Callable[[dict], dict | str]) -> str:
    ds = c.copy_ds()
    return c.set_manifest(ds, fn(c.manifest(ds)))


def shard_path(c: Ctx, path: str) -> str:
    def edit(m):
        m["shards"][0]["path"] = path
        return m
    write_text(os.path.join(c.tmp, "outside.parquet"), b"PAR1 not a datastore shard PAR1")
    return manifest_edit(c, edit)


def pipeline(c: Ctx, **over) -> str:
    spec = {"datastore": "ds", "build": {"corpus": [c.corpus()], "model": c.model, "window": 16, "min_context": 8},
            "index": {"factory": "IVF4,Flat"}}
    for key, v in over.items():
        section, _, name = key.partition("__")
        if name:
            spec[section][name] = v
        else:
            spec[section] = v
    import yaml
    return c.file("p.yaml", yaml.safe_dump(spec, sort_keys=False))


def blocker_kept(c: Ctx) -> None:
    with open(os.path.join(c.tmp, "blocker.txt")) as f:
        assert f.read() == "x"


def nothing_on_s3(prefix: str) -> Callable[[Ctx], None]:
    def check(c: Ctx) -> None:
        import boto3
        got = boto3.client("s3").list_objects_v2(Bucket=c.bucket, Prefix=prefix).get("Contents", [])
        assert not got, [o["Key"] for o in got]
    return check




def mixed_short(c: Ctx) -> list[str]:
    c.file("corpus/a.txt", GOOD[0])
    c.file("corpus/b.txt", "a")
    return c.build(os.path.join(c.tmp, "corpus"))


CASES: list[Case] = [
    # ---- build: the corpus ------------------------------------------------------------------
    Case("missing corpus file", "build", lambda c: c.build(os.path.join(c.tmp, "nope", "wiki.txt")),
         ["--corpus {tmp}/nope/wiki.txt", "no such file"]),
    Case("glob that matches no file", "build", lambda c: (c.corpus(), c.build(os.path.join(c.tmp, "corpus", "*.jsonl")))[1],
         ["--corpus {tmp}/corpus/*.jsonl", "no file matches"]),
    Case("empty directory", "build", lambda c: (os.makedirs(os.path.join(c.tmp, "empty")),
                                                c.build(os.path.join(c.tmp, "empty")))[1],
         ["--corpus", "{tmp}/empty", "empty"]),
    Case("directory with no text file", "build",
         lambda c: (c.file("docs/notes.pdf", b"%PDF-1.4\x00\x01\x02\xff"), c.file("docs/img.png", b"\x89PNG\x00\xff"),
                    c.build(os.path.join(c.tmp, "docs")))[2],
         ["--corpus", "{tmp}/docs"], needs=("ray",), commits="out"),
    Case("corpus given twice", "build", lambda c: c.build(c.corpus(), c.corpus()), ["--corpus", "more than once"]),
    Case("compressed corpus", "build", lambda c: c.build(c.file("c/a.jsonl.gz", b"\x1f\x8b\x08\x00")),
         ["{tmp}/c/a.jsonl.gz", "compressed"]),
    Case("empty file", "build", lambda c: c.build(c.file("corpus/empty.txt", "")),
         ["{tmp}/corpus/empty.txt", "no usable document", "empty document"], needs=("ray",), commits="out"),
    Case("binary file", "build", lambda c: c.build(c.file("corpus/blob.txt", bytes(range(256)) * 8)),
         ["{tmp}/corpus/blob.txt", "no usable document"], needs=("ray",), commits="out"),
    Case("non-UTF-8 file", "build", lambda c: c.build(c.file("corpus/latin1.txt", "caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1"))),
         ["{tmp}/corpus/latin1.txt", "UTF-8"], needs=("ray",), commits="out"),
    Case("JSONL without the text field", "build",
         lambda c: c.build(c.file("corpus/docs.jsonl", "".join(json.dumps({"body": t}) + "\n" for t in GOOD))),
         ["{tmp}/corpus/docs.jsonl", "--text-field", "no usable document"], needs=("ray",), commits="out"),
    Case("Parquet without the text column", "build",
         lambda c: c.build(c.file("corpus/docs.parquet", _parquet({"body": GOOD}))),
         ["{tmp}/corpus/docs.parquet", "'text'", "--text-field", "body"], needs=("ray",), commits="out"),
    Case("unknown --format", "build", lambda c: c.build(c.corpus(), "--format", "xml"), ["--format", "xml"]),
    Case("--format that does not fit the file", "build", lambda c: c.build(c.corpus(), "--format", "parquet"),
         ["{tmp}/corpus/a.txt", "Parquet", "--format"], needs=("ray",), commits="out"),
    Case("only short documents", "build",
         lambda c: c.build(c.file("corpus/a.txt", "a"), c.file("corpus/b.txt", "b")),
         ["no usable document", "--corpus", "{tmp}/corpus/a.txt"], needs=("ray",), commits="out"),
    Case("short documents beside good ones (a warning, and the build succeeds)", "build", mixed_short,
         ["{tmp}/corpus/b.txt"], needs=("ray",), commits="ok"),
    # ---- build: flags and the model -------------------------------------------------------
    Case("--window 0", "build", lambda c: c.build(c.corpus(), "--window", "0"), ["--window", "0"]),
    Case("--min-context not below --window", "build",
         lambda c: c.build(c.corpus(), "--window", "16", "--min-context", "16"), ["--min-context", "--window", "16"],
         subprocess=True),
    Case("--min-context above --window", "build",
         lambda c: c.build(c.corpus(), "--window", "16", "--min-context", "20"), ["--min-context", "20", "--window"]),
    Case("--min-context 0", "build", lambda c: c.build(c.corpus(), "--min-context", "0"), ["--min-context", "0"]),
    Case("--window 1", "build", lambda c: c.build(c.corpus(), "--window", "1", "--min-context", "1"),
         ["--window", "1"]),
    Case("--shard-rows 0", "build", lambda c: c.build(c.corpus(), "--shard-rows", "0"), ["--shard-rows", "0"]),
    Case("negative --unit-tokens", "build", lambda c: c.build(c.corpus(), "--unit-tokens", "-5"),
         ["--unit-tokens", "-5"]),
    Case("--window above the model's positions", "build", lambda c: c.build(c.corpus(), "--window", "128"),
         ["--window 128", "maximum positions (64)"]),
    Case("negative --shard-rows", "build", lambda c: c.build(c.corpus(), "--shard-rows", "-1"), ["--shard-rows", "-1"]),
    Case("negative --batch-size", "build", lambda c: c.build(c.corpus(), "--batch-size", "-1"), ["--batch-size", "-1"]),
    Case("--workers 0", "build", lambda c: c.build(c.corpus(), "--workers", "0"), ["--workers", "0"]),
    Case("model path that does not exist", "build",
         lambda c: [a if a != c.model else os.path.join(c.tmp, "models", "gpt2-missing") for a in c.build(c.corpus())],
         ["--model {tmp}/models/gpt2-missing", "no such model directory"]),
    Case("model directory without config.json", "build",
         lambda c: (c.file("notmodel/weights.bin", b"\0" * 16),
                    [a if a != c.model else os.path.join(c.tmp, "notmodel") for a in c.build(c.corpus())])[1],
         ["--model {tmp}/notmodel", "config.json"]),
    Case("unknown --key-layer", "build", lambda c: c.build(c.corpus(), "--key-layer", "attn_output"),
         ["--key-layer", "attn_output", "ffn_input"]),
    Case("--out under a regular file", "build",
         lambda c: [a if a != c.out else os.path.join(c.file("blocker.txt", "x"), "store") for a in c.build(c.corpus())],
         ["--out", "{tmp}/blocker.txt/store", "not writable"], after=blocker_kept),
    Case("--out that is a regular file", "build",
         lambda c: [a if a != c.out else c.file("blocker.txt", "x") for a in c.build(c.corpus())],
         ["--out", "{tmp}/blocker.txt", "not writable"], after=blocker_kept),
    Case("rebuild with another --window", "build",
         lambda c: ["build", "--corpus", *sorted(glob.glob(os.path.join(c.ds, "..", "corpus", "*.txt"))), "--model",
                    c.model, "--out", c.ds, "--window", "32", "--min-context", "6", "--no-progress"],
         ["--window", "--out", "{ds}", "the datastore has 16", "this run asks for 32"], needs=("ray", "ds"),
         commits="none"),
    Case("unreachable --address", "build", lambda c: c.build(c.corpus(), "--address", c.dead),
         ["--address {dead}", "nothing answers"], subprocess=True),
    # ---- S3 -------------------------------------------------------------------------------
    Case("missing bucket", "build", lambda c: [a if a != c.out else "s3://no-such-bucket-knnlm/ds"
                                                 for a in c.build(c.corpus())],
         ["s3://no-such-bucket-knnlm/ds", "--out"], needs=("s3",), commits="none"),
    Case("missing S3 corpus prefix", "build",
         lambda c: c.build(f"s3://{c.bucket}/nothing-here/"),
         ["--corpus s3://{bucket}/nothing-here/", "no object"], needs=("s3", "bucket"),
         after=nothing_on_s3("")),
    Case("missing bucket", "info", lambda c: ["info", "s3://no-such-bucket-knnlm/ds"],
         ["s3://no-such-bucket-knnlm/ds"], needs=("s3",), commits="none"),
    Case("wrong S3 credentials", "build", lambda c: [a if a != c.out else f"s3://{c.bucket}/ds"
                                                      for a in c.build(c.corpus())],
         ["s3://{bucket}/ds", "--out", "credentials"], needs=("s3auth",), commits="none"),
    Case("wrong S3 credentials", "info", lambda c: ["info", f"s3://{c.bucket}/ds"],
         ["s3://{bucket}/ds", "credentials"], needs=("s3auth",), commits="none"),
    # ---- the manifest ---------------------------------------------------------------------
    Case("not a datastore (no manifest)", "info", lambda c: ["info", os.path.join(c.tmp, "corpus")],
         ["{tmp}/corpus/manifest.json", "not found"], commits="none"),
    Case("foreign manifest (another tool's JSON)", "info",
         lambda c: ["info", manifest_edit(c, lambda m: {"name": "my-app", "version": "1.0.0"})],
         ["{tmp}/ds/manifest.json", "not a knnlm datastore manifest"], needs=("ds",), commits="none"),
    Case("manifest that is a JSON list", "verify", lambda c: ["verify", manifest_edit(c, lambda m: [m])],
         ["{tmp}/ds/manifest.json", "not a valid manifest"], needs=("ds",), commits="none"),
    Case("manifest of another format_version", "train-index",
         lambda c: ["train-index", manifest_edit(c, lambda m: m | {"format_version": 99})],
         ["{tmp}/ds/manifest.json", "format_version 99"], needs=("ds",), commits="none"),
    Case("truncated manifest", "verify",
         lambda c: ["verify", manifest_edit(c, lambda m: json.dumps(m)[:len(json.dumps(m)) // 2])],
         ["{tmp}/ds/manifest.json", "not a valid manifest"], needs=("ds",), commits="none"),
    Case("manifest shard path with ../", "verify", lambda c: ["verify", shard_path(c, "../outside.parquet")],
         ["../outside.parquet", "{tmp}/ds/manifest.json"], needs=("ds",), commits="none"),
    Case("manifest shard path that is absolute", "verify",
         lambda c: ["verify", shard_path(c, os.path.join(c.tmp, "outside.parquet"))],
         ["{tmp}/outside.parquet", "{tmp}/ds/manifest.json"], needs=("ds",), commits="none"),
    # ---- train-index, add -----------------------------------------------------------------
    Case("negative --train-size", "train-index", lambda c: ["train-index", c.ds, "--train-size", "-5"],
         ["--train-size", "-5"], needs=("ds",), commits="none"),
    Case("--index-factory without an IVF layer", "train-index",
         lambda c: ["train-index", c.ds, "--index-factory", "HNSW32"], ["--index-factory", "HNSW32"],
         needs=("ds",), commits="none"),
    Case("retrain with another --metric", "train-index",
         lambda c: ["train-index", c.ds, "--index-factory", "IVF4,Flat", "--metric", "ip", "--trainer", "faiss",
                    "--min-points-per-centroid", "1"],
         ["{ds}", "metric (--metric)", "the index has 'l2', this run asks for 'ip'", "--force"], needs=("ds",),
         commits="none"),
    Case("add before train-index", "add", lambda c: ["add", manifest_edit(c, lambda m: m | {"index": None,
                                                                                          "index_shards": None})],
         ["{tmp}/ds", "train-index"], needs=("ds",), commits="none"),
    # ---- query ----------------------------------------------------------------------------
    Case("queries file that does not exist", "query", lambda c: query(c, os.path.join(c.tmp, "nope.npy")),
         ["--queries {tmp}/nope.npy"], needs=("ds",), commits="none"),
    Case("queries file that is not an array", "query", lambda c: query(c, c.file("q.npy", "1 2 3\n")),
         ["--queries {tmp}/q.npy"], needs=("ds",), commits="none"),
    Case("NaN queries", "query", lambda c: query(c, q_nan(c)), ["--queries {tmp}/q.npy", "NaN", "[1]"],
         needs=("ds",), commits="none"),
    Case("inf queries", "query", lambda c: query(c, q_inf(c)), ["--queries {tmp}/q.npy", "inf", "[2]"],
         needs=("ds",), commits="none"),
    Case("queries of another dim", "query", lambda c: query(c, q_good(c, dim=48)),
         ["--queries {tmp}/q.npy", "32", "48"], needs=("ds",), commits="none"),
    Case("--k 0", "query", lambda c: query(c, q_good(c), "--k", "0"), ["--k", "0"], needs=("ds",), commits="none"),
    Case("negative --k", "query", lambda c: query(c, q_good(c), "--k", "-3"), ["--k", "-3"], needs=("ds",),
         commits="none"),
    Case("--k above the servers' limit", "query", lambda c: query(c, q_good(c), "--k", "100000"),
         ["--k", "100000"], needs=("ds",), commits="none"),
    Case("--nprobe 0", "query", lambda c: query(c, q_good(c), "--nprobe", "0"), ["--nprobe", "0"],
         needs=("ds",), commits="none"),
    Case("negative --batch-size", "query", lambda c: query(c, q_good(c), "--batch-size", "-1"),
         ["--batch-size", "-1"], needs=("ds",), commits="none"),
    # ---- eval, generate, neighbours, tune, serve ------------------------------------------
    Case("model of another dim", "eval", lambda c: ["eval", c.ds, "--corpus", c.evalf, "--model", c.wide_model],
         ["--model {wide_model}", "not the model that built the datastore"], needs=("ds", "wide"), commits="none"),
    Case("missing evaluation file", "eval", lambda c: ["eval", c.ds, "--corpus", os.path.join(c.tmp, "nope.txt")],
         ["--corpus", "{tmp}/nope.txt", "no such file"], needs=("ds",), commits="none"),
    Case("--k 0", "eval", lambda c: ["eval", c.ds, "--corpus", c.evalf, "--k", "0"], ["--k", "0"],
         needs=("ds",), commits="none"),
    Case("--lambda out of [0, 1]", "eval", lambda c: ["eval", c.ds, "--corpus", c.evalf, "--lambda", "1.5"],
         ["--lambda", "1.5"], needs=("ds",), commits="none"),
    Case("--min-context not below --window", "eval",
         lambda c: ["eval", c.ds, "--corpus", c.evalf, "--window", "8", "--min-context", "8"],
         ["--min-context", "--window", "8"], needs=("ds",), commits="none", subprocess=True),
    Case("unreachable --address", "eval", lambda c: ["eval", c.ds, "--corpus", c.evalf, "--address", c.dead],
         ["--address {dead}", "nothing answers"], needs=("ds",), commits="none", subprocess=True),
    Case("model of another dim", "generate",
         lambda c: ["generate", c.ds, "--prompt", "The quick", "--model", c.wide_model],
         ["--model {wide_model}", "not the model that built the datastore"], needs=("ds", "wide"), commits="none"),
    Case("--max-new-tokens 0", "generate", lambda c: ["generate", c.ds, "--prompt", "The", "--max-new-tokens", "0"],
         ["--max-new-tokens", "0"], needs=("ds",), commits="none"),
    Case("negative --k", "neighbours", lambda c: ["neighbours", c.ds, "--text", "The quick", "--k", "-1"],
         ["--k", "-1"], needs=("ds",), commits="none"),
    Case("missing neighbour cache", "tune", lambda c: ["tune", "--valid", os.path.join(c.tmp, "nocache")],
         ["--valid", "{tmp}/nocache"], commits="none"),
    Case("missing neighbour cache", "report",
         lambda c: ["report", c.ds, "--cache", os.path.join(c.tmp, "nocache"), "--out", os.path.join(c.tmp, "rep")],
         ["--cache {tmp}/nocache", "not a neighbour cache"], needs=("ds",), commits="none"),
    Case("--neighbours above what a cache keeps", "report",
         lambda c: ["report", c.ds, "--cache", os.path.join(c.tmp, "nocache"), "--out", os.path.join(c.tmp, "rep"),
                    "--neighbours", "17"], ["--neighbours 17", "at most 16"], needs=("ds",), commits="none"),
    Case("--page-tokens 0", "report",
         lambda c: ["report", c.ds, "--cache", os.path.join(c.tmp, "nocache"), "--out", os.path.join(c.tmp, "rep"),
                    "--page-tokens", "0"], ["--page-tokens", "0"], needs=("ds",), commits="none"),
    Case("--replicas 0", "serve", lambda c: ["serve", c.ds, "--replicas", "0"], ["--replicas", "0"],
         needs=("ds",), commits="none"),
    Case("unreachable --address", "serve", lambda c: ["serve", c.ds, "--address", c.dead],
         ["--address {dead}", "nothing answers"], needs=("ds",), commits="none", subprocess=True),
    # ---- the pipeline file, submit --------------------------------------------------------
    Case("unknown YAML key", "run", lambda c: ["run", pipeline(c, index__facotry="IVF4,Flat")],
         ["{tmp}/p.yaml", "index.facotry", "did you mean 'index.factory'"], subprocess=True),
    Case("negative size in the pipeline file", "run", lambda c: ["run", pipeline(c, index__train_size=-5)],
         ["{tmp}/p.yaml", "index.train_size", "-5"]),
    Case("pipeline file that is not valid YAML", "run",
         lambda c: ["run", c.file("p.yaml", "datastore: ds\nbuild: {corpus: [a\n")], ["{tmp}/p.yaml", "YAML", "line"]),
    Case("pipeline file that is a YAML list", "run", lambda c: ["run", c.file("p.yaml", "- build\n- index\n")],
         ["{tmp}/p.yaml", "mapping"]),
    Case("missing pipeline file", "run", lambda c: ["run", os.path.join(c.tmp, "nope.yaml")],
         ["{tmp}/nope.yaml", "no such pipeline file"]),
    Case("missing input in the pipeline file", "run", lambda c: ["run", pipeline(c, build__corpus=["nope.txt"])],
         ["{tmp}/p.yaml", "build.corpus", "{tmp}/nope.txt", "no such file"]),
    Case("unreachable --address (Jobs API)", "submit",
         lambda c: ["submit", pipeline(c), "--address", f"http://{c.dead}"],
         ["--address http://{dead}", "does not answer"], subprocess=True),
    Case("unreachable --address (Jobs API)", "status", lambda c: ["status", "some-job", "--address", f"http://{c.dead}"],
         ["--address http://{dead}", "does not answer"], commits="none"),
]


def _parquet(columns: dict) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


def case_id(c: Case) -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"{c.command} {c.kind}".lower()).strip("-")


# ---------------------------------------------------------------------------------------------
# fixtures


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def table_model(tmp_path_factory) -> str:
    """The tiny GPT-2 of conftest (64 positions, hidden size 32), made alone: the table needs no other."""
    return make_tiny_model(str(tmp_path_factory.mktemp("tablemodel") / "gpt2"), "gpt2")


@pytest.fixture(scope="module")
def table_ds(tmp_path_factory, table_model, ray_cluster):
    """A document-mode datastore of the tiny GPT-2 (window 16, min-context 6) with an IVF4,Flat index in
    two index shards, and an evaluation text."""
    from builder.add import add_stage
    from builder.build import build
    from builder.config import AddConfig, BuildConfig, TrainConfig
    from builder.train import train_stage

    root = tmp_path_factory.mktemp("badtable")
    corpus = [write_text(root / "corpus" / f"{i}.txt", t) for i, t in enumerate(GOOD)]
    out = str(root / "ds")
    build(BuildConfig(corpus=corpus, model=table_model, out=out, window=16, min_context=6, progress=False))
    train_stage(TrainConfig(datastore=out, index_factory="IVF4,Flat", train_size=10**6, trainer="faiss",
                            min_points_per_centroid=1))
    add_stage(AddConfig(datastore=out, index_shards=2, encoder="faiss"))
    return out, write_text(root / "eval.txt", EVAL)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A tiny GPT-2 of hidden size 48 (the datastore's model has 32)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    path = str(tmp_path_factory.mktemp("wide") / "gpt2-wide")
    tok = make_tokenizer(path)
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=48, n_head=2, n_positions=64, vocab_size=len(tok),
                                                bos_token_id=0, eos_token_id=1)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def s3_auth():
    """A moto S3 server that checks credentials (no key is valid on it), with one bucket made before
    the check starts: (endpoint, bucket)."""
    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="1")
    proc = start_moto(port, env)
    import boto3
    endpoint = f"http://127.0.0.1:{port}"
    bucket = "knnlm-auth"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)   # the one unauthenticated call
    yield endpoint, bucket
    proc.terminate()
    proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------
# running a row


def run_inprocess(argv: list[str], capsys) -> tuple[int, str, str]:
    from cluster.cli import main
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:       # argparse's usage errors
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def run_subprocess(argv: list[str], env: dict) -> tuple[int, str, str]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-m", "cluster.cli", *argv], check=False, capture_output=True, text=True,
                       env=env, timeout=180, cwd=REPO)
    return p.returncode, p.stdout, p.stderr


def snapshot(root: str) -> dict:
    """{relative path: sha256} of every file under root."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def record(case: Case, line: str, ctx: Ctx) -> None:
    path = os.environ.get("KNNLM_BAD_INPUT_TABLE")
    if not path:
        return
    for name, v in (("tmp", ctx.tmp), ("ds", ctx.ds), ("wide_model", ctx.wide_model), ("model", ctx.model)):
        if v:
            line = line.replace(v, f"<{name}>")
    rows = {}
    if os.path.exists(path):
        with open(path) as f:
            rows = json.load(f)
    rows[case_id(case)] = {"kind": case.kind, "command": case.command, "error": line}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)


def params():
    for c in CASES:
        marks = [pytest.mark.xfail(reason=c.xfail, strict=True)] if c.xfail else []
        marks += [pytest.mark.slow] if c.subprocess else []
        marks += [pytest.mark.s3] if {"s3", "s3auth", "bucket"} & set(c.needs) else []
        yield pytest.param(c, id=case_id(c), marks=marks)


@pytest.mark.parametrize("case", params())
def test_bad_input(case: Case, request, tmp_path, capsys, caplog, table_model, monkeypatch):
    ctx = Ctx(tmp=str(tmp_path), model=table_model, dead=f"127.0.0.1:{free_port()}")
    env = dict(case.env)
    if "ray" in case.needs:
        request.getfixturevalue("ray_cluster")
    if "ds" in case.needs:
        ctx.ds, ctx.evalf = request.getfixturevalue("table_ds")
    if "wide" in case.needs:
        ctx.wide_model = request.getfixturevalue("wide_model")
    if "s3" in case.needs:
        request.getfixturevalue("s3_server")
    if "bucket" in case.needs:
        ctx.bucket = request.getfixturevalue("s3_bucket")
    if "s3auth" in case.needs:
        endpoint, ctx.bucket = request.getfixturevalue("s3_auth")
        env["AWS_ENDPOINT_URL"] = endpoint
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        import builder.storage_s3
        monkeypatch.setattr(builder.storage_s3, "_CLIENTS", {})         # clients for this endpoint
    argv = case.argv(ctx)
    before = snapshot(ctx.ds) if ctx.ds else {}
    caplog.set_level(logging.WARNING)
    t0 = time.time()
    rc, out, err = run_subprocess(argv, env) if case.subprocess else run_inprocess(argv, capsys)
    took = time.time() - t0
    if case.subprocess:
        assert took < 120

    assert "Traceback" not in out + err, out + err
    if case.commits == "ok":       # short documents: skipped with a warning naming the file, the build succeeds
        assert rc == 0, err
        assert os.path.exists(os.path.join(ctx.out, "manifest.json"))
        warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        for w in case.words:
            assert any(w.format(**vars(ctx)) in m for m in warned), warned
        record(case, "(exit 0) knnlm: " + next(m for m in warned if case.words[0].format(**vars(ctx)) in m), ctx)
        return
    assert rc == 2, (rc, err)                  # a clean error (1: an uncaught exception; >= 128: a signal)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, (rc, out)
    line = lines[-1]
    assert line.startswith(f"knnlm {case.command}: error: "), line
    for w in case.words:
        assert w.format(**vars(ctx)) in line, (w, line)
    # the lines before it are log lines or argparse's usage, never the rest of the message
    for ln in lines[:-1]:
        assert ln.startswith(("knnlm", "usage:", " ", "[", "(")), (ln, err)
    record(case, line, ctx)

    if case.commits == "absent":                # refused before any work: no output folder at all
        assert not os.path.exists(ctx.out) and not os.path.exists(os.path.join(ctx.tmp, "ds"))
    if case.commits == "out":                   # no manifest, no shard, and the lease released
        assert not os.path.exists(os.path.join(ctx.out, "manifest.json"))
        assert not os.path.exists(os.path.join(ctx.out, "_build", "lease.json"))
        assert not glob.glob(os.path.join(ctx.out, "**", "*.parquet"), recursive=True)
    if ctx.ds:                                  # the shared datastore: byte for byte as before
        assert snapshot(ctx.ds) == before
    if case.after:
        case.after(ctx)


# ---------------------------------------------------------------------------------------------
# the table as markdown: python tests/test_bad_input_table.py [RESULTS.json]


def markdown(results: dict | None = None) -> str:
    rows = ["| # | kind of bad input | command | error it gives |", "|---|---|---|---|"]
    for i, c in enumerate(CASES, 1):
        got = (results or {}).get(case_id(c), {}).get("error")
        error = got if got else "… " + " … ".join(c.words)
        error = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", error)
        error = re.sub(r"knnlm-[0-9a-f]{12}", "BUCKET", error)
        rows.append(f"| {i} | {c.kind} | `knnlm {c.command}` | `` {error.replace('|', '¦')} `` |")
    return "\n".join(rows)


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else (sorted(glob.glob(os.path.join(REPO, "bench", "results",
                                                                              "bad-input-*.json"))) or [None])[-1]
    res = None
    if path:
        with open(path) as f:
            res = json.load(f)
    print(markdown(res))

"""Every bad input of `knnlm build` ends in a clear error (exit code 2) that names the file or
the flag, never a raw traceback, and commits nothing: no manifest.json under --out."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from conftest import make_tiny_model, write_text

from builder.config import BuildConfig, ConfigError
from builder.keys import KeyLayerError, find_key_module
from cluster.cli import main

W, C = "16", "8"
GOOD = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "A kNN-LM interpolates a language model with nearest neighbours from a datastore. " * 2,
]


def build_args(corpus, model, out, *extra) -> list[str]:
    corpus = corpus if isinstance(corpus, list) else [corpus]
    return ["build", "--corpus", *map(str, corpus), "--model", str(model), "--out", str(out),
            "--window", W, "--min-context", C, "--no-progress", *extra]


def run_fail(capsys, args) -> str:
    """Run the CLI; it must fail with exit code 2 and a one-line-ish message, no traceback."""
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "knnlm build: error:" in err, err
    assert "Traceback" not in err, err
    return err


def assert_nothing_committed(out) -> None:
    assert not os.path.exists(os.path.join(str(out), "manifest.json"))
    # the lease is released: a fixed rerun is not kept waiting
    assert not os.path.exists(os.path.join(str(out), "_build", "lease.json"))


@pytest.fixture
def good_corpus(tmp_path):
    return write_text(tmp_path / "corpus" / "a.txt", GOOD[0])


# ---------------------------------------------------------------------------------------------
# rejected before any work (no Ray). The command line's answer to each bad input (the one-line
# error, the exit status, nothing written) is a row of tests/test_bad_input_table.py.


CONFIG_CASES = [
    # (BuildConfig kwargs, CLI flags, words the message must hold)
    (dict(window=16, min_context=16), ["--window", "16", "--min-context", "16"], ["--min-context", "--window", "16"]),
    (dict(window=16, min_context=20), ["--window", "16", "--min-context", "20"], ["--min-context", "20", "--window"]),
    (dict(min_context=0), ["--min-context", "0"], ["--min-context", "0"]),
    (dict(window=1), ["--window", "1"], ["--window", "1"]),
    (dict(shard_rows=0), ["--shard-rows", "0"], ["--shard-rows", "0"]),
    (dict(batch_size=0), ["--batch-size", "0"], ["--batch-size", "0"]),
    (dict(unit_tokens=-5), ["--unit-tokens", "-5"], ["--unit-tokens", "-5"]),
    (dict(workers=0), ["--workers", "0"], ["--workers", "0"]),
]


@pytest.mark.parametrize("kw,flags,words", CONFIG_CASES, ids=lambda v: None)
def test_config_validation(kw, flags, words):
    with pytest.raises(ConfigError) as ei:
        BuildConfig(corpus=["c.txt"], model="m", out="o", **kw)
    for w in words:
        assert w in str(ei.value)


def test_valid_config_is_accepted():
    cfg = BuildConfig(corpus="c.txt", model="m", out="o", window=16, min_context=15, shard_rows=1, batch_size=1)
    assert cfg.corpus == ["c.txt"]
    assert cfg.resolve_window(64) == (16, 15)
    assert BuildConfig(corpus=["c"], model="m", out="o").resolve_window(64) == (64, 32)
    assert BuildConfig(corpus=["c"], model="m", out="o").resolve_window(None) == (1024, 512)


def test_window_larger_than_model_positions(gpt2_model, good_corpus):
    with pytest.raises(ConfigError) as ei:
        BuildConfig(corpus=[good_corpus], model=gpt2_model, out="o", window=128).resolve_window(64)
    assert "--window 128" in str(ei.value) and "64" in str(ei.value)
    with pytest.raises(ConfigError, match="--min-context"):  # the default-window case still checks min-context
        BuildConfig(corpus=[good_corpus], model=gpt2_model, out="o", min_context=64).resolve_window(64)


def test_model_without_recognisable_ffn(gpt2_model):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(gpt2_model)
    assert find_key_module(model, "ffn_input")[0] == "transformer.h.1.mlp"
    del model.transformer.h[-1].mlp
    model.transformer.h[-1].add_module("weird", torch.nn.Identity())
    with pytest.raises(KeyLayerError) as ei:
        find_key_module(model, "ffn_input")
    msg = str(ei.value)
    assert "GPT2LMHeadModel" in msg and "weird" in msg and "--key-layer final_hidden" in msg
    # the LM head's input is still available
    assert find_key_module(model, "final_hidden")[0] == "lm_head"


# ---------------------------------------------------------------------------------------------
# rejected once the corpus is read (on Ray)


def test_no_usable_document(capsys, tmp_path, gpt2_model, ray_cluster):
    d = tmp_path / "corpus"
    write_text(d / "a_empty.txt", "")
    write_text(d / "b_blank.txt", "  \n\n\t")
    write_text(d / "c_latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1"))
    write_text(d / "d_short.txt", "a")  # one token: no target
    out = tmp_path / "out"
    err = run_fail(capsys, build_args(d, gpt2_model, out))
    assert "no usable document" in err and "4 skipped" in err and "--corpus" in err
    assert f"{d / 'a_empty.txt'} file: empty document" in err  # the first skipped document, named
    assert_nothing_committed(out)
    # fixing the corpus in place and rerunning the same command then builds
    write_text(d / "b_blank.txt", GOOD[1])
    assert main(build_args(d, gpt2_model, out)) == 0, capsys.readouterr().err
    man = json.loads((out / "manifest.json").read_text())
    assert man["num_keys"] > 0 and man["corpus"]["skipped_documents"] == 3


@pytest.fixture(scope="module")
def overflow_model(tmp_path_factory):
    """A tiny GPT-2 whose last block's ln_2 scales by 1e30: its ffn_input keys overflow float16."""
    from transformers import GPT2LMHeadModel

    path = str(tmp_path_factory.mktemp("overflow") / "gpt2-overflow")
    make_tiny_model(path, "gpt2")  # weights and tokenizer
    model = GPT2LMHeadModel.from_pretrained(path)
    with torch.no_grad():
        model.transformer.h[-1].ln_2.weight.fill_(1e30)
    model.save_pretrained(path)
    return path


def test_non_finite_key(capsys, tmp_path, overflow_model, ray_cluster):
    path = write_text(tmp_path / "corpus" / "a.txt", GOOD[0])
    out = tmp_path / "out"
    err = run_fail(capsys, build_args(path, overflow_model, out, "--compute-dtype", "float32"))
    assert "non-finite" in err and "document 0" in err and path in err and "position 1" in err
    # the forward already ran in float32: the advice must not be to use float32
    assert "float16 range" in err and "try --compute-dtype float32" not in err
    assert_nothing_committed(out)


# ---------------------------------------------------------------------------------------------
# a successful build with some bad documents, then reruns with other settings


@pytest.fixture(scope="module")
def mixed_store(tmp_path_factory, gpt2_model, ray_cluster):
    """A corpus where one document is empty and one is not UTF-8, built once."""
    root = tmp_path_factory.mktemp("mixed")
    d = root / "corpus"
    files = {"good": [write_text(d / "a.txt", GOOD[0]), write_text(d / "d.txt", GOOD[1])],
             "empty": write_text(d / "b_empty.txt", ""),
             "latin1": write_text(d / "c_latin1.txt", "na\xefve caf\xe9".encode("latin-1"))}
    out = root / "out"
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("builder")
    logger.addHandler(handler)
    try:
        rc = main(build_args(d, gpt2_model, out))
    finally:
        logger.removeHandler(handler)
    return {"rc": rc, "out": out, "corpus": d, "files": files,
            "warnings": [r.getMessage() for r in records if r.levelno >= logging.WARNING]}


def test_mixed_corpus_builds_and_reports_skips(mixed_store):
    assert mixed_store["rc"] == 0
    man = json.loads((mixed_store["out"] / "manifest.json").read_text())
    assert man["corpus"]["skipped_documents"] == 2
    assert man["corpus"]["num_documents"] == 4
    files = {f["uri"]: f for f in man["corpus"]["files"]}
    assert files[mixed_store["files"]["empty"]]["skipped"] == 1
    assert files[mixed_store["files"]["latin1"]]["skipped"] == 1
    assert all(files[g]["skipped"] == 0 and files[g]["num_keys"] > 0 for g in mixed_store["files"]["good"])
    assert man["num_keys"] == sum(f["num_keys"] for f in files.values()) > 0
    warnings = mixed_store["warnings"]
    assert any(mixed_store["files"]["empty"] in w and "empty document" in w for w in warnings), warnings
    assert any(mixed_store["files"]["latin1"] in w and "UTF-8" in w for w in warnings), warnings


@pytest.mark.parametrize("flags,field,old,new", [
    (["--key-layer", "final_hidden"], "key_layer (--key-layer)", "'ffn_input'", "'final_hidden'"),
    (["--window", "32"], "window (--window)", "16", "32"),
    (["--mode", "stream"], "mode (--mode)", "'document'", "'stream'"),
])
def test_rerun_with_different_settings_is_refused(capsys, mixed_store, gpt2_model, flags, field, old, new):
    assert mixed_store["rc"] == 0
    out = mixed_store["out"]
    before = (out / "manifest.json").read_bytes()
    args = build_args(mixed_store["corpus"], gpt2_model, out)
    for flag, value in zip(flags[::2], flags[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    err = run_fail(capsys, args)
    assert field in err and f"the datastore has {old}" in err and f"this run asks for {new}" in err, err
    assert str(out) in err and "--out" in err
    assert (out / "manifest.json").read_bytes() == before


def test_rerun_with_same_settings_is_a_no_op(capsys, mixed_store, gpt2_model):
    assert mixed_store["rc"] == 0
    before = (mixed_store["out"] / "manifest.json").read_bytes()
    assert main(build_args(mixed_store["corpus"], gpt2_model, mixed_store["out"])) == 0
    assert "already complete" in capsys.readouterr().out
    assert (mixed_store["out"] / "manifest.json").read_bytes() == before

"""`knnlm demo`: the shipped corpus, its split, and the whole demo end to end (slow)."""
import filecmp
import json
import os
from pathlib import Path

import pytest

from builder.config import ConfigError
from cluster.cli import main
from cluster.demo import DemoConfig, deal, prepare_corpus, split_documents

SPLITS = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-splits"


@pytest.mark.skipif(not SPLITS.exists(), reason="needs ../shared/data/wikitext-2-splits")
def test_shipped_corpus_splits_like_the_shared_article_split(tmp_path):
    paths = prepare_corpus(str(tmp_path))
    for split in ("train", "valid", "test"):
        assert filecmp.cmp(paths[split], SPLITS / f"{split}.txt", shallow=False), split


def test_user_corpus_is_split_by_paragraph_or_refused(tmp_path):
    text = "\n\n".join(f"Paragraph {i} says something." for i in range(25))
    docs = split_documents(text)
    assert len(docs) == 25
    parts = deal(docs)
    assert parts["test"].count("Paragraph") == 3 and parts["valid"].count("Paragraph") == 2
    assert "Paragraph 0 " in parts["test"] and "Paragraph 5 " in parts["valid"] and "Paragraph 1 " in parts["train"]
    few = tmp_path / "few.txt"
    few.write_text("one\n\ntwo\n")
    with pytest.raises(ValueError, match=r"--corpus: found 2 documents; the demo needs at least 10"):
        prepare_corpus(str(tmp_path / "out"), [str(few)])
    with pytest.raises(ConfigError, match="--epochs must be positive"):
        DemoConfig(epochs=0)


@pytest.mark.slow
@pytest.mark.skipif(not SPLITS.exists(), reason="needs ../shared/data")
def test_demo_end_to_end(tmp_path, capsys, ray_cluster, monkeypatch):
    """The demo as a user runs it (one epoch of the small GPT-2 to keep CI short): a clear gain."""
    monkeypatch.setenv("KNNLM_CACHE", str(tmp_path / "cache"))      # the model is trained here, not in ~/.cache
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    r = json.loads((out / "results.json").read_text())
    for key in ("tokens", "base_ppl", "knnlm_ppl", "lambda", "temperature", "k", "nprobe"):   # `knnlm eval --out`'s
        assert key in r
    assert r["tokens"] > 50_000
    assert r["knnlm_ppl"] < 0.9 * r["base_ppl"], r                 # a clear kNN-LM gain on held-out articles
    assert r["valid_knnlm_ppl"] < r["valid_base_ppl"]
    assert sorted(os.listdir(out / "plots")) == ["ppl_vs_k.png", "ppl_vs_lambda.png"]
    assert r["samples"]["knnlm"] and r["samples"]["base"]
    assert "kNN-LM, tuned" in printed and "with the datastore" in printed
    # the pipeline it wrote reruns as a no-op through `knnlm run`
    assert main(["run", str(out / "pipeline.yaml"), "--out", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert "nothing to do" in again["add"]
    assert again["eval"]["knnlm_ppl"] == pytest.approx(r["knnlm_ppl"], rel=1e-9)

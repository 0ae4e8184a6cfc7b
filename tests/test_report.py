"""`knnlm report` and `knnlm eval --report`: the page's numbers are the evaluation's and the cache's, its
neighbours' text is the training text they come from, and the page works in a real browser from disk."""
import glob
import json
import os
import re
import shutil

import numpy as np
import pytest
from conftest import REPO, upload_dir, write_text
from transformers import AutoTokenizer

from builder.add import add_stage
from builder.build import build
from builder.config import AddConfig, BuildConfig, ConfigError, TrainConfig
from builder.manifest import load_manifest
from builder.storage import Storage
from builder.train import train_stage
from cluster.cli import main
from retriever.config import ReportConfig
from retriever.knnlm import knn_log_probs, neighbour_weights
from retriever.report_data import (concat, frequency_buckets, gain_histogram, k_grid, merge_windows, summarize_chunk,
                                   token_pieces)
from retriever.tune import read_cache, read_text

W, C = 16, 6
UNIQUE = "Quillfeather"          # occurs in one training document only: story.jsonl's second record
NEWS = ["The quick brown fox jumps over the lazy dog. " * 3,
        "In 1998 the river flooded the valley, and 3,000 people moved to the hills. " * 2]
STORY = ["A kNN-LM interpolates a language model with nearest neighbours from a datastore. " * 2,
         f"The old keeper of the {UNIQUE} lighthouse lit the lamp at dusk. " * 3]
EVAL = [f"The old keeper of the {UNIQUE} lighthouse lit the lamp at dusk. The quick brown fox jumps.",
        "In 1998 the lazy dog moved to the valley, and the river flooded the hills."]


# ---------------------------------------------------------------------------------------------
# the pure cores


def test_token_pieces_join_to_the_text_and_split_characters_go_whole(gpt2_model):
    tok = AutoTokenizer.from_pretrained(gpt2_model)
    for text in ("The quick brown fox.\n\nIn 1998 the river", "naïve café — 東京 ✓ done", "  spaces   and\ttabs "):
        ids = tok(text)["input_ids"]
        pieces = token_pieces(tok, ids)
        assert len(pieces) == len(ids) and "".join(pieces) == tok.decode(ids) == text
        assert all("\ufffd" not in p for p in pieces)
    # 東 is 3 bytes: byte-level BPE splits it over tokens; the token that completes it shows it
    ids = tok("東")["input_ids"]
    assert len(ids) > 1 and token_pieces(tok, ids)[-1] == "東" and token_pieces(tok, ids)[:-1] == [""] * (len(ids) - 1)


def test_summary_is_the_evaluation_formula():
    rng = np.random.default_rng(0)
    n, k = 50, 32
    dist = np.sort(rng.random((n, k)) * 30, axis=1).astype(np.float32)
    values = rng.integers(0, 8, (n, k)).astype(np.int32)
    values[3, 10:], dist[3, 10:] = -1, np.inf                           # a row with 10 neighbours
    ids = rng.integers(0, 1000, (n, 16))
    target, lm = rng.integers(0, 8, n), np.log(rng.random(n))
    s = summarize_chunk(target, lm, dist, values, ids, lam=0.3, temperature=2.0, k=k, metric="l2", show=4)
    knn = knn_log_probs(dist, values, target, 2.0, "l2")
    assert np.array_equal(s["knn"], knn) and s["nb_id"].shape == (n, 4) and np.array_equal(s["nb_id"], ids[:, :4])
    # the shown neighbours are copies: a view would keep the chunk's (n, k) arrays alive until the report is written
    assert all(s[key].base is None for key in ("nb_dist", "nb_weight", "nb_value", "nb_id"))
    np.testing.assert_allclose(s["nb_weight"], neighbour_weights(dist, values, 2.0)[:, :4])
    w = np.exp(-(dist[0].astype(np.float64) - dist[0, 0]) / 2.0)
    np.testing.assert_allclose(s["nb_weight"][0], (w / w.sum())[:4], rtol=1e-5)   # the share of p_kNN, by hand
    assert s["ks"] == k_grid(k) == [1, 2, 4, 8, 16, 32]
    np.testing.assert_allclose(s["by_k"][-1], np.sum(s["mix"]))               # at the run's k: the run's number
    j = s["lambdas"].index(0.3)
    assert s["by_lambda"][j] == np.sum(s["mix"]) and s["by_lambda"][0] == np.sum(lm)
    both = concat([summarize_chunk(target[:20], lm[:20], dist[:20], values[:20], ids[:20], lam=0.3, temperature=2.0,
                                   k=k, metric="l2", show=4),
                   summarize_chunk(target[20:], lm[20:], dist[20:], values[20:], ids[20:], lam=0.3, temperature=2.0,
                                   k=k, metric="l2", show=4)])
    assert np.array_equal(both["mix"], s["mix"]) and np.allclose(both["by_k"], s["by_k"], rtol=1e-12)
    h = gain_histogram(np.array([-10.0, -0.1, 0.0, 0.1, 2.9, 10.0]))
    assert sum(h["counts"]) == 6 and h["counts"][0] == 1 and h["counts"][-1] == 2
    b = frequency_buckets(np.array([0, 5, 50, 5000]), np.array([0, 1, 1, 2, 3]), np.zeros(5), np.ones(5))
    assert [x["tokens"] for x in b] == [1, 2, 1, 0, 1, 0, 0] and b[1]["gain"] == 1.0
    spans, of = merge_windows(np.array([1, 1, 2, 1]), np.array([10, 15, 10, 40]), np.array([20, 25, 20, 50]))
    assert spans == [(1, 10, 25), (1, 40, 50), (2, 10, 20)] and of.tolist() == [0, 0, 2, 1]


# ---------------------------------------------------------------------------------------------
# a datastore, an evaluation, its report


@pytest.fixture(scope="module")
def made(tmp_path_factory, gpt2_model, ray_cluster):
    """A document-mode datastore (two JSONL inputs, an exact index) and an evaluation of EVAL with
    `knnlm eval --save-neighbours CACHE --report DIR --out JSON`."""
    root = tmp_path_factory.mktemp("report")
    news = write_text(root / "corpus" / "news.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in NEWS))
    story = write_text(root / "corpus" / "story.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in STORY))
    ds = str(root / "ds")
    build(BuildConfig(corpus=[news, story], model=gpt2_model, out=ds, window=W, min_context=C, progress=False))
    train_stage(TrainConfig(datastore=ds, index_factory="IVF4,Flat", train_size=10**6, trainer="faiss",
                            min_points_per_centroid=1))
    add_stage(AddConfig(datastore=ds, index_shards=2, encoder="faiss"))
    evalf = write_text(root / "eval.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in EVAL))
    d = {"root": root, "ds": ds, "eval": evalf, "cache": str(root / "cache"), "report": str(root / "report"),
         "json": str(root / "eval.json"), "story": story}
    assert main(["eval", ds, "--corpus", evalf, "--k", "16", "--nprobe", "4", "--lambda", "0.3", "--temperature", "5",
                 "--save-neighbours", d["cache"], "--report", d["report"], "--out", d["json"],
                 "--cache-dir", str(root / "srv")]) == 0
    return d


def load_js(path: str, call: str):
    text = open(path, encoding="utf-8").read()
    assert text.startswith(call) and text.endswith(");\n"), path
    return json.loads(text[len(call):-3])


def report_data(folder: str) -> tuple[dict, list[dict]]:
    run = load_js(os.path.join(folder, "data", "run.js"), "knnlmRun(")
    pages = [load_js(os.path.join(folder, "data", f"page-{p:05d}.js"), f"knnlmPage({p}, ") for p in range(len(run["pages"]))]
    return run, pages


def unique_target(gpt2_model) -> int:
    """The scored index of the token right after UNIQUE in the first evaluated document: its context is
    word for word the start of the training document that holds UNIQUE."""
    tok = AutoTokenizer.from_pretrained(gpt2_model)
    ids = tok(EVAL[0])["input_ids"]
    i = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith(UNIQUE))
    return i - 1                                  # the first token of a document is not scored


def test_report_numbers_are_the_eval_json_and_the_cache(made, gpt2_model, capsys):
    j = json.load(open(made["json"]))
    run, pages = report_data(made["report"])
    assert run["run"]["base_ppl"] == j["base_ppl"] and run["run"]["knnlm_ppl"] == j["knnlm_ppl"]   # exactly
    for key in ("lambda", "temperature", "k", "nprobe", "distances", "index_factory", "window", "min_context", "mode"):
        assert run["run"][key] == j[key], key
    assert run["run"]["tokens"] == j["tokens"] == sum(p["count"] for p in pages)
    assert j["report"]["path"] == os.path.join(made["report"], "index.html")
    # per token: the cache's log-probs and neighbours, and p_kNN recomputed from its distances
    c = read_cache(made["cache"])
    assert c.meta["knnlm_ppl"] == j["knnlm_ppl"] and c.meta["lambda"] == 0.3 and c.ids.shape == (j["tokens"], 16)
    knn = knn_log_probs(c.dist, c.values, c.target, 5.0, "l2")
    lm = np.concatenate([p["lm"] for p in pages])
    np.testing.assert_allclose(lm, c.lm, rtol=1e-6)
    got = np.array([np.nan if x is None else x for p in pages for x in p["knn"]])
    assert np.array_equal(np.isnan(got), ~np.isfinite(knn))
    np.testing.assert_allclose(got[np.isfinite(knn)], knn[np.isfinite(knn)], rtol=1e-6, atol=1e-9)
    nb = [n for p in pages for n in p["nb"]]
    assert [[x[5] for x in row] for row in nb] == c.ids[:, :4].tolist()
    assert [[x[4] for x in row] for row in nb] == c.values[:, :4].tolist()
    np.testing.assert_allclose([[x[2] for x in row] for row in nb], c.dist[:, :4], rtol=1e-5)
    assert [t for p in pages for t in p["target"]] == c.target.tolist()
    # the text is the evaluated text: each document's first token unscored, the others its targets
    tok = AutoTokenizer.from_pretrained(gpt2_model)
    text = "".join(next((h[1] for h in p["heads"] if h[0] == i), "") + p["text"][i]
                   for p in pages for i in range(p["count"]))
    assert text == "".join(EVAL)
    seqs = read_text(Storage.from_uri(made["cache"]))
    assert [(a, b) for a, b, _ in seqs] == [(0, 0), (0, 1)] and tok.decode(seqs[0][2].tolist()) == EVAL[0]
    # `knnlm report` from the cache: the same data, page for page
    again = str(made["root"] / "again")
    assert main(["report", made["ds"], "--cache", made["cache"], "--out", again]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"report: .*again/index.html \(\d+ files, [\d.]+ MB for \d+ scored tokens", printed)
    run2, pages2 = report_data(again)
    assert pages2 == pages and {k: v for k, v in run2["run"].items() if k != "made"} == \
        {k: v for k, v in run["run"].items() if k != "made"}
    size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(again, "**"), recursive=True) if os.path.isfile(f))
    assert f"{size / 1e6:.1f} MB" in printed


def test_report_of_ray_workers_equals_the_in_process_one(made, tmp_path):
    """Distributed equals single-process: chunks scored and summarized on 2 Ray workers give the same pages."""
    from retriever.config import EvalConfig
    from retriever.evaluate import evaluate
    out = str(tmp_path / "workers")
    res = evaluate(EvalConfig(datastore=made["ds"], corpus=[made["eval"]], k=16, nprobe=4, lam=0.3, temperature=5.0,
                              workers=2, chunk_targets=20, report=out, cache_dir=str(tmp_path / "srv")))
    assert res.report["path"] == os.path.join(out, "index.html")
    run, pages = report_data(out)
    run0, pages0 = report_data(made["report"])
    assert pages == pages0
    assert run["run"]["knnlm_ppl"] == pytest.approx(run0["run"]["knnlm_ppl"], rel=1e-12)
    np.testing.assert_allclose(run["curves"]["k"]["ppl"], run0["curves"]["k"]["ppl"], rtol=1e-12)
    assert run["gains"] == run0["gains"] and run["buckets"] == run0["buckets"]


def test_a_neighbour_shows_the_training_document_it_comes_from(made, gpt2_model):
    """UNIQUE is in one training document: it shows in the report only in that document's text, and the
    token after it in the evaluation (whose context is that document's start) retrieves it first."""
    _, pages = report_data(made["report"])
    t = unique_target(gpt2_model)
    page = pages[0]
    top = page["nb"][t][0]
    span = page["spans"][top[0]]
    st = Storage.from_uri(made["ds"])
    files = [f["uri"] for f in load_manifest(st).corpus["files"]]
    assert files[span[3]] == made["story"] and span[4] == 1                 # story.jsonl, its second record
    assert top[2] < 1e-3 and top[4] == page["target"][t]                    # its own context: distance 0
    assert UNIQUE in "".join(span[2][:top[1] - span[1]])                    # the window before the token
    shown = [(s[3], s[4]) for p in pages for s in p["spans"] if UNIQUE[:5] in "".join(s[2])]
    assert shown and set(shown) == {(1, 1)}


def test_training_frequencies_exact_or_sampled(made):
    """The frequency plot's counts: every training token up to the limit, else blocks spread evenly, scaled."""
    from retriever.report import token_counts
    from retriever.sources import ContextReader
    st = Storage.from_uri(made["ds"])
    m = load_manifest(st)
    ctx = ContextReader(st, m)
    every = np.concatenate([np.frombuffer(st.read_bytes(ctx.tokens_file(f)), "<i4") for f in range(len(ctx.files))])
    exact, read, total = token_counts(st, m, ctx, 1000)
    assert read == total == len(every) and np.array_equal(exact, np.bincount(every, minlength=1000))
    est, read, total = token_counts(st, m, ctx, 1000, limit=256)            # 256 blocks of 1 token
    assert read == 256 < total and est.sum() == pytest.approx(total) and not np.array_equal(est, exact)
    assert set(np.flatnonzero(est)) <= set(np.flatnonzero(exact))


def test_report_plots_the_tuning_grid_beside_the_text(made, tmp_path):
    """--tune FILE.json (`knnlm tune --out`): its validation curves at its chosen λ, T, k."""
    tuned = str(tmp_path / "tune.json")
    assert main(["tune", "--valid", made["cache"], "--test", made["cache"], "--out", tuned]) == 0
    t = json.load(open(tuned))
    out = str(tmp_path / "rep")
    assert main(["report", made["ds"], "--cache", made["cache"], "--out", out, "--tune", tuned]) == 0
    run, _ = report_data(out)
    v = run["valid"]
    assert v["chosen"]["lambda"] == t["lambda"] and v["chosen"]["valid_ppl"] == t["valid_ppl"]
    row = {(r["lambda"], r["k"]): r["valid_ppl"] for r in t["table"] if r["temperature"] == t["temperature"]}
    assert v["lambda"]["ppl"] == [row[(x, t["k"])] for x in v["lambda"]["x"]]
    assert v["k"]["ppl"] == [row[(t["lambda"], x)] for x in v["k"]["x"]] and t["k"] in v["k"]["x"]
    assert run["curves"]["lambda"]["x"][:3] == [0.0, 0.05, 0.1]                 # this text's own curves too
    assert main(["report", made["ds"], "--cache", made["cache"], "--out", out, "--tune", made["json"] + ".nope"]) == 2


def test_report_is_refused_for_what_it_cannot_show(made, tmp_path):
    old = tmp_path / "old-cache"
    shutil.copytree(made["cache"], old)
    meta = json.loads((old / "cache.json").read_text())
    del meta["ids"]
    (old / "cache.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"--cache .*old-cache: made before neighbour caches kept the neighbours' ids"):
        from retriever.report import report_from_cache
        report_from_cache(ReportConfig(datastore=made["ds"], cache=str(old), out=str(tmp_path / "r")))
    assert main(["report", made["ds"], "--cache", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 2
    with pytest.raises(ConfigError, match="--neighbours 17: a neighbour cache keeps the ids of the first 16"):
        ReportConfig(datastore=made["ds"], cache=made["cache"], out="r", neighbours=17)
    assert not os.path.exists(tmp_path / "r")                               # nothing written


@pytest.mark.s3
def test_report_reads_and_writes_s3(made, s3_bucket):
    """The datastore, the cache and the report on S3: the same pages as the local report."""
    import boto3
    ds = upload_dir(made["ds"], s3_bucket, "ds")
    cache = upload_dir(made["cache"], s3_bucket, "cache")
    assert main(["report", ds, "--cache", cache, "--out", f"s3://{s3_bucket}/rep"]) == 0
    got = tmp = made["root"] / "from-s3"
    s3 = boto3.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="rep/")["Contents"]]
    assert "rep/index.html" in keys and "rep/data/run.js" in keys
    for key in keys:
        os.makedirs(os.path.dirname(tmp / key[4:]), exist_ok=True)
        s3.download_file(s3_bucket, key, str(tmp / key[4:]))
    run, pages = report_data(str(got))
    run0, pages0 = report_data(made["report"])
    assert pages == pages0 and run["run"]["datastore"] == ds and run["run"]["knnlm_ppl"] == run0["run"]["knnlm_ppl"]


# ---------------------------------------------------------------------------------------------
# the page in a real browser


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    why = "no Chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(f"{why}; with CI=true it must be there", pytrace=False)
    pytest.skip(why)


ARTIFACTS = os.environ.get("KNNLM_TEST_ARTIFACTS", os.path.join(REPO, "test-artifacts"))


def test_page_in_a_headless_browser(made, gpt2_model, tmp_path):
    """From disk, no server: no console error, the eval JSON's perplexities, paging, and a click on the token
    after UNIQUE shows the training document that holds it."""
    browser_path = chromium()
    from playwright.sync_api import sync_playwright
    j = json.load(open(made["json"]))
    paged = str(tmp_path / "paged")                 # small pages: the click has to load the right one
    assert main(["report", made["ds"], "--cache", made["cache"], "--out", paged, "--page-tokens", "10",
                 "--neighbours", "3"]) == 0
    t = unique_target(gpt2_model)
    problems = []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            for folder in (made["report"], paged):
                page = b.new_page(viewport={"width": 1400, "height": 1000})
                page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
                page.on("pageerror", lambda e: problems.append(str(e)))
                page.on("request", lambda r: problems.append(f"network: {r.url}") if not r.url.startswith("file:")
                        else None)
                page.goto("file://" + os.path.join(folder, "index.html"))
                page.wait_for_selector("#text .t")
                assert page.inner_text("#base-ppl") == f"{j['base_ppl']:.2f}"
                assert page.inner_text("#knnlm-ppl") == f"{j['knnlm_ppl']:.2f}"
                assert page.locator("#plot-lambda polyline").count() >= 1 and page.locator("#plot-hist rect").count() > 3
                if folder == paged:
                    assert page.locator("#page-select option").count() == -(-j["tokens"] // 10)
                    page.click("#next")
                    page.wait_for_function("document.querySelector('#status').textContent.startsWith('tokens 10')")
                    page.click("#gains li a")                                   # a link into the text
                    page.wait_for_selector("#text .t.sel")
                    page.select_option("#page-select", str(t // 10))
                    page.wait_for_function(f"document.querySelector('#status').textContent.startsWith('tokens {t // 10 * 10}')")
                page.click(f'#text .t[data-i="{t % 10 if folder == paged else t}"]')
                page.wait_for_selector("#panel-body .nb")
                first = page.locator("#panel-body .nb").first.inner_text()
                assert UNIQUE in first and "story.jsonl · document 1" in first and "distance 0.000" in first, first
                assert page.locator("#panel-body .nb").count() == (3 if folder == paged else 4)
                probs = page.inner_text("#panel-probs")
                assert "p_kNN" in probs and "p_LM" in probs
                os.makedirs(ARTIFACTS, exist_ok=True)
                page.screenshot(path=os.path.join(ARTIFACTS, f"report-{os.path.basename(folder)}.png"), full_page=True)
                page.close()
        finally:
            b.close()
    assert problems == []
    assert os.path.getsize(os.path.join(ARTIFACTS, "report-paged.png")) > 20_000

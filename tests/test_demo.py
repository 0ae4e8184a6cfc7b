"""`knnlm demo` and `demo.sh`: the shipped corpus and its split, the pipeline file the demo writes,
the whole demo end to end as the README runs it (slow), and demo.sh on a machine with only python3."""
import filecmp
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from builder.config import ConfigError
from cluster.cli import main
from cluster.config import DemoConfig
from cluster.demo import deal, pipeline_spec, prepare_corpus, split_documents
from cluster.pipeline_file import load_pipeline

REPO = Path(__file__).resolve().parents[1]
STOCK_PATH = "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"      # a stock Debian/Ubuntu PATH: python3, no python
NEVER = ("command not found", "externally-managed", "No module named pip")


def test_shipped_corpus_splits_like_the_shared_article_split(tmp_path, wikitext_splits):
    paths = prepare_corpus(str(tmp_path))
    for split in ("train", "valid", "test"):
        assert filecmp.cmp(paths[split], os.path.join(wikitext_splits, f"{split}.txt"), shallow=False), split


def test_user_corpus_is_split_by_paragraph_or_refused(tmp_path):
    text = "\n\n".join(f"Paragraph {i} says something." for i in range(25))
    docs = split_documents(text)
    assert len(docs) == 25
    parts = deal(docs)
    assert parts["test"].count("Paragraph") == 3 and parts["valid"].count("Paragraph") == 2
    assert "Paragraph 0 " in parts["test"] and "Paragraph 5 " in parts["valid"] and "Paragraph 1 " in parts["train"]
    few = tmp_path / "few.txt"
    few.write_text("one\n\ntwo\n")
    with pytest.raises(ConfigError, match=r"--corpus: found 2 documents; the demo needs at least 10"):
        prepare_corpus(str(tmp_path / "out"), [str(few)])
    with pytest.raises(ConfigError, match=r"--corpus nowhere.txt: no such file or directory"):
        prepare_corpus(str(tmp_path / "out"), ["nowhere.txt"])
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("Caf\u00e9 au lait.\n\n".encode("latin-1") * 20)
    with pytest.raises(ConfigError, match=rf"--corpus {latin}: not valid UTF-8 \(byte 3 of the file\)"):
        prepare_corpus(str(tmp_path / "out"), [str(latin)])
    with pytest.raises(ConfigError, match="--epochs must be positive"):
        DemoConfig(epochs=0)


def test_the_pipeline_file_runs_from_any_folder(tmp_path, monkeypatch, gpt2_model):
    """Relative or absolute --out: the file's paths are relative to its own folder, and resolve to the
    demo's files from wherever `knnlm run` is started."""
    for out_arg in ("rel/demo", str(tmp_path / "abs" / "demo")):
        monkeypatch.chdir(tmp_path)
        out = os.path.abspath(out_arg)
        paths = prepare_corpus(out_arg)
        assert paths["train"] == os.path.join(out, "data", "train.txt")
        pfile = os.path.join(out, "pipeline.yaml")
        with open(pfile, "w") as f:
            yaml.safe_dump(pipeline_spec(out, paths, gpt2_model, 64, "IVF16,Flat"), f)
        elsewhere = tmp_path / "elsewhere" / "deeper"
        elsewhere.mkdir(parents=True, exist_ok=True)
        monkeypatch.chdir(elsewhere)
        p = load_pipeline(os.path.relpath(pfile))
        assert p.datastore == os.path.join(out, "datastore") and p.build.model == gpt2_model
        assert p.build.corpus == [paths["train"]] and p.eval.corpus == [paths["test"]]
        assert (p.tune.valid, p.tune.test) == ([paths["valid"]], [paths["test"]])
        assert p.tune.plots == os.path.join(out, "plots") and p.eval.out == os.path.join(out, "eval-test.json")
        assert p.eval.report == os.path.join(out, "report")
        assert p.index.index_factory == "IVF16,Flat" and (p.build.window, p.build.min_context) == (64, 32)


def test_demo_checks_its_inputs_before_training(tmp_path, monkeypatch, capsys):
    """The data is written and the pipeline's inputs checked before the model is trained: a model
    folder that is not there, or a pipeline whose corpus path is wrong (the bug of a relative --out
    resolved twice), is refused at once, naming the key and the resolved path."""
    import cluster.demo as demo

    monkeypatch.setenv("KNNLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--model", "./no-such-model"]) == 2
    err = capsys.readouterr().err
    assert f"knnlm-demo/pipeline.yaml: build.model: {tmp_path / 'no-such-model'}: no such model directory" in err
    assert sorted(os.listdir(tmp_path / "knnlm-demo" / "data")) == ["test.txt", "train.txt", "valid.txt"]

    def no_training(*a, **kw):
        raise AssertionError("the model was trained before the pipeline's inputs were checked")

    def cwd_relative(out, paths, model, *a, **kw):      # paths relative to the working folder, not the file's
        return pipeline_spec(out, paths, model, *a, **kw) | {"build": {"corpus": ["./knnlm-demo/data/train.txt"],
                                                                       "model": model}}
    monkeypatch.setattr(demo, "train_model", no_training)
    monkeypatch.setattr(demo, "pipeline_spec", cwd_relative)
    assert main(["demo"]) == 2
    assert (f"build.corpus: {tmp_path / 'knnlm-demo' / 'knnlm-demo' / 'data' / 'train.txt'}: no such file"
            in capsys.readouterr().err)
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_demo_as_the_readme_runs_it(tmp_path, capsys, ray_cluster, monkeypatch):
    """`knnlm demo` with its defaults from a fresh working folder (a quarter epoch of the small GPT-2 to keep
    CI short: its training took 160-500 s of this test's 460-840 s at one epoch): a clear gain; then `knnlm run OUT/pipeline.yaml` from another folder is a no-op."""
    monkeypatch.setenv("KNNLM_CACHE", str(tmp_path / "cache"))      # the model is trained here, not in ~/.cache
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["demo", "--epochs", "0.25", "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    out = work / "knnlm-demo"
    r = json.loads((out / "results.json").read_text())
    for key in ("tokens", "base_ppl", "knnlm_ppl", "lambda", "temperature", "k", "nprobe"):   # `knnlm eval --out`'s
        assert key in r
    built = yaml.safe_load((out / "pipeline.yaml").read_text())                                 # the protocol
    assert (r["window"], r["min_context"], r["mode"]) == (built["build"]["window"], built["build"]["min_context"],
                                                          "stream")
    assert r["distances"] == "approximate" and r["index_factory"] == built["index"]["factory"]
    assert r["tokens"] > 50_000
    assert r["knnlm_ppl"] < 0.9 * r["base_ppl"], r                 # a clear kNN-LM gain on held-out articles
    assert r["valid_knnlm_ppl"] < r["valid_base_ppl"]
    assert r["datastore"] == str(out / "datastore") and r["out"] == str(out)
    assert sorted(os.listdir(out / "plots")) == ["ppl_vs_k.png", "ppl_vs_lambda.png"]
    assert r["samples"]["knnlm"] and r["samples"]["base"]
    page = out / "report" / "index.html"                            # the report of the test text
    assert r["report"]["path"] == str(page) and page.exists() and f"report: {page}" in printed
    assert r["report"]["tokens"] == r["tokens"] and (out / "report" / "data" / "run.js").exists()
    assert "kNN-LM, tuned" in printed and "with the datastore" in printed and str(out / "results.json") in printed
    spec = yaml.safe_load((out / "pipeline.yaml").read_text())
    assert spec["datastore"] == "datastore" and spec["build"]["corpus"] == ["data/train.txt"]
    # the pipeline it wrote reruns as a no-op through `knnlm run`, from another folder
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    assert main(["run", "../work/knnlm-demo/pipeline.yaml", "--out", "again.json"]) == 0
    again = json.loads((other / "again.json").read_text())
    assert "nothing to do" in again["add"] and "already" in again["build"].lower()
    assert again["eval"]["knnlm_ppl"] == pytest.approx(r["knnlm_ppl"], rel=1e-9)


# ---------------------------------------------------------------------------------------------
# demo.sh on a machine with python3 and no `python`


def copy_repo(dest: Path, packages: bool) -> Path:
    """The files demo.sh needs (and, with packages, what `pip install -e` needs) in a fresh folder."""
    names = ["demo.sh", ".ci/env.sh"] + (["pyproject.toml", "README.md"] if packages else [])
    for name in names:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)
    if packages:
        for pkg in ("builder", "retriever", "cluster"):
            shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dest


def stock_env(tmp_path: Path, **extra) -> dict:
    """This environment on a stock PATH with no active virtual environment: python3, no python."""
    path = STOCK_PATH
    if not shutil.which("python3", path=path):             # a machine whose python3 lives elsewhere
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        (bin_dir / "python3").symlink_to(getattr(sys, "_base_executable", sys.executable))
        path = f"{bin_dir}:{path}"
    if shutil.which("python", path=path):
        pytest.skip(f"this machine has a `python` on the stock PATH ({shutil.which('python', path=path)})")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONPATH", "PYTHONHOME")}
    return env | {"PATH": path} | extra


def run_demo_sh(repo: Path, env: dict, timeout: float) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    r = subprocess.run(["bash", "demo.sh"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=timeout)
    out = r.stdout
    for bad in NEVER:
        assert bad not in out, out
    return r.returncode, out, time.perf_counter() - t0


def test_demo_sh_makes_a_venv_with_only_python3(tmp_path):
    repo = copy_repo(tmp_path / "repo", packages=False)
    env = stock_env(tmp_path, KNNLM_DEMO_STOP="env")
    rc, out, _ = run_demo_sh(repo, env, timeout=120)
    assert rc == 0, out
    assert "no virtual environment is active: creating one in" in out and "source .venv/bin/activate" in out
    py = repo / ".venv" / "bin" / "python"
    assert py.exists() and subprocess.run([str(py), "-m", "pip", "--version"], capture_output=True).returncode == 0
    rc, out, _ = run_demo_sh(repo, env, timeout=60)                   # a second run reuses it
    assert rc == 0 and f"using {repo / '.venv'}" in out, out
    rc, out, _ = run_demo_sh(repo, env | {"VIRTUAL_ENV": str(repo / ".venv")}, timeout=60)   # an active one is used
    assert rc == 0 and f"using the active virtual environment {repo / '.venv'}" in out and "activate" not in out, out


@pytest.mark.slow
def test_demo_sh_installs_knnlm_into_its_venv(tmp_path):
    """The whole install step on a stock PATH (torch, knnlm and its dependencies into .venv), stopped
    before the demo itself runs; the installed `knnlm` works."""
    repo = copy_repo(tmp_path / "repo", packages=True)
    rc, out, seconds = run_demo_sh(repo, stock_env(tmp_path, KNNLM_DEMO_STOP="install"), timeout=1200)
    assert rc == 0, out
    assert "installing torch 2.13.0 into" in out and "installing knnlm" in out, out
    knnlm = repo / ".venv" / "bin" / "knnlm"
    r = subprocess.run([str(knnlm), "demo", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--epochs" in r.stdout, r.stdout + r.stderr

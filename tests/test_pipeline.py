"""`knnlm run PIPELINE.yaml`: file errors, and a pipeline equals its stages run one by one."""
import json
import os

import pytest
import yaml
from conftest import write_text

from builder.add import add_stage
from builder.build import build
from builder.config import AddConfig, BuildConfig, ConfigError, TrainConfig
from builder.manifest import load_manifest
from builder.storage import Storage
from builder.train import train_stage
from cluster.cli import main
from cluster.pipeline import run_pipeline
from cluster.pipeline_file import load_pipeline, parse_pipeline
from retriever.config import EvalConfig
from retriever.evaluate import evaluate

TRAIN = ["The quick brown fox jumps over the lazy dog. " * 4,
         "A kNN-LM interpolates a language model with nearest neighbours from a datastore. " * 3,
         "In 1998 the river flooded the valley, and 3,000 people moved to the hills. " * 3]
EVAL = "The quick brown fox jumps over the river. A language model with neighbours."
W, C = 16, 6


def minimal(**over) -> dict:
    d = {"datastore": "ds", "build": {"corpus": ["a.txt"], "model": "m"}, "index": {}}
    d.update(over)
    return d


def test_pipeline_file_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'indx'; did you mean 'index'\?"):
        parse_pipeline(minimal(indx={}), "p.yaml")
    with pytest.raises(ConfigError, match=r"p.yaml: unknown key 'index.facotry'; did you mean 'index.factory'\?"):
        parse_pipeline(minimal(index={"facotry": "IVF16,Flat"}), "p.yaml")
    with pytest.raises(ConfigError, match=r"unknown key 'build.windw'; did you mean 'build.window'"):
        parse_pipeline(minimal(build={"corpus": ["a"], "model": "m", "windw": 8}), "p.yaml")
    with pytest.raises(ConfigError, match=r"p.yaml: index: index.train_size must be a positive integer \(got -1\)"):
        parse_pipeline(minimal(index={"train_size": -1}), "p.yaml")
    with pytest.raises(ConfigError, match=r"build: build.min_context \(8\) must be smaller than build.window \(8\)"):
        parse_pipeline(minimal(build={"corpus": ["a"], "model": "m", "window": 8, "min_context": 8}), "p.yaml")
    with pytest.raises(ConfigError, match=r"`datastore` \(the output URI\) is required"):
        parse_pipeline({"build": {"corpus": ["a"], "model": "m"}}, "p.yaml")
    with pytest.raises(ConfigError, match=r"build.corpus: at least one"):
        parse_pipeline(minimal(build={"model": "m"}), "p.yaml")
    with pytest.raises(ConfigError, match=r"tune needs both tune.valid and tune.test"):
        parse_pipeline(minimal(tune={"valid": ["v.txt"]}), "p.yaml")
    with pytest.raises(ConfigError, match=r"serve keeps index servers running.*set `address`"):
        parse_pipeline(minimal(serve={}), "p.yaml")
    with pytest.raises(ConfigError, match=r"eval must be a mapping"):
        parse_pipeline(minimal(eval=["x"]), "p.yaml")
    bad = write_text(tmp_path / "bad.yaml", "datastore: ds\nbuild: {corpus: [a\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML \(line \d+, column \d+\)"):
        load_pipeline(bad)
    with pytest.raises(ConfigError, match="is empty"):
        load_pipeline(write_text(tmp_path / "empty.yaml", ""))
    with pytest.raises(ConfigError, match="no such pipeline file"):
        load_pipeline(str(tmp_path / "missing.yaml"))
    # the CLI prints the message, not a traceback
    rc = main(["run", str(write_text(tmp_path / "typo.yaml", yaml.safe_dump(minimal(idnex={}))))])
    assert rc == 2
    # `lambda` is a key of eval (a Python keyword in the dataclass); relative paths follow the file's folder
    for name in ("a.txt", "test.txt"):
        write_text(tmp_path / "sub" / name, "some text")
    p = load_pipeline(write_text(tmp_path / "sub" / "ok.yaml", yaml.safe_dump(
        minimal(eval={"corpus": "test.txt", "lambda": 0.3}))))
    assert p.eval.lam == 0.3 and p.eval.corpus == [str(tmp_path / "sub" / "test.txt")]
    assert p.datastore == str(tmp_path / "sub" / "ds") and p.build.model == "m"        # not a folder: a hub id
    r = p.resolved()
    assert r["eval"]["lambda"] == 0.3 and r["index"]["factory"] == "IVF4096,PQ64" and "tune" not in r


def test_inputs_are_checked_when_the_file_is_loaded(tmp_path, gpt2_model, monkeypatch, capsys):
    """Every input the file names is resolved against its folder and checked by load_pipeline, before
    any Ray or model work; the error names the key and the resolved path. Outputs are not inputs."""
    import builder.modelinfo
    import builder.runtime

    def no_work(*a, **kw):
        raise AssertionError("Ray or model work before the file's inputs were checked")
    monkeypatch.setattr(builder.runtime, "ray_session", no_work)
    monkeypatch.setattr(builder.modelinfo, "inspect_model", no_work)
    sub = tmp_path / "sub"
    for name in ("train.txt", "valid.txt", "texts/a.txt"):
        write_text(sub / name, "some text")
    os.makedirs(sub / "empty")
    good = {"datastore": "out/ds", "build": {"corpus": ["train.txt", "texts/"], "model": gpt2_model}, "index": {},
            "tune": {"valid": "valid.txt", "test": ["texts/*.txt"], "plots": "new/plots", "out": "new/tune.json"},
            "eval": {"corpus": ["valid.txt"], "out": "new/dir/eval.json"}}

    def load(**change):
        spec = json.loads(json.dumps(good))
        for key, v in change.items():
            section, name = key.split("__")
            spec[section][name] = v
        return load_pipeline(write_text(sub / "p.yaml", yaml.safe_dump(spec)))

    p = load()
    assert p.build.corpus == [str(sub / "train.txt"), str(sub / "texts")] and p.datastore == str(sub / "out" / "ds")
    assert p.eval.out == str(sub / "new" / "dir" / "eval.json") and not os.path.exists(sub / "new")   # created later
    yml = str(sub / "p.yaml")
    for change, key, path, why in [
        ({"build__corpus": ["train.txt", "nope.txt"]}, "build.corpus", sub / "nope.txt", "no such file or directory"),
        ({"tune__valid": ["../valid.txt"]}, "tune.valid", tmp_path / "valid.txt", "no such file or directory"),
        ({"tune__test": ["texts/*.jsonl"]}, "tune.test", sub / "texts" / "*.jsonl", "no file matches this pattern"),
        ({"eval__corpus": ["empty"]}, "eval.corpus", sub / "empty", "directory is empty"),
        ({"build__corpus": ["train.txt", "./train.txt"]}, "build.corpus", sub / "train.txt", "is given more than once"),
        ({"build__model": "./no-model"}, "build.model", sub / "no-model", "no such model directory"),
        ({"build__model": "texts"}, "build.model", sub / "texts", "has no config.json"),
        ({"build__model": "models/gpt2/v1"}, "build.model", sub / "models/gpt2/v1", "no such model directory"),
    ]:
        with pytest.raises(ConfigError) as e:
            load(**change)
        assert str(e.value).startswith(f"{yml}: {key}: {path}"), (change, str(e.value))
        assert why in str(e.value), (change, str(e.value))
    assert load(build__model="org/some-model").build.model == "org/some-model"     # a hub id: checked when built
    assert load(build__model=os.path.relpath(gpt2_model, sub)).build.model == gpt2_model
    # the command line: a clean message naming the key, for `knnlm run` and `knnlm run --check` alike
    load()
    write_text(sub / "bad.yaml", yaml.safe_dump(dict(good, build={"corpus": ["nope.txt"], "model": gpt2_model})))
    capsys.readouterr()
    for argv in (["run", str(sub / "bad.yaml")], ["run", "--check", str(sub / "bad.yaml")]):
        assert main(argv) == 2
        assert f"bad.yaml: build.corpus: {sub / 'nope.txt'}: no such file or directory" in capsys.readouterr().err
    # unchecked on request (knnlm submit: the inputs are checked on the cluster, inside the job)
    assert load_pipeline(str(sub / "bad.yaml"), check_inputs=False).build.corpus == [str(sub / "nope.txt")]


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    corpus = [write_text(root / "corpus" / f"{i}.txt", t) for i, t in enumerate(TRAIN)]
    evalf = write_text(root / "eval.txt", EVAL)
    return root, corpus, evalf


def test_pipeline_equals_its_stages_and_reruns_as_a_no_op(texts, gpt2_model, tmp_path, ray_cluster, capsys):
    root, corpus, evalf = texts
    spec = {"datastore": str(tmp_path / "ds"),
            "build": {"corpus": corpus, "model": gpt2_model, "window": W, "min_context": C},
            "index": {"factory": "IVF4,Flat", "train_size": 100000, "min_points_per_centroid": 1, "shards": 2,
                      "trainer": "faiss", "encoder": "faiss"},
            "tune": {"valid": [evalf], "test": [evalf], "k": 16, "nprobe": 4, "plots": str(tmp_path / "plots"),
                     "out": "results/tune.json"},
            "eval": {"corpus": [evalf], "k": 16, "nprobe": 4, "out": str(tmp_path / "eval.json")}}
    path = write_text(tmp_path / "pipeline.yaml", yaml.safe_dump(spec))
    assert main(["run", path, "--out", str(tmp_path / "new" / "run.json")]) == 0     # outputs' folders are made
    assert json.load(open(tmp_path / "results" / "tune.json"))["k"] <= 16
    out = json.load(open(tmp_path / "new" / "run.json"))
    assert list(out) == ["build", "train-index", "add", "tune", "eval"]
    st = Storage.from_uri(spec["datastore"])
    m = load_manifest(st)
    assert m.pipeline == load_pipeline(path).resolved()
    tuned = m.tuned                          # tune recorded: eval used it by default
    ev = json.load(open(tmp_path / "eval.json"))
    assert (ev["lambda"], ev["temperature"], ev["k"]) == (tuned["lambda"], tuned["temperature"], tuned["k"])
    assert sorted(os.listdir(tmp_path / "plots")) == ["ppl_vs_k.png", "ppl_vs_lambda.png"]

    # the same stages one by one, with the same settings: the same keys, index and perplexity
    ref = str(tmp_path / "ref")
    build(BuildConfig(corpus=corpus, model=gpt2_model, out=ref, window=W, min_context=C, progress=False))
    train_stage(TrainConfig(datastore=ref, index_factory="IVF4,Flat", train_size=100000, trainer="faiss",
                            min_points_per_centroid=1))
    add_stage(AddConfig(datastore=ref, index_shards=2, encoder="faiss"))
    r = load_manifest(Storage.from_uri(ref))
    assert [s["checksum"] for s in r.shards] == [s["checksum"] for s in m.shards]
    assert r.index["checksum"] == m.index["checksum"]
    assert [s["checksum"] for s in r.index_shards] == [s["checksum"] for s in m.index_shards]
    res = evaluate(EvalConfig(datastore=ref, corpus=[evalf], lam=tuned["lambda"], temperature=tuned["temperature"],
                              k=tuned["k"], nprobe=4))
    assert res.knnlm_ppl == pytest.approx(ev["knnlm_ppl"], rel=1e-9) and res.base_ppl == ev["base_ppl"]

    # a rerun does nothing but check (the neighbour caches are reused), and a changed file is refused
    capsys.readouterr()
    p = load_pipeline(path)
    again = run_pipeline(p)
    assert "nothing to do" in again["add"] and "already" in again["build"].lower()
    spec["index"]["factory"] = "IVF2,Flat"
    with pytest.raises(ConfigError, match=r"(?s)changed.yaml: train-index: .*factory \(index.factory\): the index has 'IVF4,Flat', this run asks "
                                          r"for 'IVF2,Flat'.*knnlm train-index .* --force"):
        run_pipeline(load_pipeline(write_text(tmp_path / "changed.yaml", yaml.safe_dump(spec))))
    assert load_manifest(st).pipeline["index"]["factory"] == "IVF4,Flat"


@pytest.mark.s3
def test_the_same_pipeline_file_writes_to_s3(texts, gpt2_model, tmp_path, s3_bucket, ray_cluster):
    """Only the datastore URI differs: corpus and eval files on S3, datastore on S3, same keys and index."""
    from conftest import upload_dir
    root, corpus, evalf = texts
    src = upload_dir(str(root), s3_bucket, "texts")
    spec = {"datastore": f"s3://{s3_bucket}/ds",
            "build": {"corpus": [f"{src}/corpus/"], "model": gpt2_model, "window": W, "min_context": C},
            "index": {"factory": "IVF4,Flat", "train_size": 100000, "min_points_per_centroid": 1, "shards": 2,
                      "trainer": "faiss", "encoder": "faiss"},
            "eval": {"corpus": [f"{src}/eval.txt"], "lambda": 0.3, "temperature": 2.0, "k": 16, "nprobe": 4}}
    missing = dict(spec, build=dict(spec["build"], corpus=[f"{src}/nothing/"]))
    with pytest.raises(ConfigError, match=rf"missing.yaml: build.corpus: {src}/nothing/: no object matches"):
        load_pipeline(write_text(tmp_path / "missing.yaml", yaml.safe_dump(missing)))
    s3 = run_pipeline(load_pipeline(write_text(tmp_path / "s3.yaml", yaml.safe_dump(spec))))
    spec.update(datastore=str(tmp_path / "local"))
    spec["build"]["corpus"], spec["eval"]["corpus"] = corpus, [evalf]
    local = run_pipeline(load_pipeline(write_text(tmp_path / "local.yaml", yaml.safe_dump(spec))))
    a, b = load_manifest(Storage.from_uri(f"s3://{s3_bucket}/ds")), load_manifest(Storage.from_uri(spec["datastore"]))
    assert [s["checksum"] for s in a.shards] == [s["checksum"] for s in b.shards]
    assert [s["checksum"] for s in a.index_shards] == [s["checksum"] for s in b.index_shards]
    assert a.pipeline["datastore"] == f"s3://{s3_bucket}/ds"
    assert s3["eval"]["knnlm_ppl"] == pytest.approx(local["eval"]["knnlm_ppl"], rel=1e-9)

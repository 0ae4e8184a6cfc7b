"""`knnlm demo`: the whole product on one machine, offline, in minutes.

1. The corpus: WikiText-2's validation and test text, shipped compressed with the package
   (cluster/demo_data, CC BY-SA 3.0, see its README), split by article into train (97 articles),
   valid (12) and test (13): article i goes to test when i % 10 == 0, to valid when i % 10 == 5.
   With --corpus, the user's files are split the same way (by wikitext article, else by
   blank-line-separated paragraph).
2. The model: with no --model, a byte-level BPE tokenizer and a small GPT-2 are trained on the
   train part (a few minutes on 2 CPU cores), cached by corpus and settings for the next run.
3. The pipeline, through `knnlm run`'s own code: build (stream mode) → train-index → add → tune
   (neighbour caches of valid and test, λ/T/k chosen on valid, plots) → eval of test with the tuned
   values.
4. The end: the base vs kNN-LM perplexity table, the plots, the report of the test text
   (report/index.html: `knnlm eval --report`), and one generated sample with and without the
   datastore. Everything goes to --out (default ./knnlm-demo): the data, the datastore,
   pipeline.yaml, plots/, report/, and results.json (the fields of `knnlm eval --out`, plus the
   validation figures, the tuned values and the samples).
"""
from __future__ import annotations

import hashlib
import json
import logging
import lzma
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from importlib import resources

from builder.config import ConfigError
from builder.corpus import _decode
from builder.manifest import load_manifest
from builder.modelinfo import inspect_model
from builder.runtime import ray_session
from builder.storage import Storage, StorageError, expand_inputs, read_uri, write_json_file, write_local_text
from cluster.config import DemoConfig
from cluster.pipeline import run_pipeline
from cluster.pipeline_file import load_pipeline, model_path, resolve_pipeline
from retriever.evaluate import knnlm_settings
from retriever.generate import generate
from retriever.server import default_cache_dir

log = logging.getLogger(__name__)
ARTICLE = re.compile(r"^ = [^=].* = $")            # " = Title = " (not " = = Section = = ")


# ---------------------------------------------------------------------------------------------
# the corpus


def split_articles(text: str, preamble: bool = True) -> list[str]:
    """WikiText text → its articles (each starts at a ' = Title = ' line), unchanged and in order;
    text before the first title joins the first article (or, preamble=False, is dropped)."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if ARTICLE.match(line.rstrip("\n"))]
    if not starts:
        return []
    if starts[0] != 0 and preamble:
        starts[0] = 0
    return ["".join(lines[a:b]) for a, b in zip(starts, starts[1:] + [len(lines)])]


def split_documents(text: str) -> list[str]:
    """Articles for WikiText text, else blank-line-separated paragraphs."""
    arts = split_articles(text)
    if len(arts) >= 3:
        return arts
    return [p + "\n\n" for p in re.split(r"\n\s*\n", text) if p.strip()]


def deal(docs: list[str]) -> dict[str, str]:
    """Document i → test if i % 10 == 0, valid if i % 10 == 5, else train (deterministic)."""
    out = {"train": [], "valid": [], "test": []}
    for i, d in enumerate(docs):
        out["test" if i % 10 == 0 else "valid" if i % 10 == 5 else "train"].append(d)
    return {k: "".join(v) for k, v in out.items()}


def shipped_articles() -> list[str]:
    """The 124 articles of WikiText-2 valid + test (in that order), as shipped with the package
    (the blank line before each file's first title dropped, as ../shared/data/wikitext-2-splits does)."""
    base = resources.files("cluster") / "demo_data"
    return [a for s in ("valid", "test")
            for a in split_articles(lzma.decompress((base / f"wikitext-2-{s}.txt.xz").read_bytes()).decode("utf-8"),
                                    preamble=False)]


def prepare_corpus(out_dir: str, corpus: list[str] | None = None) -> dict[str, str]:
    """{split: absolute path} of train/valid/test text files under out_dir/data, and "format":
    wikitext when the text is made of WikiText articles (the shipped corpus), else text."""
    out_dir = os.path.abspath(out_dir)
    if corpus:
        try:
            uris = expand_inputs(corpus)
        except (FileNotFoundError, ValueError) as e:                    # "--corpus X: why"
            raise ConfigError(str(e)) from None
        texts = []
        for u in uris:
            try:
                t, bad = _decode(read_uri(u), u, "file")
            except StorageError as e:
                raise ConfigError(f"--corpus {u}: {e}") from None
            if bad:
                raise ConfigError(f"--corpus {u}: {bad}")
            texts.append(t)
        text = "".join(texts)
        docs = split_documents(text)
        fmt = "wikitext" if len(split_articles(text)) >= 3 else "text"
        if len(docs) < 10:
            raise ConfigError(f"--corpus: found {len(docs)} documents; the demo needs at least 10 (articles with "
                              "' = Title = ' lines, or paragraphs separated by blank lines) to split them into "
                              "train, valid and test")
    else:
        docs, fmt = shipped_articles(), "wikitext"
    parts = deal(docs)
    os.makedirs(os.path.join(out_dir, "data"), exist_ok=True)
    paths = {}
    for split, text in parts.items():
        paths[split] = os.path.join(out_dir, "data", f"{split}.txt")
        with open(paths[split], "w", encoding="utf-8") as f:
            f.write(text)
    return paths | {"format": fmt}


# ---------------------------------------------------------------------------------------------
# the model


@dataclass
class ModelSpec:
    """A small GPT-2 that trains to a useful perplexity on ~0.5M tokens in a few CPU minutes."""
    vocab_size: int = 4096
    n_layer: int = 3
    n_embd: int = 192
    n_head: int = 4
    n_positions: int = 256
    block: int = 128                   # training sequence length
    batch: int = 16
    lr: float = 2e-3
    epochs: float = 3.0
    seed: int = 0

    def key(self, corpus_sha: str) -> str:
        return hashlib.sha256((corpus_sha + json.dumps(asdict(self), sort_keys=True)).encode()).hexdigest()[:16]


def train_tokenizer(text: str, vocab_size: int, path: str):
    """Byte-level BPE (GPT-2 style) trained on `text`, saved as a HF fast tokenizer at `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(path)
    return fast


def train_model(train_path: str, valid_path: str, out_dir: str, spec: ModelSpec, threads: int | None = None) -> dict:
    """Tokenizer + GPT-2 trained on train_path (AdamW, warm-up then cosine decay), saved at out_dir
    (written to a temporary folder, then renamed: a killed run leaves no half model). Returns stats."""
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    t0 = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    tmp = out_dir + f".part-{os.getpid()}"
    with open(train_path, encoding="utf-8") as f:
        text = f.read()
    with open(valid_path, encoding="utf-8") as f:
        valid = f.read()
    tok = train_tokenizer(text, spec.vocab_size, tmp)
    ids = np.array(tok(text)["input_ids"], dtype=np.int64)                    # (N,) training tokens
    vids = np.array(tok(valid)["input_ids"], dtype=np.int64)
    torch.manual_seed(spec.seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=spec.n_positions, n_embd=spec.n_embd, n_layer=spec.n_layer,
                     n_head=spec.n_head, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    n_blocks = len(ids) // spec.block
    blocks = torch.from_numpy(ids[:n_blocks * spec.block].reshape(n_blocks, spec.block))  # (n, block)
    steps = max(1, int(spec.epochs * n_blocks / spec.batch))
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    g = torch.Generator().manual_seed(spec.seed)
    model.train()
    order = torch.randperm(n_blocks, generator=g)
    for step in range(steps):
        lo = (step * spec.batch) % n_blocks
        if lo + spec.batch > n_blocks:
            order = torch.randperm(n_blocks, generator=g)
        x = blocks[order[lo:lo + spec.batch]] if lo + spec.batch <= n_blocks else blocks[order[:spec.batch]]
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("demo model: step %d/%d, loss %.3f (%.0fs)", step + 1, steps, loss.item(), time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():                                   # valid loss on 128-token blocks (a quick check)
        nv = len(vids) // spec.block
        vb = torch.from_numpy(vids[:nv * spec.block].reshape(nv, spec.block))
        losses = [model(input_ids=vb[i:i + 32], labels=vb[i:i + 32]).loss.item() for i in range(0, nv, 32)]
    stats = {"params": sum(p.numel() for p in model.parameters()), "train_tokens": len(ids), "steps": steps,
             "valid_block_ppl": float(math.exp(np.mean(losses))), "seconds": round(time.perf_counter() - t0, 1),
             "spec": asdict(spec)}
    model.save_pretrained(tmp)
    with open(os.path.join(tmp, "demo_model.json"), "w") as f:
        json.dump(stats, f, indent=1)
    os.replace(tmp, out_dir) if not os.path.exists(out_dir) else None
    log.info("demo model: %d parameters, valid ppl %.1f (128-token blocks) in %.0fs", stats["params"],
             stats["valid_block_ppl"], stats["seconds"])
    return stats


def default_model_cache() -> str:
    return os.path.join(default_cache_dir(), "demo-models")


def demo_model_dir(paths: dict[str, str], spec: ModelSpec, cache_dir: str | None = None) -> str:
    """The folder of the demo model of this corpus and spec (absolute; trained there by demo_model)."""
    with open(paths["train"], "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    return os.path.abspath(os.path.join(cache_dir or default_model_cache(), spec.key(sha)))


def demo_model(paths: dict[str, str], spec: ModelSpec, cache_dir: str | None = None) -> tuple[str, dict]:
    """(model folder, its stats): the cached model of this corpus and spec, trained now if missing."""
    path = demo_model_dir(paths, spec, cache_dir)
    if os.path.exists(os.path.join(path, "demo_model.json")):
        log.info("demo model: cached at %s", path)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        log.info("demo model: training a %d-layer, %d-dim GPT-2 on %s (cached at %s for the next run)",
                 spec.n_layer, spec.n_embd, paths["train"], path)
        train_model(paths["train"], paths["valid"], path, spec)
    with open(os.path.join(path, "demo_model.json")) as f:
        return path, json.load(f)


# ---------------------------------------------------------------------------------------------
# the demo


def index_factory(dim: int, train_tokens: int) -> str:
    """IVF with at least 39 training keys per list (up to 1024 lists), and fast-scan PQ with 4 dims per
    sub-quantizer (4-bit codes, dim/8 bytes per key): 3x faster than 8-bit PQ on a CPU (README)."""
    nlist = max(16, min(1024, 2 ** int(math.log2(max(train_tokens // 39, 16)))))
    pq = next((m for m in (dim // 4, dim // 2, dim) if m and dim % m == 0 and m % 2 == 0), dim)
    return f"IVF{nlist},PQ{pq}x4fs"


def pipeline_spec(out: str, paths: dict[str, str], model: str, window: int | None = None,
                  factory: str | None = None) -> dict:
    """The pipeline file the demo runs, written to OUT/pipeline.yaml: `knnlm run` reruns it from any
    folder, since its paths under OUT are relative to the file's folder (OUT) and the model's is absolute.
    Without window and factory (before the model exists) it still names every input, to check them."""
    def rel(path):
        return os.path.relpath(path, out)
    fmt = paths["format"]
    index = {"train_size": 200_000, "shards": 1}
    return {
        "datastore": "datastore",
        "build": {"corpus": [rel(paths["train"])], "model": model, "mode": "stream", "format": fmt,
                  "window": window, "min_context": window and window // 2},
        "index": {"factory": factory, **index} if factory else index,
        "tune": {"valid": [rel(paths["valid"])], "test": [rel(paths["test"])], "format": fmt, "k": 1024,
                 "plots": "plots", "out": "tune.json"},
        "eval": {"corpus": [rel(paths["test"])], "format": fmt, "out": "eval-test.json", "report": "report"},
    }


def run_demo(cfg: DemoConfig) -> dict:
    """Everything the module docstring lists; returns results.json's content. The data is written and
    the pipeline's inputs checked before the model is trained."""
    import yaml
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    out = os.path.abspath(os.path.expanduser(cfg.out))
    pfile = os.path.join(out, "pipeline.yaml")
    os.makedirs(out, exist_ok=True)
    paths = prepare_corpus(out, cfg.corpus)
    spec = ModelSpec(epochs=cfg.epochs)
    model = model_path(cfg.model, os.getcwd()) if cfg.model else demo_model_dir(paths, spec, cfg.model_cache)
    resolve_pipeline(pipeline_spec(out, paths, model), pfile, check_model=bool(cfg.model))
    stats = None
    if not cfg.model:
        model, stats = demo_model(paths, spec, cfg.model_cache)
    info = inspect_model(model, "ffn_input")
    window = cfg.window or min(info.max_positions or 1024, 1024)
    with open(paths["train"], encoding="utf-8") as f:
        train_tokens = len(AutoTokenizer.from_pretrained(info.path)(f.read())["input_ids"])
    factory = cfg.index_factory or index_factory(info.hidden_size, train_tokens)
    write_local_text(pfile, "# written by `knnlm demo`; `knnlm run` reruns it from any folder (every stage is "
                            "already done)\n" + yaml.safe_dump(pipeline_spec(out, paths, model, window, factory),
                                                                sort_keys=False))
    p = load_pipeline(pfile)
    with ray_session(None):
        stages = run_pipeline(p)
        samples = generate_samples(p.datastore, model, paths["test"], cfg)
    ev, tu = stages["eval"], stages["tune"]
    result = dict(ev)
    result.update(valid_base_ppl=tu["valid_base_ppl"], valid_knnlm_ppl=tu["valid_ppl"],
                  paper_setting_test_ppl=tu.get("test_paper_ppl"), model=model, demo_model=stats,
                  datastore=p.datastore, index_factory=factory, plots=tu.get("plots", []), samples=samples,
                  out=out, pipeline=pfile, seconds=round(time.perf_counter() - t0, 1))
    write_json_file(os.path.join(out, "results.json"), result)
    return result


def generate_samples(datastore: str, model: str, test_path: str, cfg: DemoConfig) -> dict:
    """One greedy continuation of a prompt with and without the datastore (tuned λ, T, k); the default
    prompt opens the first held-out (test) article."""
    st = Storage.from_uri(datastore)
    m = load_manifest(st)
    lam, temp, k = knnlm_settings(m, None, None, None)
    prompt = cfg.prompt
    if prompt is None:                       # the start of the first test article's body
        with open(test_path, encoding="utf-8") as f:
            body = [line for line in f if line.strip() and not line.startswith(" =")]
        prompt = " ".join(body[0].split()[:12])
    g = generate(st.uri, prompt, lam, temp, k, 32, cfg.max_new_tokens, compare=True, model=model)
    n, tok = g["prompt_tokens"], g["tokenizer"]
    return {"prompt": prompt, "knnlm": tok.decode(g["knnlm"][0, n:]), "base": tok.decode(g["base"][0, n:]),
            "lambda": lam, "temperature": temp, "k": k}


def report(r: dict) -> str:
    """The table the demo ends with."""
    lines = [f"kNN-LM demo: datastore {r['datastore']} ({r['index_factory']}), model {r['model']}", "",
             f"{'':<34} {'valid ppl':>10} {'test ppl':>10}",
             f"{'base LM':<34} {r['valid_base_ppl']:>10.2f} {r['base_ppl']:>10.2f}"]
    if r.get("paper_setting_test_ppl"):
        lines.append(f"{'kNN-LM, paper (λ=0.25, T=1)':<34} {'':>10} {r['paper_setting_test_ppl']:>10.2f}")
    lab = f"kNN-LM, tuned (λ={r['lambda']:g}, T={r['temperature']:.3g}, k={r['k']})"
    lines += [(f"{lab:<34} {r['valid_knnlm_ppl']:>10.2f} {r['knnlm_ppl']:>10.2f}  "
               f"({100 * r['relative_change']:+.1f}% on test, {r['tokens']:,} tokens)"), ""]
    lines += [f"plot: {p}" for p in r.get("plots", [])]
    if r.get("report"):
        lines.append(f"report: {r['report']['path']} (open it in a browser: where the datastore helped, and the "
                     "training text behind each prediction)")
    s = r["samples"]
    lines += ["", f"prompt:             {s['prompt']}", f"with the datastore: …{s['knnlm']}",
              f"base LM alone:      …{s['base']}", "",
              f"results: {os.path.join(r['out'], 'results.json')} ({r['seconds']:.0f} s)",
              f"rerun the pipeline (a no-op now): knnlm run {r['pipeline']}"]
    return "\n".join(lines)


def demo(cfg: DemoConfig) -> int:
    """`knnlm demo`: run it and print the table."""
    print(report(run_demo(cfg)))
    return 0

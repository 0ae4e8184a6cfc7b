"""Shared fixtures: tiny HF models with real tokenizers, an embedded Ray, a moto S3 server.

Nothing is downloaded: models are built from configs with seeded random weights and
tokenizers are trained with the `tokenizers` library, then saved with save_pretrained
so the real loading path runs.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

import pytest


# S3 settings must be in the environment before Ray starts: Ray workers inherit it.
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MOTO_PORT = _free_port()
MOTO_URL = f"http://127.0.0.1:{MOTO_PORT}"
# Every S3 request of the suite, from this process and from the Ray workers (which inherit the
# environment when ray.init runs), goes through one fault-injecting proxy in front of the moto
# server (tests/s3_proxy.py). Its fault rates are 0 except inside a test that sets them (the
# `s3_faults` fixture), so the same Ray workers serve clean tests and faulty ones.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from s3_proxy import FaultProxy  # noqa: E402

S3_PROXY = FaultProxy(MOTO_URL, seed=0)
os.environ.update({
    "AWS_ENDPOINT_URL": S3_PROXY.start(),
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-never-logged",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "0",
    # tests write "exit:<unit>:<marker>" here to kill a key worker mid-unit (builder/unit.py)
    "KNNLM_FAULT_FILE": os.path.join(os.environ.get("TMPDIR", "/tmp"), f"knnlm-fault-{os.getpid()}.txt"),
})

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.abspath(os.path.join(REPO, "..", "shared"))


def need_shared(*parts: str) -> str:
    """A folder of ../shared (the real text and the small real model beside the checkout). A user's
    clone has no ../shared: the test that needs it skips, naming the missing folder. In CI
    (CI=true) a missing folder fails the test instead, so CI never skips the real-text tests."""
    path = os.path.join(SHARED, *parts)
    if not os.path.isdir(path):
        why = f"needs {path} (the shared real text and model beside the checkout), which is absent"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}; with CI=true it must be there", pytrace=False)
        pytest.skip(why)
    return path


@pytest.fixture(scope="session")
def shared_model() -> str:
    """../shared/models/gpt2-wikitext2-small: a 4-layer GPT-2 trained on the WikiText-2 train split."""
    return need_shared("models", "gpt2-wikitext2-small")


@pytest.fixture(scope="session")
def wikitext_splits() -> str:
    """../shared/data/wikitext-2-splits: train.txt, valid.txt, test.txt (split by article)."""
    return need_shared("data", "wikitext-2-splits")

@pytest.fixture(scope="session")
def wt2_train_root(tmp_path_factory):
    """The folder of the WikiText-2 train datastore as bench/wikitext2_knnlm.py makes it (`ds/` in it: stream,
    512/256, IVF1024,PQ32 on 200k keys, 2 index shards). The slow real-text tests that need that datastore share
    it: the first one builds it, and the same stages rerun by the next are no-ops (a finished build, a trained
    index and filled index shards with the same settings are kept), saving a build of 467,808 keys in CI."""
    return tmp_path_factory.mktemp("wt2-train")


TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A kNN-LM interpolates a language model with nearest neighbours from a datastore.",
    "Valkyria Chronicles III is a tactical role-playing game developed by Sega.",
    "In 1998 the river flooded the valley, and 3,000 people moved to the hills.",
    "Tokens, keys and values: every corpus token becomes one entry of the datastore.",
]


def make_tokenizer(path: str, bos: bool = False, vocab_size: int = 400):
    """Byte-level BPE trained on a fixed text (deterministic), saved as a HF fast tokenizer.
    With bos=True it adds <s> in front of every text, like a Llama tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TRAIN_TEXT * 20, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def make_tiny_model(path: str, family: str = "gpt2", max_positions: int = 64, seed: int = 0,
                    bos: bool | None = None) -> str:
    """A tiny random causal LM of the given family saved at `path` with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

    if bos is None:
        bos = family == "llama"
    tok = make_tokenizer(path, bos=bos)
    v = len(tok)
    if family == "gpt2":
        cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=max_positions, vocab_size=v,
                         bos_token_id=0, eos_token_id=1)
    elif family == "neox":
        cfg = GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=max_positions, vocab_size=v, use_parallel_residual=True,
                            bos_token_id=0, eos_token_id=1)
    elif family in ("mistral", "qwen2"):
        from transformers import MistralConfig, Qwen2Config
        cls = MistralConfig if family == "mistral" else Qwen2Config
        cfg = cls(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=max_positions, vocab_size=v,
                  bos_token_id=0, eos_token_id=1)
    elif family == "opt":                   # its blocks hand fc1 a flattened (batch·time, dim) tensor
        from transformers import OPTConfig
        cfg = OPTConfig(num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=2,
                        word_embed_proj_dim=32, max_position_embeddings=max_positions, vocab_size=v,
                        bos_token_id=0, eos_token_id=1, pad_token_id=1)
    elif family == "llama":
        cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=64, max_position_embeddings=max_positions, vocab_size=v,
                          bos_token_id=0, eos_token_id=1)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger weights than the default init: keys that differ visibly
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{'gpt2' | 'neox' | 'llama' | 'mistral' | 'qwen2' | 'opt': path} (64 positions each)."""
    root = tmp_path_factory.mktemp("models")
    return {f: make_tiny_model(str(root / f), f) for f in ("gpt2", "neox", "llama", "mistral", "qwen2", "opt")}


@pytest.fixture(scope="session")
def gpt2_model(tiny_models):
    return tiny_models["gpt2"]


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray for the whole session (builds reuse an initialised Ray)."""
    import ray
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def start_moto(port: int, env: dict | None = None) -> subprocess.Popen:
    """moto's S3 server on 127.0.0.1:port, once it accepts connections."""
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.2)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto in server mode) on 127.0.0.1."""
    proc = start_moto(MOTO_PORT)
    yield os.environ["AWS_ENDPOINT_URL"]
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_faults(s3_server):
    """The suite's S3 fault proxy (see S3_PROXY), its counts zeroed and its draws reseeded (0); the
    test sets its rates (`set_rates`), which go back to 0 afterwards."""
    S3_PROXY.set_rates({})
    S3_PROXY.reset_counts()
    S3_PROXY.reseed(0)
    yield S3_PROXY
    S3_PROXY.set_rates({})


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the moto server; yields its name."""
    import boto3
    name = f"knnlm-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    yield name


def upload_dir(local: str, bucket: str, prefix: str) -> str:
    """Copy a local directory tree to s3://bucket/prefix (the moto server); returns that URI."""
    import boto3
    s3 = boto3.client("s3")
    for d, _, files in os.walk(local):
        for f in files:
            p = os.path.join(d, f)
            s3.upload_file(p, bucket, f"{prefix}/" + os.path.relpath(p, local))
    return f"s3://{bucket}/{prefix}"


def write_text(path, text: str | bytes) -> str:
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    return path


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: skipped (not failed) on machines without it."""
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

"""Identify a model and its tokenizer: where it is, a hash of its weights, its shape.

The hash lets every later stage recognise a moved, renamed or changed model."""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

from builder.keys import find_key_module
from builder.model_dir import ModelError, resolve_model_dir

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json", "vocab.txt")


def config_max_positions(model_dir: str) -> int | None:
    """The model's maximum positions from config.json alone (no torch import: a fast pre-check)."""
    import json
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelError(f"--model {model_dir}: cannot read config.json: {e}") from None
    cfg = cfg.get("text_config", cfg)  # multimodal wrappers keep the LM's config inside
    for k in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        if isinstance(cfg.get(k), int):
            return cfg[k]
    return None


HASH_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "knnlm-datastore",
                          "file-hashes.json")


def _hash_files(d: str, names: list[str]) -> str:
    """sha256 over the files' names and bytes, cached by (path, size, mtime, inode): a 7B model's
    weights take ~15 s to hash, and every stage checks them."""
    import json
    stats = [os.stat(os.path.join(d, n)) for n in names]
    stamp = json.dumps([[os.path.join(d, n), st.st_size, st.st_mtime_ns, st.st_ino] for n, st in zip(names, stats)])
    try:
        with open(HASH_CACHE) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if stamp in cache:
        return cache[stamp]
    digest = _hash_files_uncached(d, names)
    cache[stamp] = digest
    try:
        os.makedirs(os.path.dirname(HASH_CACHE), exist_ok=True)
        tmp = f"{HASH_CACHE}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(dict(list(cache.items())[-256:]), f)
        os.replace(tmp, HASH_CACHE)
    except OSError:
        pass  # a read-only home: hash every time
    return digest


def _hash_files_uncached(d: str, names: list[str]) -> str:
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode() + b"\0")
        with open(os.path.join(d, n), "rb") as f:
            for chunk in iter(lambda: f.read(8 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


@dataclass
class ModelInfo:
    name: str                # as given on the command line
    path: str                # resolved local directory
    sha256: str              # of the weight files
    model_class: str
    model_type: str
    hidden_size: int
    num_layers: int
    max_positions: int | None
    key_module: str
    tokenizer_sha256: str
    tokenizer_class: str
    vocab_size: int
    adds_special_tokens: bool    # the tokenizer's default adds tokens (e.g. a Llama BOS)
    bos_token_id: int | None

    def model_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "sha256": self.sha256, "class": self.model_class,
                "model_type": self.model_type, "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "max_positions": self.max_positions}

    def tokenizer_dict(self) -> dict:
        return {"name": self.name, "sha256": self.tokenizer_sha256, "class": self.tokenizer_class,
                "vocab_size": self.vocab_size, "add_special_tokens": True,
                "adds_special_tokens": self.adds_special_tokens, "bos_token_id": self.bos_token_id}


def inspect_model(model: str, key_layer: str, name: str | None = None) -> ModelInfo:
    """Everything the driver needs about a model without loading its weights.

    The architecture is instantiated on the meta device to find the key module, so an
    unsupported model fails here, before any work, with its class named."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


    path = resolve_model_dir(model)
    try:
        cfg = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise ModelError(f"--model {model}: cannot read its config: {e}") from None
    try:
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:
        raise ModelError(f"--model {model}: {type(cfg).__name__} is not a causal LM that transformers can build: {e}") from None
    key_module, _ = find_key_module(m, key_layer)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ModelError(f"--model {model}: cannot load its tokenizer: {e}") from None
    if not getattr(tok, "is_fast", False):
        log.warning("--model %s: tokenizer %s is not a fast tokenizer; tokenization will be slow",
                    model, type(tok).__name__)
    weights = sorted(n for n in os.listdir(path) if n.endswith(WEIGHT_SUFFIXES))
    if not weights:
        raise ModelError(f"--model {model}: no weight files (*.safetensors, *.bin) in {path}")
    tok_files = sorted(n for n in os.listdir(path) if n in TOKENIZER_FILES)
    probe = tok("a b", add_special_tokens=True)["input_ids"]
    bare = tok("a b", add_special_tokens=False)["input_ids"]
    max_pos = (getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
               or getattr(cfg, "n_ctx", None))
    return ModelInfo(
        name=name or model, path=path, sha256=_hash_files(path, weights), model_class=type(m).__name__,
        model_type=cfg.model_type, hidden_size=int(cfg.hidden_size), num_layers=int(cfg.num_hidden_layers),
        max_positions=int(max_pos) if max_pos else None, key_module=key_module,
        tokenizer_sha256=_hash_files(path, tok_files), tokenizer_class=type(tok).__name__,
        vocab_size=len(tok), adds_special_tokens=len(probe) != len(bare), bos_token_id=tok.bos_token_id)

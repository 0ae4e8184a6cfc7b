"""The build's tokenize stage: each input file → tokens/<i>.bin (int32 LE) + tokens/<i>.json (its meta).

A resumed build reuses the files an earlier run tokenized (refusing an input whose size changed
since); the rest run as Ray tasks, or on the driver for a small local corpus.
"""
from __future__ import annotations

import json
import logging
import os

from builder.build_errors import BuildError, unwrap
from builder.corpus import tokenize_file
from builder.dispatch import dispatch
from builder.layout import tokens_meta_path, tokens_path
from builder.lease import Lease
from builder.modelinfo import ModelInfo
from builder.storage import NotFound, Storage, is_s3, local_path, read_uri, size_uri

log = logging.getLogger(__name__)
DRIVER_TOKENIZE_BYTES = 32 << 20  # a local corpus this small is tokenized on the driver


def tokenize_input(file_index: int, uri: str, fmt: str, mode: str, text_field: str, tokenizer_path: str,
                   root_uri: str) -> dict:
    """Tokenize one input file and commit tokens/<i>.bin then tokens/<i>.json; return the meta."""
    from transformers import AutoTokenizer

    storage = Storage.from_uri(root_uri)
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    tok.model_max_length = 1 << 60  # sequences are windowed later; silence the length warning
    tf = tokenize_file(read_uri(uri), uri, fmt, mode, tok, text_field)
    storage.write_bytes(tokens_path(file_index), tf.tokens.astype("<i4").tobytes())
    meta = tf.meta()
    meta["tokens"] = tokens_path(file_index)
    storage.write_text(tokens_meta_path(file_index), json.dumps(meta))
    return meta


def tokenize_corpus(cfg, storage: Storage, lease: Lease, info: ModelInfo, inputs: list[str],
                    formats: list[str]) -> list[dict]:
    """The meta (TokenizedFile.meta() + "tokens") of every input, in corpus order: read back where an
    earlier run of this build committed it, else tokenized now."""
    metas: list[dict | None] = [None] * len(inputs)
    todo = []
    for i in range(len(inputs)):
        try:
            metas[i] = json.loads(storage.read_text(tokens_meta_path(i)))
        except NotFound:
            todo.append(i)
            continue
        size = size_uri(inputs[i])
        if size != metas[i]["bytes"]:
            raise BuildError(f"--corpus {inputs[i]} changed since this unfinished build tokenized it "
                             f"({metas[i]['bytes']} bytes then, {size} now); rerun with a new --out")
    if todo:
        _tokenize(cfg, storage, lease, info, inputs, formats, todo, metas)
    return metas


def _tokenize(cfg, storage, lease, info, inputs, formats, todo, metas) -> None:
    """Tokenize the inputs in `todo` into `metas`: on Ray tasks, or here for a small local corpus
    (a Ray task's process would spend seconds importing transformers to save milliseconds)."""
    import ray

    local = not any(is_s3(inputs[i]) for i in todo)
    local_bytes = sum(os.path.getsize(local_path(inputs[i])) for i in todo) if local else 0
    if local and local_bytes <= DRIVER_TOKENIZE_BYTES:
        log.info("tokenizing %d input files (%.1f MB) on the driver", len(todo), local_bytes / 1e6)
        for i in todo:
            metas[i] = tokenize_input(i, inputs[i], formats[i], cfg.mode, cfg.text_field, info.path, storage.uri)
        return
    log.info("tokenizing %d input files on Ray workers", len(todo))
    task = ray.remote(num_cpus=1, max_retries=2)(tokenize_input)

    def done(i: int, meta: dict) -> None:
        metas[i] = meta

    # all files at once (Ray queues them on its CPUs); a killed task is retried by Ray
    dispatch(todo, lambda i, _w: task.remote(i, inputs[i], formats[i], cfg.mode, cfg.text_field, info.path,
                                             storage.uri),
             done, lambda i, e: unwrap(e, f"tokenizing {inputs[i]}"), workers=len(todo), lease=lease)

"""The build's tokenize stage: each input file → tokens/<i>.bin (int32 LE), tokens/<i>.seqs (its sequence
table, builder/seqs.py) and tokens/<i>.json (its meta, written last: the commit).

A resumed build reuses the files an earlier run tokenized (refusing an input whose size changed
since; a meta of the older format, with its sequences as JSON lists, is rewritten with a table). The
rest run as Ray tasks, or on the driver for a small local corpus. A file larger than
corpus_ranges.RANGE_BYTES is cut into ranges (builder/corpus_ranges.py) tokenized by parallel tasks,
each into tokens/<i>.part-<k>.bin + .seqs + .json (a rerun keeps the finished ones); the driver then
joins the tokens into tokens/<i>.bin without reading them (Storage.compose), the tables one part at a
time into tokens/<i>.seqs, and writes tokens/<i>.json last. A file of one range is one task that does
the same with its one part; only a file of one chunk (CHUNK_BYTES) or one never cut (a `text` file in
document mode is one record; Parquet) is tokenized in one pass, which needs ~160 bytes per byte of text.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from typing import Iterable

import numpy as np

from builder.build_errors import BuildError, unwrap
from builder.corpus import MAX_SKIPPED, detect_format, tokenize_file
from builder.corpus_ranges import Source, chunk_grid, join_parts, tokenize_range
from builder.dispatch import dispatch
from builder.layout import (tokens_meta_path, tokens_part_meta_path, tokens_part_path, tokens_part_seqs_path,
                            tokens_path, tokens_seqs_path)
from builder.lease import Lease
from builder.modelinfo import ModelInfo
from builder.seqs import ROW, SeqTable, TableWriter, is_old_format, upgrade_meta
from builder.storage import NotFound, Storage, is_s3, local_path, read_uri, read_uri_range, size_uri

log = logging.getLogger(__name__)
DRIVER_TOKENIZE_BYTES = 32 << 20  # a local corpus this small is tokenized on the driver


def tokenize_input(file_index: int, uri: str, fmt: str, mode: str, text_field: str, tokenizer_path: str,
                   root_uri: str) -> dict:
    """Tokenize one input file and commit tokens/<i>.bin, .seqs, then tokens/<i>.json; return the meta."""
    storage = Storage.from_uri(root_uri)
    tok = _tokenizer(tokenizer_path)
    size = size_uri(uri)
    bounds, ranges = chunk_grid(uri, size, detect_format(uri, fmt), mode) if tok.is_fast else ([0, size], [(0, 1)])
    if len(bounds) > 2:                 # more than one chunk: its ranges one after the other, here, a chunk at a time
        parts = [tokenize_part(file_index, k, uri, fmt, mode, text_field, tokenizer_path, root_uri, bounds, j0, j1,
                               tok) for k, (j0, j1) in enumerate(ranges)]
        return finish_ranged(storage, file_index, uri, fmt, mode, parts, hash_input(uri, size), size)
    tf = tokenize_file(read_uri(uri), uri, fmt, mode, tok, text_field)     # one chunk, or a file never cut
    storage.write_bytes(tokens_path(file_index), tf.tokens.astype("<i4").tobytes())
    storage.write_bytes(tokens_seqs_path(file_index), tf.table())
    meta = tf.meta()
    meta["tokens"] = tokens_path(file_index)
    meta["ranges"] = 1
    storage.write_text(tokens_meta_path(file_index), json.dumps(meta))
    return meta


def _tokenizer(path: str):
    """The tokenizer at `path`, loaded once per process (and again if its files change): each load keeps
    ~4 MB that is never freed (transformers 5.24), so a pooled Ray worker that loaded it for each of the
    30 range tasks of a 2 GB file grew from 442 to 552 MB; with one load it stays flat."""
    return _load_tokenizer(path, _files_stamp(path))


def _files_stamp(path: str) -> tuple:
    """(name, size, mtime) of the files of a local tokenizer folder; () for anything else."""
    if not os.path.isdir(path):
        return ()
    return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path) if e.is_file()))


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str, stamp: tuple):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    tok.model_max_length = 1 << 60  # sequences are windowed later; silence the length warning
    return tok


def tokenize_part(file_index: int, k: int, uri: str, fmt: str, mode: str, text_field: str, tokenizer_path: str,
                  root_uri: str, bounds: list[int], j0: int, j1: int, tok=None) -> dict:
    """Range k (chunks [j0, j1) of `bounds`) of a large input → tokens/<i>.part-<k>.bin and .seqs, then its
    .json; a part an earlier run finished (same byte range, and a table: not the older format) is kept.
    Returns the part's meta."""
    storage = Storage.from_uri(root_uri)
    try:
        part = json.loads(storage.read_text(tokens_part_meta_path(file_index, k)))
        if (part["start"], part["end"]) == (bounds[j0], bounds[j1]) and not is_old_format(part):
            return part
    except NotFound:
        pass
    tok = tok or _tokenizer(tokenizer_path)
    if not tok.is_fast:
        raise BuildError(f"--corpus {uri}: tokenizing a file in ranges needs a fast tokenizer; {tokenizer_path} "
                         "has none")
    src = Source(uri, bounds[-1], detect_format(uri, fmt), tok, text_field)
    with tempfile.NamedTemporaryFile(prefix="knnlm-tokens-") as f, \
            tempfile.NamedTemporaryFile(prefix="knnlm-seqs-") as t:
        part = tokenize_range(src, mode, bounds, j0, j1, f, TableWriter(t))
        f.flush()
        t.flush()
        storage.upload_file(tokens_part_path(file_index, k), f.name)
        storage.upload_file(tokens_part_seqs_path(file_index, k), t.name)
    storage.write_text(tokens_part_meta_path(file_index, k), json.dumps(part))
    return part


def hash_input(uri: str, size: int, block: int = 8 << 20) -> str:
    """sha256 of an input object, read in blocks."""
    h = hashlib.sha256()
    for s in range(0, size, block):
        h.update(read_uri_range(uri, s, min(size, s + block)))
    return "sha256:" + h.hexdigest()


def finish_ranged(storage: Storage, file_index: int, uri: str, fmt: str, mode: str, parts: list[dict], sha256: str,
                  size: int) -> dict:
    """Join the parts of a large input into tokens/<i>.bin (Storage.compose: never in one process's
    memory) and tokens/<i>.seqs (`join_tables`, a chunk of a part's table at a time, through a local file),
    write tokens/<i>.json (last: the commit), then remove the parts."""
    tail, use = join_parts(parts, uri, detect_format(uri, fmt), mode)
    storage.compose(tokens_path(file_index),
                    [(tokens_part_path(file_index, k), 0, 4 * parts[k]["num_tokens"]) for k in use])
    tables = [SeqTable(storage, tokens_part_path(file_index, k), p).chunks() for k, p in enumerate(parts)]
    with tempfile.NamedTemporaryFile(prefix="knnlm-seqs-") as f:
        join_tables(parts, tables, mode, tail, TableWriter(f))
        f.flush()
        storage.upload_file(tokens_seqs_path(file_index), f.name)
    meta = {"uri": uri, "format": tail.pop("format"), "bytes": size, "sha256": sha256, **tail,
            "tokens": tokens_path(file_index)}
    meta["ranges"] = meta.pop("ranges")
    storage.write_text(tokens_meta_path(file_index), json.dumps(meta))
    for k in range(len(parts)):
        for rel in (tokens_part_path(file_index, k), tokens_part_seqs_path(file_index, k),
                    tokens_part_meta_path(file_index, k)):
            storage.delete(rel)
    log.info("%s: %d tokens from %d ranges", uri, meta["num_tokens"], len(parts))
    return meta


def join_tables(parts: list[dict], tables: list[Iterable[np.ndarray]], mode: str, meta: dict,
                out: TableWriter) -> None:
    """The sequence table of a ranged input from its parts' (`tables[k]`: part k's rows in chunks): document
    mode, their rows with offsets moved by the tokens and records by the records of the parts before;
    stream mode, the file's one sequence (when `meta`, the joined meta, counts one)."""
    tokens = records = 0
    for p, chunks in zip(parts, tables if mode == "document" else []):
        for rows in chunks:
            out.add_rows(rows, tokens, records)
        tokens, records = tokens + p["num_tokens"], records + p["num_records"]
    if mode != "document" and meta["num_sequences"]:
        out.add([meta["num_tokens"]], [-1])


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
        if is_old_format(metas[i]):
            metas[i] = upgrade_tokens(storage, i, metas[i])
    if todo:
        _tokenize(cfg, storage, lease, info, inputs, formats, todo, metas)
    return metas


def upgrade_tokens(storage: Storage, file_index: int, meta: dict) -> dict:
    """An older-format meta (sequences as JSON lists) of an unfinished build: write its table, then the meta
    in the table format (so the key workers read their units' rows as in any build)."""
    new, rows = upgrade_meta(meta, MAX_SKIPPED)
    storage.write_bytes(tokens_seqs_path(file_index), rows.astype(ROW).tobytes())
    storage.write_text(tokens_meta_path(file_index), json.dumps(new))
    log.info("%s: rewrote the tokens meta of an earlier version with a sequence table", storage.url(
        tokens_meta_path(file_index)))
    return new


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
    task = ray.remote(num_cpus=1, max_retries=10)                    # a lost worker (preempted node): run again
    whole, part, digest = task(tokenize_input), task(tokenize_part), task(hash_input)
    items, plans, got = [], {}, {}
    for i in todo:                  # a large file: its ranges and its hash; a file no larger than a range: one task
        fmt = detect_format(inputs[i], formats[i])
        size = size_uri(inputs[i])
        bounds, ranges = chunk_grid(inputs[i], size, fmt, cfg.mode)
        if len(ranges) == 1:
            items.append((i, "file", 0))
            continue
        plans[i] = (bounds, ranges, size)
        items += [(i, "part", k) for k in range(len(ranges))] + [(i, "hash", 0)]
        got[i] = {}
    log.info("tokenizing %d input files on Ray workers (%d tasks)", len(todo), len(items))

    def submit(item, _w):
        i, kind, k = item
        args = (inputs[i], formats[i], cfg.mode, cfg.text_field, info.path, storage.uri)
        if kind == "file":
            return whole.remote(i, *args)
        bounds, ranges, size = plans[i]
        if kind == "hash":
            return digest.remote(inputs[i], size)
        return part.remote(i, k, *args, bounds, *ranges[k])

    def done(item, result) -> None:
        i, kind, k = item
        if kind == "file":
            metas[i] = result
            return
        got[i][(kind, k)] = result
        _, ranges, size = plans[i]
        if len(got[i]) == len(ranges) + 1:          # every range and the hash: join them
            metas[i] = finish_ranged(storage, i, inputs[i], formats[i], cfg.mode,
                                     [got[i][("part", k)] for k in range(len(ranges))], got[i][("hash", 0)], size)

    # all tasks at once (Ray queues them on its CPUs); a killed task is retried by Ray
    dispatch(items, submit, done, lambda it, e: unwrap(e, f"tokenizing {inputs[it[0]]}"), workers=len(items),
             lease=lease)

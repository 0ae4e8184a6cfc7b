"""Corpus readers, tokenization of one input file, and the sliding windows over its sequences.

Vocabulary used throughout:
- *record*: one document as the input format defines it (a text file, a WikiText article,
  a JSONL line, a Parquet row). Records are numbered in file order; skipped ones keep
  their number, so document ids never depend on what was skipped.
- *sequence*: what the LM reads with sliding windows: one record in `document` mode, the
  whole file in `stream` mode.
- *target*: a token position t >= 1 of a sequence; each target gets exactly one key.
- *unit*: a run of whole windows of consecutive sequences of one file; the unit of
  dispatch, retry and resume (builder/unit.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field

import numpy as np

from builder.errors import KnnlmError
from builder.seqs import count_targets, table_rows

log = logging.getLogger(__name__)

STREAM_RECORD_SEPARATOR = "\n\n"  # joins JSONL/Parquet records into one stream-mode sequence
MAX_SKIPPED = 100                  # skipped records a tokens meta lists (the first, by record; it counts them all)
_WIKI_TITLE = re.compile(rb"^ = [^=](?:.*[^=])? = *\r?\n?$")


class InputError(KnnlmError, ValueError):
    """Bad corpus input; the message names the file (and record) and the flag to change."""


# ---------------------------------------------------------------------------------------------
# formats


def detect_format(uri: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    low = uri.lower()
    for suffix in (".gz", ".zst"):
        if low.endswith(suffix):
            raise InputError(f"{uri}: compressed inputs are not supported; decompress it first")
    if low.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if low.endswith((".parquet", ".pq")):
        return "parquet"
    if low.endswith(".tokens"):  # wiki.train.tokens etc.
        return "wikitext"
    return "text"


@dataclass
class Record:
    text: str | None
    where: str                 # human-readable location: "line 12", "article 3 (line 40)"
    skip: str | None = None    # reason it is skipped, or None


def _decode(b: bytes, uri: str, where: str) -> tuple[str | None, str | None]:
    try:
        return b.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte {e.start} of the {where})"


def split_wikitext(data: bytes) -> list[tuple[int, bytes]]:
    """Split a WikiText file into articles: (first line number, raw bytes).

    A line ` = Title = ` starts an article (section headings ` = = X = = ` do not).
    Text before the first title is an article of its own only if it is not blank."""
    lines = data.splitlines(keepends=True)
    articles: list[tuple[int, list[bytes]]] = []
    cur: list[bytes] = []
    start = 1
    for i, line in enumerate(lines, 1):
        if _WIKI_TITLE.match(line):
            if cur and (articles or b"".join(cur).strip()):
                articles.append((start, cur))
            cur, start = [], i
        cur.append(line)
    if cur and (articles or b"".join(cur).strip()):
        articles.append((start, cur))
    return [(s, b"".join(c)) for s, c in articles]


def read_records(data: bytes, uri: str, fmt: str, text_field: str = "text") -> list[Record]:
    """Decode one input file into its records, in file order. Pure."""
    if fmt == "text":
        text, bad = _decode(data, uri, "file")
        return [Record(text, "file", bad)]
    if fmt == "wikitext":
        out = []
        for line_no, raw in split_wikitext(data):
            text, bad = _decode(raw, uri, f"article at line {line_no}")
            out.append(Record(text, f"article {len(out)} (line {line_no})", bad))
        return out
    if fmt == "jsonl":
        out = []
        for line_no, raw in enumerate(data.split(b"\n"), 1):
            if not raw.strip():
                continue
            where = f"line {line_no}"
            text, bad = _decode(raw, uri, f"line {line_no}")
            if bad:
                out.append(Record(None, where, bad))
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                out.append(Record(None, where, f"invalid JSON ({e.msg})"))
                continue
            val = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(val, str):
                out.append(Record(None, where, f"no string field {text_field!r} (set --text-field)"))
                continue
            out.append(Record(val, where))
        return out
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            pf = pq.ParquetFile(pa.BufferReader(data))
        except Exception as e:
            raise InputError(f"{uri}: not a readable Parquet file ({e}); check --format") from None
        names = pf.schema_arrow.names
        if text_field not in names:
            raise InputError(f"{uri}: Parquet file has no column {text_field!r} (columns: {', '.join(names)}); "
                             "set --text-field")
        col = pf.read(columns=[text_field]).column(0)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            raise InputError(f"{uri}: column {text_field!r} has type {col.type}, expected string; set --text-field")
        return [Record(v, f"row {i}", None if v is not None else "null text")
                for i, v in enumerate(col.to_pylist())]
    raise InputError(f"{uri}: unknown format {fmt!r} (--format)")


# ---------------------------------------------------------------------------------------------
# tokenization of one input file (pure core of the tokenize stage)


@dataclass
class TokenizedFile:
    uri: str
    format: str
    tokens: np.ndarray                 # (N,) int32: the file's sequences concatenated
    seq_lengths: list[int]             # tokens per sequence
    seq_records: list[int]             # record index of each sequence (-1 in stream mode)
    num_records: int
    skipped: list[dict] = field(default_factory=list)   # {record, where, reason}
    sha256: str = ""
    bytes: int = 0

    def meta(self) -> dict:
        """tokens/<i>.json (less "tokens", "ranges"): counts and the first skipped records (builder/seqs.py)."""
        return {"uri": self.uri, "format": self.format, "bytes": self.bytes, "sha256": self.sha256,
                "num_records": self.num_records, "num_tokens": int(self.tokens.size),
                "num_sequences": len(self.seq_lengths), "num_targets": count_targets(self.seq_lengths),
                "num_skipped": len(self.skipped), "skipped": first_skipped(self.skipped)}

    def table(self) -> bytes:
        """tokens/<i>.seqs: the sequence table (builder/seqs.py)."""
        return table_rows(self.seq_lengths, self.seq_records).astype("<i8").tobytes()


def first_skipped(skipped: list[dict]) -> list[dict]:
    """The first MAX_SKIPPED skipped records by record index (what a meta lists of them)."""
    return sorted(skipped, key=lambda d: d["record"])[:MAX_SKIPPED]


def tokenize_file(data: bytes, uri: str, fmt: str, mode: str, tokenizer, text_field: str = "text",
                  batch: int = 512) -> TokenizedFile:
    """Records of one file → token sequences, with the tokenizer's default special tokens.

    `document` mode: one sequence per usable record; `stream` mode: the whole file as one
    sequence (JSONL/Parquet records joined with a blank line). Empty, undecodable or
    shorter-than-2-token documents are skipped and reported, not fatal."""
    fmt = detect_format(uri, fmt)
    records = read_records(data, uri, fmt, text_field)
    skipped: list[dict] = []

    def skip(i: int, where: str, reason: str):
        skipped.append({"record": i, "where": where, "reason": reason})

    if mode == "stream":
        if fmt in ("text", "wikitext"):
            text, bad = _decode(data, uri, "file")
            texts, idx = ([text], [-1]) if not bad else ([], [])
            if bad:
                skip(-1, "file", bad)
        else:
            for i, r in enumerate(records):
                if r.skip:
                    skip(i, r.where, r.skip)
                elif not r.text or not r.text.strip():
                    skip(i, r.where, "empty document")
            good = [r.text for r in records if not r.skip and r.text and r.text.strip()]
            texts, idx = ([STREAM_RECORD_SEPARATOR.join(good)], [-1]) if good else ([], [])
    else:
        texts, idx = [], []
        for i, r in enumerate(records):
            if r.skip:
                skip(i, r.where, r.skip)
            elif not r.text or not r.text.strip():
                skip(i, r.where, "empty document")
            else:
                texts.append(r.text)
                idx.append(i)
    if mode == "stream" and texts and not texts[0].strip():
        skip(-1, "file", "empty file")
        texts, idx = [], []
    if not records and mode == "document":
        skip(-1, "file", "empty file")

    ids: list[list[int]] = []
    for s in range(0, len(texts), batch):
        ids.extend(tokenizer(texts[s:s + batch], add_special_tokens=True, verbose=False)["input_ids"])
    seqs, seq_records = [], []
    for i, t in zip(idx, ids):
        if len(t) < 2:
            skip(i, records[i].where if i >= 0 else "file", f"fewer than 2 tokens ({len(t)})")
            continue
        seqs.append(np.asarray(t, dtype=np.int64))
        seq_records.append(i)
    flat = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
    if flat.size and int(flat.max()) >= 2 ** 31:
        raise InputError(f"{uri}: token id does not fit int32")
    tokens = flat.astype(np.int32)
    skipped.sort(key=lambda d: d["record"])
    return TokenizedFile(uri=uri, format=fmt, tokens=tokens, seq_lengths=[len(s) for s in seqs],
                         seq_records=seq_records, num_records=len(records) if mode == "document" else 1,
                         skipped=skipped, sha256="sha256:" + hashlib.sha256(data).hexdigest(), bytes=len(data))


# ---------------------------------------------------------------------------------------------
# windows (pure)


def plan_windows(n: int, window: int, min_context: int) -> list[tuple[int, int, int, int]]:
    """Sliding windows over a sequence of n tokens: (start, end, first_target, end_target).

    The first window covers [0, min(W, n)); each next one starts `min_context` tokens
    before the previous one ended (stride W - min_context); the last ends at n. Window k
    gives keys to the targets [end_{k-1}, end_k) (window 0: [1, end_0)), i.e. each target
    to the first window that holds it at a position other than its first; its key is the
    hidden state at t-1, which sees at least min(min_context, t) tokens."""
    if not 1 <= min_context < window:
        raise ValueError(f"need 1 <= min_context < window, got {min_context}, {window}")
    stride = window - min_context
    out = []
    s, prev_end = 0, 1
    while True:
        e = min(s + window, n)
        out.append((s, e, prev_end, e))
        if e >= n:
            return out
        prev_end = e
        s += stride

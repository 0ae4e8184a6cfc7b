"""Records of a byte range of an input file, for builder/corpus_ranges.py: the tokenizer's special
tokens, where a range's records and skipped records are in the whole file, and a JSONL range's records
with their line starts."""
from __future__ import annotations

import re

from builder.corpus import InputError, read_records


def special_tokens(tok) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the ids the tokenizer adds around a text with add_special_tokens=True."""
    sample = "Hello world"
    bare = tok(sample, add_special_tokens=False)["input_ids"]
    full = tok(sample, add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(bare) + 1):
        if full[k:k + len(bare)] == bare:
            return full[:k], full[k + len(bare):]
    raise InputError(f"tokenizer {getattr(tok, 'name_or_path', '')}: its special tokens are not a prefix and a "
                     "suffix of the text's tokens; it cannot tokenize in ranges")


def shift_where(where: str, records: int, lines: int) -> str:
    """A record location of a range ("line 3", "article 2 (line 40)") as the whole file numbers it."""
    m = re.fullmatch(r"article (\d+) \(line (\d+)\)", where)
    if m:
        return f"article {int(m[1]) + records} (line {int(m[2]) + lines})"
    m = re.fullmatch(r"line (\d+)", where)
    return f"line {int(m[1]) + lines}" if m else where


def shift_reason(reason: str, lines: int) -> str:
    """A skip reason that names a line ("... of the line 3)") as the whole file numbers it."""
    return re.sub(r"(of the (?:article at )?line )(\d+)\)$", lambda m: f"{m[1]}{int(m[2]) + lines})", reason)


def count_lines(data: bytes, fmt: str) -> int:
    """How far a range moves the line numbers of the records after it."""
    return len(data.splitlines()) if fmt == "wikitext" else data.count(b"\n")


def jsonl_records(data: bytes, base: int, uri: str, text_field: str) -> list[tuple[int, object]]:
    """(line start byte, Record) of each record of JSONL bytes starting at byte `base` of the file."""
    starts, pos = [], base
    for raw in data.split(b"\n"):
        if raw.strip():
            starts.append(pos)
        pos += len(raw) + 1
    return list(zip(starts, read_records(data, uri, "jsonl", text_field)))

"""Tokenization of one input file in byte ranges, with exactly the tokens of `tokenize_file`'s one pass.

- `plan_ranges` cuts a file at record boundaries, reading only small windows: after a "\\n" (JSONL, and
  every format in `stream` mode), or where a WikiText article title line starts (`document` mode); a
  `text` file in document mode (one record) and Parquet are never cut.
- The build cuts a file into *chunks* (CHUNK_BYTES, the grid) and gives each task a *range* of
  consecutive chunks; a task holds one chunk's text and tokens at a time, so its memory is bounded by
  the chunk size, not by the file or range size.
- `document` mode: each record is tokenized alone, as in one pass; record numbers and the skipped
  records' locations are shifted by what the earlier ranges hold when the parts are joined.
- `stream` mode: chunk j is tokenized with MARGIN_BYTES of context on each side (the *view* of the
  chunk; no special tokens). At the seam between chunks j-1 and j, both views are searched, near the
  seam, for a token boundary where they agree on SEAM_TOKENS tokens before and after it: tokens before
  it come from the left view, from it on from the right one. Where none is found, the margin at that
  seam is doubled (logged) rather than tokens made up. A seam is a function of the bytes around it only,
  so the two tasks on either side of a range boundary cut it at the same place. The tokenizer's own
  special tokens (learned by comparing add_special_tokens True/False) go at the file's start and end.
  JSONL records are joined with STREAM_RECORD_SEPARATOR as in one pass: a view is the exact piece of
  that joined text its bytes hold; token positions are compared as (line start byte, char in record).
"""
from __future__ import annotations

import bisect
import ctypes
import logging
import re
from dataclasses import dataclass

import numpy as np

from builder.corpus import _WIKI_TITLE, STREAM_RECORD_SEPARATOR, InputError, detect_format, first_skipped, read_records
from builder.corpus_records import count_lines, jsonl_records, shift_reason, shift_where, special_tokens
from builder.seqs import TableWriter
from builder.storage import read_uri_range

log = logging.getLogger(__name__)

RANGE_BYTES = 64 << 20     # a task's range (a file no larger is one task, still a chunk at a time)
CHUNK_BYTES = 256 << 10    # what a task tokenizes at once (its 3 views: ~0.15 GB above the process's own)
MARGIN_BYTES = 4 << 10     # context on each side of a chunk in stream mode (doubled where needed)
MAX_MARGIN_BYTES = 1 << 20
SEAM_TOKENS = 16           # tokens that must agree on each side of a seam's cut
SCAN = 64 << 10            # window read while looking for a cut


# planning


def _line_at(read, size: int, q: int) -> bytes:
    """The line that starts at q (as bytes.splitlines(keepends=True) cuts it)."""
    n = 256
    while True:
        buf = read(q, min(size, q + n))
        m = re.search(rb"\r\n|\r|\n", buf)
        if m and (m.end() < len(buf) or buf[-1:] != b"\r" or q + len(buf) >= size):
            return buf[:m.end()]
        if q + len(buf) >= size:
            return buf
        n *= 4


def _next_cut(read, size: int, p: int, title: bool) -> int | None:
    """The first line start q >= p (q < size) after a "\\n" (and, with `title`, whose line is a
    WikiText article title); None if there is none."""
    pos, n = max(p - 1, 0), 4096
    while pos < size:
        buf = read(pos, min(size, pos + n))
        n = min(SCAN, 4 * n)
        i = -1
        while True:
            i = buf.find(b"\n", i + 1)
            if i < 0:
                break
            q = pos + i + 1
            if q < p:
                continue
            if q >= size:
                return None
            if not title or _WIKI_TITLE.match(_line_at(read, size, q)):
                return q
        pos += len(buf)
    return None


def plan_ranges(uri: str, size: int, fmt: str, mode: str, target_bytes: int, read=None) -> list[int]:
    """Cut points [0, b1, ..., size] of byte ranges of about `target_bytes`, each at a record
    boundary (module docstring). `read(start, end)` reads bytes of the file (default: the URI)."""
    read = read or (lambda s, e: read_uri_range(uri, s, e))
    fmt = detect_format(uri, fmt)
    out = [0]
    if fmt == "parquet" or (fmt == "text" and mode == "document"):
        return [0, size]
    title = fmt == "wikitext" and mode == "document"
    while size - out[-1] > target_bytes:
        q = _next_cut(read, size, out[-1] + target_bytes, title)
        if q is None:
            break
        out.append(q)
    return out + [size] if size > 0 else [0, 0]


# stream mode: views of chunks and the seams between them


@dataclass
class View:
    start: int                 # bytes [start, end) of the file it holds
    end: int
    text: str
    ids: np.ndarray            # int32, no special tokens
    enc: object                # the tokenizers Encoding (offsets on demand)
    segs: list                 # jsonl: [(char start in text, line start byte, char index of it there)]
    jsonl: bool
    first: bool                # nothing of the stream comes before its text
    last: bool                 # nothing of the stream comes after its text
    bad: int | None = None     # first byte that is not UTF-8, if its bytes hold one

    def key(self, i: int) -> tuple[int, int]:
        """Where token i starts, as (file byte, 0) for text, (line start byte, char in record) for JSONL."""
        o = self.enc.token_to_chars(i)[0]
        if self.jsonl:
            k = bisect.bisect_right([s[0] for s in self.segs], o) - 1
            c0, line, idx = self.segs[max(k, 0)]
            return line, idx + o - c0
        return self.start + len(self.text[:o].encode("utf-8")) if o < 4096 else \
            self.end - len(self.text[o:].encode("utf-8")), 0

    def find(self, key: tuple[int, int]) -> int:
        """The first token whose key is >= key (binary search)."""
        lo, hi = 0, len(self.ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.key(mid) < key:
                lo = mid + 1
            else:
                hi = mid
        return lo


def _trim() -> None:
    """Give freed memory back (the tokenizer's buffers fragment glibc's heap: RSS would creep up)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):      # not glibc
        pass


class Source:
    """One input file seen through ranged reads, with the tokenizer (stream mode's views and seams)."""

    def __init__(self, uri: str, size: int, fmt: str, tok, text_field: str = "text", read=None):
        self.uri, self.size, self.fmt, self.tok, self.text_field = uri, size, fmt, tok, text_field
        self.read = read or (lambda s, e: read_uri_range(uri, s, e))
        self.backend = tok.backend_tokenizer
        self.backend.no_truncation()
        self.backend.no_padding()
        self._good_before: int | None = None      # a usable JSONL record starts at this byte
        self._cache: dict = {}

    def _line_start_before(self, x: int) -> int:         # the start of the line holding byte x
        while x > 0:
            lo = max(0, x - SCAN)
            i = self.read(lo, x).rfind(b"\n")
            if i >= 0:
                return lo + i + 1
            x = lo
        return 0

    def _any_good_before(self, x: int) -> bool:
        """Is there a usable JSONL record before line start x? Scans back."""
        if self._good_before is not None and self._good_before < x:
            return True
        while x > 0:
            lo = self._line_start_before(max(0, x - SCAN))
            for start, r in reversed(jsonl_records(self.read(lo, x), lo, self.uri, self.text_field)):
                if not r.skip and r.text and r.text.strip():
                    self._good_before = start
                    return True
            x = lo
        return False

    def view(self, s: int, e: int, ml: int, mr: int) -> View:
        k = (s, e, ml, mr)
        if k not in self._cache:
            if len(self._cache) >= 3:
                self._cache.pop(next(iter(self._cache)))
                _trim()
            self._cache[k] = self._view(s, e, ml, mr)
        return self._cache[k]

    def _view(self, s: int, e: int, ml: int, mr: int) -> View:
        if self.fmt == "jsonl":
            a = self._line_start_before(max(0, s - ml))
            b = min(self.size, e + mr)
            b = b if b >= self.size else (_next_cut(self.read, self.size, b, False) or self.size)
            parts, segs, n = [], [], 0
            sep = self._any_good_before(a)
            for line, r in jsonl_records(self.read(a, b), a, self.uri, self.text_field):
                if r.skip or not r.text or not r.text.strip():
                    continue
                if sep:
                    segs.append((n, line, -len(STREAM_RECORD_SEPARATOR)))
                    parts.append(STREAM_RECORD_SEPARATOR)
                    n += len(STREAM_RECORD_SEPARATOR)
                else:
                    segs.append((n, line, 0))
                parts.append(r.text)
                n += len(r.text)
                sep = True
                if self._good_before is None or line < self._good_before:
                    self._good_before = line
            text, bad, first = "".join(parts), None, not self._any_good_before(a)
        else:
            a, b = max(0, s - ml), min(self.size, e + mr)
            raw = self.read(a, b + 1)             # (one byte more: is b inside a character?)
            cut, end = 0, b - a
            while cut < 3 and a + cut < s and 0x80 <= raw[cut] < 0xC0:      # start and end on a character
                cut += 1
            while end > b - a - 3 and a + end > e and end < len(raw) and 0x80 <= raw[end] < 0xC0:
                end -= 1
            a, b, raw = a + cut, a + end, raw[cut:end]
            try:
                text, bad = raw.decode("utf-8"), None
            except UnicodeDecodeError as err:
                text, bad = "", a + err.start
            segs, first = [], a == 0
        enc = self.backend.encode(text, add_special_tokens=False)
        return View(a, b, text, np.asarray(enc.ids, dtype=np.int32), enc, segs, self.fmt == "jsonl", first,
                    b >= self.size, bad)

    def seam(self, bounds: list[int], j: int, margin: int | None = None) -> tuple[tuple[int, int], int]:
        """Where the tokens of chunk j start (a key) and the margin that found it."""
        s0, b, e1 = bounds[j - 1], bounds[j], bounds[j + 1]
        margin = margin or MARGIN_BYTES
        nominal = (b, -1 << 30)
        while True:
            left, right = self.view(s0, b, MARGIN_BYTES, margin), self.view(b, e1, margin, MARGIN_BYTES)
            if left.bad is not None or right.bad is not None:
                return nominal, margin
            cut = _agree(left, right, nominal, margin)
            if cut is not None:
                return cut, margin
            if margin >= MAX_MARGIN_BYTES:
                raise InputError(f"{self.uri}: no place to cut the token stream near byte {b} within "
                                 f"{margin} bytes of context; tokenize it without ranges")
            margin *= 2
            log.info("%s: widening the context at byte %d to %d bytes to find a cut both sides agree on",
                     self.uri, b, margin)


def _agree(left: View, right: View, nominal: tuple[int, int], margin: int) -> tuple[int, int] | None:
    """A key near `nominal` where both views start a token and agree on SEAM_TOKENS tokens each side."""
    nl, nr, ir, il = len(left.ids), len(right.ids), right.find(nominal), left.find(nominal)
    if il == 0 and left.first:            # nothing of the stream before the seam: cut at the next token
        return right.key(ir) if ir < nr else nominal
    if ir == nr and right.last:           # nothing after it
        return nominal
    if il == 0 or ir == nr:
        return None
    K = SEAM_TOKENS
    for d in range(max(64, margin // 8)):
        for i in ((ir + d, ir - d - 1) if d else (ir,)):
            if not (0 < i < nr) or (i < K and not right.first) or (nr - i < K and not right.last):
                continue
            k = right.key(i)
            if right.key(i - 1) >= k:
                continue
            j = left.find(k)
            if j >= nl or j == 0 or left.key(j) != k or left.key(j - 1) >= k or (j < K and not left.first) \
                    or (nl - j < K and not left.last):
                continue
            w, f = min(K, i, j), min(K, nl - j, nr - i)
            if np.array_equal(left.ids[j - w:j + f], right.ids[i - w:i + f]) and \
                    all(left.key(j + t) == right.key(i + t) for t in (-w, f - 1)):
                return k
    return None


# one range, and the join of the ranges' results


def chunk_grid(uri: str, size: int, fmt: str, mode: str, range_bytes: int | None = None,
               chunk_bytes: int | None = None, read=None) -> tuple[list[int], list[tuple[int, int]]]:
    """(chunk cut points, ranges as [first chunk, end chunk)) of a file; one range if it fits in one. A file
    of one range is still cut into chunks: a task's memory is bounded by the chunk, whatever the file."""
    range_bytes = range_bytes or RANGE_BYTES
    chunk = min(chunk_bytes or CHUNK_BYTES, range_bytes)
    if size <= chunk:
        return [0, size], [(0, 1)]
    bounds = plan_ranges(uri, size, fmt, mode, chunk, read)
    ranges, j = [], 0
    while j < len(bounds) - 1:
        k = j + 1
        while k < len(bounds) - 1 and bounds[k + 1] - bounds[j] <= range_bytes:
            k += 1
        ranges.append((j, k))
        j = k
    return bounds, ranges


def tokenize_range(src: Source, mode: str, bounds: list[int], j0: int, j1: int, out, table: TableWriter) -> dict:
    """Tokens of chunks [j0, j1) of the grid `bounds`, as the one-pass tokenization of the whole file has
    them, written to the binary file `out` (int32 LE) chunk by chunk, and its sequences to `table`; returns
    the range's part meta: its records, lines, counts and first skipped records numbered from its start."""
    n = len(bounds) - 1
    part = {"start": bounds[j0], "end": bounds[j1], "num_tokens": 0, "num_records": 0, "lines": 0,
            "num_skipped": 0, "skipped": [], "bad": None, "blank": True, "good": 0}
    prefix, suffix = special_tokens(src.tok) if mode == "stream" else ([], [])

    def emit(ids) -> None:
        a = np.asarray(ids, dtype="<i4")
        out.write(a.tobytes())
        part["num_tokens"] += int(a.size)

    seams: dict[int, tuple] = {}

    def seam(j: int) -> tuple:
        if j not in seams:
            seams[j] = ((-1, 0), MARGIN_BYTES) if j == 0 else ((src.size + 1, 0), MARGIN_BYTES) if j == n \
                else src.seam(bounds, j)
        return seams[j]

    for j in range(j0, j1):
        s, e = bounds[j], bounds[j + 1]
        data = src.read(s, e)
        recs = [] if src.fmt != "jsonl" and mode == "stream" else read_records(data, src.uri, src.fmt, src.text_field)
        texts, idx, skipped, lengths, records = [], [], [], [], []      # this chunk's (bounded by its size)
        skip = lambda i, why: skipped.append({"record": part["num_records"] + i, "reason": why,  # noqa: E731
                                              "where": shift_where(recs[i].where, part["num_records"], part["lines"])})
        for i, r in enumerate(recs):
            if r.skip or not r.text or not r.text.strip():
                skip(i, shift_reason(r.skip, part["lines"]) if r.skip else "empty document")
            else:
                texts.append(r.text)
                idx.append(i)
        part["good"] += len(texts)
        if mode == "document":
            for b in range(0, len(texts), 512):
                for i, t in zip(idx[b:b + 512], src.tok(texts[b:b + 512], add_special_tokens=True,
                                                        verbose=False)["input_ids"]):
                    if len(t) < 2:
                        skip(i, f"fewer than 2 tokens ({len(t)})")
                        continue
                    emit(t)
                    lengths.append(len(t))
                    records.append(part["num_records"] + i)
            table.add(lengths, records)
        else:
            if src.fmt != "jsonl":
                try:
                    part["blank"] = part["blank"] and not data.decode("utf-8").strip()
                except UnicodeDecodeError as err:
                    part["bad"] = s + err.start        # the file is skipped: nothing more to do
                    break
            (c0, m0), (c1, m1) = seam(j), seam(j + 1)
            v = src.view(s, e, m0, m1)
            ia = v.find(c0) if j > 0 else 0
            ib = v.find(c1) if j + 1 < n else len(v.ids)
            for c, i in ((c0, ia), (c1, ib)):
                if 0 < c[0] <= src.size and i < len(v.ids) and v.bad is None and v.key(i) != c and \
                        not (i == 0 and v.first) and c[1] != -1 << 30:
                    raise InputError(f"{src.uri}: the tokens around byte {c[0]} depend on more context than "
                                     f"{max(m0, m1)} bytes; tokenize it without ranges")
            if j == 0:
                emit(prefix)
            emit(v.ids[ia:ib])
            if j == n - 1:
                emit(suffix)
        part.update(num_skipped=part["num_skipped"] + len(skipped), skipped=first_skipped(part["skipped"] + skipped))
        part["num_records"] += len(recs)
        part["lines"] += count_lines(data, src.fmt)
    return part | table.counts()


def join_parts(parts: list[dict], uri: str, fmt: str, mode: str) -> tuple[dict, list[int]]:
    """(the file's meta as TokenizedFile.meta() has it, less uri/bytes/sha256; the parts whose tokens
    make up tokens/<i>.bin, in order): record numbers and locations shifted by the ranges before. (The
    parts' sequence tables are joined by build_tokens.finish_ranged.)"""
    skipped, use, recs, lines, n_skipped = [], [], 0, 0, 0
    for p in parts:
        for d in p["skipped"]:
            skipped.append({"record": d["record"] + recs, "where": shift_where(d["where"], recs, lines),
                            "reason": shift_reason(d["reason"], lines)})
        n_skipped += p["num_skipped"]
        recs += p["num_records"]
        lines += p["lines"]
    total, in_parts = sum(p["num_tokens"] for p in parts), len(skipped)
    seqs, targets = sum(p["num_sequences"] for p in parts), sum(p["num_targets"] for p in parts)
    if mode == "document":
        use = [k for k, p in enumerate(parts) if p["num_tokens"]]
        if recs == 0:
            skipped.append({"record": -1, "where": "file", "reason": "empty file"})
    else:
        bad = [p["bad"] for p in parts if p["bad"] is not None]
        if bad:
            skipped.append({"record": -1, "where": "file", "reason": f"not valid UTF-8 (byte {min(bad)} of the file)"})
        elif fmt != "jsonl" and all(p["blank"] for p in parts):
            skipped.append({"record": -1, "where": "file", "reason": "empty file"})
        elif fmt == "jsonl" and not any(p["good"] for p in parts):
            pass                               # (its records are skipped)
        elif total < 2:
            skipped.append({"record": -1, "where": "file", "reason": f"fewer than 2 tokens ({total})"})
        else:
            seqs, targets, use = 1, total - 1, [k for k, p in enumerate(parts) if p["num_tokens"]]
    meta = {"format": fmt, "num_records": recs if mode == "document" else 1, "num_tokens": total if seqs else 0,
            "num_sequences": seqs, "num_targets": targets, "num_skipped": n_skipped + len(skipped) - in_parts,
            "skipped": first_skipped(skipped), "ranges": len(parts)}
    return meta, use

"""The sequence table of a tokenized input: where each sequence of tokens/<i>.bin starts, its length, its record.

    tokens/<i>.seqs   int64 LE rows (offset in the token array, length, record), one per sequence, in file
                      order (record: the record index in document mode, -1 in stream mode)

It is written before tokens/<i>.json (the commit), which keeps only counts and bounded data: num_sequences,
num_targets (sum of max(0, n - 1)), num_tokens, num_records, the first builder.corpus.MAX_SKIPPED (100)
skipped records and num_skipped. Readers take rows [a, b) with one range read, so no stage holds a
per-document list: the build plans units from the table in chunks (builder/unit.py), a key worker reads
its unit's rows, provenance finds a record's sequence by binary search. A meta of the older format (the
lists `seq_lengths` and `seq_records` in the JSON, no table) is read through the same `SeqTable`, from
its lists; an unfinished build rewrites it with a table (build_tokens.upgrade_tokens).
"""
from __future__ import annotations

from typing import BinaryIO, Iterator

import numpy as np

from builder.layout import seqs_beside
from builder.storage_base import Storage, StorageError

ROW = np.dtype("<i8")
COLUMNS = 3                  # offset, length, record
ROW_BYTES = COLUMNS * ROW.itemsize
CHUNK_ROWS = 1 << 20         # rows a reader holds at once (24 MB)


def table_rows(lengths, records, start: int = 0) -> np.ndarray:
    """(n, 3) int64 rows of sequences of `lengths` laid end to end from token offset `start`."""
    lengths = np.asarray(lengths, np.int64)
    rows = np.empty((len(lengths), COLUMNS), np.int64)
    rows[:, 1] = lengths
    rows[:, 2] = np.asarray(records, np.int64)
    np.cumsum(lengths, out=rows[:, 0])
    rows[:, 0] += start - lengths                    # exclusive cumsum: where each one starts
    return rows


def count_targets(lengths: np.ndarray) -> int:
    """Targets (keys) of sequences of these lengths: each token but the first."""
    return int(np.maximum(np.asarray(lengths, np.int64) - 1, 0).sum())


class TableWriter:
    """Appends rows to a binary file (a local temporary file, uploaded when complete), counting them."""

    def __init__(self, out: BinaryIO):
        self.out = out
        self.rows = self.tokens = self.targets = 0

    def add(self, lengths, records) -> None:
        """Sequences that follow the ones written so far in the token array."""
        self.add_rows(table_rows(lengths, records, self.tokens))

    def add_rows(self, rows: np.ndarray, token_shift: int = 0, record_shift: int = 0) -> None:
        """Rows of another table (a part's), their offsets and records moved by the shifts."""
        if not len(rows):
            return
        rows = rows + np.array([token_shift, 0, record_shift], np.int64)
        self.out.write(rows.astype(ROW).tobytes())
        self.rows += len(rows)
        self.tokens = int(rows[-1, 0] + rows[-1, 1])
        self.targets += count_targets(rows[:, 1])

    def counts(self) -> dict:
        return {"num_sequences": self.rows, "num_targets": self.targets}


def parse_rows(data: bytes) -> np.ndarray:
    """(k, 3) rows of a table's bytes (a partial row at the end of a truncated table is left out)."""
    return np.frombuffer(data, ROW, count=len(data) // ROW_BYTES * COLUMNS).reshape(-1, COLUMNS)


def is_old_format(meta: dict) -> bool:
    """A meta of the older format: its sequences as JSON lists, no table beside it."""
    return "seq_lengths" in meta


def upgrade_meta(meta: dict, max_skipped: int) -> tuple[dict, np.ndarray]:
    """(the meta in the table format, keys in the order a new one has them; the table's rows) of an
    older-format meta."""
    rows = table_rows(meta["seq_lengths"], meta["seq_records"])
    skipped = sorted(meta["skipped"], key=lambda d: d["record"])
    new: dict = {}
    for k, v in meta.items():
        if k == "seq_lengths":
            new.update(num_sequences=len(rows), num_targets=count_targets(rows[:, 1]))
        elif k == "skipped":
            new.update(num_skipped=len(skipped), skipped=skipped[:max_skipped])
        elif k != "seq_records":
            new[k] = v
    return new, rows


class SeqTable:
    """The sequences of one tokenized input (`tokens`: its tokens file, the table beside it), read in ranges.

    With an older-format `meta` the rows come from its lists; without a meta (a key worker reading its
    unit's rows) the number of rows is looked up only when needed."""

    def __init__(self, storage: Storage, tokens: str, meta: dict | None = None):
        self.storage, self.path = storage, seqs_beside(tokens)
        self._mem = table_rows(meta["seq_lengths"], meta["seq_records"]) if meta and is_old_format(meta) else None
        self._n = len(self._mem) if self._mem is not None else meta["num_sequences"] if meta else None

    @property
    def n(self) -> int:
        if self._n is None:
            self._n = self.storage.size(self.path) // ROW_BYTES
        return self._n

    def rows(self, a: int, b: int) -> np.ndarray:
        """(b - a, 3) rows [a, b) (fewer at the table's end): offset, length, record."""
        if self._mem is not None:
            return self._mem[a:b]
        b = min(b, self._n) if self._n is not None else b
        if a >= b:
            return np.zeros((0, COLUMNS), np.int64)
        rows = parse_rows(self.storage.read_range(self.path, a * ROW_BYTES, b * ROW_BYTES))
        if len(rows) != b - a:
            raise StorageError(f"{self.storage.url(self.path)} is truncated: expected sequences [{a}, {b}), "
                               f"found {len(rows)}")
        return rows

    def chunks(self, size: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
        """Every row, `size` at a time (memory bounded by the chunk, not the table)."""
        for a in range(0, self.n, size):
            yield self.rows(a, a + size)

    def find_record(self, record: int) -> int | None:
        """The sequence of `record` (records increase along the table): a binary search of single-row
        reads; None when the record has no sequence (it was skipped)."""
        lo, hi = 0, self.n
        while lo < hi:
            mid = (lo + hi) // 2
            r = int(self.rows(mid, mid + 1)[0, 2])
            if r == record:
                return mid
            lo, hi = (mid + 1, hi) if r < record else (lo, mid)
        return None

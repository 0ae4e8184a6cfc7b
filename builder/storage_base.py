"""The storage interface: a datastore root as a few primitives over relative paths.

Every artifact of a datastore (shards, progress records, the lease, the manifest) goes through a
`Storage` rooted at the datastore URI. This module holds the interface, its errors and URI
parsing; the implementations are builder/storage_local.py and builder/storage_s3.py, and
builder/storage.py (what the stages import) puts them together.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import ClassVar

from builder.errors import KnnlmError


class StorageError(KnnlmError, RuntimeError):
    """A storage operation failed for a reason the user must fix (permissions, missing bucket...)."""


class NotFound(StorageError):
    pass


class InputError(Exception):
    """A corpus argument that cannot be read. The message names the flag (`--corpus SPEC: why`);
    `detail` is the message without it, for callers that name the input otherwise (a pipeline key)."""

    def __init__(self, detail: str, sep: str = " "):
        super().__init__(f"--corpus{sep}{detail}")
        self.detail, self.sep = detail, sep

    def __reduce__(self):                   # pickles (e.g. from a Ray worker) with its parts
        return type(self), (self.detail, self.sep)


class InputNotFound(InputError, FileNotFoundError):
    """A corpus argument matches no file or object."""


class DuplicateInput(InputError, ValueError):
    """A file named twice by the corpus arguments (it would be in the datastore twice)."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"invalid S3 URI {uri!r}: expected s3://bucket/prefix")
    if "@" in bucket:
        raise StorageError(f"invalid S3 URI {uri!r}: credentials must not be part of the URI; "
                           "use the standard AWS environment or profile")
    return bucket, key.strip("/")


def local_path(uri: str) -> str:
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return os.path.abspath(os.path.expanduser(uri))


def check_rel(root: str, rel: str, prefix: bool = False) -> str:
    """`rel` unchanged if it is a clean relative path inside the root `root`, else a StorageError naming
    both: no absolute path, no '..', '.' or empty component, no backslash, no NUL. A listing `prefix`
    may be "" or end with "/"."""
    why = None
    if not isinstance(rel, str):
        why = f"is a {type(rel).__name__}, not a string"
    elif "\0" in rel:
        why = "holds a NUL byte"
    elif "\\" in rel:
        why = "holds a backslash"
    elif rel.startswith("/"):
        why = "is absolute"
    else:
        body = rel[:-1] if prefix and rel.endswith("/") else rel
        if not body and not prefix:
            why = "is empty"
        elif body and any(part in ("", ".", "..") for part in body.split("/")):
            why = "has an empty, '.' or '..' component"
    if why:
        raise StorageError(f"storage path {rel!r} {why}: it must be a relative path inside the datastore root {root}")
    return rel


def normalize_uri(uri: str) -> str:
    """A canonical form: s3://bucket/prefix without trailing slash, or an absolute local path."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    return local_path(uri)



# ---------------------------------------------------------------------------------------------


@dataclass
class Storage:
    """A datastore root. Subclasses implement the primitives over relative paths."""

    uri: str
    # "file" and "s3" → their implementation; builder/storage.py registers them (they import this
    # module, so it cannot import them)
    backends: ClassVar[dict[str, type["Storage"]]] = {}

    def __post_init__(self):       # here so that the generated __init__ calls a subclass's __post_init__
        pass

    @staticmethod
    def from_uri(uri: str) -> "Storage":
        uri = normalize_uri(uri)
        return Storage.backends["s3" if is_s3(uri) else "file"](uri)

    def url(self, rel: str) -> str:
        return f"{self.uri.rstrip('/')}/{rel}"

    # primitives -------------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes: raise NotImplementedError
    def read_range(self, rel: str, start: int, end: int) -> bytes: raise NotImplementedError
    def size(self, rel: str) -> int: raise NotImplementedError
    def write_bytes(self, rel: str, data: bytes) -> None: raise NotImplementedError
    def exists(self, rel: str) -> bool: raise NotImplementedError
    def list(self, prefix: str = "") -> list[str]: raise NotImplementedError
    def delete(self, rel: str) -> None: raise NotImplementedError
    def create_exclusive(self, rel: str, data: bytes) -> bool: raise NotImplementedError
    def replace_if(self, rel: str, data: bytes, expected: bytes) -> bool: raise NotImplementedError
    def cleanup_incomplete(self, prefix: str = "") -> int: raise NotImplementedError
    def check_writable(self) -> None: raise NotImplementedError

    # helpers ------------------------------------------------------------------------------
    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def open_read(self, rel: str) -> "RangeReader":
        """A seekable read-only file over an object: each read is one ranged GET on S3, so a
        Parquet reader fetches only the footer and the row groups it is asked for."""
        return RangeReader(self, rel, self.size(rel))

    def download_file(self, rel: str, path: str) -> None:
        """Copy an object to a local file (streamed: for objects larger than memory)."""
        raise NotImplementedError

    def upload_file(self, rel: str, path: str) -> None:
        """Store a local file as an object, atomically (streamed)."""
        raise NotImplementedError

    def compose(self, rel: str, pieces: list[tuple[str, int, int]]) -> None:
        """Store, atomically, the concatenation of byte ranges [start, end) of objects of this root as
        `rel`, never holding more than a bounded chunk in memory (local: a streamed copy; S3: a multipart
        upload of server-side part copies)."""
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> int:
        paths = self.list(prefix)
        for p in paths:
            self.delete(p)
        return len(paths)



class RangeReader(io.RawIOBase):
    """A read-only, seekable file over a stored object (wrap in `pyarrow.PythonFile`)."""

    def __init__(self, storage: Storage, rel: str, size: int):
        self.storage, self.rel, self._size, self._pos = storage, rel, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        data = self.storage.read_range(self.rel, self._pos, end) if end > self._pos else b""
        self._pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def size(self) -> int:
        return self._size



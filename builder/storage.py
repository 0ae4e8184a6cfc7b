"""URI → storage: local paths / file:// and s3://bucket/prefix, one small interface.

What the stages import: `Storage.from_uri(uri)` (the interface, builder/storage_base.py; local and
S3 implementations in builder/storage_local.py and builder/storage_s3.py, registered here), the
corpus inputs (`expand_inputs`, `read_uri`, `size_uri`) and local output files.

- Writes are atomic: local files are written to a temporary name and renamed; an S3
  object becomes visible only when its PUT (or multipart upload) completes.
- `create_exclusive` / `replace_if` are the conditional writes the leases need
  (S3 `If-None-Match: *` / `If-Match: <etag>`; a file lock locally).
- S3 goes through boto3 with the standard AWS credential chain and environment
  (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, ...), so MinIO/Ceph/R2 work.
  Credentials are never logged or stored: only bucket/key names are.
"""
from __future__ import annotations

import fnmatch
import glob
import json
import os

from builder.storage_base import (
    DuplicateInput,
    InputError,
    InputNotFound,
    NotFound,
    RangeReader,
    Storage,
    StorageError,
    is_s3,
    local_path,
    normalize_uri,
    split_s3,
)
from builder.storage_local import LocalStorage
from builder.storage_s3 import (S3Storage, get_object_checked, list_s3_objects, reset_clients, s3_client, s3_reason,
                                s3_transfer_client, with_retries)
from builder.storage_s3_compose import s3_compose

__all__ = ["DuplicateInput", "InputError", "InputNotFound", "LocalStorage", "NotFound", "RangeReader", "S3Storage",
           "Storage", "StorageError", "expand_inputs", "is_s3", "list_s3_objects", "local_path", "normalize_uri",
           "read_uri", "read_uri_range", "reset_clients", "s3_client", "s3_transfer_client", "size_uri", "split_s3", "with_retries",
           "write_json_file", "write_local_text"]

Storage.backends.update(file=LocalStorage, s3=S3Storage)
S3Storage.compose = s3_compose          # (in its own module: storage_s3.py is near the size limit)

# ---------------------------------------------------------------------------------------------
# single input objects (corpus files)


def expand_inputs(specs: list[str]) -> list[str]:
    """Expand corpus arguments into an ordered list of file URIs.

    Each argument is a file, a directory (all files below it), a glob, or an s3:// URI
    (an object, a prefix, or a glob on keys). Each argument's matches are sorted
    (key order for S3); arguments keep the order given. Duplicates are an error because
    they would silently double the datastore."""
    out: list[str] = []
    for spec in specs:
        if is_s3(spec):
            bucket, key = split_s3(spec)
            has_glob = any(ch in key for ch in "*?[")
            prefix = key.split("*")[0].split("?")[0].split("[")[0] if has_glob else key
            objs = [o["Key"] for o in list_s3_objects(bucket, prefix) if not o["Key"].endswith("/")]
            if has_glob:
                objs = [k for k in objs if fnmatch.fnmatchcase(k, key)]
            elif key and key in objs:
                objs = [key]
            else:
                objs = [k for k in objs if not key or k.startswith(key.rstrip("/") + "/")]
            if not objs:
                raise InputNotFound(f"{spec}: no object matches")
            out.extend(f"s3://{bucket}/{k}" for k in sorted(objs))
        else:
            p = local_path(spec)
            if any(ch in spec for ch in "*?["):
                matches = sorted(m for m in glob.glob(p, recursive=True) if os.path.isfile(m))
                if not matches:
                    raise InputNotFound(f"{spec}: no file matches this pattern")
                out.extend(matches)
            elif os.path.isdir(p):
                matches = sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs)
                if not matches:
                    raise InputNotFound(f"{spec}: directory is empty")
                out.extend(matches)
            elif os.path.isfile(p):
                out.append(p)
            else:
                raise InputNotFound(f"{spec}: no such file or directory")
    seen = set()
    for u in out:
        if u in seen:
            raise DuplicateInput(f"{u} is given more than once", sep=": ")
        seen.add(u)
    return out


def size_uri(uri: str) -> int:
    """Size in bytes of an input object (local path, file:// or s3://)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return int(with_retries(lambda: s3_client().head_object(Bucket=bucket, Key=key), f"stat {uri}")["ContentLength"])
    return os.path.getsize(local_path(uri))


def read_uri(uri: str) -> bytes:
    """Read a whole input object (local path, file:// or s3://)."""
    return read_uri_range(uri, None, None)


def read_uri_range(uri: str, start: int | None, end: int | None) -> bytes:
    """Bytes [start, end) of an input object (clipped to its end; None, None: all of it): one GET on S3,
    retried, never a body cut short."""
    if start is not None and end <= start:
        return b""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        from botocore.exceptions import ClientError
        try:
            return get_object_checked(bucket, key, f"read {uri}", start, end)[0]
        except ClientError as e:
            raise StorageError(f"cannot read {uri}: {s3_reason(e)}") from e
    try:
        with open(local_path(uri), "rb") as f:
            if start is None:
                return f.read()
            f.seek(start)
            return f.read(end - start)
    except OSError as e:
        raise StorageError(f"cannot read {uri}: {e.strerror or e}") from e


def write_local_text(path: str, text: str) -> str:
    """A local output file (`--out`, results.json, the demo's pipeline.yaml), written as a datastore
    file is (LocalStorage.write_bytes): its folder created as needed, written aside and renamed.
    Returns the absolute path."""
    given, path = path, local_path(path)
    if given.endswith(("/", os.sep)) or os.path.isdir(path):
        raise StorageError(f"{given} is a folder: the output must be a file name (e.g. {os.path.join(given, 'out.json')})")
    LocalStorage(os.path.dirname(path)).write_text(os.path.basename(path), text)
    return path


def write_json_file(path: str, obj) -> str:
    """A local JSON output (see write_local_text). Returns the absolute path."""
    return write_local_text(path, json.dumps(obj, indent=1, default=str))


"""URI → storage: local paths / file:// and s3://bucket/prefix, one small interface.

Every artifact of a datastore (shards, progress records, the lease, the manifest) goes
through `Storage`, rooted at the datastore URI, with paths relative to that root.

- Writes are atomic: local files are written to a temporary name and renamed; an S3
  object becomes visible only when its PUT (or multipart upload) completes.
- `create_exclusive` / `replace_if` are the conditional writes the build lease needs
  (S3 `If-None-Match: *` / `If-Match: <etag>`; a file lock locally).
- S3 goes through boto3 with the standard AWS credential chain and environment
  (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, ...), so MinIO/Ceph/R2 work.
  Credentials are never logged or stored: only bucket/key names are.
"""
from __future__ import annotations

import fcntl
import fnmatch
import glob
import io
import logging
import os
import random
import time
import uuid
from dataclasses import dataclass
from typing import Callable, TypeVar

from builder.errors import KnnlmError
from builder.layout import probe_path

log = logging.getLogger(__name__)
T = TypeVar("T")


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


def normalize_uri(uri: str) -> str:
    """A canonical form: s3://bucket/prefix without trailing slash, or an absolute local path."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    return local_path(uri)


# ---------------------------------------------------------------------------------------------
# S3 client with retries


_S3_CLIENT = None
_S3_CLIENT_PID = None


def s3_client():
    """One boto3 client per process (boto3 clients are thread-safe, not fork-safe)."""
    global _S3_CLIENT, _S3_CLIENT_PID
    if _S3_CLIENT is None or _S3_CLIENT_PID != os.getpid():
        import boto3
        from botocore.config import Config

        cfg = Config(retries={"max_attempts": 10, "mode": "standard"},
                     connect_timeout=10, read_timeout=120, max_pool_connections=32)
        _S3_CLIENT = boto3.session.Session().client("s3", config=cfg)
        _S3_CLIENT_PID = os.getpid()
    return _S3_CLIENT


def _s3_code(exc: Exception) -> str:
    resp = getattr(exc, "response", None) or {}
    return str(resp.get("Error", {}).get("Code", ""))


def with_retries(fn: Callable[[], T], what: str, attempts: int = 6) -> T:
    """Retry transient storage errors (connection drops, throttling, 5xx) with jittered backoff.

    botocore already retries inside one call; this covers errors that escape it (e.g. a
    connection reset while streaming a body)."""
    from botocore.exceptions import (
        ClientError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from botocore.exceptions import ConnectionError as BotoConnError

    transient_codes = {"SlowDown", "Throttling", "RequestTimeout", "InternalError",
                       "ServiceUnavailable", "503", "500"}
    for i in range(attempts):
        try:
            return fn()
        except (BotoConnError, ReadTimeoutError, ResponseStreamingError, ConnectionError) as e:
            err: Exception = e
        except ClientError as e:
            if _s3_code(e) not in transient_codes:
                raise
            err = e
        if i == attempts - 1:
            raise StorageError(f"{what}: failed after {attempts} attempts: {err}") from err
        delay = min(30.0, 0.5 * 2 ** i) * (0.5 + random.random())
        log.warning("%s: transient storage error (%s); retrying in %.1fs", what, type(err).__name__, delay)
        time.sleep(delay)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------


@dataclass
class Storage:
    """A datastore root. Subclasses implement the primitives over relative paths."""

    uri: str

    def __post_init__(self):
        pass

    @staticmethod
    def from_uri(uri: str) -> "Storage":
        uri = normalize_uri(uri)
        return S3Storage(uri) if is_s3(uri) else LocalStorage(uri)

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

    def delete_prefix(self, prefix: str) -> int:
        paths = self.list(prefix)
        for p in paths:
            self.delete(p)
        return len(paths)


class LocalStorage(Storage):
    def _p(self, rel: str) -> str:
        return os.path.join(self.uri, rel)

    def read_bytes(self, rel: str) -> bytes:
        try:
            with open(self._p(rel), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise NotFound(f"{self.url(rel)} does not exist") from None

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        try:
            with open(self._p(rel), "rb") as f:
                f.seek(start)
                return f.read(end - start)
        except FileNotFoundError:
            raise NotFound(f"{self.url(rel)} does not exist") from None

    def size(self, rel: str) -> int:
        try:
            return os.path.getsize(self._p(rel))
        except FileNotFoundError:
            raise NotFound(f"{self.url(rel)} does not exist") from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self._p(rel)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
        except OSError as e:
            raise StorageError(f"cannot write {path}: {e.strerror or e}") from e

    def download_file(self, rel: str, path: str) -> None:
        import shutil
        try:
            shutil.copyfile(self._p(rel), path)
        except FileNotFoundError:
            raise NotFound(f"{self.url(rel)} does not exist") from None

    def upload_file(self, rel: str, path: str) -> None:
        import shutil
        dst = self._p(rel)
        try:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            tmp = f"{dst}.tmp-{uuid.uuid4().hex[:12]}"
            shutil.copyfile(path, tmp)
            os.replace(tmp, dst)
        except OSError as e:
            raise StorageError(f"cannot write {dst}: {e.strerror or e}") from e

    def exists(self, rel: str) -> bool:
        return os.path.exists(self._p(rel))

    def list(self, prefix: str = "") -> list[str]:
        base = self._p(prefix)
        out = []
        if os.path.isdir(base):
            for d, _, files in os.walk(base):
                for f in files:
                    if ".tmp-" in f or f.endswith(".lock"):
                        continue
                    out.append(os.path.relpath(os.path.join(d, f), self.uri))
        return sorted(out)

    def delete(self, rel: str) -> None:
        for p in (self._p(rel), self._p(rel) + ".lock"):
            try:
                os.remove(p)
            except FileNotFoundError:
                pass
        # prune directories left empty (local only; S3 has no directories)
        d = os.path.dirname(self._p(rel))
        while d.startswith(self.uri + os.sep):
            try:
                os.rmdir(d)
            except OSError:
                break
            d = os.path.dirname(d)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        path = self._p(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # write aside then hard-link: the object appears complete or not at all, and link()
        # fails if the name exists (the conditional write)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)

    def replace_if(self, rel: str, data: bytes, expected: bytes) -> bool:
        path = self._p(rel)
        with open(path + ".lock", "a") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            try:
                with open(path, "rb") as f:
                    if f.read() != expected:
                        return False
            except FileNotFoundError:
                return False
            self.write_bytes(rel, data)
            return True

    def cleanup_incomplete(self, prefix: str = "") -> int:
        n = 0
        for p in glob.glob(os.path.join(self._p(prefix), "**", "*.tmp-*"), recursive=True):
            try:
                os.remove(p)
                n += 1
            except FileNotFoundError:
                pass
        return n

    def check_writable(self) -> None:
        probe = probe_path(uuid.uuid4().hex[:8])
        try:
            self.write_bytes(probe, b"ok")
        except StorageError as e:
            raise StorageError(f"output {self.uri} is not writable: {e} (check --out)") from e
        self.delete(probe)


class S3Storage(Storage):
    MULTIPART_THRESHOLD = 64 << 20   # larger objects go up as multipart uploads ...
    MULTIPART_CHUNK = 32 << 20       # ... of parts this size, 8 in parallel

    def __post_init__(self):
        self.bucket, self.prefix = split_s3(self.uri)

    def _k(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _get(self, rel: str, **kw) -> tuple[bytes, str]:
        """(body, etag) of an object; the body is read inside the retry loop."""
        from botocore.exceptions import ClientError

        def go():
            r = s3_client().get_object(Bucket=self.bucket, Key=self._k(rel), **kw)
            return r["Body"].read(), r["ETag"]
        try:
            return with_retries(go, f"read {self.url(rel)}")
        except ClientError as e:
            if _s3_code(e) in ("NoSuchKey", "404"):
                raise NotFound(f"{self.url(rel)} does not exist") from None
            raise StorageError(f"cannot read {self.url(rel)}: {_s3_code(e)}") from e

    def read_bytes(self, rel: str) -> bytes:
        return self._get(rel)[0]

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        return self._get(rel, Range=f"bytes={start}-{end - 1}")[0] if end > start else b""

    def _get_with_etag(self, rel: str) -> tuple[bytes, str] | None:
        try:
            return self._get(rel)
        except NotFound:
            return None

    def write_bytes(self, rel: str, data: bytes) -> None:
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import ClientError

        key = self._k(rel)
        try:
            if len(data) < self.MULTIPART_THRESHOLD:
                with_retries(lambda: s3_client().put_object(Bucket=self.bucket, Key=key, Body=data),
                             f"write {self.url(rel)}")
            else:
                # multipart: visible only once completed; a failed attempt is aborted by the
                # transfer manager, and one from a killed process by cleanup_incomplete()
                cfg = TransferConfig(multipart_threshold=self.MULTIPART_THRESHOLD,
                                     multipart_chunksize=self.MULTIPART_CHUNK, max_concurrency=8)
                with_retries(lambda: s3_client().upload_fileobj(io.BytesIO(data), self.bucket, key, Config=cfg),
                             f"write {self.url(rel)}")
        except ClientError as e:
            raise StorageError(f"cannot write {self.url(rel)}: {_s3_code(e)} {e}") from e

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig
        return TransferConfig(multipart_threshold=self.MULTIPART_THRESHOLD, multipart_chunksize=self.MULTIPART_CHUNK,
                              max_concurrency=8)

    def download_file(self, rel: str, path: str) -> None:
        from botocore.exceptions import ClientError
        try:
            with_retries(lambda: s3_client().download_file(self.bucket, self._k(rel), path,
                                                           Config=self._transfer_config()), f"read {self.url(rel)}")
        except ClientError as e:
            if _s3_code(e) in ("404", "NoSuchKey", "NotFound"):
                raise NotFound(f"{self.url(rel)} does not exist") from None
            raise StorageError(f"cannot read {self.url(rel)}: {_s3_code(e)}") from e

    def upload_file(self, rel: str, path: str) -> None:
        from botocore.exceptions import ClientError
        try:  # visible only once complete (PUT or completed multipart upload)
            with_retries(lambda: s3_client().upload_file(path, self.bucket, self._k(rel),
                                                         Config=self._transfer_config()), f"write {self.url(rel)}")
        except ClientError as e:
            raise StorageError(f"cannot write {self.url(rel)}: {_s3_code(e)} {e}") from e

    def size(self, rel: str) -> int:
        from botocore.exceptions import ClientError
        try:
            r = with_retries(lambda: s3_client().head_object(Bucket=self.bucket, Key=self._k(rel)),
                             f"stat {self.url(rel)}")
        except ClientError as e:
            if _s3_code(e) in ("404", "NoSuchKey", "NotFound"):
                raise NotFound(f"{self.url(rel)} does not exist") from None
            raise StorageError(f"cannot stat {self.url(rel)}: {_s3_code(e)}") from e
        return int(r["ContentLength"])

    def exists(self, rel: str) -> bool:
        try:
            self.size(rel)                 # one HEAD, with its errors
            return True
        except NotFound:
            return False

    def list(self, prefix: str = "") -> list[str]:
        base = self._k(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = []
        for obj in list_s3_objects(self.bucket, base):
            out.append(obj["Key"][strip:])
        return sorted(out)

    def delete(self, rel: str) -> None:
        with_retries(lambda: s3_client().delete_object(Bucket=self.bucket, Key=self._k(rel)),
                     f"delete {self.url(rel)}")

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError
        try:
            with_retries(lambda: s3_client().put_object(Bucket=self.bucket, Key=self._k(rel), Body=data,
                                                        IfNoneMatch="*"), f"create {self.url(rel)}")
            return True
        except ClientError as e:
            if _s3_code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            raise StorageError(f"cannot create {self.url(rel)}: {_s3_code(e)}") from e

    def replace_if(self, rel: str, data: bytes, expected: bytes) -> bool:
        from botocore.exceptions import ClientError
        cur = self._get_with_etag(rel)
        if cur is None or cur[0] != expected:
            return False
        try:
            with_retries(lambda: s3_client().put_object(Bucket=self.bucket, Key=self._k(rel), Body=data,
                                                        IfMatch=cur[1]), f"replace {self.url(rel)}")
            return True
        except ClientError as e:
            if _s3_code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            raise StorageError(f"cannot replace {self.url(rel)}: {_s3_code(e)}") from e

    def cleanup_incomplete(self, prefix: str = "") -> int:
        """Abort multipart uploads left under this root by killed writers."""
        c = s3_client()
        n = 0
        kw = {"Bucket": self.bucket, "Prefix": self._k(prefix)}
        while True:
            r = with_retries(lambda: c.list_multipart_uploads(**kw), f"list uploads {self.uri}")
            for u in r.get("Uploads", []) or []:
                c.abort_multipart_upload(Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"])
                n += 1
            if not r.get("IsTruncated"):
                return n
            kw["KeyMarker"] = r["NextKeyMarker"]
            kw["UploadIdMarker"] = r["NextUploadIdMarker"]

    def check_writable(self) -> None:
        from botocore.exceptions import ClientError, NoCredentialsError
        probe = probe_path(uuid.uuid4().hex[:8])
        try:
            s3_client().put_object(Bucket=self.bucket, Key=self._k(probe), Body=b"ok")
            s3_client().delete_object(Bucket=self.bucket, Key=self._k(probe))
        except NoCredentialsError as e:
            raise StorageError(f"output {self.uri} is not writable: no AWS credentials found "
                               "(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)") from e
        except (ClientError, StorageError) as e:
            raise StorageError(f"output {self.uri} is not writable: {_s3_code(e) or e} (check --out, "
                               "the bucket name and your credentials)") from e
        except Exception as e:  # endpoint unreachable etc.
            raise StorageError(f"output {self.uri} is not writable: {e} (check --out and AWS_ENDPOINT_URL)") from e


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


def list_s3_objects(bucket: str, prefix: str) -> list[dict]:
    c = s3_client()
    out: list[dict] = []
    kw = {"Bucket": bucket, "Prefix": prefix}
    while True:
        r = with_retries(lambda: c.list_objects_v2(**kw), f"list s3://{bucket}/{prefix}")
        out.extend(r.get("Contents", []) or [])
        if not r.get("IsTruncated"):
            return out
        kw["ContinuationToken"] = r["NextContinuationToken"]


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
    if is_s3(uri):
        bucket, key = split_s3(uri)
        from botocore.exceptions import ClientError
        try:
            return with_retries(lambda: s3_client().get_object(Bucket=bucket, Key=key)["Body"].read(),
                                f"read {uri}")
        except ClientError as e:
            raise StorageError(f"cannot read {uri}: {_s3_code(e)}") from e
    try:
        with open(local_path(uri), "rb") as f:
            return f.read()
    except OSError as e:
        raise StorageError(f"cannot read {uri}: {e.strerror or e}") from e


def write_local_text(path: str, text: str) -> str:
    """A local output file (`--out`, results.json, the demo's pipeline.yaml), written as a datastore
    file is (LocalStorage.write_bytes): its folder created as needed, written aside and renamed.
    Returns the absolute path."""
    path = local_path(path)
    LocalStorage(os.path.dirname(path)).write_text(os.path.basename(path), text)
    return path


def write_json_file(path: str, obj) -> str:
    """A local JSON output (see write_local_text). Returns the absolute path."""
    import json
    return write_local_text(path, json.dumps(obj, indent=1, default=str))

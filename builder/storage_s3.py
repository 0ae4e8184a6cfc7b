"""S3 storage (s3://bucket/prefix; AWS, MinIO, Ceph, R2) through boto3, with retries.

boto3 uses the standard AWS credential chain and environment (AWS_ENDPOINT_URL, AWS_REGION,
AWS_ACCESS_KEY_ID, ...). Credentials are never logged or stored: only bucket/key names are. An
object becomes visible only when its PUT (or multipart upload) completes; conditional writes are
`If-None-Match: *` / `If-Match: <etag>`.
"""
from __future__ import annotations

import io
import logging
import os
import random
import time
import uuid
from typing import Callable, TypeVar

from builder.layout import probe_path
from builder.storage_base import NotFound, Storage, StorageError, split_s3

log = logging.getLogger(__name__)
T = TypeVar("T")

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
    from botocore.exceptions import ClientError, ReadTimeoutError, ResponseStreamingError
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



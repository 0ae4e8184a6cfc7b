"""S3 storage (s3://bucket/prefix; AWS, MinIO, Ceph, R2) through boto3, with retries.

boto3 uses the standard AWS credential chain and environment (AWS_ENDPOINT_URL, AWS_REGION,
AWS_ACCESS_KEY_ID, ...). Credentials are never logged or stored: only bucket/key names are. An
object becomes visible only when its PUT (or multipart upload) completes; conditional writes are
`If-None-Match: *` / `If-Match: <etag>`.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import time
import uuid
from typing import Callable, TypeVar

from builder.layout import probe_path
from builder.storage_base import NotFound, Storage, StorageError, check_rel, split_s3

log = logging.getLogger(__name__)
T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# S3 clients with retries
#
# The retry budget. At scale an object store fails a few percent of requests (503 SlowDown above
# all, 500s, dropped connections, bodies cut short), and a pipeline makes 10^4-10^5 requests, so a
# stage must survive a per-request failure rate p of 10% (the fault suite also runs 10% of EACH
# kind: p ~ 0.34 for a GET) with a negligible chance of failing:
# - our own calls (one request each: GET, PUT, HEAD, LIST, DELETE) use a client WITHOUT botocore
#   retries and go through `with_retries`, ATTEMPTS = 12 times: a call fails only if all 12 fail,
#   p^12 = 1e-12 at p = 0.1 (1e-7 for 10^5 calls) and 2e-6 at p = 0.34. Doing it ourselves
#   also covers what botocore does not retry (a body cut short while streaming, a short body,
#   a truncated error body that surfaces as urllib3's ProtocolError), keeps the backoff small
#   (botocore's first retry alone waits rand(0,1) s, and its retry quota can run dry in a burst),
#   and lets a conditional write know that an earlier attempt of its own may have landed;
# - s3transfer (upload_file/download_file, multipart parts) needs retries per part, so it gets a
#   second client with botocore's standard mode at 10 attempts per request (p^10 = 1e-10 per part
#   at 10%); its downloads retry streaming errors 5 times more, and `with_retries` redoes a whole
#   failed transfer.
# Backoff: 0.05 s doubling (0.2 s for throttling), capped at 2 s (5 s), jittered x0.5-1.5: the 11
# waits of a call that fails 12 times total ~15 s (~45 s throttled); a single retry ~0.05 s.

ATTEMPTS = 12
_BASE_DELAY, _MAX_DELAY = 0.05, 2.0
_THROTTLE_BASE_DELAY, _THROTTLE_MAX_DELAY = 0.2, 5.0
_THROTTLING = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "503",
               "ServiceUnavailable", "TooManyRequests"}
_TRANSIENT_CODES = _THROTTLING | {"RequestTimeout", "InternalError", "500", "502", "504", "BadGateway",
                                  "GatewayTimeout",
                                  # a multipart upload completed by an attempt whose answer was lost
                                  # and then completed again: the whole upload is redone
                                  "NoSuchUpload"}
_PRECONDITION = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")
_CLIENTS: dict[str, object] = {}
_CLIENTS_PID = None


class ShortRead(Exception):
    """A response body shorter than announced, or unlike its ETag: transient, re-read."""


def _client(kind: str):
    global _CLIENTS_PID
    if _CLIENTS_PID != os.getpid():
        _CLIENTS.clear()
        _CLIENTS_PID = os.getpid()
    if kind not in _CLIENTS:
        import boto3
        from botocore.config import Config

        retries = {"total_max_attempts": 1} if kind == "plain" else {"total_max_attempts": 10}
        cfg = Config(retries={**retries, "mode": "standard"},
                     connect_timeout=10, read_timeout=120, max_pool_connections=32)
        _CLIENTS[kind] = boto3.session.Session().client("s3", config=cfg)
    return _CLIENTS[kind]


def s3_client():
    """One boto3 client per process (boto3 clients are thread-safe, not fork-safe) WITHOUT botocore
    retries: every call must go through `with_retries`."""
    return _client("plain")


def s3_transfer_client():
    """The client s3transfer (upload_file, download_file, multipart) runs on: botocore retries each
    request (a part) itself."""
    return _client("transfer")


def reset_clients() -> None:
    """Forget the cached clients (tests that change AWS_ENDPOINT_URL)."""
    _CLIENTS.clear()


def _s3_code(exc: Exception) -> str:
    resp = getattr(exc, "response", None) or {}
    return str(resp.get("Error", {}).get("Code", ""))


AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken", "403"}


def s3_reason(exc: Exception) -> str:
    """The S3 error code, with what to check when it is the credentials that were refused."""
    code = _s3_code(exc)
    if code in AUTH_CODES:
        return (f"{code}: S3 refused the credentials (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the "
                "profile, and that they may access the bucket)")
    return code


def _transient(e: BaseException) -> str | None:
    """The error code (or class name) of a transient storage error; None if it is not one."""
    import http.client

    import urllib3.exceptions
    from boto3.exceptions import RetriesExceededError, S3TransferFailedError, S3UploadFailedError
    from botocore.exceptions import ClientError, FlexibleChecksumError, HTTPClientError, IncompleteReadError
    from botocore.exceptions import ConnectionError as BotoConnError

    if isinstance(e, ClientError):
        code = _s3_code(e)
        return code if code in _TRANSIENT_CODES else None
    if isinstance(e, (S3UploadFailedError, S3TransferFailedError)):   # boto3 wraps a ClientError's text
        cause = e.__cause__ or e.__context__
        if cause is not None:
            return _transient(cause)
        return next((c for c in _TRANSIENT_CODES if f"({c})" in str(e)), None)
    # FlexibleChecksumError: a body unlike the checksum the server stored (cut short, corrupted)
    if isinstance(e, (BotoConnError, HTTPClientError, IncompleteReadError, FlexibleChecksumError,
                      RetriesExceededError, ShortRead,
                      urllib3.exceptions.HTTPError, http.client.HTTPException, ConnectionError, TimeoutError)):
        return type(e).__name__
    return None


def with_retries(fn: Callable[[], T], what: str, attempts: int = ATTEMPTS) -> T:
    """Retry transient storage errors (connection drops and resets, throttling, 5xx, bodies cut
    short) with jittered exponential backoff; see the retry budget above."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:
            why = _transient(e)
            if why is None:
                raise
            err: Exception = e
        if i == attempts - 1:
            raise StorageError(f"{what}: failed after {attempts} attempts: {type(err).__name__}: "
                               f"{_one_line(err)}") from err
        base, cap = ((_THROTTLE_BASE_DELAY, _THROTTLE_MAX_DELAY) if why in _THROTTLING else (_BASE_DELAY, _MAX_DELAY))
        delay = min(cap, base * 2 ** i) * (0.5 + random.random())
        log.warning("%s: transient storage error (%s); retrying in %.2fs", what, why, delay)
        time.sleep(delay)
    raise AssertionError("unreachable")


def _one_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _plain_md5_etag(r: dict) -> str | None:
    """The ETag of a GET response if it is the body's MD5: a single PUT's, not a multipart upload's
    ('-N'), and not of an object encrypted with KMS or a customer key (whose ETag is not an MD5)."""
    etag = str(r.get("ETag", "")).strip('"')
    if len(etag) != 32 or any(ch not in "0123456789abcdef" for ch in etag.lower()):
        return None
    if r.get("ServerSideEncryption") == "aws:kms" or r.get("SSECustomerAlgorithm"):
        return None
    return etag.lower()


def get_object_checked(bucket: str, key: str, what: str, start: int | None = None,
                       end: int | None = None) -> tuple[bytes, str]:
    """(body, etag) of an object, or of bytes [start, end) of it, retried; a body cut short is never
    returned: its length must be the announced one (for a range: the range, clipped to the object),
    and a whole body must match an ETag that is its MD5. Raises botocore's ClientError (e.g.
    NoSuchKey) for a permanent error."""
    kw = {"Range": f"bytes={start}-{end - 1}"} if start is not None else {}

    def go():
        r = s3_client().get_object(Bucket=bucket, Key=key, **kw)
        body = r["Body"].read()
        n = int(r.get("ContentLength", -1))
        if len(body) != n:
            raise ShortRead(f"{what}: got {len(body)} of {n} bytes")
        if start is not None:
            cr = str(r.get("ContentRange", ""))
            if cr.startswith("bytes "):
                total = int(cr.rsplit("/", 1)[1]) if not cr.endswith("/*") else None
                want = (min(end, total) if total is not None else end) - start
                if len(body) != want or not cr.startswith(f"bytes {start}-"):
                    raise ShortRead(f"{what}: got {cr} ({len(body)} bytes) for bytes {start}-{end - 1}")
                return body, r["ETag"]
        etag = _plain_md5_etag(r)
        if etag is not None and hashlib.md5(body).hexdigest() != etag:
            raise ShortRead(f"{what}: body does not match its ETag (MD5)")
        # (a server that ignored the Range sent the whole object)
        return (body if start is None else body[start:end]), r["ETag"]
    return with_retries(go, what)


class S3Storage(Storage):
    MULTIPART_THRESHOLD = 64 << 20   # larger objects go up as multipart uploads ...
    MULTIPART_CHUNK = 32 << 20       # ... of parts this size, 8 in parallel

    def __post_init__(self):
        self.bucket, self.prefix = split_s3(self.uri)

    def _k(self, rel: str, prefix: bool = False) -> str:
        rel = check_rel(self.uri, rel, prefix)
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _get(self, rel: str, start: int | None = None, end: int | None = None) -> tuple[bytes, str]:
        """(body, etag) of an object or of bytes [start, end) of it (see get_object_checked)."""
        from botocore.exceptions import ClientError
        try:
            return get_object_checked(self.bucket, self._k(rel), f"read {self.url(rel)}", start, end)
        except ClientError as e:
            if _s3_code(e) in ("NoSuchKey", "404"):
                raise NotFound(f"{self.url(rel)} does not exist") from None
            raise StorageError(f"cannot read {self.url(rel)}: {s3_reason(e)}") from e

    def read_bytes(self, rel: str) -> bytes:
        return self._get(rel)[0]

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        return self._get(rel, start, end)[0] if end > start else b""

    def _get_with_etag(self, rel: str) -> tuple[bytes, str] | None:
        try:
            return self._get(rel)
        except NotFound:
            return None

    def write_bytes(self, rel: str, data: bytes) -> None:
        from botocore.exceptions import ClientError

        key = self._k(rel)
        try:
            if len(data) < self.MULTIPART_THRESHOLD:
                with_retries(lambda: s3_client().put_object(Bucket=self.bucket, Key=key, Body=data),
                             f"write {self.url(rel)}")
            else:
                # multipart: visible only once completed; a failed attempt is aborted by the
                # transfer manager, and one from a killed process by cleanup_incomplete()
                with_retries(lambda: s3_transfer_client().upload_fileobj(
                    io.BytesIO(data), self.bucket, key, Config=self._transfer_config()), f"write {self.url(rel)}")
        except ClientError as e:
            raise StorageError(f"cannot write {self.url(rel)}: {_s3_code(e)} {e}") from e

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig
        return TransferConfig(multipart_threshold=self.MULTIPART_THRESHOLD, multipart_chunksize=self.MULTIPART_CHUNK,
                              max_concurrency=8)

    def download_file(self, rel: str, path: str) -> None:
        """Streamed to `path` by s3transfer, then checked against a HEAD: the size, and the MD5 when
        the ETag is one (a mismatch is re-downloaded)."""
        from botocore.exceptions import ClientError
        what = f"read {self.url(rel)}"

        def go():
            head = s3_client().head_object(Bucket=self.bucket, Key=self._k(rel))
            s3_transfer_client().download_file(self.bucket, self._k(rel), path, Config=self._transfer_config())
            n, want = os.path.getsize(path), int(head["ContentLength"])
            if n != want:
                raise ShortRead(f"{what}: downloaded {n} of {want} bytes")
            etag = _plain_md5_etag(head)
            if etag is not None and _file_md5(path) != etag:
                raise ShortRead(f"{what}: download does not match its ETag (MD5)")
        try:
            with_retries(go, what)
        except ClientError as e:
            if _s3_code(e) in ("404", "NoSuchKey", "NotFound"):
                raise NotFound(f"{self.url(rel)} does not exist") from None
            raise StorageError(f"cannot read {self.url(rel)}: {s3_reason(e)}") from e

    def upload_file(self, rel: str, path: str) -> None:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import ClientError
        try:  # visible only once complete (PUT or completed multipart upload)
            with_retries(lambda: s3_transfer_client().upload_file(path, self.bucket, self._k(rel),
                                                                  Config=self._transfer_config()),
                         f"write {self.url(rel)}")
        except (ClientError, S3UploadFailedError) as e:
            raise StorageError(f"cannot write {self.url(rel)}: {_s3_code(e)} {_one_line(e)}") from e

    def size(self, rel: str) -> int:
        from botocore.exceptions import ClientError
        try:
            r = with_retries(lambda: s3_client().head_object(Bucket=self.bucket, Key=self._k(rel)),
                             f"stat {self.url(rel)}")
        except ClientError as e:
            if _s3_code(e) in ("404", "NoSuchKey", "NotFound"):
                raise NotFound(f"{self.url(rel)} does not exist") from None
            raise StorageError(f"cannot stat {self.url(rel)}: {s3_reason(e)}") from e
        return int(r["ContentLength"])

    def exists(self, rel: str) -> bool:
        try:
            self.size(rel)                 # one HEAD, with its errors
            return True
        except NotFound:
            return False

    def list(self, prefix: str = "") -> list[str]:
        base = self._k(prefix, prefix=True)
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = []
        for obj in list_s3_objects(self.bucket, base):
            out.append(obj["Key"][strip:])
        return sorted(out)

    def delete(self, rel: str) -> None:
        with_retries(lambda: s3_client().delete_object(Bucket=self.bucket, Key=self._k(rel)),
                     f"delete {self.url(rel)}")

    DELETE_BATCH = 1000              # keys per DeleteObjects request (the S3 maximum)

    def delete_prefix(self, prefix: str) -> int:
        """Every object under `prefix`, DELETE_BATCH per DeleteObjects request (a build's 25,000 unit
        records: 25 requests, not 25,000); keys a request could not delete are retried."""
        base = self._k(prefix, prefix=True)
        keys = [o["Key"] for o in list_s3_objects(self.bucket, base)]
        for i in range(0, len(keys), self.DELETE_BATCH):
            self._delete_keys(keys[i:i + self.DELETE_BATCH])
        return len(keys)

    def _delete_keys(self, keys: list[str]) -> None:
        """One DeleteObjects request (retried, as a whole and for the keys it reports failed)."""
        what = f"delete {len(keys)} objects under {self.uri}"
        for attempt in range(ATTEMPTS):
            r = with_retries(lambda: s3_client().delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}), what)
            errors = r.get("Errors") or []
            if not errors:
                return
            bad = next((e for e in errors if str(e.get("Code")) not in _TRANSIENT_CODES), None)
            if bad is not None or attempt == ATTEMPTS - 1:
                e = bad or errors[0]
                raise StorageError(f"cannot delete s3://{self.bucket}/{e.get('Key')}: {e.get('Code')} "
                                   f"({len(errors)} of {len(keys)} objects of one request not deleted)")
            keys = [str(e["Key"]) for e in errors]
            time.sleep(min(_MAX_DELAY, _BASE_DELAY * 2 ** attempt) * (0.5 + random.random()))

    def _put_conditional(self, rel: str, data: bytes, what: str, **cond) -> bool:
        """A conditional PUT, retried. An attempt whose answer was lost (a reset after the server
        wrote) makes the next one fail its precondition against our own object: after a precondition
        failure on a retry, the object is read back, and holding exactly our bytes it was our write.
        (The callers' payloads are unique: a lease holds its holder id and a sequence number.)"""
        from botocore.exceptions import ClientError
        tries = 0

        def go():
            nonlocal tries
            tries += 1
            return s3_client().put_object(Bucket=self.bucket, Key=self._k(rel), Body=data, **cond)
        try:
            with_retries(go, f"{what} {self.url(rel)}")
            return True
        except ClientError as e:
            if _s3_code(e) not in _PRECONDITION:
                raise StorageError(f"cannot {what} {self.url(rel)}: {s3_reason(e)}") from e
        if tries > 1:
            cur = self._get_with_etag(rel)
            if cur is not None and cur[0] == data:
                log.info("%s %s: an earlier attempt whose answer was lost had written it", what, self.url(rel))
                return True
        return False

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        return self._put_conditional(rel, data, "create", IfNoneMatch="*")

    def replace_if(self, rel: str, data: bytes, expected: bytes) -> bool:
        cur = self._get_with_etag(rel)
        if cur is None or cur[0] != expected:
            return False
        return self._put_conditional(rel, data, "replace", IfMatch=cur[1])

    def cleanup_incomplete(self, prefix: str = "") -> int:
        """Abort multipart uploads left under this root by killed writers."""
        from botocore.exceptions import ClientError
        c = s3_client()
        n = 0
        kw = {"Bucket": self.bucket, "Prefix": self._k(prefix, prefix=True)}
        while True:
            r = with_retries(lambda: c.list_multipart_uploads(**kw), f"list uploads {self.uri}")
            for u in r.get("Uploads", []) or []:
                def abort(key=u["Key"], upload=u["UploadId"]):
                    try:
                        c.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
                    except ClientError as e:       # aborted by an attempt whose answer was lost
                        if _s3_code(e) != "NoSuchUpload":
                            raise
                with_retries(abort, f"abort upload s3://{self.bucket}/{u['Key']}")
                n += 1
            if not r.get("IsTruncated"):
                return n
            kw["KeyMarker"] = r["NextKeyMarker"]
            kw["UploadIdMarker"] = r["NextUploadIdMarker"]

    def check_writable(self) -> None:
        from botocore.exceptions import ClientError, NoCredentialsError
        probe = self._k(probe_path(uuid.uuid4().hex[:8]))
        try:
            with_retries(lambda: s3_client().put_object(Bucket=self.bucket, Key=probe, Body=b"ok"),
                         f"write {self.uri}")
            with_retries(lambda: s3_client().delete_object(Bucket=self.bucket, Key=probe), f"delete {self.uri}")
        except NoCredentialsError as e:
            raise StorageError(f"output {self.uri} is not writable: no AWS credentials found "
                               "(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)") from e
        except ClientError as e:
            raise StorageError(f"output {self.uri} is not writable: {s3_reason(e) or e} (check --out, "
                               "the bucket name and your credentials)") from e
        except StorageError as e:       # transient errors all along: the endpoint is unreachable
            raise StorageError(f"output {self.uri} is not writable: {e} (check --out and AWS_ENDPOINT_URL)") from e
        except Exception as e:  # endpoint unreachable etc.
            raise StorageError(f"output {self.uri} is not writable: {e} (check --out and AWS_ENDPOINT_URL)") from e


def _file_md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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



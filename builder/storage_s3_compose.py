"""S3Storage.compose: one object from byte ranges of others, by server-side part copies (registered by
builder/storage.py, which puts the storage implementations together)."""
from __future__ import annotations

import logging

from builder.storage_base import StorageError
from builder.storage_s3 import S3Storage, s3_client, s3_reason, with_retries

log = logging.getLogger(__name__)
MIN_PART = 5 << 20               # S3's smallest part (all but the last) ...
MAX_COPY = 1 << 30               # ... and the largest server-side copy we ask for in one part


def s3_compose(self: S3Storage, rel: str, pieces: list[tuple[str, int, int]]) -> None:
    """A multipart upload whose parts are UploadPartCopy of the pieces (server-side); a piece, or the
    tail of one, that would make a part under MIN_PART is read and re-uploaded instead, gathered in a
    buffer of at most MIN_PART bytes. Visible only once completed; aborted on failure."""
    from botocore.exceptions import ClientError
    pieces = [(r, s, e) for r, s, e in pieces if e > s]
    total = sum(e - s for _, s, e in pieces)
    what = f"write {self.url(rel)}"
    if total < MIN_PART:                     # small: one PUT
        self.write_bytes(rel, b"".join(self.read_range(r, s, e) for r, s, e in pieces))
        return
    c, key = s3_client(), self._k(rel)
    try:
        upload = with_retries(lambda: c.create_multipart_upload(Bucket=self.bucket, Key=key), what)["UploadId"]
    except ClientError as e:
        raise StorageError(f"cannot write {self.url(rel)}: {s3_reason(e)}") from e
    parts: list[dict] = []
    buf = bytearray()

    def put(body: bytes) -> None:
        n = len(parts) + 1
        r = with_retries(lambda: c.upload_part(Bucket=self.bucket, Key=key, UploadId=upload, PartNumber=n,
                                               Body=body), what)
        parts.append({"PartNumber": n, "ETag": r["ETag"]})

    def copy(src: str, start: int, end: int) -> None:
        n = len(parts) + 1
        r = with_retries(lambda: c.upload_part_copy(
            Bucket=self.bucket, Key=key, UploadId=upload, PartNumber=n,
            CopySource={"Bucket": self.bucket, "Key": self._k(src)},
            CopySourceRange=f"bytes={start}-{end - 1}"), what)
        parts.append({"PartNumber": n, "ETag": r["CopyPartResult"]["ETag"]})
    try:
        for src, s, e in pieces:
            while s < e:
                if not buf and e - s >= MIN_PART:     # a part of its own: copied on the server
                    n = min(e - s, MAX_COPY)
                    copy(src, s, s + n)
                else:
                    n = min(e - s, MIN_PART - len(buf))
                    buf += self.read_range(src, s, s + n)
                    if len(buf) >= MIN_PART:
                        put(bytes(buf))
                        buf.clear()
                s += n
        if buf:
            put(bytes(buf))
        with_retries(lambda: c.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload,
                                                         MultipartUpload={"Parts": parts}), what)
    except BaseException:
        try:
            c.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
        except Exception:       # cleanup_incomplete aborts what is left
            log.warning("%s: could not abort its multipart upload", what)
        raise

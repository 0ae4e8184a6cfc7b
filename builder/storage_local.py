"""Local storage (a path or file://): atomic writes by rename, a file lock for conditional writes."""
from __future__ import annotations

import fcntl
import glob
import os
import shutil
import uuid

from builder.layout import probe_path
from builder.storage_base import NotFound, Storage, StorageError, check_rel


class LocalStorage(Storage):
    def _p(self, rel: str, prefix: bool = False) -> str:
        return os.path.join(self.uri, check_rel(self.uri, rel, prefix))

    def _pw(self, rel: str, prefix: bool = False) -> str:
        """_p for a write or delete: also refused where a symlinked folder would take it out of the root
        (the last component is replaced or removed, never followed)."""
        path = self._p(rel, prefix)
        root = os.path.realpath(self.uri)
        d = os.path.realpath(os.path.dirname(path))
        if d != root and not d.startswith(root + os.sep):
            raise StorageError(f"storage path {rel!r} leads through a symlink to {d}, outside the datastore root "
                               f"{self.uri}: refused")
        return path

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

    def _write_aside(self, rel: str, fill) -> None:
        """fill(tmp) writes the new file aside, then it is renamed into place: atomic, readers see the
        old file or the whole new one. Its folder is made as needed."""
        path = self._pw(rel)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
            fill(tmp)
            os.replace(tmp, path)
        except OSError as e:
            raise StorageError(f"cannot write {path}: {e.strerror or e}") from e

    def write_bytes(self, rel: str, data: bytes) -> None:
        def fill(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        self._write_aside(rel, fill)

    def download_file(self, rel: str, path: str) -> None:
        try:
            shutil.copyfile(self._p(rel), path)
        except FileNotFoundError:
            raise NotFound(f"{self.url(rel)} does not exist") from None

    def upload_file(self, rel: str, path: str) -> None:
        self._write_aside(rel, lambda tmp: shutil.copyfile(path, tmp))

    COPY_CHUNK = 8 << 20

    def compose(self, rel: str, pieces: list[tuple[str, int, int]]) -> None:
        srcs = [(self._p(r), s, e) for r, s, e in pieces]
        for (r, _, _), (p, _, _) in zip(pieces, srcs):
            if not os.path.exists(p):
                raise NotFound(f"{self.url(r)} does not exist")

        def fill(tmp: str) -> None:
            with open(tmp, "wb") as out:
                for path, start, end in srcs:
                    with open(path, "rb") as f:
                        f.seek(start)
                        left = end - start
                        while left > 0:
                            block = f.read(min(left, self.COPY_CHUNK))
                            if not block:
                                raise OSError(f"{path} is shorter than {end} bytes")
                            out.write(block)
                            left -= len(block)
                out.flush()
                os.fsync(out.fileno())
        self._write_aside(rel, fill)

    def exists(self, rel: str) -> bool:
        return os.path.exists(self._p(rel))

    def list(self, prefix: str = "") -> list[str]:
        base = self._p(prefix, prefix=True)
        out = []
        if os.path.isdir(base):
            for d, _, files in os.walk(base):
                for f in files:
                    if ".tmp-" in f or f.endswith(".lock"):
                        continue
                    out.append(os.path.relpath(os.path.join(d, f), self.uri))
        return sorted(out)

    def delete(self, rel: str) -> None:
        path = self._pw(rel)
        for p in (path, path + ".lock"):
            try:
                os.remove(p)
            except FileNotFoundError:
                pass
        # prune directories left empty (local only; S3 has no directories)
        d = os.path.dirname(path)
        while d.startswith(self.uri + os.sep):
            try:
                os.rmdir(d)
            except OSError:
                break
            d = os.path.dirname(d)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        path = self._pw(rel)
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
        path = self._pw(rel)
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
        for p in glob.glob(os.path.join(self._pw(prefix, prefix=True), "**", "*.tmp-*"), recursive=True):
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



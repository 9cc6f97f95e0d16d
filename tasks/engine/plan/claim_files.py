"""One run's claim files in an output's ``_claims/`` folder: listed, created exclusively, renewed, removed."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from typing import Any

from fsspec.implementations.local import LocalFileSystem

__all__ = ["CLAIMS_DIR", "HOST", "TMP_PREFIX", "ClaimFiles"]

CLAIMS_DIR = "_claims"
TMP_PREFIX = ".tmp-"
HOST = socket.gethostname()


class ClaimFiles:
    """The claims folder of the output at ``root`` on ``fs``, as run ``run_id`` writes in it."""

    def __init__(self, fs: Any, root: str, run_id: str) -> None:
        self.fs = fs
        self.folder = f"{root}/{CLAIMS_DIR}"
        self.run_id = run_id

    def lease_path(self) -> str:
        return f"{self.folder}/run-{self.run_id}.json"

    def body(self, since: float, renewed: float | None = None) -> bytes:
        """A claim of this run: who holds it, since when, last renewed when (now by default)."""
        return json.dumps(
            {
                "run_id": self.run_id,
                "host": HOST,
                "pid": os.getpid(),
                "since": since,
                "renewed": time.time() if renewed is None else renewed,
            }
        ).encode()

    def names(self) -> list[str]:
        try:
            return [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.folder, detail=False)]
        except FileNotFoundError:
            return []

    def create(self, path: str, data: bytes) -> bool:
        """Exclusive create: False if the file exists. On local disk the content is written first and
        hard-linked into place (link fails if the name exists), so a claim is never seen half-written."""
        if isinstance(self.fs, LocalFileSystem):
            tmp = f"{self.folder}/{TMP_PREFIX}{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError:  # no hard links here (some network or FAT mounts): O_EXCL, then write
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            finally:
                os.unlink(tmp)
            return True
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def write(self, path: str, data: bytes) -> None:
        """Overwrite (renew): atomic on local disk (temporary file, then rename), a single PUT elsewhere."""
        if isinstance(self.fs, LocalFileSystem):
            tmp = f"{self.folder}/{TMP_PREFIX}{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            return
        self.fs.pipe_file(path, data)

    def remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

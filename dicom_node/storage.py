"""Durable instance storage: a received instance is on disk (fsynced, renamed into place) before we
answer Success, so a crash or power cut after the acknowledgement never loses it."""
from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

_SAFE = re.compile(r"[^0-9A-Za-z.\-]")


def _safe(name: str) -> str:
    """UIDs are safe path parts already; anything else is made so (never trust the wire)."""
    cleaned = _SAFE.sub("_", name.strip())[:128]
    return cleaned or "unknown"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes | memoryview) -> None:
    """Write to a temp file beside `path`, fsync it, rename it over `path`, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fdatasync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def digest(data: bytes) -> str:
    """Content fingerprint: tells an identical resend from a changed instance."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass(frozen=True)
class StoredInstance:
    path: Path
    digest: str
    size: int


class InstanceStore:
    """Files under ``root/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``; rejects go to ``quarantine``."""

    def __init__(self, root: Path, quarantine: Path) -> None:
        self.root = root
        self.quarantine = quarantine
        self.root.mkdir(parents=True, exist_ok=True)
        self.quarantine.mkdir(parents=True, exist_ok=True)

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return self.root / _safe(study_uid) / _safe(series_uid) / f"{_safe(sop_uid)}.dcm"

    def store(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> StoredInstance:
        path = self.path_for(study_uid, series_uid, sop_uid)
        write_durably(path, data)
        return StoredInstance(path=path, digest=digest(data), size=len(data))

    def keep_rejected(self, data: bytes, caller: str, reason: str) -> Path:
        """Keep a file we could not accept, with the reason beside it, for the admin to inspect."""
        stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{time.monotonic_ns() % 10**9:09d}"
        path = self.quarantine / f"{stamp}-{_safe(caller)}.dcm"
        write_durably(path, data)
        write_durably(path.with_suffix(".txt"), f"caller: {caller}\nreason: {reason}\n".encode())
        return path

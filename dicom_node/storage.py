"""Instance storage: one file per instance, renamed into place whole.

Received instances reach here from the ingest journal, which made them durable before Success went
back; the store writes them without a flush each and `sync` makes a whole batch durable at once
before the journal lets go of them.
"""
from __future__ import annotations

import ctypes
import os
import re
import time
from pathlib import Path

from blake3 import blake3

from lungnode.dicom_node.uids import checked_uid

_UNSAFE = re.compile(r"[^0-9A-Za-z\-]")


def _safe(name: str) -> str:
    """An AE title as part of a file name: letters, digits and dashes only (never trust the wire)."""
    return _UNSAFE.sub("_", name.strip())[:16] or "unknown"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes | memoryview, durable: bool = True) -> None:
    """Write to a temp file beside `path` and rename it over `path`: the file appears whole or not at
    all. ``durable``: fsync the file before the rename and the directory after it; without, a caller
    flushes a batch with `sync_filesystem`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fdatasync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


_libc = ctypes.CDLL(None, use_errno=True)


def sync_filesystem(path: Path) -> None:
    """Flush every file and directory written on the filesystem holding `path`: one journal commit for
    a batch of files, where fsync per file and per directory costs one each. Raises OSError when the
    kernel reports a write-back error (Linux >= 5.8)."""
    syncfs = getattr(_libc, "syncfs", None)
    if syncfs is None:  # not Linux
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def digest(data: bytes) -> str:
    """Content fingerprint: tells an identical resend from a changed instance. BLAKE3 (SIMD) takes
    0.07 ms a CT slice here where hashlib's fastest, SHA-256, takes 0.3 ms."""
    return blake3(data).hexdigest()


class InstanceStore:
    """Files under ``root/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``; rejects go to ``quarantine``."""

    def __init__(self, root: Path, quarantine: Path) -> None:
        self.root = root
        self.quarantine = quarantine
        self.root.mkdir(parents=True, exist_ok=True)
        self.quarantine.mkdir(parents=True, exist_ok=True)

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Where an instance is filed; InvalidUID when any of the three is not a UID. A UID is digits and
        dots with no empty component, so it can be no `..` nor a separator: the path cannot leave the root,
        and the receive path spends no file-system lookups proving it."""
        return self.series_dir(study_uid, series_uid) / f"{checked_uid('SOPInstanceUID', sop_uid)}.dcm"

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        """The folder of one received series; InvalidUID when either UID is not a UID."""
        return self.root / checked_uid("StudyInstanceUID", study_uid) / checked_uid("SeriesInstanceUID", series_uid)

    def sync(self) -> None:
        sync_filesystem(self.root)

    def keep_rejected(self, data: bytes, caller: str, reason: str) -> Path:
        """Keep a file we could not accept, with the reason beside it, for the admin to inspect."""
        stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{time.monotonic_ns() % 10**9:09d}"
        path = self.quarantine / f"{stamp}-{_safe(caller)}.dcm"
        write_atomically(path, data)
        write_atomically(path.with_suffix(".txt"), f"caller: {caller}\nreason: {reason}\n".encode())
        return path

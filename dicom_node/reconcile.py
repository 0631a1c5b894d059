"""Re-index received files that the job index lost (for example to a power cut between the fsynced
file and the index commit): the files on disk are the source of truth."""
from __future__ import annotations

import logging
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from lungnode.dicom_node.db import InstanceRecord, JobDB
from lungnode.dicom_node.storage import digest

log = logging.getLogger(__name__)


def reconcile(db: JobDB, incoming: Path) -> int:
    known = db.known_paths()
    added = 0
    for path in sorted(incoming.glob("*/*/*.dcm")):
        if str(path) in known:
            continue
        try:
            data = path.read_bytes()
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            db.record_instance(InstanceRecord.from_header(ds, path, digest(data), len(data), "(recovered)"))
            added += 1
        except (InvalidDicomError, OSError, AttributeError, ValueError) as exc:
            log.error("cannot re-index %s: %s", path, exc)
    if added:
        log.warning("re-indexed %d received files missing from the job index", added)
    return added

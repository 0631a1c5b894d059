"""Retention: received images and quarantined files are patient data kept only as long as they are
needed. The PACS holds the study; this node's copy serves processing, re-runs and the page's slice
viewer. After the configured days both go; the results (sent back into the study) and the audit trail
stay."""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass

from lungnode.dicom_node.db import JobDB
from lungnode.dicom_node.storage import InstanceStore
from lungnode.dicom_node.uids import checked_uid, inside

log = logging.getLogger(__name__)
DAY = 86400.0


@dataclass(frozen=True)
class Purged:
    studies: int
    instances: int
    quarantined: int


def purge_expired(db: JobDB, store: InstanceStore, days: float, now: float | None = None) -> Purged:
    """Delete the images of finished studies whose last image is older than ``days``, and quarantined
    files as old. Files go first, then their index rows: a crash in between leaves rows the next run
    purges again, never files that `reconcile` would take for new arrivals."""
    cutoff = (time.time() if now is None else now) - days * DAY
    studies = instances = 0
    for study_uid in db.studies_to_purge(cutoff):
        try:
            folder = inside(store.root, store.root / checked_uid("StudyInstanceUID", study_uid))
        except ValueError as exc:  # indexed by a version that did not check UIDs: left for the admin
            log.error("retention: study %r skipped: %s", study_uid[:64], exc)
            continue
        for path in db.instance_paths(study_uid):  # files filed elsewhere by an older version, if any
            inside(store.root, path).unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        instances += db.forget_instances(study_uid)
        studies += 1
    quarantined = 0
    for path in store.quarantine.iterdir():
        if path.is_file() and path.stat().st_mtime < cutoff:
            path.unlink(missing_ok=True)
            quarantined += path.suffix == ".dcm"
    if studies or quarantined:
        log.info("retention (%g days): images of %d study(ies) (%d instances) and %d quarantined file(s) deleted",
                 days, studies, instances, quarantined)
    return Purged(studies, instances, quarantined)

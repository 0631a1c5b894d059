"""Retention: a finished study's received images and old quarantined files are deleted after the
configured days; its results and its row on the worklist stay; a re-run is refused once they are gone."""
from __future__ import annotations

import os
import time

from lungnode.dicom_node.db import DONE, QUEUED, InstanceRecord, JobDB
from lungnode.dicom_node.retention import DAY, Purged, purge_expired
from lungnode.dicom_node.storage import InstanceStore


def _receive(db: JobDB, store: InstanceStore, study: str, n: int, when: float) -> list:
    paths = []
    for i in range(n):
        path = store.path_for(study, f"{study}.1", f"{study}.1.{i}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"slice")
        db.record_instance(InstanceRecord(f"{study}.1.{i}", study, f"{study}.1", "1.2.840.10008.5.1.4.1.1.2", path,
                                          "d", 5, "PACS"), now=when)
        paths.append(path)
    return paths


def _finish(db: JobDB, study: str) -> None:
    db.queue_stable_studies(0, now=time.time() + 1)
    while (claimed := db.claim_next()) is not None:
        db.finish(claimed.study_uid, DONE, reason=None, series_uid=None, model="m", findings=0, seconds=1)


def test_old_finished_studies_lose_their_images_and_keep_their_results(tmp_path):
    db = JobDB(tmp_path / "db.sqlite3")
    store = InstanceStore(tmp_path / "incoming", tmp_path / "quarantine")
    now = time.time()
    old = _receive(db, store, "1.2.3", 3, now - 40 * DAY)
    recent = _receive(db, store, "1.2.4", 2, now - 2 * DAY)
    _finish(db, "1.2.3")
    still_receiving = _receive(db, store, "1.2.5", 1, now - 90 * DAY)
    db.queue_stable_studies(0, now=now)  # ... 1.2.5 is queued, not finished: it is kept
    results = tmp_path / "results" / "1.2.3" / "v1"
    results.mkdir(parents=True)
    (results / "result.json").write_text("{}")
    stale, fresh = tmp_path / "quarantine" / "a.dcm", tmp_path / "quarantine" / "b.dcm"
    for path, age in ((stale, 31), (fresh, 1)):
        path.write_bytes(b"rejected")
        os.utime(path, (now - age * DAY, now - age * DAY))

    assert purge_expired(db, store, days=30, now=now) == Purged(studies=1, instances=3, quarantined=1)
    assert not any(p.exists() for p in old) and not (tmp_path / "incoming" / "1.2.3").exists()
    assert all(p.exists() for p in recent + still_receiving) and fresh.exists() and not stale.exists()
    assert db.instance_paths("1.2.3") == [] and db.study("1.2.3").state == DONE  # still on the worklist
    assert (results / "result.json").exists()
    assert not db.requeue("1.2.3")  # nothing left to read
    assert db.study("1.2.5").state == QUEUED  # not finished: its images stay, however old
    assert purge_expired(db, store, days=30, now=now) == Purged(0, 0, 0)

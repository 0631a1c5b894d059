"""The study state machine and the results outbox in SQLite, across restarts."""
from __future__ import annotations

import sqlite3
from pathlib import Path

from lungnode.dicom_node.db import (
    DICOM, DONE, FAILED, FHIR, HL7, PENDING, PROCESSING, QUEUED, RECEIVING, SENT, SUPERSEDED, InstanceRecord, JobDB,
)


def rec(sop: str, study: str = "1.2.3", digest: str = "d") -> InstanceRecord:
    return InstanceRecord(sop_uid=sop, study_uid=study, series_uid="1.2.3.4", sop_class_uid="ct",
                          path=Path(f"/x/{sop}.dcm"), digest=digest, size=1, caller="PACS", accession="A1")


def test_study_is_queued_after_quiet_time_and_processed_once(tmp_path):
    db = JobDB(tmp_path / "j.sqlite3")
    db.record_instance(rec("1"), now=100.0)
    db.record_instance(rec("2"), now=105.0)
    assert db.queue_stable_studies(10, now=110.0) == []  # still receiving
    assert db.queue_stable_studies(10, now=115.0) == ["1.2.3"]
    study = db.claim_next()
    assert study.state == PROCESSING and db.claim_next() is None
    assert db.finish("1.2.3", DONE, reason=None, series_uid="1.2.3.4", model="m", findings=2, seconds=1) == 1
    assert db.study("1.2.3").state == DONE and db.study("1.2.3").version == 1


def test_late_instance_reopens_and_stale_result_is_dropped(tmp_path):
    db = JobDB(tmp_path / "j.sqlite3")
    db.record_instance(rec("1"), now=100.0)
    db.queue_stable_studies(1, now=200.0)
    db.claim_next()
    db.record_instance(rec("2"), now=201.0)  # arrives while processing
    assert db.study("1.2.3").state == RECEIVING
    assert db.finish("1.2.3", DONE, reason=None, series_uid=None, model="m", findings=0, seconds=1) is None
    assert db.study("1.2.3").version == 0
    db.queue_stable_studies(1, now=300.0)
    db.claim_next()
    assert db.finish("1.2.3", DONE, reason=None, series_uid=None, model="m", findings=0, seconds=1) == 1
    db.record_instance(rec("3"), now=400.0)  # after results: processed again as version 2
    db.queue_stable_studies(1, now=500.0)
    db.claim_next()
    assert db.finish("1.2.3", DONE, reason=None, series_uid=None, model="m", findings=0, seconds=1) == 2


def test_identical_resend_changes_nothing(tmp_path):
    db = JobDB(tmp_path / "j.sqlite3")
    assert db.record_instance(rec("1"), now=100.0)
    db.queue_stable_studies(1, now=200.0)
    assert not db.record_instance(rec("1"), now=300.0)
    assert db.study("1.2.3").state == QUEUED
    assert db.record_instance(rec("1", digest="changed"), now=300.0)
    assert db.study("1.2.3").state == RECEIVING


def test_processing_study_is_requeued_after_restart_and_fails_after_retries(tmp_path):
    path = tmp_path / "j.sqlite3"
    db = JobDB(path)
    db.record_instance(rec("1"), now=100.0)
    db.queue_stable_studies(1, now=200.0)
    db.claim_next()
    db.close()  # the node died while processing
    db = JobDB(path)
    assert db.recover_after_restart() == 1 and db.study("1.2.3").state == QUEUED
    for _ in range(3):
        db.claim_next()
        db.fail("1.2.3", "RuntimeError: boom", max_attempts=3)
    assert db.study("1.2.3").state == FAILED and "boom" in db.study("1.2.3").reason


def test_outbox_survives_restart_retries_and_supersedes_old_versions(tmp_path):
    path = tmp_path / "j.sqlite3"
    db = JobDB(path)
    first = db.add_delivery("1.2.3", 1, "PACS@h:104", tmp_path / "v1")
    db.delivery_failed(first, "connection refused", retry_at=1e12)
    assert db.due_deliveries() == []  # waiting for its retry time
    db.close()
    db = JobDB(path)
    d = db.due_deliveries(now=2e12)[0]
    assert (d.id, d.attempts, d.last_error) == (first, 1, "connection refused")
    second = db.add_delivery("1.2.3", 2, "PACS@h:104", tmp_path / "v2")
    states = {x.id: x.state for x in db.deliveries("1.2.3")}
    assert states == {first: SUPERSEDED, second: PENDING}
    db.delivery_sent(second)
    assert db.deliveries("1.2.3")[-1].state == SENT and db.pending_count() == 0


def test_deliveries_have_a_kind_and_an_old_database_is_migrated(tmp_path):
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)  # the outbox as it was before RIS delivery: no kind column
    old.executescript(
        "CREATE TABLE deliveries(id INTEGER PRIMARY KEY AUTOINCREMENT, study_uid TEXT NOT NULL, "
        "version INTEGER NOT NULL, destination TEXT NOT NULL, path TEXT NOT NULL, state TEXT NOT NULL DEFAULT "
        "'pending', attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL, last_error TEXT, "
        "created REAL NOT NULL, sent_at REAL);"
        "INSERT INTO deliveries(study_uid, version, destination, path, next_attempt, created) "
        "VALUES('1.2.3', 1, 'PACS@h:104', '/r/v1', 0, 0);")
    old.close()
    db = JobDB(path)
    (pacs,) = db.deliveries("1.2.3")
    assert (pacs.kind, pacs.destination, pacs.state) == (DICOM, "PACS@h:104", PENDING)
    ris = db.add_delivery("1.2.3", 2, "HL7 ris:2575", tmp_path / "v2", HL7)
    fhir = db.add_delivery("1.2.3", 2, "FHIR http://fhir/r4", tmp_path / "v2", FHIR)
    assert [(d.kind, d.state) for d in db.deliveries("1.2.3")] == [(DICOM, PENDING), (HL7, PENDING), (FHIR, PENDING)]
    db.add_delivery("1.2.3", 3, "HL7 ris:2575", tmp_path / "v3", HL7)  # supersedes only the HL7 row
    states = {d.id: d.state for d in db.deliveries("1.2.3")}
    assert (states[pacs.id], states[ris], states[fhir]) == (PENDING, SUPERSEDED, PENDING)
    db.close()
    assert JobDB(path).deliveries("1.2.3")[-1].kind == HL7  # reopening does not migrate twice

"""Job state in SQLite: received instances, the study state machine, and the results outbox.

Study states: receiving -> queued (quiet for stable_seconds) -> processing -> done | not_processed | failed.
An instance that arrives later sends the study back to receiving; it is processed again as a new version.
The instance files are the source of truth: `reconcile` re-indexes any file the index lost.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom


SCHEMA = """
CREATE TABLE IF NOT EXISTS studies(
  study_uid TEXT PRIMARY KEY,
  patient_id TEXT, patient_name TEXT, accession TEXT, study_date TEXT, description TEXT,
  first_received REAL NOT NULL, last_received REAL NOT NULL,
  state TEXT NOT NULL,
  version INTEGER NOT NULL DEFAULT 0,
  attempts INTEGER NOT NULL DEFAULT 0,
  reason TEXT, processed_at REAL, series_uid TEXT, model TEXT, findings INTEGER, seconds REAL
);
CREATE TABLE IF NOT EXISTS instances(
  sop_uid TEXT PRIMARY KEY,
  study_uid TEXT NOT NULL, series_uid TEXT NOT NULL, sop_class_uid TEXT,
  path TEXT NOT NULL, digest TEXT, size INTEGER, caller TEXT, received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);
CREATE TABLE IF NOT EXISTS deliveries(
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  study_uid TEXT NOT NULL, version INTEGER NOT NULL, destination TEXT NOT NULL, path TEXT NOT NULL,
  kind TEXT NOT NULL DEFAULT 'dicom',
  state TEXT NOT NULL DEFAULT 'pending',
  attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL, last_error TEXT,
  created REAL NOT NULL, sent_at REAL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, next_attempt);
CREATE TABLE IF NOT EXISTS delivered_instances(
  delivery_id INTEGER NOT NULL, sop_uid TEXT NOT NULL, PRIMARY KEY(delivery_id, sop_uid)
);
CREATE TABLE IF NOT EXISTS verifications(
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  study_uid TEXT NOT NULL, reviewed_version INTEGER NOT NULL, user TEXT NOT NULL, completed_at REAL NOT NULL,
  state TEXT NOT NULL DEFAULT 'pending', version INTEGER, reason TEXT, created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS verifications_study ON verifications(study_uid, state);
"""

RECEIVING, QUEUED, PROCESSING, DONE, NOT_PROCESSED, FAILED = (
    "receiving", "queued", "processing", "done", "not_processed", "failed")
PENDING, SENT, SUPERSEDED = "pending", "sent", "superseded"
# Delivery kinds: DICOM objects by C-STORE to the PACS, an HL7 ORU over MLLP or a FHIR Bundle to the RIS.
DICOM, HL7, FHIR = "dicom", "hl7", "fhir"
# A verified version asked for by a completed review: pending -> made (its version) | dropped (why).
MADE, DROPPED = "made", "dropped"


@dataclass(frozen=True)
class InstanceRecord:
    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    path: Path
    digest: str
    size: int
    caller: str
    patient_id: str = ""
    patient_name: str = ""
    accession: str = ""
    study_date: str = ""
    description: str = ""

    @classmethod
    def from_header(cls, ds: pydicom.Dataset, path: Path, digest: str, size: int, caller: str) -> "InstanceRecord":
        return cls(
            sop_uid=str(ds.SOPInstanceUID), study_uid=str(ds.StudyInstanceUID),
            series_uid=str(ds.SeriesInstanceUID), sop_class_uid=str(ds.SOPClassUID), path=path,
            digest=digest, size=size, caller=caller,
            patient_id=str(ds.get("PatientID", "")), patient_name=str(ds.get("PatientName", "")),
            accession=str(ds.get("AccessionNumber", "")), study_date=str(ds.get("StudyDate", "")),
            description=str(ds.get("StudyDescription", "")))


@dataclass(frozen=True)
class Study:
    study_uid: str
    patient_id: str
    patient_name: str
    accession: str
    study_date: str
    description: str
    first_received: float
    last_received: float
    state: str
    version: int
    attempts: int
    reason: str | None
    processed_at: float | None
    series_uid: str | None
    model: str | None
    findings: int | None
    seconds: float | None


@dataclass(frozen=True)
class Delivery:
    id: int
    study_uid: str
    version: int
    destination: str  # human-readable: "AET@host:port", "HL7 host:port", "FHIR <base URL>"
    kind: str  # DICOM, HL7 or FHIR
    path: Path
    state: str
    attempts: int
    next_attempt: float
    last_error: str | None


@dataclass(frozen=True)
class VerificationJob:
    """A verified results version to make from the completed review of `reviewed_version`."""

    id: int
    study_uid: str
    reviewed_version: int
    user: str  # who completed the review
    completed_at: float
    state: str  # PENDING, MADE or DROPPED
    version: int | None  # the version made
    reason: str | None  # why it was dropped
    created: float


class JobDB:
    """Thread-safe access to the state database (one connection, serialised by a lock)."""

    def __init__(self, path: Path) -> None:
        # NORMAL in WAL mode survives a process crash; after a power cut `reconcile` re-indexes files.
        self._conn, self._lock = open_database(path, "NORMAL")
        with self._lock:
            self._conn.executescript(SCHEMA)
            columns = {r["name"] for r in self._conn.execute("PRAGMA table_info(deliveries)")}
            if "kind" not in columns:  # a database from before RIS delivery: all its rows went to the PACS
                self._conn.execute(f"ALTER TABLE deliveries ADD COLUMN kind TEXT NOT NULL DEFAULT '{DICOM}'")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _tx(self) -> Transaction:
        return Transaction(self._lock, self._conn)

    # --- receiving ---------------------------------------------------------------------------
    def record_instance(self, rec: InstanceRecord, now: float | None = None) -> bool:
        """Index a stored instance. Returns False when it is an identical resend (nothing changes)."""
        now = time.time() if now is None else now
        with self._tx() as c:
            row = c.execute("SELECT digest FROM instances WHERE sop_uid=?", (rec.sop_uid,)).fetchone()
            if row is not None and row["digest"] == rec.digest:
                return False
            c.execute(
                "INSERT OR REPLACE INTO instances VALUES(?,?,?,?,?,?,?,?,?)",
                (rec.sop_uid, rec.study_uid, rec.series_uid, rec.sop_class_uid, str(rec.path),
                 rec.digest, rec.size, rec.caller, now),
            )
            c.execute(
                """INSERT INTO studies(study_uid, patient_id, patient_name, accession, study_date, description,
                                       first_received, last_received, state)
                   VALUES(?,?,?,?,?,?,?,?,?)
                   ON CONFLICT(study_uid) DO UPDATE SET last_received=excluded.last_received,
                       state=excluded.state, reason=NULL""",
                (rec.study_uid, rec.patient_id, rec.patient_name, rec.accession, rec.study_date,
                 rec.description, now, now, RECEIVING),
            )
            return True

    def known_paths(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._conn.execute("SELECT path FROM instances")}

    def instance_paths(self, study_uid: str, series_uid: str | None = None) -> list[Path]:
        """The study's instance files, or only those of one series."""
        sql, args = "SELECT path FROM instances WHERE study_uid=?", [study_uid]
        if series_uid is not None:
            sql, args = sql + " AND series_uid=?", args + [series_uid]
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY path", args).fetchall()
        return [Path(r[0]) for r in rows]

    # --- study state machine -------------------------------------------------------------------
    def queue_stable_studies(self, stable_seconds: float, now: float | None = None) -> list[str]:
        """Receiving studies quiet for `stable_seconds` become queued for processing."""
        cutoff = (time.time() if now is None else now) - stable_seconds
        with self._tx() as c:
            rows = c.execute("SELECT study_uid FROM studies WHERE state=? AND last_received<=?",
                             (RECEIVING, cutoff)).fetchall()
            for r in rows:
                c.execute("UPDATE studies SET state=? WHERE study_uid=?", (QUEUED, r[0]))
        return [r[0] for r in rows]

    def claim_next(self) -> Study | None:
        with self._tx() as c:
            row = c.execute("SELECT study_uid FROM studies WHERE state=? ORDER BY last_received LIMIT 1",
                            (QUEUED,)).fetchone()
            if row is None:
                return None
            c.execute("UPDATE studies SET state=?, attempts=attempts+1 WHERE study_uid=?",
                      (PROCESSING, row[0]))
        return self.study(row[0])

    def finish(self, study_uid: str, state: str, *, reason: str | None, series_uid: str | None,
               model: str | None, findings: int | None, seconds: float) -> int | None:
        """Record a result. Returns the new results version, or None when the study was reopened
        (more instances arrived) while it was processed, so this result is stale."""
        with self._tx() as c:
            row = c.execute("SELECT state, version FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
            if row is None or row["state"] != PROCESSING:
                return None
            version = row["version"] + 1
            c.execute(
                """UPDATE studies SET state=?, version=?, reason=?, processed_at=?, series_uid=?, model=?,
                   findings=?, seconds=?, attempts=0 WHERE study_uid=?""",
                (state, version, reason, time.time(), series_uid, model, findings, seconds, study_uid),
            )
            return version

    # --- verified versions (from a radiologist's completed review) -----------------------------------
    def request_verification(self, study_uid: str, reviewed_version: int, user: str, completed_at: float) -> int:
        """Queue a verified version of the study; one still pending for it is dropped (this one replaces it)."""
        now = time.time()
        with self._tx() as c:
            c.execute("UPDATE verifications SET state=?, reason=? WHERE study_uid=? AND state=?",
                      (DROPPED, "the review was completed again", study_uid, PENDING))
            cur = c.execute("INSERT INTO verifications(study_uid, reviewed_version, user, completed_at, created) "
                            "VALUES(?,?,?,?,?)", (study_uid, reviewed_version, user, completed_at, now))
            return int(cur.lastrowid)

    def next_verification(self) -> VerificationJob | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM verifications WHERE state=? ORDER BY id LIMIT 1",
                                     (PENDING,)).fetchone()
        return VerificationJob(**dict(row)) if row else None

    def reviewable_version(self, study: Study) -> int:
        """The results version a review of the study is about: the latest, or the one the latest (verified)
        version was made from."""
        made = self.verified_version(study.study_uid, study.version)
        return made.reviewed_version if made else study.version

    def verified_version(self, study_uid: str, version: int) -> VerificationJob | None:
        """The verification that made results `version` of the study, None for the model's results."""
        with self._lock:
            row = self._conn.execute("SELECT * FROM verifications WHERE study_uid=? AND state=? AND version=?",
                                     (study_uid, MADE, version)).fetchone()
        return VerificationJob(**dict(row)) if row else None

    def current_verifications(self) -> dict[str, VerificationJob]:
        """By study: the verification that made its latest version (studies whose latest is verified)."""
        with self._lock:
            rows = self._conn.execute("SELECT v.* FROM verifications v JOIN studies s ON s.study_uid=v.study_uid "
                                      "AND s.version=v.version WHERE v.state=?", (MADE,)).fetchall()
        return {r["study_uid"]: VerificationJob(**dict(r)) for r in rows}

    def last_verification(self, study_uid: str, reviewed_version: int) -> VerificationJob | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM verifications WHERE study_uid=? AND reviewed_version=? "
                                     "ORDER BY id DESC LIMIT 1", (study_uid, reviewed_version)).fetchone()
        return VerificationJob(**dict(row)) if row else None

    def finish_verification(self, job_id: int, version: int, findings: int) -> bool:
        """Record the verified version `version` as the study's latest, when the study still stands where
        the review left it: done, its latest version the reviewed one or made from it, `version` the next.
        False (the job dropped) when it moved on meanwhile."""
        with self._tx() as c:
            job = VerificationJob(**dict(c.execute("SELECT * FROM verifications WHERE id=?", (job_id,)).fetchone()))
            s = c.execute("SELECT state, version FROM studies WHERE study_uid=?", (job.study_uid,)).fetchone()
            made = c.execute("SELECT reviewed_version FROM verifications WHERE study_uid=? AND state=? AND version=?",
                             (job.study_uid, MADE, s["version"])).fetchone() if s else None
            reviewable = made["reviewed_version"] if made else s["version"] if s else None
            if s is None or s["state"] != DONE or reviewable != job.reviewed_version or version != s["version"] + 1:
                c.execute("UPDATE verifications SET state=?, reason=? WHERE id=?",
                          (DROPPED, "the study has newer images or results than the review", job_id))
                return False
            c.execute("UPDATE studies SET version=?, findings=?, processed_at=?, reason=NULL WHERE study_uid=?",
                      (version, findings, time.time(), job.study_uid))
            c.execute("UPDATE verifications SET state=?, version=? WHERE id=?", (MADE, version, job_id))
            return True

    def drop_verification(self, job_id: int, reason: str) -> None:
        with self._tx() as c:
            c.execute("UPDATE verifications SET state=?, reason=? WHERE id=?", (DROPPED, reason, job_id))

    def fail(self, study_uid: str, reason: str, max_attempts: int = 3) -> None:
        """A processing error: retry later up to `max_attempts`, then mark failed with the reason."""
        with self._tx() as c:
            c.execute(
                "UPDATE studies SET state=CASE WHEN attempts>=? THEN ? ELSE ? END, reason=? "
                "WHERE study_uid=? AND state=?",
                (max_attempts, FAILED, QUEUED, reason, study_uid, PROCESSING),
            )

    def requeue(self, study_uid: str) -> bool:
        """Process a study again (re-run button / API); not while it is processed, nor once its images
        were purged."""
        with self._tx() as c:
            cur = c.execute("UPDATE studies SET state=?, attempts=0 WHERE study_uid=? AND state!=? "
                            "AND EXISTS (SELECT 1 FROM instances WHERE study_uid=?)",
                            (QUEUED, study_uid, PROCESSING, study_uid))
            return cur.rowcount == 1

    # --- retention -----------------------------------------------------------------------------
    def studies_to_purge(self, received_before: float) -> list[str]:
        """Finished studies (done, not processed, failed) whose last image came before the cutoff and
        whose images are still here."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT study_uid FROM studies WHERE state IN (?,?,?) AND last_received<? "
                "AND EXISTS (SELECT 1 FROM instances i WHERE i.study_uid=studies.study_uid)",
                (DONE, NOT_PROCESSED, FAILED, received_before)).fetchall()
        return [r[0] for r in rows]

    def forget_instances(self, study_uid: str) -> int:
        """Drop a study's instances from the index (their files are gone); the study and its results stay."""
        with self._tx() as c:
            return c.execute("DELETE FROM instances WHERE study_uid=?", (study_uid,)).rowcount

    def recover_after_restart(self) -> int:
        """Studies that were being processed when the node stopped go back to the queue."""
        with self._tx() as c:
            return c.execute("UPDATE studies SET state=? WHERE state=?", (QUEUED, PROCESSING)).rowcount

    def study(self, study_uid: str) -> Study | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
        return Study(**dict(row)) if row else None

    def studies(self, limit: int = 200) -> list[Study]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM studies ORDER BY last_received DESC LIMIT ?", (limit,)).fetchall()
        return [Study(**dict(r)) for r in rows]

    # --- outbox --------------------------------------------------------------------------------
    def add_delivery(self, study_uid: str, version: int, destination: str, path: Path, kind: str = DICOM) -> int:
        """Queue results for a destination; older undelivered versions for it are superseded."""
        now = time.time()
        with self._tx() as c:
            c.execute("UPDATE deliveries SET state=? WHERE study_uid=? AND destination=? AND state=?",
                      (SUPERSEDED, study_uid, destination, PENDING))
            cur = c.execute(
                "INSERT INTO deliveries(study_uid, version, destination, kind, path, next_attempt, created) "
                "VALUES(?,?,?,?,?,?,?)", (study_uid, version, destination, kind, str(path), now, now))
            return int(cur.lastrowid)

    def due_deliveries(self, now: float | None = None) -> list[Delivery]:
        now = time.time() if now is None else now
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM deliveries WHERE state=? AND next_attempt<=? ORDER BY id", (PENDING, now)
            ).fetchall()
        return [_delivery(r) for r in rows]

    def deliveries(self, study_uid: str) -> list[Delivery]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM deliveries WHERE study_uid=? ORDER BY id", (study_uid,)).fetchall()
        return [_delivery(r) for r in rows]

    def pending_by_study(self) -> dict[str, int]:
        """Pending deliveries per study, in one query (the worklist polls it)."""
        with self._lock:
            rows = self._conn.execute("SELECT study_uid, COUNT(*) FROM deliveries WHERE state=? GROUP BY study_uid",
                                      (PENDING,)).fetchall()
        return {r[0]: r[1] for r in rows}

    def pending_count(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM deliveries WHERE state=?", (PENDING,)).fetchone()[0]

    def delivery_sent(self, delivery_id: int) -> None:
        with self._tx() as c:
            c.execute("UPDATE deliveries SET state=?, sent_at=?, attempts=attempts+1, last_error=NULL "
                      "WHERE id=?", (SENT, time.time(), delivery_id))

    def delivery_failed(self, delivery_id: int, error: str, retry_at: float) -> None:
        with self._tx() as c:
            c.execute("UPDATE deliveries SET attempts=attempts+1, last_error=?, next_attempt=? WHERE id=?",
                      (error, retry_at, delivery_id))

    def instance_delivered(self, delivery_id: int, sop_uid: str) -> None:
        """The destination acknowledged this instance of the delivery: a retry does not send it again."""
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO delivered_instances(delivery_id, sop_uid) VALUES(?,?)",
                      (delivery_id, sop_uid))

    def delivered_instances(self, delivery_id: int) -> set[str]:
        with self._lock:
            rows = self._conn.execute("SELECT sop_uid FROM delivered_instances WHERE delivery_id=?",
                                      (delivery_id,)).fetchall()
        return {r[0] for r in rows}

    def previous_sent(self, study_uid: str, destination: str, before_version: int) -> list[Delivery]:
        """Delivered results of older versions (to remove from a PACS that allows it)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM deliveries WHERE study_uid=? AND destination=? AND state=? AND version<?",
                (study_uid, destination, SENT, before_version)).fetchall()
        return [_delivery(r) for r in rows]


def _delivery(row: sqlite3.Row) -> Delivery:
    d = dict(row)
    return Delivery(id=d["id"], study_uid=d["study_uid"], version=d["version"], destination=d["destination"],
                    kind=d["kind"], path=Path(d["path"]), state=d["state"], attempts=d["attempts"],
                    next_attempt=d["next_attempt"], last_error=d["last_error"])


def open_database(path: Path, synchronous: str) -> tuple[sqlite3.Connection, threading.RLock]:
    """One WAL-mode connection shared by the node's threads (autocommit: writes go through Transaction),
    and the lock that serialises them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn, threading.RLock()


class Transaction:
    """BEGIN IMMEDIATE ... COMMIT on a shared connection under its lock; ROLLBACK on error."""

    def __init__(self, lock, conn: sqlite3.Connection) -> None:
        self.lock, self.conn = lock, conn

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.lock.release()



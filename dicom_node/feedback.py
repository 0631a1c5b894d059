"""The radiologist's feedback on a study's results, kept in SQLite (`feedback.sqlite3` beside the job
database): a verdict per finding (confirmed, or rejected with a reason), nodules the model missed that
the radiologist added on a slice, and "review complete". Each is stored for one study and one results
version, with who wrote it and when; a write is committed before the caller answers.

The node's web API writes it, `lungnode train import feedback` reads it (the node need not run): this
module depends on nothing above the DICOM node layer. A change to a completed review reopens it, so
"complete" always means every finding of that version has a verdict as it stands.
"""
from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, get_args

from lungnode.dicom_node.db import Transaction, open_database

Verdict = Literal["confirmed", "rejected"]
CONFIRMED, REJECTED = get_args(Verdict)
# Why a finding is not a nodule: the fixed list the page offers ("other" needs a free text).
Reason = Literal["vessel", "airway", "scar", "outside_lung", "artefact", "other"]
REASONS: tuple[Reason, ...] = get_args(Reason)
OTHER: Reason = "other"
MAX_TEXT = 500
FEEDBACK_FILE = "feedback.sqlite3"  # in the node's data folder

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts(
  study_uid TEXT NOT NULL, version INTEGER NOT NULL, finding INTEGER NOT NULL,
  verdict TEXT NOT NULL, reason TEXT, reason_text TEXT,
  box_mm TEXT NOT NULL, diameter_mm REAL NOT NULL, score REAL NOT NULL,
  user TEXT NOT NULL, at REAL NOT NULL,
  PRIMARY KEY(study_uid, version, finding));
CREATE TABLE IF NOT EXISTS added_nodules(
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  study_uid TEXT NOT NULL, version INTEGER NOT NULL,
  x_mm REAL NOT NULL, y_mm REAL NOT NULL, z_mm REAL NOT NULL, diameter_mm REAL NOT NULL,
  sop_uid TEXT NOT NULL, slice INTEGER NOT NULL, column_px REAL NOT NULL, row_px REAL NOT NULL,
  user TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS added_study ON added_nodules(study_uid, version);
CREATE TABLE IF NOT EXISTS reviews(
  study_uid TEXT NOT NULL, version INTEGER NOT NULL, series_uid TEXT NOT NULL, findings INTEGER NOT NULL,
  completed_by TEXT NOT NULL, completed_at REAL NOT NULL,
  PRIMARY KEY(study_uid, version));
"""


class FeedbackError(ValueError):
    """A write the store refuses, with what to do instead."""


@dataclass(frozen=True)
class FindingVerdict:
    """The verdict on finding N<finding>, with the finding as judged (its box in LPS mm)."""

    study_uid: str
    version: int
    finding: int
    verdict: Verdict
    reason: Reason | None
    reason_text: str | None
    box_mm: tuple[float, float, float, float, float, float]  # xmin, ymin, zmin, xmax, ymax, zmax
    diameter_mm: float
    score: float
    user: str
    at: float


@dataclass(frozen=True)
class Click:
    """Where on the processed series a nodule was marked: slice index and image pixel position."""

    slice: int
    column_px: float
    row_px: float


@dataclass(frozen=True)
class AddedNodule:
    """A nodule the model missed, marked by the radiologist on slice `sop_uid` (at `click`)."""

    id: int
    study_uid: str
    version: int
    center_mm: tuple[float, float, float]  # LPS
    diameter_mm: float
    sop_uid: str
    click: Click
    user: str
    at: float


@dataclass(frozen=True)
class ReviewCompletion:
    study_uid: str
    version: int
    series_uid: str
    findings: int
    completed_by: str
    completed_at: float


@dataclass(frozen=True)
class Review:
    """Everything recorded for one study and results version."""

    study_uid: str
    version: int
    verdicts: list[FindingVerdict]
    added: list[AddedNodule]
    completion: ReviewCompletion | None

    @property
    def confirmed(self) -> int:
        return sum(v.verdict == CONFIRMED for v in self.verdicts)

    @property
    def rejected(self) -> int:
        return sum(v.verdict == REJECTED for v in self.verdicts)

    @property
    def started(self) -> bool:
        return bool(self.verdicts or self.added or self.completion)


@dataclass(frozen=True)
class ReviewCounts:
    """A review as the worklist shows it."""

    version: int
    confirmed: int
    rejected: int
    added: int
    complete: bool


def check_verdict(verdict: str, reason: str | None, reason_text: str | None) -> tuple[Reason | None, str | None]:
    """The reason fields as stored: none for a confirmed finding; a listed reason for a rejected one,
    with a text for "other"."""
    text = (reason_text or "").strip() or None
    if verdict == CONFIRMED:
        return None, None
    if verdict != REJECTED:
        raise FeedbackError(f"a verdict is {CONFIRMED!r} or {REJECTED!r}, got {verdict!r}")
    if reason not in REASONS:
        raise FeedbackError(f"a rejected finding needs a reason, one of {', '.join(REASONS)}")
    if reason == OTHER and text is None:
        raise FeedbackError("the reason 'other' needs a few words in reason_text")
    if text is not None and len(text) > MAX_TEXT:
        raise FeedbackError(f"reason_text is at most {MAX_TEXT} characters")
    return reason, text if reason == OTHER else None


class FeedbackStore:
    """Thread-safe access to the feedback database (one connection, serialised by a lock)."""

    def __init__(self, path: Path) -> None:
        self._conn, self._lock = open_database(path, "FULL")  # a radiologist's work is not redone lightly
        with self._lock:
            self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _tx(self):
        return Transaction(self._lock, self._conn)

    # --- writes (each one transaction, committed on return) ------------------------------------
    def set_verdict(self, v: FindingVerdict) -> FindingVerdict:
        """Record (or replace) the verdict on a finding, stamped now; returns it as stored."""
        reason, text = check_verdict(v.verdict, v.reason, v.reason_text)
        v = replace(v, reason=reason, reason_text=text, at=time.time())
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO verdicts VALUES(?,?,?,?,?,?,?,?,?,?,?)",
                      (v.study_uid, v.version, v.finding, v.verdict, reason, text, json.dumps(list(v.box_mm)),
                       v.diameter_mm, v.score, v.user, v.at))
            self._reopen(c, v.study_uid, v.version)
        return v

    def withdraw_verdict(self, study_uid: str, version: int, finding: int) -> bool:
        with self._tx() as c:
            gone = c.execute("DELETE FROM verdicts WHERE study_uid=? AND version=? AND finding=?",
                             (study_uid, version, finding)).rowcount == 1
            if gone:
                self._reopen(c, study_uid, version)
            return gone

    def add_nodule(self, study_uid: str, version: int, center_mm: tuple[float, float, float], diameter_mm: float,
                   sop_uid: str, click: Click, user: str) -> AddedNodule:
        if not 0 < diameter_mm <= 100:
            raise FeedbackError(f"a nodule's diameter is more than 0 and at most 100 mm, got {diameter_mm}")
        at = time.time()
        with self._tx() as c:
            cur = c.execute("INSERT INTO added_nodules(study_uid, version, x_mm, y_mm, z_mm, diameter_mm, sop_uid, "
                            "slice, column_px, row_px, user, at) VALUES(?,?,?,?,?,?,?,?,?,?,?,?)",
                            (study_uid, version, *center_mm, diameter_mm, sop_uid, click.slice, click.column_px,
                             click.row_px, user, at))
            self._reopen(c, study_uid, version)
        return AddedNodule(int(cur.lastrowid), study_uid, version, center_mm, diameter_mm, sop_uid, click, user, at)

    def remove_nodule(self, study_uid: str, version: int, nodule_id: int) -> bool:
        with self._tx() as c:
            gone = c.execute("DELETE FROM added_nodules WHERE id=? AND study_uid=? AND version=?",
                             (nodule_id, study_uid, version)).rowcount == 1
            if gone:
                self._reopen(c, study_uid, version)
            return gone

    def complete(self, study_uid: str, version: int, series_uid: str, findings: int, user: str) -> ReviewCompletion:
        """Mark the review complete; every one of the version's `findings` must have a verdict."""
        with self._tx() as c:
            judged = {r[0] for r in c.execute("SELECT finding FROM verdicts WHERE study_uid=? AND version=?",
                                              (study_uid, version))}
            missing = [f"N{n}" for n in range(1, findings + 1) if n not in judged]
            if missing:
                raise FeedbackError(f"confirm or reject {', '.join(missing)} first")
            done = ReviewCompletion(study_uid, version, series_uid, findings, user, time.time())
            c.execute("INSERT OR REPLACE INTO reviews VALUES(?,?,?,?,?,?)",
                      (study_uid, version, series_uid, findings, user, done.completed_at))
        return done

    def reopen(self, study_uid: str, version: int) -> bool:
        with self._tx() as c:
            return self._reopen(c, study_uid, version)

    @staticmethod
    def _reopen(c: sqlite3.Connection, study_uid: str, version: int) -> bool:
        return c.execute("DELETE FROM reviews WHERE study_uid=? AND version=?", (study_uid, version)).rowcount == 1

    # --- reads ---------------------------------------------------------------------------------
    def review(self, study_uid: str, version: int) -> Review:
        with self._lock:
            verdicts = self._conn.execute("SELECT * FROM verdicts WHERE study_uid=? AND version=? ORDER BY finding",
                                          (study_uid, version)).fetchall()
            added = self._conn.execute("SELECT * FROM added_nodules WHERE study_uid=? AND version=? ORDER BY id",
                                       (study_uid, version)).fetchall()
            done = self._conn.execute("SELECT * FROM reviews WHERE study_uid=? AND version=?",
                                      (study_uid, version)).fetchone()
        return Review(study_uid, version, [_verdict(r) for r in verdicts], [_added(r) for r in added],
                      ReviewCompletion(**dict(done)) if done else None)

    def completed(self) -> list[ReviewCompletion]:
        """Every completed review, newest version of each study first."""
        with self._lock:
            rows = self._conn.execute("SELECT * FROM reviews ORDER BY study_uid, version DESC").fetchall()
        return [ReviewCompletion(**dict(r)) for r in rows]

    def reviewed_studies(self) -> set[str]:
        """Studies with any feedback recorded, of any version."""
        with self._lock:
            rows = self._conn.execute("SELECT study_uid FROM verdicts UNION SELECT study_uid FROM added_nodules "
                                      "UNION SELECT study_uid FROM reviews").fetchall()
        return {r[0] for r in rows}

    def counts(self, versions: dict[str, int]) -> dict[str, ReviewCounts]:
        """Review counts of each study's given version (the worklist's current versions), in three queries;
        studies without feedback on that version are left out."""
        out: dict[str, list] = {}
        with self._lock:
            for uid, version, verdict, n in self._conn.execute(
                    "SELECT study_uid, version, verdict, COUNT(*) FROM verdicts GROUP BY study_uid, version, verdict"):
                if versions.get(uid) == version:
                    out.setdefault(uid, [0, 0, 0, False])[0 if verdict == CONFIRMED else 1] = n
            for uid, version, n in self._conn.execute(
                    "SELECT study_uid, version, COUNT(*) FROM added_nodules GROUP BY study_uid, version"):
                if versions.get(uid) == version:
                    out.setdefault(uid, [0, 0, 0, False])[2] = n
            for uid, version in self._conn.execute("SELECT study_uid, version FROM reviews"):
                if versions.get(uid) == version:
                    out.setdefault(uid, [0, 0, 0, False])[3] = True
        return {uid: ReviewCounts(versions[uid], *c) for uid, c in out.items()}


def _verdict(r: sqlite3.Row) -> FindingVerdict:
    return FindingVerdict(r["study_uid"], r["version"], r["finding"], r["verdict"], r["reason"], r["reason_text"],
                          tuple(json.loads(r["box_mm"])), r["diameter_mm"], r["score"], r["user"], r["at"])


def _added(r: sqlite3.Row) -> AddedNodule:
    return AddedNodule(r["id"], r["study_uid"], r["version"], (r["x_mm"], r["y_mm"], r["z_mm"]), r["diameter_mm"],
                       r["sop_uid"], Click(r["slice"], r["column_px"], r["row_px"]), r["user"], r["at"])

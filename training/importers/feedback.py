"""Radiologist feedback from a lungnode data folder -> labelled scans (`lungnode train import feedback`).

Reads the node's job database and feedback database directly (the node need not run). Only studies whose
review is complete are used, each with its latest completed review: the processed series as received
(`incoming/<study>/<series>`), the confirmed findings (their detected box) and the added nodules (a cube
of their diameter) as nodules, the rejected findings as ``negative_box`` with their reason.
"""
from __future__ import annotations

from pathlib import Path

from lungnode.config import Settings
from lungnode.dicom_node.db import DONE, JobDB
from lungnode.dicom_node.feedback import CONFIRMED, REJECTED, FeedbackStore, FindingVerdict, ReviewCompletion
from lungnode.dicom_node.storage import InstanceStore
from lungnode.training.importers.datalist import Box, ImportResult, LabeledScan, Negative

SOURCE = "feedback"


def detected_box(v: FindingVerdict) -> Box:
    """A judged finding's detected box (LPS min/max corners) as centre and size."""
    lo, hi = v.box_mm[:3], v.box_mm[3:]
    return Box(tuple((a + b) / 2 for a, b in zip(lo, hi)), tuple(b - a for a, b in zip(lo, hi)), v.diameter_mm)


def import_feedback(data_dir: Path) -> ImportResult:
    settings = Settings(data_dir=Path(data_dir))
    for needed in (settings.db_path, settings.feedback_path):
        if not needed.is_file():
            raise ValueError(f"{data_dir} has no {needed.name}: give the node's data folder (LUNGNODE_DATA_DIR, "
                             "default ./var), after at least one review was recorded there")
    jobs, store = JobDB(settings.db_path), FeedbackStore(settings.feedback_path)
    try:
        return _collect(jobs, store, InstanceStore(settings.incoming_dir, settings.quarantine_dir))
    finally:
        jobs.close()
        store.close()


def _collect(jobs: JobDB, store: FeedbackStore, images: InstanceStore) -> ImportResult:
    out = ImportResult()
    latest: dict[str, ReviewCompletion] = {}
    for c in store.completed():  # newest version of each study first
        latest.setdefault(c.study_uid, c)
    started = store.reviewed_studies()
    for s in jobs.studies(limit=1_000_000):
        if s.study_uid in latest:
            continue
        if s.study_uid in started:
            out.skip(s.study_uid, "review not complete (a finding without a verdict, or not marked complete)")
        elif s.state == DONE:
            out.skip(s.study_uid, "not reviewed")
    for c in latest.values():
        folder = images.series_dir(c.study_uid, c.series_uid)
        if not any(folder.glob("*.dcm")):
            out.skip(c.study_uid, "its images are no longer on the node (deleted after LUNGNODE_RETAIN_IMAGES_DAYS)")
            continue
        review = store.review(c.study_uid, c.version)
        study = jobs.study(c.study_uid)
        boxes = [detected_box(v) for v in review.verdicts if v.verdict == CONFIRMED]
        boxes += [Box.cube(a.center_mm, a.diameter_mm) for a in review.added]
        negatives = [Negative(detected_box(v), v.reason) for v in review.verdicts if v.verdict == REJECTED]
        out.scans.append(LabeledScan(folder.resolve(), c.series_uid, SOURCE, boxes, negatives=negatives,
                                     patient_id=study.patient_id if study and study.patient_id else None))
    return out

"""One study through the stages: select series -> volume -> detect -> report objects on disk.

The report objects are the DICOM results plus, for the RIS, the HL7 ORU message (oru.hl7) and the
FHIR transaction Bundle (fhir.json), always written (they are cheap) so that every delivery later
sends exactly the bytes made here. The caller (the node's worker) records the outcome and queues the
deliveries.

A radiologist's completed review makes a verified version the same way (`verify_study`): the findings
they confirmed and the nodules they added, through the same builders, into the next version's folder,
with verification.json saying who verified it, when, and which findings they added."""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import pydicom

from lungnode.dicom_node.feedback import CONFIRMED, Review
from lungnode.dicom_node.uids import checked_uid, inside
from lungnode.inference.detector import Detector
from lungnode.inference.series_selection import SelectionRules, select_series
from lungnode.inference.types import Detection, DetectionResult, ModelInfo, Volume
from lungnode.inference.volume import VolumeError, load_volume
from lungnode.reports.build import build_results
from lungnode.reports.fhir_report import bundle_json
from lungnode.reports.hl7_oru import MessageParties, build_oru
from lungnode.reports.report_facts import report_facts
from lungnode.reports.verification import Verification, verified_detections

log = logging.getLogger(__name__)
ORU_FILE = "oru.hl7"  # the ORU^R01 as sent over MLLP: UTF-8, segments ended by CR
FHIR_FILE = "fhir.json"
RESULT_FILE = "result.json"
VERIFICATION_FILE = "verification.json"  # in a verified version's folder


@dataclass
class StudyOutcome:
    result: DetectionResult
    results_dir: Path
    result_series_uids: list[str]


@dataclass(frozen=True)
class VerifiedVersion:
    """verification.json: a version a radiologist verified (its findings N<added> are theirs)."""

    reviewed_version: int
    verified_by: str  # their account
    observer_name: str  # as the SR's Verifying Observer Name (DICOM PN)
    organization: str
    completed_at: float  # when they completed the review (epoch seconds)
    added: list[int]


def results_dir_for(root: Path, study_uid: str, version: int) -> Path:
    """results/<Study Instance UID>/v<version>; InvalidUID (a ValueError) when the study UID is not a UID,
    so that no header can name a folder outside ``root``."""
    return inside(root, root / checked_uid("StudyInstanceUID", study_uid) / f"v{int(version)}")


def process_study(study_uid: str, paths: list[Path], version: int, detector: Detector, rules: SelectionRules,
                  results_root: Path, *, parties: MessageParties, fhir_patient_system: str) -> StudyOutcome:
    """Run the stages and write the result objects (DICOM files, result.json, oru.hl7, fhir.json) for
    `version`; ``parties`` fill MSH-3..6, ``fhir_patient_system`` names the Patient ID's system."""
    started = time.monotonic()
    selection = select_series(paths, rules)
    volume = None
    if selection.chosen is None:
        result = DetectionResult(study_uid, None, detector.spec.info, [], not_processed_reason=
                                 f"no eligible CT series: {selection.why_not}")
        source_path = paths[0]
    else:
        source_path = selection.chosen.paths[0]
        try:
            volume = load_volume(selection.chosen.paths)
            detections = detector.detect(volume)
            result = DetectionResult(study_uid, selection.chosen.series_instance_uid, detector.spec.info,
                                     detections)
        except VolumeError as exc:
            result = DetectionResult(study_uid, selection.chosen.series_instance_uid, detector.spec.info, [],
                                     not_processed_reason=str(exc))
    result.seconds = time.monotonic() - started
    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    return _write_results(result, volume, source, version, results_root, parties, fhir_patient_system)


def verify_study(reviewed: DetectionResult, review: Review, paths: list[Path], version: int, *, observer_name: str,
                 default_organization: str, results_root: Path, parties: MessageParties,
                 fhir_patient_system: str) -> StudyOutcome:
    """Results `version` made from the completed ``review`` of the ``reviewed`` results: the confirmed
    findings (same geometry) and the added nodules, VERIFIED by ``observer_name`` (DICOM PN) of the
    source CT's Institution Name (else ``default_organization``). ``paths`` are the reviewed series'
    images (the volume the objects point into)."""
    if review.completion is None:
        raise ValueError(f"the review of version {review.version} is not complete")
    if not paths:
        raise ValueError("the reviewed series' images are no longer on the node (LUNGNODE_RETAIN_IMAGES_DAYS): "
                         "send the study again to make a verified version")
    started = time.monotonic()
    source = pydicom.dcmread(paths[0], stop_before_pixels=True)
    organization = str(source.get("InstitutionName", "") or "") or default_organization
    confirmed = [v.finding for v in review.verdicts if v.verdict == CONFIRMED]
    detections, added = verified_detections(reviewed.detections, confirmed,
                                            [(a.center_mm, a.diameter_mm) for a in review.added])
    verification = Verification(observer_name, organization,
                                datetime.fromtimestamp(review.completion.completed_at, timezone.utc),
                                review.version, added)
    result = DetectionResult(reviewed.study_instance_uid, reviewed.series_instance_uid, reviewed.model, detections)
    volume = load_volume(paths)
    result.seconds = time.monotonic() - started
    outcome = _write_results(result, volume, source, version, results_root, parties, fhir_patient_system,
                             verification)
    record = VerifiedVersion(review.version, review.completion.completed_by, observer_name, organization,
                             review.completion.completed_at, sorted(added))
    (outcome.results_dir / VERIFICATION_FILE).write_text(json.dumps(asdict(record), indent=2))
    return outcome


def _write_results(result: DetectionResult, volume: Volume | None, source: pydicom.Dataset, version: int,
                   results_root: Path, parties: MessageParties, fhir_patient_system: str,
                   verification: Verification | None = None) -> StudyOutcome:
    """Build every result object of `version` and write them into its (new) folder."""
    study_uid = result.study_instance_uid
    objects = build_results(result, volume, source, version=version, verification=verification)
    out = results_dir_for(results_root, study_uid, version)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for i, ds in enumerate(objects):
        ds.save_as(out / f"{i:03d}-{ds.Modality}-{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    (out / RESULT_FILE).write_text(json.dumps(asdict(result), indent=2, default=str))
    facts = report_facts(result, volume, source, version, verification=verification)
    (out / ORU_FILE).write_bytes(build_oru(facts, parties).encode("utf-8"))
    (out / FHIR_FILE).write_text(bundle_json(facts, fhir_patient_system), encoding="utf-8")
    log.info("study %s v%d: %s in %.1f s", study_uid, version,
             result.not_processed_reason or f"{len(result.detections)} finding(s)"
             + (f", verified (review of v{verification.reviewed_version})" if verification else ""), result.seconds)
    return StudyOutcome(result, out, sorted({str(ds.SeriesInstanceUID) for ds in objects}))


def load_result(directory: Path | None) -> DetectionResult | None:
    """result.json back as the DetectionResult the pipeline wrote."""
    path = directory / RESULT_FILE if directory else None
    if path is None or not path.exists():
        return None
    data = json.loads(path.read_text())
    return DetectionResult(
        study_instance_uid=data["study_instance_uid"], series_instance_uid=data["series_instance_uid"],
        model=ModelInfo(**data["model"]), detections=[_detection(d) for d in data["detections"]],
        not_processed_reason=data.get("not_processed_reason"), seconds=data.get("seconds", 0.0))


def _detection(d: dict) -> Detection:
    """JSON lists back to the tuples Detection declares (the API's serializer checks them)."""
    return Detection(center_mm=tuple(d["center_mm"]), box_mm=tuple(d["box_mm"]), diameter_mm=d["diameter_mm"],
                     score=d["score"])


def load_verification(directory: Path | None) -> VerifiedVersion | None:
    """verification.json of a verified version (None for the model's results)."""
    path = directory / VERIFICATION_FILE if directory else None
    return VerifiedVersion(**json.loads(path.read_text())) if path is not None and path.exists() else None

"""One study through the stages: select series -> volume -> detect -> report objects on disk.

The report objects are the DICOM results plus, for the RIS, the HL7 ORU message (oru.hl7) and the
FHIR transaction Bundle (fhir.json), always written (they are cheap) so that every delivery later
sends exactly the bytes made here. The caller (the node's worker) records the outcome and queues the
deliveries."""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pydicom

from lungnode.dicom_node.uids import checked_uid, inside
from lungnode.inference.detector import Detector
from lungnode.inference.series_selection import SelectionRules, select_series
from lungnode.inference.types import DetectionResult
from lungnode.inference.volume import VolumeError, load_volume
from lungnode.reports.build import build_results
from lungnode.reports.fhir_report import bundle_json
from lungnode.reports.hl7_oru import MessageParties, build_oru
from lungnode.reports.report_facts import report_facts

log = logging.getLogger(__name__)
ORU_FILE = "oru.hl7"  # the ORU^R01 as sent over MLLP: UTF-8, segments ended by CR
FHIR_FILE = "fhir.json"


@dataclass
class StudyOutcome:
    result: DetectionResult
    results_dir: Path
    result_series_uids: list[str]


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
    objects = build_results(result, volume, source, version=version)

    out = results_dir_for(results_root, study_uid, version)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for i, ds in enumerate(objects):
        ds.save_as(out / f"{i:03d}-{ds.Modality}-{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    (out / "result.json").write_text(json.dumps(asdict(result), indent=2, default=str))
    facts = report_facts(result, volume, source, version)
    (out / ORU_FILE).write_bytes(build_oru(facts, parties).encode("utf-8"))
    (out / FHIR_FILE).write_text(bundle_json(facts, fhir_patient_system), encoding="utf-8")
    log.info("study %s v%d: %s in %.1f s", study_uid, version,
             result.not_processed_reason or f"{len(result.detections)} finding(s)", result.seconds)
    return StudyOutcome(result, out, sorted({str(ds.SeriesInstanceUID) for ds in objects}))

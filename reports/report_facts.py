"""What the RIS reports (HL7 ORU, FHIR) say about one processed study, gathered once from the
processing outcome so both formats state the same patient, order, model and nodules.

Nodules are numbered N1, N2 ... in detection order, as in the SR and on the key images, and each is
placed on the source slice through its centre, so a RIS user can find it in the viewer.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import pydicom
from pydicom import Dataset

from lungnode.inference.types import DetectionResult, ModelInfo, Volume
from lungnode.reports.key_images import centre_slice_index
from lungnode.reports.verification import Verification


@dataclass(frozen=True)
class PatientFacts:
    """The patient as the DICOM source header names them (PS3.3 Patient Module)."""

    id: str
    issuer: str  # Issuer of Patient ID, may be empty
    family: str
    given: str
    middle: str
    prefix: str
    suffix: str
    birth_date: str  # DICOM DA, YYYYMMDD, may be empty
    sex: str  # DICOM M, F, O or empty


@dataclass(frozen=True)
class NoduleFacts:
    number: int
    center_mm: tuple[float, float, float]  # DICOM patient coordinates (LPS)
    diameter_mm: float
    score: float | None  # the model's confidence; None for a nodule the radiologist added
    slice_sop_instance_uid: str
    slice_instance_number: int | None  # InstanceNumber of that slice, as the viewer shows it
    slice_frame_number: int | None  # set when the slice is a frame of a multi-frame instance


@dataclass(frozen=True)
class ReportFacts:
    study_uid: str
    series_uid: str | None  # the series that was read; None when nothing was
    accession: str
    study_date: str  # DICOM DA
    study_time: str  # DICOM TM
    timezone_offset: str  # DICOM Timezone Offset From UTC (+HHMM), may be empty
    patient: PatientFacts
    model: ModelInfo
    version: int
    nodules: list[NoduleFacts]
    not_processed_reason: str | None
    created: datetime  # when these results were made (timezone-aware)
    verification: Verification | None = None  # set for a version a radiologist verified

    @property
    def verifier(self) -> str:
        """The verifying radiologist's name as people write it ("Lan Nguyen"); empty when not verified."""
        if self.verification is None:
            return ""
        name = pydicom.valuerep.PersonName(self.verification.observer_name)
        return " ".join(p for p in (name.name_prefix, name.given_name, name.middle_name, name.family_name,
                                    name.name_suffix) if p)

    @property
    def summary(self) -> str:
        """One line a RIS user reads first: the outcome and the model (or the radiologist) behind it."""
        if self.not_processed_reason is not None:
            return f"Not processed: {self.not_processed_reason}"
        if self.verification is not None and not self.nodules:
            return (f"No lung nodules on review by {self.verifier} of results version "
                    f"{self.verification.reviewed_version}.")
        if self.verification is not None:
            added = sum(n.score is None for n in self.nodules)
            return (f"{len(self.nodules)} lung nodule(s) verified by {self.verifier} on review of results version "
                    f"{self.verification.reviewed_version}: {len(self.nodules) - added} detected by "
                    f"{self.model.name} {self.model.version} and confirmed, {added} added by the radiologist.")
        found = f"{len(self.nodules)} lung nodule(s) detected" if self.nodules else "No lung nodules detected"
        return (f"{found} by {self.model.name} {self.model.version} (AI, research software: "
                f"findings need review by a radiologist).")


def report_facts(result: DetectionResult, volume: Volume | None, source: Dataset, version: int,
                 created: datetime | None = None, verification: Verification | None = None) -> ReportFacts:
    """Collect the facts from a result, its volume (None when not processed) and a source CT header;
    ``verification`` for a version a radiologist verified."""
    name = pydicom.valuerep.PersonName(source.get("PatientName", "") or "")
    patient = PatientFacts(
        id=str(source.get("PatientID", "") or ""), issuer=str(source.get("IssuerOfPatientID", "") or ""),
        family=name.family_name, given=name.given_name, middle=name.middle_name, prefix=name.name_prefix,
        suffix=name.name_suffix, birth_date=str(source.get("PatientBirthDate", "") or ""),
        sex=str(source.get("PatientSex", "") or ""))
    nodules = []
    if result.not_processed_reason is None and result.detections:
        if volume is None:
            raise ValueError("detections need the volume they were found in")
        for number, d in enumerate(result.detections, start=1):
            ref = volume.slices[centre_slice_index(volume, d.center_mm)]
            instance = pydicom.dcmread(ref.path, stop_before_pixels=True, specific_tags=["InstanceNumber"])
            nodules.append(NoduleFacts(
                number=number, center_mm=tuple(float(c) for c in d.center_mm), diameter_mm=float(d.diameter_mm),
                score=None if verification and verification.is_added(number) else float(d.score),
                slice_sop_instance_uid=ref.sop_instance_uid,
                slice_instance_number=int(instance.InstanceNumber) if instance.get("InstanceNumber") else None,
                slice_frame_number=ref.frame_number))
    return ReportFacts(
        study_uid=result.study_instance_uid, series_uid=result.series_instance_uid,
        accession=str(source.get("AccessionNumber", "") or ""), study_date=str(source.get("StudyDate", "") or ""),
        study_time=str(source.get("StudyTime", "") or ""),
        timezone_offset=str(source.get("TimezoneOffsetFromUTC", "") or ""), patient=patient, model=result.model,
        version=version, nodules=nodules, not_processed_reason=result.not_processed_reason,
        created=created or datetime.now(timezone.utc), verification=verification)

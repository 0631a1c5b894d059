"""TID 1500 measurement report (Comprehensive 3D SR) for one DetectionResult.

Per nodule two measurement groups with the same tracking identifier and UID (also those of the
presentation state's marks), as TID 1500 allows for one finding described twice:
- TID 1411 volumetric: the centre as a 3D point in the CT frame of reference (SCOORD3D), the slice it
  lies on, diameter and detection confidence - what a follow-up tool or importer needs;
- TID 1501: the diameter INFERRED FROM a 2D circle (SCOORD, TID 320) on the source slice through the
  centre - what viewers that only draw image coordinates (most PACS, OHIF) can show. TID 1411 takes
  one ROI kind only and highdicom (after TID 1419) refuses coordinates on its measurements, and a 2D
  TID 1410 group would be a second ROI of the same finding that 3D consumers cannot place.
Both name the algorithm (TID 4019). The AI's document is UNVERIFIED: no person has signed it. Studies
without nodules, and studies that could not be read, still get a report so the radiologist knows the
AI looked (or why it did not).

A version a radiologist verified (verification.py) is VERIFIED, COMPLETE and FINAL, with the radiologist
as Verifying Observer (VerificationDateTime = when they completed the review) and as the person observer
of the observation context (TID 1002) beside the model (TID 1004). The findings they confirmed keep the
algorithm and its confidence; a nodule they added has neither, and its groups carry the qualitative
evaluation Observer Type (DCM 121005) = Person (DCM 121006): the radiologist found it, not the model.
"""
from __future__ import annotations

import highdicom as hd
import numpy as np
from highdicom.sr.templates import DEFAULT_LANGUAGE
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import DT

from lungnode.inference.types import DetectionResult, ModelInfo, Volume
from lungnode.reports.result_series import ResultSeries
from lungnode.reports.source_refs import Finding, series_headers, source_header
from lungnode.reports.verification import Verification

CHEST_CT = hd.sr.CodedConcept("24627-2", "LN", "Chest CT")
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
# "Certainty of Finding" (DCM 111012): the detector's confidence that the finding is real, in 0..1.
# Not "Probability of cancer": the model detects nodules, it does not grade malignancy.
DETECTION_CONFIDENCE = codes.DCM.CertaintyOfFinding
# On a nodule the radiologist added: who observed it.
FOUND_BY_PERSON = hd.sr.QualitativeEvaluation(codes.DCM.ObserverType, codes.DCM.Person)


def device_observer_uid(model: ModelInfo, manufacturer: str) -> str:
    """A UID that names this exact model (same weights -> same UID), for the observer context."""
    return generate_uid(entropy_srcs=[manufacturer, model.name, model.version, model.sha256])


def build_sr(
    result: DetectionResult,
    volume: Volume | None,
    source: Dataset,
    findings: list[Finding],
    *,
    series: ResultSeries,
    verification: Verification | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR for a result: ``findings`` (from `findings_of`), "no nodules found", or "not processed: <reason>";
    VERIFIED by the radiologist with ``verification``."""
    header = source_header(source)
    context = hd.sr.ObservationContext(
        observer_person_context=observer_person(verification) if verification else None,
        observer_device_context=observer_device(result.model, series.manufacturer))
    evidence = [header]
    if result.not_processed_reason is not None:
        content = _statement_report(context, f"Not processed: {result.not_processed_reason}")
    elif not result.detections:
        found_by = (f"on review of results version {verification.reviewed_version}" if verification else
                    f"by {result.model.name} {result.model.version}")
        content = _statement_report(context, f"No lung nodules found {found_by}.", nodules_absent=True)
    else:
        if volume is None:
            raise ValueError("detections need the volume they were found in")
        frame_of_reference = source.get("FrameOfReferenceUID")
        if not frame_of_reference:
            raise ValueError("the source CT instance has no FrameOfReferenceUID")
        algorithm = hd.sr.AlgorithmIdentification(
            name=result.model.name,
            version=result.model.version,
            parameters=[f"sha256:{result.model.sha256}"],
            manufacturer=series.manufacturer,
        )
        columns = int(source.Columns)
        groups = [group for finding in findings
                  for group in _nodule_groups(finding, frame_of_reference, algorithm, columns)]
        content = hd.sr.MeasurementReport(
            observation_context=context,
            procedure_reported=CHEST_CT,
            imaging_measurements=groups,
        )
        evidence += series_headers(volume, source)
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=content[0],
        is_complete=True,
        is_final=verification is not None,
        is_verified=verification is not None,
        verifying_observer_name=verification.observer_name if verification else None,
        verifying_organization=verification.organization if verification else None,
        # Free text (reasons quote series descriptions) may not fit the source's character set.
        specific_character_set="ISO_IR 192",
        **series.attributes(result.model),
    )
    if verification is not None:  # highdicom stamps the build time; the radiologist verified at completion
        sr.VerifyingObserverSequence[0].VerificationDateTime = DT(verification.at)
    return sr


def observer_person(verification: Verification) -> hd.sr.ObserverContext:
    """The verifying radiologist as an observer (TID 1003), of the SR's and the KOS's content."""
    person = hd.sr.PersonObserverIdentifyingAttributes(name=verification.observer_name,
                                                       organization_name=verification.organization)
    return hd.sr.ObserverContext(observer_type=codes.DCM.Person, observer_identifying_attributes=person)


def _nodule_groups(
    finding: Finding,
    frame_of_reference: str,
    algorithm: hd.sr.AlgorithmIdentification,
    columns: int,
) -> tuple[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations, hd.sr.MeasurementsAndQualitativeEvaluations]:
    """The finding in 3D (centre point) and on its centre slice (circle), linked by tracking UID; the
    model's (algorithm, confidence) or the radiologist's (observer type person)."""
    ref, detection = finding.slice, finding.detection
    frames = [ref.frame_number] if ref.frame_number is not None else None
    about = {
        "finding_category": codes.SCT.MorphologicallyAbnormalStructure,
        "finding_type": codes.SCT.Nodule,
        "finding_sites": [hd.sr.FindingSite(codes.SCT.Lung)],
        **({"qualitative_evaluations": [FOUND_BY_PERSON]} if finding.added else {"algorithm_id": algorithm}),
    }
    diameter = hd.sr.Measurement(codes.SCT.Diameter, detection.diameter_mm, unit=codes.UCUM.Millimeter)
    centre = hd.sr.VolumeSurface(
        graphic_type=hd.sr.GraphicTypeValues3D.POINT,
        graphic_data=np.array([detection.center_mm], dtype=np.float64),
        frame_of_reference_uid=frame_of_reference,
        source_images=[hd.sr.SourceImageForSegmentation(ref.sop_class_uid, ref.sop_instance_uid, frames)],
    )
    volumetric = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(finding),
        referenced_volume_surface=centre,
        geometric_purpose=codes.DCM.Center,
        measurements=[diameter] if finding.added else [
            diameter, hd.sr.Measurement(DETECTION_CONFIDENCE, detection.score, unit=codes.UCUM.NoUnits)],
        **about,
    )
    circle = hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.CIRCLE,
        graphic_data=finding.circle(columns),
        source_image=hd.sr.SourceImageForRegion(ref.sop_class_uid, ref.sop_instance_uid, frames),
    )
    on_slice = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(finding),
        measurements=[hd.sr.Measurement(codes.SCT.Diameter, detection.diameter_mm, unit=codes.UCUM.Millimeter,
                                        referenced_coordinates=[circle])],
        **about,
    )
    return volumetric, on_slice


def _tracking(finding: Finding) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=finding.tracking_uid, identifier=finding.tracking_id)


def _statement_report(
    context: hd.sr.ObservationContext, text: str, *, nodules_absent: bool = False
) -> hd.sr.ContentSequence:
    """A TID 1500 report without measurement groups: its Qualitative Evaluations container (row 10)
    holds the statement. highdicom's MeasurementReport insists on at least one group, hence by hand."""
    evaluations = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    evaluations.ContentSequence = hd.sr.ContentSequence()
    if nodules_absent:
        evaluations.ContentSequence.append(
            hd.sr.CodeContentItem(
                name=codes.SCT.Nodule,
                value=codes.SCT.Absent,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    evaluations.ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Comment, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
    )
    root = hd.sr.ContainerContentItem(name=codes.cid7021.ImagingMeasurementReport, template_id="1500")
    root.ContentSequence = hd.sr.ContentSequence()
    root.ContentSequence.extend(hd.sr.LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE))
    root.ContentSequence.extend(context)
    root.ContentSequence.append(
        hd.sr.CodeContentItem(
            name=codes.DCM.ProcedureReported,
            value=CHEST_CT,
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    )
    root.ContentSequence.append(evaluations)
    return hd.sr.ContentSequence([root], is_root=True)


def observer_device(model: ModelInfo, manufacturer: str) -> hd.sr.ObserverContext:
    """The algorithm as the observer (TID 1004): who made the SR's and the KOS's content."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_observer_uid(model, manufacturer),
        name=f"{model.name} {model.version}",
        manufacturer_name=manufacturer,
        model_name=model.name,
    )
    return hd.sr.ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=device)

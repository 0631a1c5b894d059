"""TID 1500 measurement report (Comprehensive 3D SR) for one DetectionResult.

One TID 1411 volumetric measurement group per nodule carries what a PACS or a follow-up tool needs
to find it again: tracking id, the centre as a 3D point in the CT frame of reference, the slice it
lies on, diameter and detection confidence. Studies without nodules, and studies that could not be
read, still get a report so the radiologist knows the AI looked (or why it did not).
"""
from __future__ import annotations

from copy import deepcopy

import highdicom as hd
import numpy as np
from highdicom.sr.templates import DEFAULT_LANGUAGE
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from lungnode.inference.types import Detection, DetectionResult, ModelInfo, SliceRef, Volume
from lungnode.reports.key_images import centre_slice_index

CHEST_CT = hd.sr.CodedConcept("24627-2", "LN", "Chest CT")
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
# "Certainty of Finding" (DCM 111012): the detector's confidence that the finding is real, in 0..1.
# Not "Probability of cancer": the model detects nodules, it does not grade malignancy.
DETECTION_CONFIDENCE = codes.DCM.CertaintyOfFinding
# Type 2 patient/study attributes highdicom reads from the source; a missing one becomes empty.
_TYPE2_HEADER = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName",
)


def device_observer_uid(model: ModelInfo, manufacturer: str) -> str:
    """A UID that names this exact model (same weights -> same UID), for the observer context."""
    return generate_uid(entropy_srcs=[manufacturer, model.name, model.version, model.sha256])


def build_sr(
    result: DetectionResult,
    volume: Volume | None,
    source: Dataset,
    *,
    series_instance_uid: str,
    series_number: int,
    series_description: str,
    manufacturer: str,
    institution: str | None,
) -> hd.sr.Comprehensive3DSR:
    """The SR for a result: findings, "no nodules found", or "not processed: <reason>"."""
    header = _source_header(source)
    context = _observation_context(result.model, manufacturer)
    evidence = [header]
    if result.not_processed_reason is not None:
        content = _statement_report(context, f"Not processed: {result.not_processed_reason}")
    elif not result.detections:
        content = _statement_report(
            context,
            f"No lung nodules detected by {result.model.name} {result.model.version}.",
            nodules_absent=True,
        )
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
            manufacturer=manufacturer,
        )
        groups = [
            _nodule_group(number, detection, volume, frame_of_reference, algorithm)
            for number, detection in enumerate(result.detections, start=1)
        ]
        content = hd.sr.MeasurementReport(
            observation_context=context,
            procedure_reported=CHEST_CT,
            imaging_measurements=groups,
        )
        evidence += [_slice_evidence(volume, ref) for ref in volume.slices]
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=content[0],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
        institution_name=institution,
        series_description=series_description,
        manufacturer_model_name=result.model.name,
        software_versions=result.model.version,
        # Free text (reasons quote series descriptions) may not fit the source's character set.
        specific_character_set="ISO_IR 192",
    )


def _nodule_group(
    number: int,
    detection: Detection,
    volume: Volume,
    frame_of_reference: str,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    ref = volume.slices[centre_slice_index(volume, detection.center_mm)]
    centre = hd.sr.VolumeSurface(
        graphic_type=hd.sr.GraphicTypeValues3D.POINT,
        graphic_data=np.array([detection.center_mm], dtype=np.float64),
        frame_of_reference_uid=frame_of_reference,
        source_images=[hd.sr.SourceImageForSegmentation(ref.sop_class_uid, ref.sop_instance_uid)],
    )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"N{number}"),
        referenced_volume_surface=centre,
        finding_category=codes.SCT.MorphologicallyAbnormalStructure,
        finding_type=codes.SCT.Nodule,
        finding_sites=[hd.sr.FindingSite(codes.SCT.Lung)],
        algorithm_id=algorithm,
        geometric_purpose=codes.DCM.Center,
        measurements=[
            hd.sr.Measurement(codes.SCT.Diameter, detection.diameter_mm, unit=codes.UCUM.Millimeter),
            hd.sr.Measurement(DETECTION_CONFIDENCE, detection.score, unit=codes.UCUM.NoUnits),
        ],
    )


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


def _observation_context(model: ModelInfo, manufacturer: str) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_observer_uid(model, manufacturer),
        name=f"{model.name} {model.version}",
        manufacturer_name=manufacturer,
        model_name=model.name,
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _source_header(source: Dataset) -> Dataset:
    """A copy of the source header that has every attribute highdicom copies (empty if unknown)."""
    header = deepcopy(source)
    for keyword in _TYPE2_HEADER:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def _slice_evidence(volume: Volume, ref: SliceRef) -> Dataset:
    """Minimal evidence item for one CT slice: every slice of the series was read by the model."""
    item = Dataset()
    item.StudyInstanceUID = volume.study_instance_uid
    item.SeriesInstanceUID = volume.series_instance_uid
    item.SOPClassUID = ref.sop_class_uid
    item.SOPInstanceUID = ref.sop_instance_uid
    return item

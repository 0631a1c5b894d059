"""Key Object Selection Document (TID 2010) that flags what an AI run found, as IHE AI Results uses it.

Title "Of Interest" (DCM 113000): the source CT slice through each nodule centre, each with the
presentation state to display it with (so a viewer opening the KOS shows the marked slice), then the
SR, the presentation state, the segmentation (when made) and the key images. It is made only when
there are findings: a KOS must reference at least one object, and one on a study without findings
would put a key-image flag on a normal study in the worklist; the SR alone records that the AI looked
and found nothing.
"""
from __future__ import annotations

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes

from lungnode.inference.types import ModelInfo, Volume
from lungnode.reports.result_series import ResultSeries
from lungnode.reports.source_refs import Finding, slice_header
from lungnode.reports.sr import observer_device, observer_person
from lungnode.reports.verification import Verification

TITLE = codes.DCM.OfInterest


def build_kos(
    findings: list[Finding],
    volume: Volume,
    source: Dataset,
    model: ModelInfo,
    *,
    sr: Dataset,
    gsps: Dataset,
    seg: Dataset | None,
    key_images: list[Dataset],
    series: ResultSeries,
    verification: Verification | None = None,
) -> hd.ko.KeyObjectSelectionDocument:
    if not findings:
        raise ValueError("a key object selection needs at least one finding")
    key_slices = {(f.slice.sop_instance_uid, f.slice.frame_number): f.slice for f in findings}
    slices = [slice_header(volume, ref, source) for ref in key_slices.values()]
    results = [sr, gsps, *([seg] if seg is not None else []), *key_images]
    content = hd.ko.KeyObjectSelection(
        document_title=TITLE,
        referenced_objects=[*slices, *results],
        observer_person_context=observer_person(verification) if verification else None,
        observer_device_context=observer_device(model, series.manufacturer),
        description=(
            (f"{len(findings)} nodule(s) verified by a radiologist on review of results version "
             f"{verification.reviewed_version}. " if verification else
             f"{model.name} {model.version}: {len(findings)} nodule candidate(s), not reviewed. ")
            + f"CT slices through each centre (shown with the {'' if verification else 'AI '}presentation "
            f"state), the SR, the presentation state, {'the nodule masks, ' if seg is not None else ''}"
            "and the key images."
        ),
    )
    # highdicom adds the references in the order given: the first IMAGE items are the CT slices.
    images = [item for item in content[0].ContentSequence if item.ValueType == "IMAGE"]
    for item, ref in zip(images, key_slices.values()):
        _show_with(item, gsps, ref.frame_number)
    unique = {ds.SOPInstanceUID: ds for ds in (*results, *slices)}
    return hd.ko.KeyObjectSelectionDocument(
        evidence=list(unique.values()),
        content=content,
        **series.attributes(model),
    )


def _show_with(item: Dataset, presentation_state: Dataset, frame_number: int | None) -> None:
    """Image Reference Macro (PS3.3 table 10-3): the frame, and the presentation state to apply."""
    referenced = item.ReferencedSOPSequence[0]
    if frame_number is not None:
        referenced.ReferencedFrameNumber = frame_number
    state = Dataset()
    state.ReferencedSOPClassUID = presentation_state.SOPClassUID
    state.ReferencedSOPInstanceUID = presentation_state.SOPInstanceUID
    referenced.ReferencedSOPSequence = [state]

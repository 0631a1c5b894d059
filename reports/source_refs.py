"""Where the report objects point into the source CT: shared by the SR, the presentation state and the KOS.

Each detection becomes one `Finding` with the number, tracking UID, centre slice and centre pixel that
every object uses, so the SR finding, the GSPS circle and the KOS key slice of a nodule always agree
(and a viewer or tool can match them by tracking UID).
"""
from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom import Dataset

from lungnode.inference.types import Detection, SliceRef, Volume
from lungnode.reports.key_images import centre_slice_index, label_text

# Type 2 patient/study attributes highdicom reads from the source; a missing one becomes empty.
_TYPE2_HEADER = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName",
)


@dataclass(frozen=True)
class Finding:
    """One detection as the report objects mark it.

    ``centre_px`` is (column, row) in DICOM image coordinates of ``slice`` (the top-left corner of the
    first pixel is 0, 0; the centre of pixel (i, j) is i + 0.5, j + 0.5), as SR SCOORD and GSPS PIXEL
    graphics both use them.
    """

    number: int
    detection: Detection
    tracking_uid: str
    slice: SliceRef
    centre_px: tuple[float, float]
    radius_px: float
    added: bool = False  # added by the radiologist on review (a verified version), not found by the model

    @property
    def tracking_id(self) -> str:
        return f"N{self.number}"

    @property
    def label(self) -> str:
        return label_text(self.number, self.detection, self.added)

    def circle(self, columns: int) -> np.ndarray:
        """CIRCLE graphic data [[centre], [point on the circle]]; the second point is taken on the side
        that stays inside an image ``columns`` wide (PS3.3 requires graphic data within the image)."""
        c, r = self.centre_px
        edge = c + self.radius_px if c + self.radius_px <= columns else c - self.radius_px
        return np.array([[c, r], [edge, r]], dtype=np.float64)


def findings_of(volume: Volume, detections: list[Detection], added: frozenset[int] = frozenset()) -> list[Finding]:
    """Number the detections N1, N2 ... in order and place each on the source slice through its centre;
    ``added`` are the numbers of those the radiologist added (see verification.py)."""
    out = []
    for number, detection in enumerate(detections, start=1):
        i, j, _ = volume.world_to_index(detection.center_mm)
        out.append(Finding(
            number=number,
            detection=detection,
            tracking_uid=hd.UID(),
            slice=volume.slices[centre_slice_index(volume, detection.center_mm)],
            centre_px=(float(i) + 0.5, float(j) + 0.5),
            radius_px=detection.diameter_mm / 2 / volume.spacing[0],
            added=number in added,
        ))
    return out


def source_header(source: Dataset) -> Dataset:
    """A copy of the source header that has every attribute highdicom copies (empty if unknown)."""
    header = deepcopy(source)
    for keyword in _TYPE2_HEADER:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def slice_header(volume: Volume, ref: SliceRef, source: Dataset) -> Dataset:
    """The header of one source instance as far as a referencing object needs it: UIDs, matrix size
    (the series is one regular volume, so the source's), and the patient/study data to inherit."""
    item = Dataset()
    for keyword in ("SpecificCharacterSet", "Rows", "Columns", "NumberOfFrames"):
        if keyword in source:
            setattr(item, keyword, source[keyword].value)
    for keyword in _TYPE2_HEADER:
        setattr(item, keyword, source.get(keyword, ""))
    item.SamplesPerPixel = source.get("SamplesPerPixel", 1)
    item.StudyInstanceUID = volume.study_instance_uid
    item.SeriesInstanceUID = volume.series_instance_uid
    item.SOPClassUID = ref.sop_class_uid
    item.SOPInstanceUID = ref.sop_instance_uid
    return item


def series_headers(volume: Volume, source: Dataset) -> list[Dataset]:
    """One `slice_header` per source instance of the volume (a multi-frame instance once), in slice order."""
    seen: dict[str, Dataset] = {}
    for ref in volume.slices:
        if ref.sop_instance_uid not in seen:
            seen[ref.sop_instance_uid] = slice_header(volume, ref, source)
    return list(seen.values())

"""DICOM Segmentation with one binary mask per nodule, laid over the original CT slices.

Viewers such as OHIF and 3D Slicer render a SEG over the source series (many do not apply a GSPS),
so the same findings as the SR and the presentation state also come as segments "N1", "N2" ...:
each a sphere of the detected diameter at the detected centre, on the source CT's own grid, with the
SR's tracking identifier and UID so a viewer or tool can match segment, SR finding and mark. Only
frames that hold a nodule are stored, and each frame names the CT slice it lies on.

A multi-frame (Enhanced CT) source gets no SEG (logged): highdicom matches SEG frames to source frames
by the source's per-frame functional groups, which this module does not rebuild; the SR, marks and KOS
still point at the right frames there.
"""
from __future__ import annotations

import logging

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes

from lungnode.inference.types import ModelInfo, Volume
from lungnode.reports.result_series import ResultSeries
from lungnode.reports.gsps import LAYER, VERIFIED_LAYER
from lungnode.reports.source_refs import Finding, slice_header
from lungnode.reports.verification import Verification

log = logging.getLogger(__name__)


def build_seg(
    findings: list[Finding],
    volume: Volume,
    source: Dataset,
    model: ModelInfo,
    *,
    series: ResultSeries,
    verification: Verification | None = None,
) -> hd.seg.Segmentation | None:
    """One BINARY segment per finding; None (logged) for a multi-frame source."""
    if not findings:
        raise ValueError("a segmentation needs at least one finding")
    if any(ref.frame_number is not None for ref in volume.slices):
        log.info("no SEG for series %s: multi-frame (Enhanced CT) sources are not supported",
                 volume.series_instance_uid)
        return None
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model.name,
        family=codes.cid7162.ArtificialIntelligence,
        version=model.version,
        source=series.manufacturer,
        parameters={"sha256": model.sha256},
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=finding.number,
            segment_label=finding.tracking_id,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Nodule,
            # a nodule the radiologist added: marked by hand (centre and diameter), no algorithm
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL if finding.added
            else hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=None if finding.added else algorithm,
            tracking_id=finding.tracking_id,
            tracking_uid=finding.tracking_uid,
        )
        for finding in findings
    ]
    planes, masks = _balls(findings, volume)
    return hd.seg.Segmentation(
        source_images=_located_headers(volume, source),
        pixel_array=masks,
        plane_positions=[hd.PlanePositionSequence("PATIENT", volume.slices[k].position_mm) for k in planes],
        plane_orientation=hd.PlaneOrientationSequence("PATIENT", _orientation(volume)),
        pixel_measures=hd.PixelMeasuresSequence(_pixel_spacing(volume), _slice_thickness(volume, source),
                                                spacing_between_slices=float(volume.spacing[2])),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        device_serial_number=model.sha256[:16],  # as the presentation state: the weights' hash
        content_label=VERIFIED_LAYER if verification else LAYER,
        content_description=f"{len(findings)} nodule(s) verified by a radiologist" if verification
        else f"{len(findings)} AI nodule candidate(s), not reviewed",
        omit_empty_frames=True,
        **series.attributes(model),
    )


def _orientation(volume: Volume) -> list[float]:
    """ImageOrientationPatient of the source slices: the world directions of a row (i) and a column (j)."""
    return [float(v) for v in (*volume.direction[:, 0], *volume.direction[:, 1])]


def _pixel_spacing(volume: Volume) -> list[float]:
    """PixelSpacing: between rows (j), then between columns (i)."""
    return [float(volume.spacing[1]), float(volume.spacing[0])]


def _slice_thickness(volume: Volume, source: Dataset) -> float:
    """The source's slice thickness, else the slice spacing."""
    return float(source.get("SliceThickness") or volume.spacing[2])


def _located_headers(volume: Volume, source: Dataset) -> list[Dataset]:
    """`slice_header` of each source slice plus where it lies (the volume's geometry), which highdicom
    needs to tell which CT slice each SEG frame belongs to."""
    headers = []
    for ref in volume.slices:
        header = slice_header(volume, ref, source)
        header.Modality = source.get("Modality", "CT")
        header.FrameOfReferenceUID = source.FrameOfReferenceUID
        header.ImagePositionPatient = list(ref.position_mm)
        header.ImageOrientationPatient = _orientation(volume)
        header.PixelSpacing = _pixel_spacing(volume)
        header.SliceThickness = _slice_thickness(volume, source)
        headers.append(header)
    return headers


def _balls(findings: list[Finding], volume: Volume) -> tuple[list[int], np.ndarray]:
    """(source slice indices k, stacked masks (k, j, i, segment)) over only the slices some nodule
    touches: each mask a ball of the detected diameter (at least the voxel at the centre, so that a
    tiny nodule is not lost)."""
    shape = np.array(volume.hu.shape)
    boxes = []
    for finding in findings:
        centre = volume.world_to_index(finding.detection.center_mm)[::-1]  # (k, j, i)
        reach = finding.detection.diameter_mm / 2 / np.asarray(volume.spacing)[::-1]
        lo = np.clip(np.floor(centre - reach).astype(int), 0, shape - 1)
        hi = np.clip(np.ceil(centre + reach).astype(int), 0, shape - 1)
        boxes.append((centre, lo, hi))
    planes = sorted({k for _, lo, hi in boxes for k in range(lo[0], hi[0] + 1)})
    row_of = {k: n for n, k in enumerate(planes)}
    masks = np.zeros((len(planes), shape[1], shape[2], len(findings)), dtype=np.uint8)
    for s, (finding, (centre, lo, hi)) in enumerate(zip(findings, boxes, strict=True)):
        k, j, i = np.meshgrid(*(np.arange(a, b + 1) for a, b in zip(lo, hi, strict=True)), indexing="ij")
        world = volume.index_to_world(np.stack([i, j, k], axis=-1))
        inside = np.linalg.norm(world - np.asarray(finding.detection.center_mm), axis=-1) \
            <= finding.detection.diameter_mm / 2
        inside[tuple(np.clip(np.round(centre).astype(int), lo, hi) - lo)] = True
        rows = [row_of[k] for k in range(lo[0], hi[0] + 1)]
        masks[rows, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1, s] = inside
    return planes, masks

"""DICOM SEG and TID 1500 SR objects (as a PACS holds them) -> labelled scans of the CTs they annotate.

SEG: the nodule segments (label or segmented property type matching ``finding``) are read with
highdicom in the referenced CT's own geometry (one mask plane per CT slice), split into connected
components, and each component becomes a box of its true extent; its diameter is that of the sphere
of its volume. Components under 3 mm become don't-care boxes.

SR: the TID 1500 measurement groups whose finding type matches ``finding`` and whose ROI is a 3D
coordinate in the CT's frame of reference: a POINT centre with a Diameter measurement (what lungnode
writes), an ELLIPSOID (true extent), or an ELLIPSE / POLYGON / POLYLINE / MULTIPOINT outline (a cube
of the measured diameter, else of the outline's size). An SR that explicitly reports "Nodule: Absent"
labels a negative scan. SRs observed only by a device (AI output) are not reader ground truth and are
refused unless ``accept_device_sr``.

lungnode's own results (its SR and SEG, sent back to the PACS beside the CT) are always refused, by
manufacturer, device observer or algorithm name: training on the model's output would teach it its
own mistakes.

Several objects for one CT usually describe the same nodules (re-reads, re-processing), so one object
labels a CT: the newest usable SEG, else the newest usable SR; the others are listed as superseded.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from scipy import ndimage
from tqdm import tqdm

from lungnode.training.importers.datalist import MIN_NODULE_MM, Box, ImportResult, LabeledScan
from lungnode.training.importers.image_index import Geometry, ImageIndex, Instance, Series

FINDING = r"nodul|lesion|mass|tumou?r|neoplasm"
OWN_OUTPUT = re.compile(r"lungnode", re.I)  # lungnode's Manufacturer, and in its model/algorithm names
_DEVICE_NAMES = {c.value for c in (codes.DCM.DeviceObserverName, codes.DCM.DeviceObserverManufacturer,
                                     codes.DCM.DeviceObserverModelName)}
_CORNERS = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], float)
_MM_PER_UNIT = {"mm": 1.0, "cm": 10.0}


class NotALabel(ValueError):
    """The object cannot label its CT (the message says why)."""


@dataclass(frozen=True)
class LabelObject:
    instance: Instance
    ct: Series


def _world_box(geometry: Geometry, lo_ijk, hi_ijk) -> tuple[np.ndarray, np.ndarray]:
    """(centre, size) of the world axis-aligned box around the voxels lo..hi (inclusive)."""
    lo, hi = np.asarray(lo_ijk, float) - 0.5, np.asarray(hi_ijk, float) + 0.5
    world = geometry.index_to_world(lo + _CORNERS * (hi - lo))
    return (world.min(0) + world.max(0)) / 2, world.max(0) - world.min(0)


def seg_boxes(path: Path, ct: Series, finding: str = FINDING) -> tuple[list[Box], list[Box]]:
    """(nodules, don't-care boxes) from the matching segments of a SEG over the single-frame CT ``ct``."""
    seg = hd.seg.segread(path)
    geometry = ct.geometry
    if seg.get("FrameOfReferenceUID") != ct.instances[0].frame_of_reference_uid:
        raise NotALabel("SEG and CT have different frames of reference")
    pattern = re.compile(finding, re.I)
    numbers = []
    for n in seg.segment_numbers:
        d = seg.get_segment_description(n)
        if pattern.search(f"{d.segment_label} {d.segmented_property_type.meaning}"):
            numbers.append(n)
    if not numbers:
        raise NotALabel("no segment names a nodule")
    pixels = seg.get_pixels_by_source_instance(list(geometry.sop_uids), segment_numbers=numbers,
                                               assert_missing_frames_are_empty=True, dtype=np.float32)
    mask = np.any(pixels >= 0.5, axis=-1)  # (k, j, i); fractional segments thresholded at one half
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    nodules, ignore = [], []
    for idx, sl in enumerate(ndimage.find_objects(labels), start=1):
        lo = [sl[2].start, sl[1].start, sl[0].start]
        hi = [sl[2].stop - 1, sl[1].stop - 1, sl[0].stop - 1]
        centre, size = _world_box(geometry, lo, hi)
        diameter = float((6 * counts[idx] * geometry.voxel_volume_mm3 / np.pi) ** (1 / 3))
        box = Box(tuple(map(float, centre)), tuple(map(float, size)), diameter)
        (nodules if diameter >= MIN_NODULE_MM else ignore).append(box)
    return nodules, ignore


def made_by_lungnode(path: Path) -> str | None:
    """Where an SR/SEG names lungnode as its maker (None if nowhere): its Manufacturer, the SEG's
    segmentation algorithm (name or source) or the SR's device observer (manufacturer, name, model)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    algorithms = {f"{a.AlgorithmName} {a.get('AlgorithmSource', '')}": None for s in ds.get("SegmentSequence", [])
                  for a in s.get("SegmentationAlgorithmIdentificationSequence", [])}  # ordered, once each
    names = {
        "Manufacturer": str(ds.get("Manufacturer", "")),
        "segmentation algorithm": " ".join(algorithms),
        "device observer": " ".join(_device_names(ds)),
    }
    for where, name in names.items():
        if OWN_OUTPUT.search(name):
            return f"{where} {name.strip()!r}"
    return None


def _device_names(dataset: pydicom.Dataset):
    for item in dataset.get("ContentSequence", []):
        name = item.get("ConceptNameCodeSequence", [None])[0]
        if name is not None and name.CodeValue in _DEVICE_NAMES and "TextValue" in item:
            yield str(item.TextValue)
        yield from _device_names(item)


def _diameter_mm(group) -> float | None:
    for m in group.get_measurements(name=codes.SCT.Diameter):
        scale = _MM_PER_UNIT.get(str(m.unit.value))
        if scale is not None:
            return float(m.value) * scale
    return None


def _roi_box(graphic_type: str, points: np.ndarray, diameter: float | None) -> Box:
    """The box for one 3D ROI (see the module doc); NotALabel when its size is unknown."""
    if graphic_type == "ELLIPSOID":
        axes = points[1::2] - points[0::2]  # three full axes
        centre = points.mean(0)
        size = np.sqrt((axes**2).sum(0))  # extent of the ellipsoid along x, y, z
        d = diameter or float(np.prod(np.linalg.norm(axes, axis=1)) ** (1 / 3))
        return Box(tuple(map(float, centre)), tuple(map(float, size)), d)
    if graphic_type == "POINT":
        if diameter is None:
            raise NotALabel("a point without a Diameter measurement")
        return Box.cube(points[0], diameter)
    if len(points) > 1 and np.allclose(points[0], points[-1]):
        points = points[:-1]  # closed outline: the first vertex repeated
    centre = points.mean(0)
    if diameter is None:
        if graphic_type == "ELLIPSE":
            diameter = float(np.sqrt(np.prod(np.linalg.norm(points[1::2] - points[0::2], axis=1))))
        elif graphic_type == "POLYGON" and len(points) > 2:
            area = 0.5 * np.linalg.norm(np.cross(points, np.roll(points, -1, axis=0)).sum(0))
            diameter = float(2 * np.sqrt(area / np.pi))
        else:
            diameter = float(np.ptp(points, axis=0).max())
    if not diameter > 0:
        raise NotALabel(f"a {graphic_type} without a size")
    return Box.cube(centre, diameter)


def _reports_absent(dataset: pydicom.Dataset) -> bool:
    """Whether any content item says "Nodule: Absent"."""
    for item in dataset.get("ContentSequence", []):
        name = item.get("ConceptNameCodeSequence", [None])[0]
        value = item.get("ConceptCodeSequence", [None])[0]
        if (name is not None and value is not None and name.CodeValue == codes.SCT.Nodule.value
                and value.CodeValue == codes.SCT.Absent.value):
            return True
        if _reports_absent(item):
            return True
    return False


def sr_boxes(path: Path, ct: Series, finding: str = FINDING, *, accept_device_sr: bool = False) -> list[Box]:
    """Nodules of a TID 1500 SR over ``ct``; [] for a report of no nodules; NotALabel otherwise."""
    sr = hd.sr.srread(path)
    report = sr.content
    if not isinstance(report, hd.sr.MeasurementReport):
        raise NotALabel("not a TID 1500 measurement report")
    observers = {str(o.observer_type.value) for o in report.get_observer_contexts()}
    if not accept_device_sr and codes.DCM.Device.value in observers and codes.DCM.Person.value not in observers:
        raise NotALabel("observed by a device (AI output), not a reader; --accept-device-sr to use it")
    pattern = re.compile(finding, re.I)
    groups = [g for g in (report.get_volumetric_roi_measurement_groups() + report.get_planar_roi_measurement_groups())
              if g.finding_type is not None and pattern.search(g.finding_type.meaning)]
    if not groups:
        if _reports_absent(sr):
            return []
        raise NotALabel("no nodule findings")
    frame = ct.instances[0].frame_of_reference_uid
    boxes = []
    for g in groups:
        roi = g.roi
        if isinstance(roi, hd.sr.VolumeSurface):
            graphic_type, points, roi_frame = roi.graphic_type.value, roi.graphic_data, roi.frame_of_reference_uid
        elif isinstance(roi, hd.sr.Scoord3DContentItem):
            graphic_type, points, roi_frame = roi.graphic_type.value, roi.value, roi.frame_of_reference_uid
        else:
            raise NotALabel("a finding without 3D coordinates (2D image coordinates or a segment reference)")
        if roi_frame != frame:
            raise NotALabel("a finding in another frame of reference than the CT")
        boxes.append(_roi_box(graphic_type, np.asarray(points, float).reshape(-1, 3), _diameter_mm(g)))
    return boxes


def referenced_series(path: Path) -> list[str]:
    """Series UIDs an SR/SEG names as its evidence or source (most referenced instances first)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    counts: dict[str, int] = {}
    for key in ("ReferencedSeriesSequence", "CurrentRequestedProcedureEvidenceSequence",
                "PertinentOtherEvidenceSequence"):
        for item in ds.get(key, []):
            series_items = item.get("ReferencedSeriesSequence", [item])
            for s in series_items:
                if "SeriesInstanceUID" in s:
                    n = len(s.get("ReferencedSOPSequence", s.get("ReferencedInstanceSequence", [])))
                    counts[s.SeriesInstanceUID] = counts.get(s.SeriesInstanceUID, 0) + n
    return sorted(counts, key=lambda uid: -counts[uid])


def label_objects(index: ImageIndex, result: ImportResult) -> list[LabelObject]:
    """Every SEG and SR under the folders with the CT series it refers to (present in the index)."""
    found = []
    for series in index.of_modality("SEG", "SR"):
        for inst in series.instances:
            cts = [index.series[u] for u in referenced_series(inst.path)
                   if u in index.series and index.series[u].modality not in ("SEG", "SR")]
            if not cts:
                result.skip(str(inst.path), f"{inst.modality}: its CT series is not under the image folders")
                continue
            found.append(LabelObject(inst, cts[0]))
    return found


def import_dicom_objects(index: ImageIndex, *, finding: str = FINDING, accept_device_sr: bool = False,
                         progress: bool = True) -> ImportResult:
    result = ImportResult()
    by_ct: dict[str, list[LabelObject]] = {}
    for obj in label_objects(index, result):
        by_ct.setdefault(obj.ct.uid, []).append(obj)
    for ct_uid, objs in tqdm(sorted(by_ct.items()), desc="SEG/SR scans", unit="scan", disable=not progress):
        objs.sort(key=lambda o: o.instance.content_datetime, reverse=True)
        objs.sort(key=lambda o: o.instance.modality != "SEG")  # stable: SEGs first, newest first in each
        scan = None
        for obj in objs:
            what = str(obj.instance.path)
            if scan is not None:
                result.skip(what, f"{obj.instance.modality}: superseded by another object for the same CT")
                continue
            own = made_by_lungnode(obj.instance.path)
            if own is not None:
                result.skip(what, f"{obj.instance.modality}: lungnode's own output ({own}), never ground truth")
                continue
            try:
                if obj.instance.modality == "SEG":
                    nodules, ignore = seg_boxes(obj.instance.path, obj.ct, finding)
                    source = "dicom-seg"
                else:
                    nodules, ignore = sr_boxes(obj.instance.path, obj.ct, finding,
                                               accept_device_sr=accept_device_sr), []
                    source = "dicom-sr"
                geometry = obj.ct.geometry
            except (ValueError, AttributeError, KeyError) as exc:  # NotALabel, GeometryError, broken objects
                result.skip(what, f"{obj.instance.modality}: {exc}")
                continue
            if any(not geometry.contains(b.center_mm) for b in nodules):
                result.skip(what, f"{obj.instance.modality}: nodule centre outside the CT")
                continue
            scan = LabeledScan(obj.ct.folder, ct_uid, source, nodules, ignore, obj.ct.patient_id or None)
            result.scans.append(scan)
    return result

"""LIDC-IDRI reader XML (``LidcReadMessage``) -> consensus nodules, the way LUNA16 built its lists.

Each reading session is one radiologist. A nodule >= 3 mm is outlined slice by slice (``roi`` with
``edgeMap`` pixels, ``inclusion`` FALSE for holes); smaller nodules and non-nodules are single points.
Per outlined nodule the mask is the polygon's inside without the outline pixels (the LIDC readers drew
the outline just outside the nodule), holes removed; its centre is the mean world position of the
mask voxels and its diameter that of the sphere with the mask's volume (pixel area x slice spacing).
Checked against the per-reader rows LUNA16 lists (``annotations_excluded.csv`` rows with a
diameter) for LIDC-IDRI-0001/0002: two of the five outlines match to 0.01 mm, the other three within
0.8 mm in diameter and 1.5 mm in centre (LUNA16 may have used a later revision of the XML files).

Marks of different readers within the larger radius of each other form one finding. A finding
outlined by at least ``min_readers`` readers is a nodule: centre = mean of the readers' centroids,
diameter = mean of their diameters (LUNA16's rule, with 3 of 4). Every other finding (fewer readers,
points only) becomes a don't-care box, like LUNA16's excluded list, placed and sized by its outlines
when it has any.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from lungnode.training.importers.datalist import UNMEASURED_MM, Box, ImportResult, LabeledScan
from lungnode.training.importers.image_index import Geometry, GeometryError, ImageIndex


@dataclass(frozen=True)
class Roi:
    """One reader's outline (or point) on one slice, in pixel (column, row) coordinates."""

    sop_instance_uid: str
    z_mm: float
    inclusion: bool
    points: np.ndarray  # (n, 2) int: x = column, y = row


@dataclass(frozen=True)
class ReaderFinding:
    reader: str
    rois: list[Roi]
    outlined: bool  # a nodule >= 3 mm (contours), not a point mark


@dataclass
class LidcRead:
    series_uid: str
    findings: list[ReaderFinding]


@dataclass(frozen=True)
class Mark:
    """A reader's finding in world mm."""

    reader: str
    center_mm: np.ndarray
    diameter_mm: float | None  # None for a point mark


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(el: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in el if _local(c.tag) == name]


def _text(el: ET.Element, name: str, default: str = "") -> str:
    found = _children(el, name)
    return (found[0].text or "").strip() if found else default


def _roi(el: ET.Element, points_tag: str) -> Roi:
    xy = [[int(float(_text(p, "xCoord"))), int(float(_text(p, "yCoord")))] for p in _children(el, points_tag)]
    pts = np.array(xy, dtype=int).reshape(-1, 2)
    return Roi(_text(el, "imageSOP_UID"), float(_text(el, "imageZposition", "nan")),
               _text(el, "inclusion", "TRUE").upper() != "FALSE", pts)


def read_lidc_xml(path: Path) -> LidcRead:
    """Parse one file; raises ValueError for anything but a LIDC CT read."""
    root = ET.parse(path).getroot()
    if _local(root.tag) != "LidcReadMessage":
        raise ValueError(f"not a LIDC CT read ({_local(root.tag)})")
    headers = _children(root, "ResponseHeader")
    series_uid = _text(headers[0], "SeriesInstanceUid") if headers else ""
    if not series_uid:
        raise ValueError("no SeriesInstanceUid in the ResponseHeader")
    findings = []
    for n, session in enumerate(_children(root, "readingSession")):
        reader = _text(session, "servicingRadiologistID") or f"reader-{n + 1}"
        for nod in _children(session, "unblindedReadNodule"):
            rois = [roi for roi in (_roi(r, "edgeMap") for r in _children(nod, "roi")) if len(roi.points)]
            if rois:
                outlined = any(r.inclusion and len(r.points) > 1 for r in rois)
                findings.append(ReaderFinding(reader, rois, outlined))
        for non in _children(session, "nonNodule"):
            roi = _roi(non, "locus")
            if len(roi.points):
                findings.append(ReaderFinding(reader, [roi], outlined=False))
    return LidcRead(series_uid, findings)


def _slice_index(geometry: Geometry, roi: Roi) -> int:
    """The slice a ROI lies on: by SOP instance UID, else by z (some XML files name other UIDs)."""
    if roi.sop_instance_uid in geometry.sop_uids:
        return geometry.sop_uids.index(roi.sop_instance_uid)
    ks = np.arange(geometry.shape[0])
    z = geometry.index_to_world(np.stack([np.zeros_like(ks), np.zeros_like(ks), ks], 1))[:, 2]
    k = int(np.argmin(np.abs(z - roi.z_mm)))
    if abs(z[k] - roi.z_mm) > 0.5 * abs(geometry.axes[2, 2]) + 0.01:
        raise GeometryError(f"no slice at z = {roi.z_mm} mm for a reader's ROI")
    return k


def _fill(points: np.ndarray, keep_outline: bool) -> tuple[np.ndarray, int, int]:
    """(mask in the outline's bounding box, row offset, column offset)."""
    x0, y0 = points.min(0)
    x1, y1 = points.max(0)
    img = Image.new("1", (int(x1 - x0 + 1), int(y1 - y0 + 1)))
    if len(points) > 2:
        ImageDraw.Draw(img).polygon([(int(x - x0), int(y - y0)) for x, y in points], fill=1, outline=1)
    mask = np.array(img, dtype=bool)
    mask[points[:, 1] - y0, points[:, 0] - x0] = keep_outline
    return mask, int(y0), int(x0)


def reader_mark(finding: ReaderFinding, geometry: Geometry) -> Mark:
    """World centre and volume-equivalent diameter of one reader's finding (see module doc)."""
    if not finding.outlined:
        roi = finding.rois[0]
        col, row = roi.points[0]
        return Mark(finding.reader, geometry.index_to_world([col, row, _slice_index(geometry, roi)]), None)
    rows, cols = geometry.shape[1:]
    planes: dict[int, np.ndarray] = {}
    for roi in sorted(finding.rois, key=lambda r: not r.inclusion):  # inclusions first, then holes
        k = _slice_index(geometry, roi)
        plane = planes.setdefault(k, np.zeros((rows, cols), bool))
        mask, r0, c0 = _fill(roi.points, keep_outline=not roi.inclusion)
        view = plane[r0:r0 + mask.shape[0], c0:c0 + mask.shape[1]]
        if roi.inclusion:
            view |= mask[: view.shape[0], : view.shape[1]]
        else:
            view &= ~mask[: view.shape[0], : view.shape[1]]
    voxels = np.concatenate([np.c_[np.argwhere(p)[:, ::-1], np.full(p.sum(), k)] for k, p in planes.items()])
    if len(voxels) == 0:  # outlines so tight that nothing is inside them: the outline pixels are the nodule
        voxels = np.unique(np.concatenate([np.c_[r.points, np.full(len(r.points), _slice_index(geometry, r))]
                                           for r in finding.rois if r.inclusion]), axis=0)
    centre = geometry.index_to_world(voxels.mean(0))
    diameter = float((6.0 * len(voxels) * geometry.voxel_volume_mm3 / np.pi) ** (1 / 3))
    return Mark(finding.reader, centre, diameter)


def _clusters(marks: list[Mark]) -> list[list[Mark]]:
    """Link marks of different readers closer than the larger of their radii (union-find)."""
    parent = list(range(len(marks)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, a in enumerate(marks):
        for j in range(i + 1, len(marks)):
            b = marks[j]
            reach = max(a.diameter_mm or UNMEASURED_MM, b.diameter_mm or UNMEASURED_MM) / 2
            if a.reader != b.reader and np.linalg.norm(a.center_mm - b.center_mm) <= reach:
                parent[root(j)] = root(i)
    groups: dict[int, list[Mark]] = {}
    for i, m in enumerate(marks):
        groups.setdefault(root(i), []).append(m)
    return list(groups.values())


def consensus(marks: list[Mark], min_readers: int) -> tuple[list[Box], list[Box]]:
    """(nodules, don't-care boxes) from all readers' marks of one scan."""
    nodules, ignore = [], []
    for group in _clusters(marks):
        outlined: dict[str, list[Mark]] = {}
        for m in group:
            if m.diameter_mm is not None:
                outlined.setdefault(m.reader, []).append(m)
        if len(outlined) >= min_readers:
            centres = [np.mean([m.center_mm for m in ms], axis=0) for ms in outlined.values()]
            diameters = [np.mean([m.diameter_mm for m in ms]) for ms in outlined.values()]
            nodules.append(Box.cube(np.mean(centres, axis=0), float(np.mean(diameters))))
        else:
            sized = [m for ms in outlined.values() for m in ms]
            where = sized or group
            ignore.append(Box.cube(np.mean([m.center_mm for m in where], axis=0),
                                   float(np.mean([m.diameter_mm for m in sized])) if sized else UNMEASURED_MM))
    return nodules, ignore


def xml_files(paths: list[Path]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        out += sorted(p.rglob("*.xml")) if p.is_dir() else [p]
    return out


def import_lidc_xml(xml_paths: list[Path], index: ImageIndex, *, min_readers: int = 3,
                    progress: bool = True) -> ImportResult:
    """One scan per series read in the XML files (several files for one series are pooled)."""
    result = ImportResult()
    reads: dict[str, list[ReaderFinding]] = {}
    for path in xml_files(xml_paths):
        try:
            read = read_lidc_xml(path)
        except (ValueError, ET.ParseError) as exc:
            result.skip(str(path), f"XML skipped: {exc}")
            continue
        reads.setdefault(read.series_uid, []).extend(read.findings)
    for uid, findings in tqdm(sorted(reads.items()), desc="LIDC scans", unit="scan", disable=not progress):
        series = index.series.get(uid)
        if series is None:
            result.skip(uid, "image not found under the image folders")
            continue
        try:
            marks = [reader_mark(f, series.geometry) for f in findings]
        except GeometryError as exc:
            result.skip(uid, f"image unusable: {exc}")
            continue
        nodules, ignore = consensus(marks, min_readers)
        result.scans.append(LabeledScan(series.folder, uid, "lidc-xml", nodules, ignore, series.patient_id or None))
    return result

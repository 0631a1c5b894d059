"""Pick the series of a study to read, with a reason for every series that is not eligible.

Only headers are read here (no pixel data), so a study of several thousand images is judged quickly.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from lungnode.inference.types import SeriesCandidate, SeriesSelection

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MULTIFRAME_CT = {"1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}  # Enhanced, Legacy Converted


@dataclass(frozen=True)
class SelectionRules:
    min_slices: int = 40
    max_slice_spacing_mm: float = 3.0
    max_pixel_spacing_mm: float = 1.5
    spacing_tolerance: float = 0.1  # relative deviation of slice gaps still called consistent


def _headers(paths: list[Path]) -> dict[str, list[tuple[Path, pydicom.Dataset]]]:
    series: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):
            continue
        series[str(ds.get("SeriesInstanceUID", ""))].append((path, ds))
    return series


def _judge(uid: str, items: list[tuple[Path, pydicom.Dataset]], rules: SelectionRules) -> SeriesCandidate:
    first = items[0][1]
    cand = SeriesCandidate(series_instance_uid=uid, paths=[p for p, _ in items],
                           description=str(first.get("SeriesDescription", "")))
    reasons = cand.reasons
    if first.get("Modality") != "CT":
        reasons.append(f"modality is {first.get('Modality', 'missing')}, not CT")
    sop_class = str(first.get("SOPClassUID", ""))
    if sop_class in MULTIFRAME_CT:
        n_slices = max(int(ds.get("NumberOfFrames", 1)) for _, ds in items)
    elif sop_class == CT_IMAGE:
        n_slices = len(items)
    else:
        reasons.append("not a CT image storage series")
        n_slices = 0
    image_type = [str(v).upper() for v in first.get("ImageType", [])]
    if "LOCALIZER" in image_type:
        reasons.append("a localizer (scout)")
    if n_slices < rules.min_slices:
        reasons.append(f"{n_slices} slices, fewer than {rules.min_slices}")
    if reasons or sop_class in MULTIFRAME_CT:
        # Multi-frame geometry is checked when the volume is built.
        cand.eligible = not reasons
        cand.score = float(n_slices)
        return cand
    try:
        orient = np.array([float(v) for v in first.ImageOrientationPatient])
        normal = np.cross(orient[:3], orient[3:])
        positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in items])
        pixel_spacing = max(float(v) for v in first.PixelSpacing)
    except (AttributeError, ValueError, TypeError):
        reasons.append("image position, orientation or pixel spacing missing")
        return cand
    if abs(normal[2]) < 0.9:
        reasons.append("not axial")
    for _, ds in items:
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], orient, atol=1e-3):
            reasons.append("slices have different orientations")
            break
    z = np.sort(positions @ normal)
    gaps = np.diff(z)
    if np.any(gaps < 1e-3):
        reasons.append("two slices share one position")
    elif gaps.size:
        step = float(np.median(gaps))
        if np.max(np.abs(gaps - step)) > rules.spacing_tolerance * step:
            reasons.append(f"inconsistent slice spacing ({gaps.min():.2f}-{gaps.max():.2f} mm)")
        if step > rules.max_slice_spacing_mm:
            reasons.append(f"slice spacing {step:.2f} mm, more than {rules.max_slice_spacing_mm} mm")
        if pixel_spacing > rules.max_pixel_spacing_mm:
            reasons.append(f"pixel spacing {pixel_spacing:.2f} mm, more than {rules.max_pixel_spacing_mm} mm")
        # Prefer thin slices, then long coverage; original images over derived ones.
        cand.score = (z[-1] - z[0]) / max(step, 0.5) + (10.0 if "ORIGINAL" in image_type else 0.0)
    cand.eligible = not reasons
    return cand


def select_series(paths: list[Path], rules: SelectionRules = SelectionRules()) -> SeriesSelection:
    """Judge every series among `paths` and choose the best eligible one (None if there is none)."""
    candidates = [_judge(uid, items, rules) for uid, items in _headers(paths).items()]
    eligible = [c for c in candidates if c.eligible]
    chosen = max(eligible, key=lambda c: c.score) if eligible else None
    return SeriesSelection(chosen=chosen, candidates=candidates)

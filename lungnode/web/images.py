"""PNG images for the reading room: slices of the processed series in lung window, and the key images.

Slices are plain anatomy; the browser draws the nodule boxes over them, so one cached, windowed copy
of the series serves every slider position. The boxes come from the same geometry as the key images.
"""
from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
from PIL import Image

from lungnode.inference.types import Detection, Volume
from lungnode.inference.volume import load_volume
from lungnode.reports.key_images import LUNG_WINDOW_HU, box_pixels, centre_slice_index


@dataclass(frozen=True)
class NoduleMark:
    """Where nodule N<number> is drawn: its centre slice, the slices its box spans, and the box in
    image pixels (x0, y0, x1, y1; pixel (i, j) covers [i, i+1) x [j, j+1))."""

    number: int
    slice: int
    first_slice: int
    last_slice: int
    box_px: tuple[float, float, float, float]
    diameter_mm: float
    score: float


@dataclass(frozen=True)
class SeriesView:
    """The processed series windowed to 8 bits (k, row, column) and the nodule marks on it."""

    series_uid: str
    grey: np.ndarray
    spacing_mm: tuple[float, float, float]  # column, row, slice
    nodules: list[NoduleMark]
    origin_mm: tuple[float, float, float]  # the volume's geometry (inference.types.Volume)
    direction: np.ndarray
    slice_uids: list[str]  # SOP Instance UID of each slice

    def slice_png(self, k: int) -> bytes:
        return png(self.grey[k])

    def world_mm(self, k: int, x_px: float, y_px: float) -> tuple[float, float, float]:
        """A point clicked on slice k, in image pixels (pixel (i, j) covers [i, i+1) x [j, j+1)), in LPS mm
        through the slice's position, orientation and pixel spacing."""
        ijk = np.array([x_px - 0.5, y_px - 0.5, k], dtype=np.float64)
        xyz = np.asarray(self.origin_mm) + (ijk * np.asarray(self.spacing_mm)) @ self.direction.T
        return (float(xyz[0]), float(xyz[1]), float(xyz[2]))


def png(pixels: np.ndarray, max_side: int | None = None) -> bytes:
    image = Image.fromarray(pixels)
    if max_side:
        image.thumbnail((max_side, max_side))
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False, compress_level=3)
    return out.getvalue()


def lung_window(hu: np.ndarray) -> np.ndarray:
    lo, hi = LUNG_WINDOW_HU
    return np.round(np.clip((hu - lo) / (hi - lo), 0.0, 1.0) * 255).astype(np.uint8)


def nodule_mark(volume: Volume, detection: Detection, number: int) -> NoduleMark:
    x0, y0, z0, x1, y1, z1 = detection.box_mm
    ks = volume.world_to_index(np.array([[x0, y0, z0], [x1, y1, z1]]))[:, 2]
    last = volume.hu.shape[0] - 1
    i0, j0, i1, j1 = box_pixels(volume, detection)
    return NoduleMark(number=number, slice=centre_slice_index(volume, detection.center_mm),
                      first_slice=int(np.clip(np.floor(ks.min() + 0.5), 0, last)),
                      last_slice=int(np.clip(np.ceil(ks.max() - 0.5), 0, last)),
                      box_px=(i0 + 0.5, j0 + 0.5, i1 + 0.5, j1 + 0.5),
                      diameter_mm=detection.diameter_mm, score=detection.score)


def build_view(paths: list[Path], series_uid: str, detections: list[Detection]) -> SeriesView:
    """Load the processed series (its instance files) and window it."""
    if not paths:
        raise FileNotFoundError(f"series {series_uid} is no longer among the received images")
    volume = load_volume(paths)
    return SeriesView(series_uid=series_uid, grey=lung_window(volume.hu), spacing_mm=volume.spacing,
                      nodules=[nodule_mark(volume, d, n) for n, d in enumerate(detections, start=1)],
                      origin_mm=tuple(float(v) for v in volume.origin), direction=np.asarray(volume.direction),
                      slice_uids=[s.sop_instance_uid for s in volume.slices])


class SeriesViews:
    """The last few series views, keyed by (study, results version); loads each once even when the
    slider asks for many slices at the same moment, and a cached view costs no file or database work."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._views: dict[tuple[str, int], SeriesView] = {}
        self._lock = threading.Lock()

    def get(self, study_uid: str, version: int, load: Callable[[], SeriesView]) -> SeriesView:
        key = (study_uid, version)
        with self._lock:
            view = self._views.pop(key, None) or load()
            self._views[key] = view  # most recently used last
            while len(self._views) > self.keep:
                self._views.pop(next(iter(self._views)))
            return view


def key_image_png(path: Path, max_side: int | None = None) -> bytes:
    """A secondary-capture key image (RGB, box and label burned in) as PNG."""
    return png(pydicom.dcmread(path).pixel_array, max_side)

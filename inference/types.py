"""Typed values passed between the pipeline stages (select -> volume -> detect -> report).

World coordinates are DICOM patient coordinates (LPS, millimetres) everywhere; voxel indices are
(k, j, i) = (slice, row, column), the order of ``Volume.hu``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class SliceRef:
    """One source CT instance behind one plane of the volume (for SR/key-image references)."""

    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    position_mm: tuple[float, float, float]  # ImagePositionPatient
    frame_number: int | None = None  # set for a frame of a multi-frame (Enhanced CT) instance


@dataclass
class Volume:
    """A CT volume in Hounsfield units with its patient geometry.

    ``hu[k, j, i]``; ``spacing`` is (i, j, k) = (column, row, slice) in mm; ``direction`` is 3x3 with
    columns the world (LPS) directions of the i, j, k axes; ``origin`` is the world position of voxel 0.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    slices: list[SliceRef]
    study_instance_uid: str
    series_instance_uid: str

    def index_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """Continuous (i, j, k) voxel indices, shape (..., 3) -> LPS mm, shape (..., 3)."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return np.asarray(self.origin) + (ijk * np.asarray(self.spacing)) @ self.direction.T

    def world_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """LPS mm, shape (..., 3) -> continuous (i, j, k) voxel indices, shape (..., 3)."""
        xyz = np.asarray(xyz, dtype=np.float64) - np.asarray(self.origin)
        return (xyz @ np.linalg.inv(self.direction).T) / np.asarray(self.spacing)


@dataclass(frozen=True)
class Detection:
    """One nodule candidate in world coordinates."""

    center_mm: tuple[float, float, float]  # LPS
    box_mm: tuple[float, float, float, float, float, float]  # LPS xmin, ymin, zmin, xmax, ymax, zmax
    diameter_mm: float
    score: float


@dataclass(frozen=True)
class ModelInfo:
    """What produced a result: shown in the SR, key images and model card."""

    name: str
    version: str
    sha256: str


@dataclass
class SeriesCandidate:
    """A series in a study and why it is (or is not) eligible for detection."""

    series_instance_uid: str
    paths: list[Path]
    description: str = ""
    eligible: bool = False
    reasons: list[str] = field(default_factory=list)
    score: float = 0.0


@dataclass
class SeriesSelection:
    """The chosen series (or None) and the reasons for every candidate."""

    chosen: SeriesCandidate | None
    candidates: list[SeriesCandidate]

    @property
    def why_not(self) -> str:
        """Human-readable reason when no series was eligible."""
        if not self.candidates:
            return "the study holds no image series"
        return "; ".join(
            f"series {c.series_instance_uid} ({c.description or 'no description'}): {', '.join(c.reasons)}"
            for c in self.candidates
        )


@dataclass
class DetectionResult:
    """Everything the report stage needs about one processed (or refused) study."""

    study_instance_uid: str
    series_instance_uid: str | None
    model: ModelInfo
    detections: list[Detection]
    not_processed_reason: str | None = None
    seconds: float = 0.0

"""Find the images that annotations refer to, and their patient geometry.

Annotation lists name a scan by its SeriesInstanceUID; the images sit somewhere under folders a user
points at, as DICOM files with any names or as ``<series uid>.mhd`` / ``.nii.gz`` volumes (LUNA16).
Only headers are read (no pixels), so indexing a large archive is quick.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from tqdm import tqdm

from lungnode.training.importers.datalist import Box, ImportResult, LabeledScan

VOLUME_SUFFIXES = (".mhd", ".nii.gz", ".nii")
_NOT_DICOM = (".raw", ".zraw", ".xml", ".csv", ".json", ".txt", ".md", ".zip", ".gz", ".py")
_TAGS = ["SOPInstanceUID", "SOPClassUID", "Modality", "SeriesInstanceUID", "StudyInstanceUID", "PatientID",
         "FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows",
         "Columns", "NumberOfFrames", "SeriesDate", "SeriesTime", "ContentDate", "ContentTime"]


class GeometryError(ValueError):
    """The image is not one regular volume (the message says why)."""


@dataclass(frozen=True)
class Instance:
    """The header fields of one DICOM file that importers need."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    series_uid: str
    study_uid: str
    patient_id: str
    frame_of_reference_uid: str
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns)
    rows: int
    columns: int
    frames: int
    content_datetime: str  # for "newest wins" between label objects

    @classmethod
    def from_dataset(cls, path: Path, ds: pydicom.Dataset) -> Instance:
        def floats(name):
            v = ds.get(name)
            return tuple(float(x) for x in v) if v else None

        return cls(
            path=path, sop_instance_uid=str(ds.get("SOPInstanceUID", "")), sop_class_uid=str(ds.get("SOPClassUID", "")),
            modality=str(ds.get("Modality", "")), series_uid=str(ds.get("SeriesInstanceUID", "")),
            study_uid=str(ds.get("StudyInstanceUID", "")), patient_id=str(ds.get("PatientID", "")),
            frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
            position=floats("ImagePositionPatient"), orientation=floats("ImageOrientationPatient"),
            pixel_spacing=floats("PixelSpacing"), rows=int(ds.get("Rows", 0) or 0),
            columns=int(ds.get("Columns", 0) or 0), frames=int(ds.get("NumberOfFrames", 1) or 1),
            content_datetime=f"{ds.get('ContentDate', '')}{ds.get('ContentTime', '')}"
                             or f"{ds.get('SeriesDate', '')}{ds.get('SeriesTime', '')}",
        )


@dataclass(frozen=True)
class Geometry:
    """Voxel grid -> world mm (LPS): ``origin + axes @ (i, j, k)``; i = column, j = row, k = slice."""

    origin: np.ndarray  # world position of voxel (0, 0, 0)
    axes: np.ndarray  # 3x3, column n is the world step of one voxel along i, j, k
    shape: tuple[int, int, int]  # (k, j, i)
    sop_uids: tuple[str, ...] = ()  # DICOM: the instance at each k

    def index_to_world(self, ijk) -> np.ndarray:
        return self.origin + np.asarray(ijk, float) @ self.axes.T

    def world_to_index(self, xyz) -> np.ndarray:
        return (np.asarray(xyz, float) - self.origin) @ np.linalg.inv(self.axes).T

    @property
    def voxel_volume_mm3(self) -> float:
        return float(abs(np.linalg.det(self.axes)))

    def contains(self, xyz, margin_mm: float = 0.0) -> bool:
        """Whether a world point lies within the scanned volume (plus a margin)."""
        ijk = self.world_to_index(xyz)
        pad = margin_mm / np.linalg.norm(self.axes, axis=0)
        hi = np.asarray(self.shape[::-1]) - 1
        return bool(np.all(ijk >= -0.5 - pad) and np.all(ijk <= hi + 0.5 + pad))


@dataclass
class Series:
    """The instances of one DICOM series found under the indexed folders."""

    uid: str
    instances: list[Instance]

    @property
    def folder(self) -> Path:
        """The folder holding the series (the common parent when its files are spread out)."""
        return Path(os.path.commonpath([str(i.path.parent) for i in self.instances]))

    @property
    def modality(self) -> str:
        return self.instances[0].modality

    @property
    def patient_id(self) -> str:
        return self.instances[0].patient_id

    @cached_property
    def geometry(self) -> Geometry:
        """The series as one evenly spaced stack of single-frame slices, sorted along its normal."""
        inst = [i for i in self.instances if i.position and i.orientation and i.pixel_spacing]
        if not inst:
            raise GeometryError("no image position/orientation/pixel spacing")
        if any(i.frames > 1 for i in inst):
            raise GeometryError("multi-frame images are not supported by the importers")
        orient = np.array(inst[0].orientation).reshape(2, 3)
        if any(not np.allclose(i.orientation, inst[0].orientation, atol=1e-3) for i in inst):
            raise GeometryError("slices differ in orientation")
        normal = np.cross(orient[0], orient[1])
        inst.sort(key=lambda i: float(np.dot(i.position, normal)))
        pos = np.array([i.position for i in inst])
        if len(inst) > 1:
            steps = np.diff(pos @ normal)
            step = float(np.median(steps))
            if step <= 0 or np.any(np.abs(steps - step) > 0.02 * step + 0.01):
                raise GeometryError("slices are not evenly spaced (gaps or duplicates)")
            k_axis = (pos[-1] - pos[0]) / (len(inst) - 1)
        else:
            k_axis = normal
        rs, cs = inst[0].pixel_spacing
        axes = np.stack([orient[0] * cs, orient[1] * rs, k_axis], axis=1)
        return Geometry(pos[0], axes, (len(inst), inst[0].rows, inst[0].columns),
                        tuple(i.sop_instance_uid for i in inst))


def volume_geometry(path: Path) -> Geometry:
    """Geometry of a .mhd/.nii.gz file from its header (SimpleITK's LPS physical space)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    if reader.GetDimension() != 3:
        raise GeometryError(f"{path.name} is not a 3D image")
    direction = np.array(reader.GetDirection()).reshape(3, 3)
    axes = direction * np.array(reader.GetSpacing())[None, :]
    size = reader.GetSize()
    return Geometry(np.array(reader.GetOrigin()), axes, (size[2], size[1], size[0]))


def volume_stem(path: Path) -> str:
    """The file name without its image suffix (LUNA16 names files after the series UID)."""
    name = path.name
    return next((name[: -len(s)] for s in VOLUME_SUFFIXES if name.endswith(s)), name)


@dataclass
class ImageIndex:
    series: dict[str, Series]
    volumes: dict[str, Path]  # file stem (a series UID for LUNA16) -> .mhd / .nii.gz

    @classmethod
    def build(cls, roots: list[Path], *, progress: bool = True) -> ImageIndex:
        files: list[Path] = []
        for root in map(Path, roots):
            if root.is_file():
                files.append(root)
            elif root.is_dir():
                files += sorted(p for p in root.rglob("*") if p.is_file())
            else:
                raise FileNotFoundError(f"image folder {root} does not exist")
        series: dict[str, dict[str, Instance]] = {}
        volumes: dict[str, Path] = {}
        for path in tqdm(files, desc="indexing images", unit="file", disable=not progress or len(files) < 50):
            if path.name.endswith(VOLUME_SUFFIXES):
                volumes[volume_stem(path)] = path
                continue
            if path.name.lower().endswith(_NOT_DICOM):
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
            except (InvalidDicomError, OSError, ValueError):
                continue
            inst = Instance.from_dataset(path, ds)
            if inst.series_uid and inst.sop_instance_uid:
                series.setdefault(inst.series_uid, {}).setdefault(inst.sop_instance_uid, inst)
        return cls({uid: Series(uid, list(v.values())) for uid, v in series.items()}, volumes)

    def image_for(self, series_uid: str) -> tuple[Path, Geometry, str | None]:
        """(image path, geometry, patient id) of a series, as a volume file or a DICOM folder.

        Raises KeyError when it is not under the indexed folders, GeometryError when unusable."""
        if series_uid in self.volumes:
            path = self.volumes[series_uid]
            return path, volume_geometry(path), None
        s = self.series[series_uid]
        return s.folder, s.geometry, s.patient_id or None

    def of_modality(self, *modalities: str) -> list[Series]:
        return [s for s in self.series.values() if s.modality in modalities]

    @cached_property
    def _sop_to_series(self) -> dict[str, str]:
        return {i.sop_instance_uid: s.uid for s in self.series.values() for i in s.instances}

    def series_of_instance(self, sop_instance_uid: str) -> Series | None:
        uid = self._sop_to_series.get(sop_instance_uid)
        return self.series[uid] if uid else None


def locate(index: ImageIndex, series_uid: str, source: str, boxes: list[Box], ignore: list[Box],
           result: ImportResult) -> LabeledScan | None:
    """The labelled scan for a series found in the index, or None (recorded in ``result.skipped``).

    A nodule centre outside the image means the annotation belongs to another image or uses other
    coordinates: the whole scan is skipped rather than trained on with a nodule missing."""
    try:
        image, geometry, patient_id = index.image_for(series_uid)
    except KeyError:
        result.skip(series_uid, "image not found under the image folders")
        return None
    except GeometryError as exc:
        result.skip(series_uid, f"image unusable: {exc}")
        return None
    if any(not geometry.contains(b.center_mm) for b in boxes):
        result.skip(series_uid, "nodule centre outside the image (another image, or other coordinates?)")
        return None
    return LabeledScan(image, series_uid, source, boxes, [b for b in ignore if geometry.contains(b.center_mm)],
                       patient_id)

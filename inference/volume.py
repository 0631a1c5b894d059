"""Build the HU volume of the chosen series, keeping its LPS patient geometry and slice references.

highdicom does the sorting by position, the spacing checks and the modality (HU) rescale, for single
frame CT and for multi-frame Enhanced CT alike.
"""
from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom

from lungnode.inference.types import SliceRef, Volume


class VolumeError(ValueError):
    """The series cannot be turned into one regular volume (the message says why)."""


def load_volume(paths: list[Path]) -> Volume:
    datasets = [pydicom.dcmread(p) for p in paths]
    if not datasets:
        raise VolumeError("no images")
    try:
        if len(datasets) == 1 and int(datasets[0].get("NumberOfFrames", 1)) > 1:
            hvol = hd.Image.from_dataset(datasets[0]).get_volume(dtype=np.float32)
        else:
            hvol = hd.get_volume_from_series(datasets, dtype=np.float32)
    except (ValueError, RuntimeError, AttributeError, KeyError) as exc:
        unreadable = _unreadable(datasets)
        if unreadable:
            raise VolumeError(f"{len(unreadable)} of {len(datasets)} slices cannot be decoded: "
                              f"{'; '.join(unreadable[:3])}") from exc
        raise VolumeError(f"the slices do not form one regular volume: {exc}") from exc
    hvol = hvol.squeeze_channel() if hvol.number_of_channel_dimensions else hvol
    affine = np.asarray(hvol.affine, dtype=np.float64)
    # highdicom's array axes are (slice, row, column); ours name them (k, j, i): i = column.
    vectors = affine[:3, :3][:, ::-1]  # columns now i, j, k
    spacing = np.linalg.norm(vectors, axis=0)
    direction = vectors / spacing
    origin = affine[:3, 3]
    volume = Volume(
        hu=np.ascontiguousarray(hvol.array, dtype=np.float32),
        spacing=tuple(float(s) for s in spacing),
        origin=tuple(float(o) for o in origin),
        direction=direction,
        slices=[],
        study_instance_uid=str(datasets[0].StudyInstanceUID),
        series_instance_uid=str(datasets[0].SeriesInstanceUID),
    )
    volume.slices = _slice_refs(volume, datasets, paths)
    return volume


def _unreadable(datasets: list[pydicom.Dataset]) -> list[str]:
    """The slices whose pixel data does not decode, named as a PACS admin finds them: Instance Number
    and SOP Instance UID, with the decoder's reason."""
    bad = []
    for ds in datasets:
        try:
            ds.pixel_array
        except Exception as exc:  # each decoder (RLE, JPEG, JPEG 2000 ...) fails in its own way
            bad.append(f"instance {ds.get('InstanceNumber', '?')} ({ds.SOPInstanceUID}): {type(exc).__name__}: "
                       f"{str(exc)[:120]}")
    return bad


def _slice_refs(volume: Volume, datasets: list[pydicom.Dataset], paths: list[Path]) -> list[SliceRef]:
    """The source instance (and frame) behind each plane k, found by position."""
    n = volume.hu.shape[0]
    planes = volume.index_to_world(np.stack([np.zeros(n), np.zeros(n), np.arange(n)], axis=1))
    if len(datasets) == 1:
        ds = datasets[0]
        return [SliceRef(str(ds.SOPInstanceUID), str(ds.SOPClassUID), paths[0], tuple(map(float, planes[k])),
                         frame_number=_frame_at(ds, planes[k])) for k in range(n)]
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    refs = []
    for k in range(n):
        idx = int(np.argmin(np.linalg.norm(positions - planes[k], axis=1)))
        ds = datasets[idx]
        refs.append(SliceRef(str(ds.SOPInstanceUID), str(ds.SOPClassUID), paths[idx],
                             tuple(float(v) for v in positions[idx])))
    return refs


def _frame_at(ds: pydicom.Dataset, position: np.ndarray) -> int:
    frames = ds.get("PerFrameFunctionalGroupsSequence", [])
    best, best_d = 1, np.inf
    for number, item in enumerate(frames, start=1):
        try:
            ipp = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        except (AttributeError, IndexError):
            continue
        d = float(np.linalg.norm(ipp - position))
        if d < best_d:
            best, best_d = number, d
    return best


def load_image_file(path: Path) -> Volume:
    """A .mhd/.nii(.gz)/.nrrd volume (LUNA16 ships .mhd) through SimpleITK, whose physical frame is LPS."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    hu = sitk.GetArrayFromImage(image).astype(np.float32)  # (k, j, i)
    return Volume(
        hu=hu,
        spacing=tuple(float(s) for s in image.GetSpacing()),
        origin=tuple(float(o) for o in image.GetOrigin()),
        direction=np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3),
        slices=[],
        study_instance_uid="",
        series_instance_uid=Path(path).name.split(".")[0],
    )


def load_any(path: Path) -> Volume:
    """A DICOM series folder or a volume file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        return load_volume(files)
    return load_image_file(path)

"""Read what the pipeline stored for one study version: result.json and its key images.

Read-only: the pipeline writes results/<study>/v<N>/, the page and the API only look."""
from __future__ import annotations

import json
from pathlib import Path

import pydicom

from lungnode.inference.types import Detection, DetectionResult, ModelInfo
from lungnode.pipeline import results_dir_for

SECONDARY_CAPTURE_CLASSES = {"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.4"}  # SC, multi-frame true colour


def version_dir(results_root: Path, study_uid: str, version: int) -> Path | None:
    """The results folder of a processed version, or None before the first run finished."""
    path = results_dir_for(results_root, study_uid, version)
    return path if version > 0 and path.is_dir() else None


def load_result(directory: Path | None) -> DetectionResult | None:
    """result.json back as the DetectionResult the pipeline wrote."""
    path = directory / "result.json" if directory else None
    if path is None or not path.exists():
        return None
    data = json.loads(path.read_text())
    return DetectionResult(
        study_instance_uid=data["study_instance_uid"], series_instance_uid=data["series_instance_uid"],
        model=ModelInfo(**data["model"]), detections=[_detection(d) for d in data["detections"]],
        not_processed_reason=data.get("not_processed_reason"), seconds=data.get("seconds", 0.0))


def _detection(d: dict) -> Detection:
    """JSON lists back to the tuples Detection declares (the API's serializer checks them)."""
    return Detection(center_mm=tuple(d["center_mm"]), box_mm=tuple(d["box_mm"]), diameter_mm=d["diameter_mm"],
                     score=d["score"])


def key_image_files(directory: Path | None) -> dict[int, Path]:
    """Secondary-capture key images by nodule number (their InstanceNumber, N1 = 1)."""
    found: dict[int, Path] = {}
    for path in sorted(directory.glob("*.dcm")) if directory else []:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if str(ds.SOPClassUID) in SECONDARY_CAPTURE_CLASSES:
            found[int(ds.InstanceNumber)] = path
    return found

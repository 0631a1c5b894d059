"""Read what the pipeline stored for one study version: result.json and its key images.

Read-only: the pipeline writes results/<study>/v<N>/, the page and the API only look."""
from __future__ import annotations

from pathlib import Path

import pydicom

from lungnode.pipeline import results_dir_for

SECONDARY_CAPTURE_CLASSES = {"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.4"}  # SC, multi-frame true colour


def version_dir(results_root: Path, study_uid: str, version: int) -> Path | None:
    """The results folder of a processed version, or None before the first run finished."""
    path = results_dir_for(results_root, study_uid, version)
    return path if version > 0 and path.is_dir() else None


def key_image_files(directory: Path | None) -> dict[int, Path]:
    """Secondary-capture key images by nodule number (their InstanceNumber, N1 = 1)."""
    found: dict[int, Path] = {}
    for path in sorted(directory.glob("*.dcm")) if directory else []:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if str(ds.SOPClassUID) in SECONDARY_CAPTURE_CLASSES:
            found[int(ds.InstanceNumber)] = path
    return found

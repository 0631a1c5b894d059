"""The scans an evaluation runs on, each with its reference nodules and don't-care findings:
held-out phantoms (by seed), a datalist from `lungnode train import`, or DICOM series scored against
the LUNA16 lists. Scans load one at a time, so an evaluation holds one volume in memory."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom

from lungnode.inference.types import Volume
from lungnode.inference.volume import load_any
from lungnode.training.froc import Annotation, load_luna16_csv


@dataclass(frozen=True)
class LoadedScan:
    volume: Volume
    annotations: list[Annotation]
    excluded: list[Annotation]


@dataclass(frozen=True)
class EvalScan:
    series_uid: str
    name: str
    load: Callable[[], LoadedScan]


def phantom_scans(first_seed: int, last_seed: int) -> list[EvalScan]:
    """Phantoms made like the training ones, from seeds the training never saw."""
    from lungnode.training.data import PhantomSettings, phantom_volume

    def load(seed: int) -> LoadedScan:
        volume, ph = phantom_volume(seed, PhantomSettings())
        uid = f"phantom-{seed}"
        return LoadedScan(volume, [Annotation(uid, n.center_mm, n.diameter_mm) for n in ph.nodules], [])

    return [EvalScan(f"phantom-{s}", f"phantom-{s}", lambda s=s: load(s)) for s in range(first_seed, last_seed + 1)]


def datalist_scans(path: Path, section: str) -> list[EvalScan]:
    """Items of one section of a MONAI-style datalist (boxes cccwhd in world mm; `ignore_box` = don't care)."""
    data = json.loads(Path(path).read_text())
    if section not in data:
        raise ValueError(f"{path} has no {section!r} section (it has {', '.join(data)})")
    scans = []
    for n, item in enumerate(data[section]):
        image = Path(item["image"])
        image = image if image.is_absolute() else Path(path).parent / image
        uid = item.get("series_uid") or f"{image.name}-{n}"
        diameters = item.get("diameter_mm")
        nodules = [Annotation(uid, tuple(b[:3]), float(diameters[i]) if diameters else float(max(b[3:6])))
                   for i, b in enumerate(item.get("box", []))]
        ignore = [Annotation(uid, tuple(b[:3]), float(max(b[3:6]))) for b in item.get("ignore_box", [])]
        scans.append(EvalScan(uid, image.name, lambda image=image, a=nodules, e=ignore: LoadedScan(load_any(image), a, e)))
    return scans


def luna16_scans(series_root: Path, annotations_csv: Path, excluded_csv: Path | None) -> list[EvalScan]:
    """Every DICOM series under `series_root`, scored with the LUNA16 lists (a series absent from
    annotations.csv is a negative scan)."""
    annotations = load_luna16_csv(annotations_csv)
    excluded = load_luna16_csv(excluded_csv) if excluded_csv and Path(excluded_csv).is_file() else []
    folders: dict[str, Path] = {}
    for f in sorted(Path(series_root).rglob("*.dcm")):
        uid = str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)
        folders.setdefault(uid, f.parent)
    if not folders:
        raise ValueError(f"no DICOM series under {series_root}")
    scans = []
    for uid, folder in folders.items():
        mine = [a for a in annotations if a.series_uid == uid]
        ignore = [a for a in excluded if a.series_uid == uid]
        name = folder.parent.name if folder.parent != Path(series_root) else folder.name
        scans.append(EvalScan(uid, name, lambda folder=folder, a=mine, e=ignore: LoadedScan(load_any(folder), a, e)))
    return scans

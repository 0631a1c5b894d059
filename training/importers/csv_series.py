"""A hospital's own nodule list (CSV) over its DICOM series -> labelled scans.

Columns ``series_uid,x_mm,y_mm,z_mm,diameter_mm`` (world mm, DICOM patient coordinates) or, with
``voxel=True``, ``series_uid,i,j,k,diameter_mm``: i = column, j = row (0-based, as in the DICOM
pixel data), k = slice counted along the slice normal (increasing z for an axial scan: the order of
an ITK/SimpleITK image and of lungnode's Volume), fractions allowed. A row whose coordinates are
empty lists a scan without nodules, so negative scans can be imported too. The series are found by
SeriesInstanceUID under the image folders.
"""
from __future__ import annotations

import csv
from pathlib import Path

from tqdm import tqdm

from lungnode.training.importers.datalist import Box, ImportResult
from lungnode.training.importers.image_index import GeometryError, ImageIndex, locate

WORLD_COLUMNS = ("x_mm", "y_mm", "z_mm")
VOXEL_COLUMNS = ("i", "j", "k")


def read_csv(path: Path, voxel: bool) -> dict[str, list[tuple[tuple[float, float, float], float]]]:
    """series uid -> [(coordinates, diameter)] in the file's coordinates; ValueError names the line."""
    coords = VOXEL_COLUMNS if voxel else WORLD_COLUMNS
    out: dict[str, list[tuple[tuple[float, float, float], float]]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or ())
        missing = {"series_uid", *coords, "diameter_mm"} - fields
        if missing:
            other = WORLD_COLUMNS if voxel else VOXEL_COLUMNS
            hint = ""
            if set(other) <= fields:
                hint = f" (the file has {', '.join(other)}: {'drop' if voxel else 'add'} --voxel)"
            raise ValueError(f"{path}: columns {sorted(missing)} missing{hint}")
        for line, row in enumerate(reader, start=2):
            uid = (row["series_uid"] or "").strip()
            if not uid:
                raise ValueError(f"{path}:{line}: empty series_uid")
            nodules = out.setdefault(uid, [])
            values = [(row[c] or "").strip() for c in (*coords, "diameter_mm")]
            if not any(values):
                continue  # a scan without nodules
            try:
                x, y, z, d = (float(v) for v in values)
            except ValueError:
                raise ValueError(f"{path}:{line}: coordinates and diameter must be numbers, got {values}") from None
            if d <= 0:
                raise ValueError(f"{path}:{line}: diameter must be positive, got {d}")
            nodules.append(((x, y, z), d))
    return out


def import_csv(path: Path, index: ImageIndex, *, voxel: bool = False, progress: bool = True) -> ImportResult:
    rows = read_csv(path, voxel)
    result = ImportResult()
    for uid, nodules in tqdm(sorted(rows.items()), desc="CSV scans", unit="scan", disable=not progress):
        if voxel:
            try:
                geometry = index.image_for(uid)[1]
            except KeyError:
                result.skip(uid, "image not found under the image folders")
                continue
            except GeometryError as exc:
                result.skip(uid, f"image unusable: {exc}")
                continue
            boxes = [Box.cube(geometry.index_to_world(c), d) for c, d in nodules]
        else:
            boxes = [Box.cube(c, d) for c, d in nodules]
        scan = locate(index, uid, "csv", boxes, [], result)
        if scan is not None:
            result.scans.append(scan)
    return result

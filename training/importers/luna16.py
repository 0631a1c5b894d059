"""LUNA16 lists -> labelled scans.

``annotations.csv`` (seriesuid, coordX, coordY, coordZ, diameter_mm) holds the nodules >= 3 mm that
at least 3 of 4 LIDC readers accepted. Its coordinates are ITK world mm of the .mhd files, which for
these axial scans are the DICOM patient coordinates (LPS) of the same series: the LIDC-IDRI-0001
nodule (56.21, 86.34, -115.87) falls on column 316, row 367 of the slice at z = -115 (checked in the
tests), so rows need no conversion whether the image is a .mhd file or the DICOM series.
``annotations_excluded.csv`` (readers' marks that are not targets) becomes don't-care boxes.
"""
from __future__ import annotations

import csv
from pathlib import Path

from tqdm import tqdm

from lungnode.training.importers.datalist import UNMEASURED_MM, Box, ImportResult
from lungnode.training.importers.image_index import ImageIndex, locate

_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")


def read_luna_csv(path: Path) -> dict[str, list[Box]]:
    """Rows grouped by series; a diameter <= 0 (an unmeasured mark) becomes a UNMEASURED_MM cube."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not a LUNA16 list, columns {sorted(missing)} missing")
        out: dict[str, list[Box]] = {}
        for row in reader:
            d = float(row["diameter_mm"])
            centre = (float(row["coordX"]), float(row["coordY"]), float(row["coordZ"]))
            out.setdefault(row["seriesuid"].strip(), []).append(Box.cube(centre, d if d > 0 else UNMEASURED_MM))
    return out


def read_series_list(path: Path) -> list[str]:
    """``seriesuids.csv``: one UID a line, no header."""
    return [line.split(",")[0].strip() for line in Path(path).read_text().splitlines() if line.strip()]


def import_luna16(annotations: Path, index: ImageIndex, *, excluded: Path | None = None,
                  series_list: Path | None = None, progress: bool = True) -> ImportResult:
    """One scan per series: those in ``series_list`` (negatives included) when given, else every
    series named in the annotations or the excluded list."""
    nodules = read_luna_csv(annotations)
    ignore = read_luna_csv(excluded) if excluded else {}
    uids = read_series_list(series_list) if series_list else sorted(set(nodules) | set(ignore))
    result = ImportResult()
    for uid in tqdm(uids, desc="LUNA16 scans", unit="scan", disable=not progress):
        scan = locate(index, uid, "luna16", nodules.get(uid, []), ignore.get(uid, []), result)
        if scan is not None:
            result.scans.append(scan)
    return result

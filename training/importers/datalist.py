"""The datalist every importer writes: labelled scans -> one validated MONAI-style JSON file.

The format is the one ``training/synth.py`` writes, so trainers read real and synthetic data alike:
``{"training": [...], "validation": [...], "test": [...]}`` (empty sections left out). Each item:
``image`` (a DICOM series folder or a .mhd/.nii.gz file, relative to the datalist file when it lies
under its folder, else absolute), ``box`` (world mm, DICOM patient coordinates (LPS), MONAI "cccwhd":
centre x, y, z then the box size along x, y, z), ``label`` (0 = nodule), ``diameter_mm``,
``ignore_box`` (don't-care regions for FROC and loss masking, same layout), ``series_uid`` (picks the
series when an image folder holds several) and ``source``. Radiologist feedback (source "feedback")
adds ``negative_box`` (findings a radiologist rejected: hard negatives, same layout) and
``negative_reason`` (one reason code each: vessel, airway, scar, outside_lung, artefact, other).

Boxes are cubes of the nodule diameter when only a centre and a size are known (LUNA16, LIDC reads,
CSV, SR points), as MONAI's LUNA16 datalists are; a SEG or an SR ellipsoid gives the true extent.
``diameter_mm`` is the diameter of the sphere of the nodule's volume wherever a shape is known.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SOURCES = ("luna16", "lidc-xml", "dicom-seg", "dicom-sr", "csv", "feedback")
SECTIONS = ("training", "validation", "test")
# A mark without a size (LUNA16 diameter -1, a reader's point mark): LUNA16's evaluation script
# treats it as a 10 mm sphere, so its don't-care box is a 10 mm cube.
UNMEASURED_MM = 10.0
# LIDC readers outline nodules >= 3 mm; smaller findings are not targets (LUNA16's rule too).
MIN_NODULE_MM = 3.0
SIZE_BINS = ("<6 mm", "6-10 mm", "10-20 mm", ">=20 mm")


@dataclass(frozen=True)
class Box:
    """One nodule (or don't-care region) in world mm (LPS)."""

    center_mm: tuple[float, float, float]
    size_mm: tuple[float, float, float]  # extent along x, y, z
    diameter_mm: float

    @classmethod
    def cube(cls, center_mm, diameter_mm: float) -> Box:
        d = float(diameter_mm)
        return cls(tuple(float(c) for c in center_mm), (d, d, d), d)

    def cccwhd(self) -> list[float]:
        return [*self.center_mm, *self.size_mm]


@dataclass(frozen=True)
class Negative:
    """A region a reader said is not a nodule (a rejected finding), and the reason code."""

    box: Box
    reason: str


@dataclass
class LabeledScan:
    """One image with its nodules, as an importer found it."""

    image: Path  # DICOM series folder or volume file
    series_uid: str
    source: str  # one of SOURCES
    boxes: list[Box]
    ignore: list[Box] = field(default_factory=list)
    patient_id: str | None = None  # keeps one patient's scans in one split
    negatives: list[Negative] | None = None  # set by sources that know them (radiologist feedback)


@dataclass(frozen=True)
class Skipped:
    """Something an importer could not use, and why (shown in the summary)."""

    what: str
    reason: str


@dataclass
class ImportResult:
    scans: list[LabeledScan] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def skip(self, what: str, reason: str) -> None:
        self.skipped.append(Skipped(what, reason))


# ----------------------------------------------------------------------------------------------
# The file format (validated on write and on read)
# ----------------------------------------------------------------------------------------------

BoxList = list[Annotated[list[float], Field(min_length=6, max_length=6)]]


class DatalistItem(BaseModel):
    """One item; extra keys (synth's kind/attachment/seed) are kept."""

    model_config = ConfigDict(extra="allow")

    image: str = Field(min_length=1)
    box: BoxList
    label: list[int]
    diameter_mm: list[float]
    ignore_box: BoxList = []
    negative_box: BoxList | None = None
    negative_reason: list[Annotated[str, Field(min_length=1)]] | None = None
    series_uid: str | None = None
    source: Literal[SOURCES] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> DatalistItem:
        if not len(self.box) == len(self.label) == len(self.diameter_mm):
            raise ValueError(f"{self.image}: box, label and diameter_mm differ in length")
        if (self.negative_box is None) != (self.negative_reason is None) or \
                len(self.negative_box or []) != len(self.negative_reason or []):
            raise ValueError(f"{self.image}: negative_box and negative_reason go together, one reason per box")
        for b in self.box + self.ignore_box + (self.negative_box or []):
            if not all(math.isfinite(v) for v in b) or min(b[3:]) <= 0:
                raise ValueError(f"{self.image}: box {b} is not finite with a positive size")
        if any(not math.isfinite(d) or d <= 0 for d in self.diameter_mm):
            raise ValueError(f"{self.image}: diameters must be positive")
        return self


class Datalist(BaseModel):
    training: list[DatalistItem]
    validation: list[DatalistItem] = []
    test: list[DatalistItem] = []

    @model_validator(mode="after")
    def _unique_scans(self) -> Datalist:
        keys = [(i.series_uid, i.image) for s in SECTIONS for i in getattr(self, s)]
        dup = [k for k, n in Counter(keys).items() if n > 1]
        if dup:
            raise ValueError(f"scans listed twice: {dup[:3]}")
        return self


def read_datalist(path: Path) -> Datalist:
    return Datalist.model_validate_json(Path(path).read_text())


def image_path(datalist_path: Path, image: str) -> Path:
    """An item's image: relative paths are relative to the datalist file's folder."""
    p = Path(image)
    return p if p.is_absolute() else Path(datalist_path).parent / p


def split_of(group: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """The section for a patient (or series) by a seeded hash, so a scan keeps its split when others
    are added later, and all scans of one patient land together."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError("validation and test fractions must be >= 0 and sum to less than 1")
    u = int.from_bytes(hashlib.sha256(f"{seed}:{group}".encode()).digest()[:8], "big") / 2**64
    return "test" if u < test_fraction else "validation" if u < test_fraction + val_fraction else "training"


def _mm(values) -> list[float]:
    return [round(float(v), 4) for v in values]  # 0.1 um: exact enough, short enough to read


def _item(scan: LabeledScan, root: Path) -> DatalistItem:
    image = scan.image.resolve()
    rel = os.path.relpath(image, root)
    return DatalistItem(
        image=Path(rel).as_posix() if not rel.startswith("..") else image.as_posix(),
        box=[_mm(b.cccwhd()) for b in scan.boxes],
        label=[0] * len(scan.boxes),
        diameter_mm=_mm(b.diameter_mm for b in scan.boxes),
        ignore_box=[_mm(b.cccwhd()) for b in scan.ignore],
        negative_box=None if scan.negatives is None else [_mm(n.box.cccwhd()) for n in scan.negatives],
        negative_reason=None if scan.negatives is None else [n.reason for n in scan.negatives],
        series_uid=scan.series_uid,
        source=scan.source,
    )


def _dumps(body: dict[str, list[dict]]) -> str:
    """JSON with one item a line: readable, greppable and diff-friendly even with many boxes."""
    sections = []
    for name, items in body.items():
        rows = ",\n  ".join(json.dumps(i) for i in items)
        sections.append(f' "{name}": [\n  {rows}\n ]' if items else f' "{name}": []')
    return "{\n" + ",\n".join(sections) + "\n}\n"


def write_datalist(path: Path, scans: list[LabeledScan], *, val_fraction: float = 0.0,
                   test_fraction: float = 0.0, seed: int = 0, append: bool = False) -> Datalist:
    """Validate and write the datalist; with ``append`` the scans join the items already in the file
    (whose sections stay as they were), replacing any item of the same series."""
    path = Path(path)
    root = path.parent.resolve()
    sections: dict[str, list[DatalistItem]] = {s: [] for s in SECTIONS}
    new_uids = {s.series_uid for s in scans}
    if append and path.exists():
        old = read_datalist(path)
        for s in SECTIONS:
            sections[s] = [i for i in getattr(old, s) if i.series_uid not in new_uids]
    for scan in scans:
        group = scan.patient_id or scan.series_uid
        sections[split_of(group, seed, val_fraction, test_fraction)].append(_item(scan, root))
    datalist = Datalist(**sections)
    body = {s: [i.model_dump(exclude_none=True) for i in getattr(datalist, s)]
            for s in SECTIONS if s == "training" or getattr(datalist, s)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(_dumps(body))
    tmp.replace(path)
    return datalist


def size_bin(d: float) -> str:
    return SIZE_BINS[0] if d < 6 else SIZE_BINS[1] if d < 10 else SIZE_BINS[2] if d < 20 else SIZE_BINS[3]


def summary_table(datalist: Datalist, skipped: list[Skipped], examples: int = 3) -> str:
    """Scans, nodules, don't-care boxes and size bins per section, then the skipped with reasons."""
    head = f"{'section':<11}{'scans':>6}{'negative':>9}{'nodules':>8}{'ignore':>7}" + "".join(
        f"{b:>10}" for b in SIZE_BINS)
    lines = [head, "-" * len(head)]
    rows = [(s, getattr(datalist, s)) for s in SECTIONS]
    rows.append(("total", [i for _, items in rows for i in items]))
    for name, items in rows:
        bins = Counter(size_bin(d) for i in items for d in i.diameter_mm)
        lines.append(f"{name:<11}{len(items):>6}{sum(not i.box for i in items):>9}"
                     f"{sum(len(i.box) for i in items):>8}{sum(len(i.ignore_box) for i in items):>7}"
                     + "".join(f"{bins[b]:>10}" for b in SIZE_BINS))
    sources = Counter(i.source or "synthetic" for _, items in rows[:-1] for i in items)
    lines.append("by source: " + ", ".join(f"{k} {n}" for k, n in sorted(sources.items())))
    reasons = Counter(r for _, items in rows[:-1] for i in items for r in i.negative_reason or [])
    if reasons:
        lines.append("rejected findings (negative_box): " + ", ".join(f"{k} {n}" for k, n in sorted(reasons.items())))
    lines.append(f"skipped: {len(skipped)}")
    by_reason: dict[str, list[str]] = {}
    for s in skipped:
        by_reason.setdefault(s.reason, []).append(s.what)
    for reason, whats in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        more = f" (+{len(whats) - examples} more)" if len(whats) > examples else ""
        lines.append(f"  {len(whats):>5}  {reason}: {', '.join(whats[:examples])}{more}")
    return "\n".join(lines)

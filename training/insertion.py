"""Simulated nodules inserted into real chest CT, so the few real scans a site has teach real anatomy.

Places are drawn inside the lung mask, clear of labelled nodules, free in the parenchyma, against the
pleura or touching a vessel. The nodule has the phantoms' shape model (``synth.nodule_field``), or a
LIDC reader's real outline (``lidc_shapes``), on the scan's own grid. It is blended by the air it displaces: each air-containing voxel (HU < 0) is scaled
toward the nodule's density, so ground glass raises the parenchyma while vessels, chest wall and bone
keep their values; the noise that scaling removes is put back with the level and grain measured in
the nearby parenchyma. The slice profile (FWHM one slice) blurs the nodule along the slice axis.

Coordinates inside this module are "grid mm", (i, j, k) * spacing; NoduleSpecs are world LPS mm.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from lungnode.inference.lung_mask import lung_bbox, lung_mask
from lungnode.inference.types import Volume
from lungnode.training.synth import (
    ATTACHMENTS,
    KINDS,
    NoduleModel,
    PARENCHYMA_HU,
    NoduleSpec,
    add_nodules,
    nodule_field,
    phantom_seed,
    write_nifti_image,
)

TISSUE_HU = -300.0  # above: vessel, wall, mediastinum
_DIRECTIONS = np.array([[a, b, c] for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if a or b or c], float)
_DIRECTIONS /= np.linalg.norm(_DIRECTIONS, axis=1, keepdims=True)
_GRAINS = (0.0, 0.4, 0.6, 0.8, 1.0, 1.3, 1.7, 2.2)  # candidate noise correlation widths, voxels


def insert_nodules(
    volume: Volume,
    rng_or_seed: np.random.Generator | int,
    *,
    n: tuple[int, int] = (1, 3),
    diameter_range_mm: tuple[float, float] = (4.0, 25.0),
    kinds: Sequence[str] = KINDS,
    attachments: Sequence[str] = ATTACHMENTS,
    avoid: Sequence[tuple[Sequence[float], float]] = (),
    lungs: np.ndarray | None = None,
    nodule_model: NoduleModel | None = None,
) -> tuple[np.ndarray, list[NoduleSpec]]:
    """A copy of ``volume.hu`` with n (inclusive range) simulated nodules, and their ground truth.

    ``avoid`` holds (LPS centre mm, radius mm) of nodules already in the scan: new ones keep 4 mm
    clear of them. ``lungs`` is ``lung_mask(volume)`` when the caller has it. Sizes, kinds and
    attachments are drawn as for the phantoms (``synth.add_nodules``); ``nodule_model`` draws each
    nodule in place of ``synth.nodule_field`` (real outlines: lidc_shapes).
    """
    unknown = (set(kinds) - set(KINDS)) | (set(attachments) - set(ATTACHMENTS))
    if unknown:
        raise ValueError(f"unknown nodule kind/attachment: {sorted(unknown)}")
    rng = np.random.default_rng(rng_or_seed)
    scene = _Scene(volume, lung_mask(volume) if lungs is None else lungs, nodule_model or nodule_field)
    specs = add_nodules(
        rng, n, diameter_range_mm, list(kinds), list(attachments),
        place=lambda r, attachment, taken: scene.place(rng, r, attachment, taken),
        draw=lambda c, r, kind: scene.render(rng, c, r, kind),
        taken=[(volume.world_to_index(np.asarray(c, float)) * scene.spacing, float(r)) for c, r in avoid],
        to_world=lambda c: volume.index_to_world(c / scene.spacing),
    )
    return scene.hu, specs


@dataclass
class _Noise:
    """Correlated Gaussian noise: white noise blurred by ``grain`` voxels (k, j, i), times ``gain``."""

    gain: float
    grain: tuple[float, float, float]

    def sample(self, rng, shape: tuple[int, ...]) -> np.ndarray:
        pad = [int(np.ceil(4 * g)) for g in self.grain]  # away from the filter's edge handling
        white = rng.standard_normal([n + 2 * p for n, p in zip(shape, pad)], dtype=np.float32)
        field = ndimage.gaussian_filter(white, self.grain)
        return self.gain * field[tuple(slice(p, p + n) for n, p in zip(shape, pad))]


def _high_pass(a: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    return a - ndimage.gaussian_filter(a, sigma)


def _robust_sd(a: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(a - np.median(a))))


def _lag_correlation(a: np.ndarray, ok: np.ndarray, axis: int) -> float:
    """Correlation of neighbours along an axis, over pairs where both are ok."""
    n = a.shape[axis]
    first, second = np.take(a, range(n - 1), axis), np.take(a, range(1, n), axis)
    both = np.take(ok, range(n - 1), axis) & np.take(ok, range(1, n), axis)
    if both.sum() < 50:
        return 0.0
    return float(np.corrcoef(first[both], second[both])[0, 1])


class _Scene:
    """The volume being edited, its lung mask and lookups in grid mm."""

    def __init__(self, volume: Volume, lungs: np.ndarray, model: NoduleModel):
        self.hu = np.array(volume.hu, dtype=np.float32)  # a copy: the caller's volume is not touched
        self.lungs = lungs
        self.spacing = np.asarray(volume.spacing, float)  # (i, j, k)
        box = lung_bbox(lungs, volume, 0.0)
        if not lungs[box].any():
            raise ValueError("no lungs found in the volume")
        self.lo = np.array([box[2].start, box[1].start, box[0].start]) * self.spacing
        self.hi = np.array([box[2].stop - 1, box[1].stop - 1, box[0].stop - 1]) * self.spacing
        self.edge = 0.8 * min(self.spacing[:2]) + 0.3  # partial-volume edge, as in the phantoms
        self.model = model

    def _kji(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        kji = np.rint(np.asarray(g) / self.spacing).astype(int)[..., ::-1]
        ok = np.all((kji >= 0) & (kji < self.hu.shape), axis=-1)
        return np.where(ok[..., None], kji, 0), ok

    def value(self, g: np.ndarray) -> np.ndarray:
        """HU at grid-mm points (..., 3); -1000 off the grid."""
        kji, ok = self._kji(g)
        return np.where(ok, self.hu[kji[..., 0], kji[..., 1], kji[..., 2]], -1000.0)

    def in_lungs(self, g: np.ndarray) -> np.ndarray:
        kji, ok = self._kji(g)
        return ok & self.lungs[kji[..., 0], kji[..., 1], kji[..., 2]]

    def parenchyma(self, g: np.ndarray) -> np.ndarray:
        return self.in_lungs(g) & (self.value(g) < PARENCHYMA_HU)

    # -- placement --------------------------------------------------------------------------------

    def place(self, rng, r: float, attachment: str, taken: list[tuple[np.ndarray, float]]) -> np.ndarray | None:
        """A centre for a nodule of radius r with the wanted attachment, or None after many tries."""
        reach = r * 1.25 + 1.0
        for p in self._random_points(rng, 120, TISSUE_HU if attachment == "vascular" else None):
            if attachment == "pleural":
                c = self._against_pleura(rng, p, r, reach)
            elif attachment == "vascular":
                c = self._beside_vessel(rng, p, r, reach)
            else:
                ring = p + (reach + 1.5) * _DIRECTIONS
                ok = self.parenchyma(p) and self.in_lungs(ring).all() and self.parenchyma(ring).mean() >= 0.8
                c = p if ok else None
            if c is not None and all(np.linalg.norm(c - q) > r + rq + 4.0 for q, rq in taken):
                return c
        return None

    def _random_points(self, rng, count: int, above_hu: float | None) -> list[np.ndarray]:
        """Random grid-mm points in the lungs: parenchyma, or (above_hu) denser voxels such as vessels."""
        out: list[np.ndarray] = []
        for _ in range(40):
            g = rng.uniform(self.lo, self.hi, (4096, 3))
            hu = self.value(g)
            keep = self.in_lungs(g) & ((hu > above_hu) if above_hu is not None else (hu < PARENCHYMA_HU))
            out.extend(g[keep][: count - len(out)])
            if len(out) >= count:
                break
        return out

    def _against_pleura(self, rng, p, r, reach) -> np.ndarray | None:
        """Walk from p until the lung ends at a thick wall (not a vessel), and step back in."""
        a = rng.uniform(0, 2 * np.pi)
        d = np.array([np.cos(a), np.sin(a), rng.uniform(-0.3, 0.3)])
        d /= np.linalg.norm(d)
        steps = p + d * np.arange(1.0, 200.0, 1.0)[:, None]
        dense = (self.value(steps) > TISSUE_HU) | ~self.in_lungs(steps)
        if not dense.any():
            return None
        b = steps[int(np.argmax(dense))]  # on the wall, past the pleura's partial-volume rim
        if not (self.value(b + np.outer([2.0, 5.0, 8.0], d)) > TISSUE_HU).all():
            return None  # a vessel or an airway wall, not the pleura
        c = b - d * r * rng.uniform(0.5, 0.85)
        if not self.parenchyma(np.stack([c, c - d * (r + 2.0)])).all():
            return None
        return c if self.in_lungs(c + reach * _DIRECTIONS).mean() >= 0.55 else None

    def _beside_vessel(self, rng, v, r, reach) -> np.ndarray | None:
        """From a point in a thin vessel, step out sideways past its surface by most of r."""
        w = rng.normal(size=3)
        w /= np.linalg.norm(w)
        steps = np.arange(0.25, 6.0, 0.25)
        out = self.value(v + np.outer(steps, w)) < -500
        back = self.value(v - np.outer(steps, w)) < -500
        if not out.any() or not back.any() or steps[np.argmax(out)] + steps[np.argmax(back)] > 8.0:
            return None  # not a vessel of 1-8 mm across (a wall, the hilum, a large vessel)
        c = v + w * (steps[np.argmax(out)] + r * rng.uniform(0.6, 0.9))
        ring = c + reach * _DIRECTIONS
        if not self.parenchyma(c) or not self.in_lungs(ring).all() or self.parenchyma(ring).mean() < 0.6:
            return None
        return c

    # -- rendering --------------------------------------------------------------------------------

    def render(self, rng, c: np.ndarray, r: float, kind: str) -> None:
        field = self.model(rng, self.hu.shape, self.spacing, (0.0, 0.0, 0.0), c, r, kind, self.edge)
        if field is None:
            return
        level, noise = self._local_parenchyma(rng, c, r)
        # Blur the edge like the scanner: in plane as the noise grain (the same kernel made both),
        # across slices by the slice profile (FWHM one slice).
        cov = ndimage.gaussian_filter(field.coverage, (1 / 2.355, *noise.grain[1:]), mode="constant")
        scale = 1.0 - cov * np.clip(1.0 - field.hu / level, 0.0, None)  # air kept in each voxel
        bg = self.hu[field.box]
        air = bg < 0
        restored = np.sqrt(np.clip(1.0 - scale**2, 0.0, None)) * noise.sample(rng, bg.shape)
        self.hu[field.box] = np.where(air, bg * scale + restored, bg)

    def _local_parenchyma(self, rng, c: np.ndarray, r: float) -> tuple[float, _Noise]:
        """Median HU of the parenchyma around c, and a noise model fitted to its high frequencies."""
        half = (r + 20.0) / self.spacing
        kji = (c / self.spacing)[::-1]
        lo = np.maximum(np.floor(kji - half[::-1]).astype(int), 0)
        hi = np.minimum(np.ceil(kji + half[::-1]).astype(int) + 1, self.hu.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        region = self.hu[box]
        sigma = np.minimum(2.0 / self.spacing[::-1], 3.0)
        smooth = ndimage.gaussian_filter(region, sigma)
        ok = self.lungs[box] & (smooth < PARENCHYMA_HU)
        if ok.sum() < 200:  # hardly any lung around: typical values
            return -850.0, _Noise(20.0, (0.0, 0.0, 0.0))
        resid = region - smooth
        target_sd = _robust_sd(resid[ok])
        ok &= np.abs(resid) < 3 * target_sd  # fine vessels are texture, not noise
        target = [_lag_correlation(resid, ok, a) for a in range(3)]
        white = rng.standard_normal(region.shape, dtype=np.float32)
        grain = [0.0, 0.0, 0.0]
        for axes in ((1, 2), (0,)):  # in plane first, then across slices
            best = None
            for g in _GRAINS:
                trial = grain.copy()
                for a in axes:
                    trial[a] = g
                hp = _high_pass(ndimage.gaussian_filter(white, trial), sigma)
                err = sum((_lag_correlation(hp, ok, a) - target[a]) ** 2 for a in axes)
                if best is None or err < best[0]:
                    best = (err, trial, _robust_sd(hp[ok]))
            grain = best[1]
        return float(np.median(region[ok])), _Noise(target_sd / max(best[2], 1e-6), tuple(grain))


# ------------------------------------------------------------------------------------------------
# Writers and the data set
# ------------------------------------------------------------------------------------------------


def write_derived_series(volume: Volume, hu: np.ndarray, out_dir: Path, *, n_nodules: int,
                         series_description: str = "simulated nodules",
                         study_instance_uid: str | None = None) -> list[Path]:
    """Write ``hu`` (planes as ``volume.slices``) as a new CT series: every source header is copied,
    the geometry is the same, the series and instance UIDs are new, ImageType is DERIVED\\SECONDARY and
    DerivationDescription says simulated nodules were inserted (it is training data, not a patient's
    image). It goes into a new study unless ``study_instance_uid`` names one, so simulated nodules
    never land in a patient's real study if the series reaches a PACS."""
    if not volume.slices or any(ref.frame_number is not None for ref in volume.slices):
        raise ValueError("writing a derived series needs single-frame source instances (Volume.slices)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    study_uid = study_instance_uid or generate_uid()
    paths = []
    for k, ref in enumerate(volume.slices):
        ds = pydicom.dcmread(ref.path)
        ds.SourceImageSequence = [pydicom.Dataset()]
        ds.SourceImageSequence[0].ReferencedSOPClassUID = ds.SOPClassUID
        ds.SourceImageSequence[0].ReferencedSOPInstanceUID = ds.SOPInstanceUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesNumber = int(ds.get("SeriesNumber") or 0) + 1000
        ds.SeriesDescription = f"{ds.get('SeriesDescription', '')} {series_description}".strip()[:64]
        ds.ImageType = ["DERIVED", "SECONDARY", *list(ds.get("ImageType", ["", "", "AXIAL"]))[2:]]
        ds.DerivationDescription = (f"{n_nodules} simulated lung nodules inserted by lungnode for training; "
                                    "not a patient image")
        for tag in ("SmallestImagePixelValue", "LargestImagePixelValue"):
            if tag in ds:
                delattr(ds, tag)
        ds.PixelData = _stored(ds, hu[k]).tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out_dir / f"IM{k:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _stored(ds: pydicom.Dataset, hu: np.ndarray) -> np.ndarray:
    """HU -> stored pixel values with the source's rescale and pixel format (clipped to its range)."""
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    bits, signed = int(ds.BitsStored), int(ds.PixelRepresentation) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    values = np.clip(np.rint((hu - intercept) / slope), lo, hi)
    return values.astype(np.int16 if signed else np.uint16)


@dataclass(frozen=True)
class InsertionSource:
    """A real series to insert into, with what is already known about it: its labelled nodules (kept
    clear of and listed, since they are in the image) and findings known not to be nodules (a site
    radiologist's rejected marks, cccwhd boxes with reasons), carried into every copy."""

    series_dir: Path
    known: tuple[tuple[tuple[float, float, float], float], ...] = ()  # (LPS centre, diameter mm)
    negative_box: tuple[tuple[float, ...], ...] = ()
    negative_reason: tuple[str, ...] = ()


def read_known_nodules(csv_path: Path, series_uid: str) -> list[tuple[tuple[float, float, float], float]]:
    """(LPS centre, diameter mm) of a series' labelled nodules from a LUNA16-style annotations.csv."""
    with open(csv_path, newline="") as f:
        return [((float(row["coordX"]), float(row["coordY"]), float(row["coordZ"])), float(row["diameter_mm"]))
                for row in csv.DictReader(f) if row["seriesuid"] == series_uid]


def sources_from_series(series_dirs: Sequence[Path], annotations: Path | None = None) -> list[InsertionSource]:
    """Series folders, their labelled nodules read from a LUNA16-style ``annotations`` CSV."""
    sources = []
    for d in series_dirs:
        first = next((p for p in sorted(Path(d).rglob("*")) if p.is_file()), None)
        if first is None:
            raise FileNotFoundError(f"{d}: no files (give a DICOM series folder)")
        uid = str(pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)
        known = read_known_nodules(annotations, uid) if annotations else []
        sources.append(InsertionSource(Path(d), tuple(known)))
    return sources


def sources_from_datalist(path: Path, section: str = "training") -> list[InsertionSource]:
    """The scans of a datalist (`lungnode train import`, e.g. a site's feedback) with their nodules and
    rejected findings. Only DICOM series folders: an inserted copy is written with the series' headers."""
    from lungnode.training.importers.datalist import image_path

    data = json.loads(Path(path).read_text())
    if section not in data:
        raise ValueError(f"{path} has no {section!r} section (it has {', '.join(data)})")
    sources = []
    for item in data[section]:
        image = image_path(path, item["image"])
        if not image.is_dir():
            raise ValueError(f"{image}: nodules are inserted into DICOM series folders, not volume files")
        diameters = item.get("diameter_mm") or [max(b[3:6]) for b in item.get("box", [])]
        sources.append(InsertionSource(
            image, tuple((tuple(b[:3]), float(d)) for b, d in zip(item.get("box", []), diameters)),
            tuple(tuple(b) for b in item.get("negative_box", [])), tuple(item.get("negative_reason", []))))
    return sources


def generate_inserted_dataset(sources: Sequence[InsertionSource], out_dir: Path, n: int, seed: int, *,
                              fmt: str = "nifti", nodule_model: NoduleModel | None = None) -> Path:
    """n copies of the given real series (in turn) with simulated nodules, and a datalist.json like
    ``synth.generate_dataset``'s; each source's labelled nodules are avoided and listed as boxes too
    (kind "labelled"), its rejected findings carried as ``negative_box``."""
    from tqdm import tqdm

    from lungnode.inference.volume import load_volume

    if fmt not in ("nifti", "dicom"):
        raise ValueError(f"format must be 'nifti' or 'dicom', not {fmt!r}")
    if not sources:
        raise ValueError("no series to insert nodules into")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    loaded: tuple[InsertionSource, Volume, np.ndarray] | None = None
    for idx in tqdm(range(n), desc="insertions", unit="series"):
        source = sources[idx % len(sources)]
        if loaded is None or loaded[0] != source:
            volume = load_volume(sorted(p for p in source.series_dir.rglob("*") if p.is_file()))
            loaded = (source, volume, lung_mask(volume))
        _, volume, lungs = loaded
        known = list(source.known)
        # a rejected finding stays visible: a nodule drawn over it would hide what the site taught
        avoid = [(c, d / 2) for c, d in known] + [(tuple(b[:3]), max(b[3:6]) / 2) for b in source.negative_box]
        s = phantom_seed(seed, idx)
        hu, specs = insert_nodules(volume, s, avoid=avoid, lungs=lungs, nodule_model=nodule_model)
        name = f"inserted_{seed}_{idx:05d}"  # the seed keeps copies of several runs apart when mined together
        if fmt == "nifti":
            target = write_nifti_image(np.rint(hu).astype(np.int16), volume.spacing, volume.origin, volume.direction,
                                       out_dir / "images" / f"{name}.nii.gz")
        else:
            target = out_dir / "images" / name
            write_derived_series(volume, hu, target, n_nodules=len(specs))
        rows = [(n.center_mm, n.diameter_mm, n.kind, n.attachment) for n in specs]
        rows += [(c, d, "labelled", "unknown") for c, d in known]
        entry = {
            "image": target.relative_to(out_dir).as_posix(),
            "box": [[*c, d, d, d] for c, d, _, _ in rows],
            "label": [0] * len(rows),
            "diameter_mm": [d for _, d, _, _ in rows],
            "kind": [k for _, _, k, _ in rows],
            "attachment": [a for _, _, _, a in rows],
            "seed": s,
            "source_series": volume.series_instance_uid,
        }
        if source.negative_box:
            entry |= {"negative_box": [list(b) for b in source.negative_box],
                      "negative_reason": list(source.negative_reason)}
        entries.append(entry)
    datalist = out_dir / "datalist.json"
    datalist.write_text(json.dumps({"training": entries}, indent=1))
    return datalist

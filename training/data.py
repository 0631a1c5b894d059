"""Training data: synthetic phantoms and datalist scans, prepared exactly like inference input, cut
into random patches.

Each phantom is made once (``make_phantom``), pushed through the Detector's own ``prepare`` (body
crop, resampling to model spacing, windowing) and cached as ``seed_<n>.npy`` (float16 image, I, J, K)
+ ``seed_<n>.json`` (nodule boxes in model voxels). A scan from a datalist (``lungnode train import``,
``train synth --insert-into``) is cached the same way as ``scan_<hash>.npy``. Patches are drawn from the cache by a RNG seeded
with (run seed, sample number), so a resumed run draws the same patches as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from lungnode.inference.detector import PreparedImage, prepare
from lungnode.inference.rescoring import crop_padded
from lungnode.inference.tta import mirror_boxes
from lungnode.inference.types import Volume
from lungnode.models.registry import InferenceSettings
from lungnode.training.synth import GENERATOR_VERSION


@dataclass(frozen=True)
class PhantomSettings:
    """How one phantom is made; None leaves ``make_phantom``'s default (a 512 x 512 clinical-like grid)."""

    spacing_mm: tuple[float, float, float] | None = None
    field_of_view_mm: float | None = None
    n_nodules: tuple[int, int] | None = None
    diameter_range_mm: tuple[float, float] | None = None
    attachments: tuple[str, ...] | None = None
    # Real nodule outlines (lidc_shapes): the library file, which patients' outlines, and how often.
    nodule_shapes: str | None = None
    shape_split: str = "train"
    real_shape_fraction: float = 1.0

    def make_phantom_kwargs(self) -> dict:
        names = {"spacing_mm": "spacing", "field_of_view_mm": "field_of_view_mm", "n_nodules": "n_nodules",
                 "diameter_range_mm": "diameter_range_mm", "attachments": "attachments"}
        kwargs = {arg: getattr(self, f) for f, arg in names.items() if getattr(self, f) is not None}
        if self.nodule_shapes is not None and self.real_shape_fraction > 0:
            from lungnode.training.lidc_shapes import library_split

            kwargs["nodule_model"] = library_split(self.nodule_shapes, self.shape_split).field_model(self.real_shape_fraction)
        return kwargs


@dataclass(frozen=True)
class PhantomMix:
    """The training population: some phantoms made at the model spacing (fast), the rest at a random
    scanner-like spacing and resampled by ``prepare`` like a real series.

    A ``focus_fraction`` of the phantoms hold the detector's hard cases instead of the usual mix (for
    instance several small nodules all beside vessels), so they are seen often enough to be learnt.
    Defaults: training.fit.PhantomConfig.
    """

    model_spacing_mm: tuple[float, float, float]
    model_spacing_fraction: float
    native_inplane_mm: tuple[float, float]
    native_slice_mm: tuple[float, float]
    field_of_view_mm: tuple[float, float]
    n_nodules: tuple[int, int]
    diameter_range_mm: tuple[float, float]
    focus_fraction: float
    focus_n_nodules: tuple[int, int]
    focus_diameter_range_mm: tuple[float, float]
    focus_attachments: tuple[str, ...]
    nodule_shapes: str | None = None  # a lidc_shapes library: real outlines for real_shape_fraction of the nodules
    real_shape_fraction: float = 0.0

    def for_seed(self, seed: int) -> PhantomSettings:
        rng = np.random.default_rng([seed, 0x5EED])
        if rng.random() < self.model_spacing_fraction:
            spacing = self.model_spacing_mm
        else:
            inplane = float(np.round(rng.uniform(*self.native_inplane_mm), 3))
            spacing = (inplane, inplane, float(np.round(rng.uniform(*self.native_slice_mm), 2)))
        fov = float(np.round(rng.uniform(*self.field_of_view_mm)))
        shapes = {"nodule_shapes": self.nodule_shapes, "real_shape_fraction": self.real_shape_fraction}
        if self.focus_fraction > 0 and rng.random() < self.focus_fraction:
            return PhantomSettings(spacing_mm=spacing, field_of_view_mm=fov, n_nodules=self.focus_n_nodules,
                                   diameter_range_mm=self.focus_diameter_range_mm,
                                   attachments=self.focus_attachments, **shapes)
        return PhantomSettings(spacing_mm=spacing, field_of_view_mm=fov, n_nodules=self.n_nodules,
                               diameter_range_mm=self.diameter_range_mm, **shapes)


def phantom_volume(seed: int, ps: PhantomSettings):
    """(Volume, Phantom) for one seed; the Volume is built straight from the phantom's arrays."""
    from lungnode.training.synth import make_phantom

    ph = make_phantom(seed, **ps.make_phantom_kwargs())
    volume = Volume(
        hu=ph.hu,
        spacing=tuple(float(v) for v in ph.spacing),
        origin=tuple(float(v) for v in ph.origin),
        direction=np.eye(3),
        slices=[],
        study_instance_uid=f"phantom-{seed}",
        series_instance_uid=f"phantom-{seed}",
    )
    return volume, ph


def model_boxes(ph, volume: Volume, prepared: PreparedImage) -> np.ndarray:
    """Nodule boxes (i0, j0, k0, i1, j1, k1) in the prepared image's model voxels."""
    return world_boxes_to_model([[*n.center_mm, n.diameter_mm, n.diameter_mm, n.diameter_mm] for n in ph.nodules],
                                volume, prepared)


def world_boxes_to_model(boxes_cccwhd: list[list[float]], volume: Volume, prepared: PreparedImage) -> np.ndarray:
    """World-mm boxes (centre x, y, z, size x, y, z) -> (i0, j0, k0, i1, j1, k1) model voxels,
    via their 8 corners, so any scan orientation gives the box that encloses the nodule."""
    out = []
    for b in boxes_cccwhd:
        c, half = np.asarray(b[:3], np.float64), np.asarray(b[3:6], np.float64) / 2
        corners = np.array([c + half * (2 * np.array(s) - 1) for s in np.ndindex(2, 2, 2)])
        m = prepared.source_index_to_box(volume.world_to_index(corners))
        out.append(np.concatenate([m.min(0), m.max(0)]))
    return np.asarray(out, dtype=np.float32).reshape(-1, 6)


def cache_scan(cache_dir: Path, image: Path, boxes_cccwhd: list[list[float]], inf: InferenceSettings) -> Path:
    """Load, prepare and store one datalist scan unless already cached (keyed by path, labels, file
    size and time); returns its image path."""
    from lungnode.inference.volume import load_any

    stat = image.stat()
    key = hashlib.sha1(json.dumps([str(image.resolve()), boxes_cccwhd, stat.st_size, stat.st_mtime_ns]).encode())
    img_path = cache_dir / f"scan_{key.hexdigest()[:16]}.npy"
    if not img_path.is_file():
        volume = load_any(image)
        prepared = prepare(volume, inf)
        meta = {"image": str(image), "series_uid": volume.series_instance_uid,
                "boxes": world_boxes_to_model(boxes_cccwhd, volume, prepared).tolist()}
        img_path.with_suffix(".json").write_text(json.dumps(meta))
        tmp = img_path.with_name(img_path.stem + ".tmp.npy")
        np.save(tmp, prepared.image.numpy().astype(np.float16))
        tmp.rename(img_path)
    return img_path


def cache_phantom(cache_dir: Path, seed: int, ps: PhantomSettings, inf: InferenceSettings) -> Path:
    """Make, prepare and store one phantom unless already cached; returns its image path."""
    img_path = cache_dir / f"seed_{seed}.npy"
    if not img_path.is_file():
        volume, ph = phantom_volume(seed, ps)
        prepared = prepare(volume, inf)
        boxes = model_boxes(ph, volume, prepared)
        meta = {"seed": seed, "settings": asdict(ps), "boxes": boxes.tolist(),
                "diameters_mm": [n.diameter_mm for n in ph.nodules]}
        (cache_dir / f"seed_{seed}.json").write_text(json.dumps(meta))
        tmp = cache_dir / f"seed_{seed}.tmp.npy"
        np.save(tmp, prepared.image.numpy().astype(np.float16))
        tmp.rename(img_path)
    return img_path


# Bumped when the cached boxes change meaning: "monai-voxel-corner" = PreparedImage.source_index_to_box
# (before it, boxes were in voxel-centre coordinates, half a voxel off MONAI's flips).
BOX_CONVENTION = "monai-voxel-corner"


def _preprocessing(inf: InferenceSettings) -> dict:
    """What changes a cached image or its boxes (the cache key); detection-only settings are left out."""
    return {**inf.model_dump(mode="json", exclude={"lung_mask", "lung_margin_mm", "lung_tolerance_mm", "aerated_lung_tolerance_mm", "sw_batch_size"}),
            "boxes": BOX_CONVENTION}


def build_scan_cache(cache_root: Path, scans: list[tuple[Path, list[list[float]]]], inf: InferenceSettings) -> list[Path]:
    """The prepared datalist scans ((image, boxes) pairs), under a folder keyed by the preprocessing."""
    key = hashlib.sha1(json.dumps(_preprocessing(inf), sort_keys=True).encode()).hexdigest()
    cache_dir = cache_root / f"scans-{key[:12]}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    return [cache_scan(cache_dir, image, boxes, inf) for image, boxes in tqdm(scans, desc="scans", dynamic_ncols=True)]


def build_cache(cache_root: Path, seeds: list[int], mix: PhantomMix, inf: InferenceSettings, processes: int = 1) -> list[Path]:
    """The prepared phantoms for ``seeds`` (made where missing, ``processes`` at a time).

    The cache folder is keyed by the phantom and preprocessing settings and the generator's version,
    so changing any of them never reuses stale images.
    """
    what = [asdict(mix), _preprocessing(inf), GENERATOR_VERSION]
    if mix.nodule_shapes is not None:  # the library's content, not just its path
        what.append(hashlib.sha256(Path(mix.nodule_shapes).read_bytes()).hexdigest())
    key = hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()
    cache_dir = cache_root / key[:12]
    cache_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(cache_dir, seed, mix.for_seed(seed), inf) for seed in seeds]
    if processes > 1:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            return list(tqdm(pool.imap(_cache_job, jobs), total=len(jobs), desc="phantoms", dynamic_ncols=True))
    return [_cache_job(j) for j in tqdm(jobs, desc="phantoms", dynamic_ncols=True)]


def _cache_job(job) -> Path:
    return cache_phantom(*job)


@dataclass(frozen=True)
class PatchSettings:
    patch_size: tuple[int, int, int]
    positive_fraction: float  # share of patches centred near a nodule
    flip: bool
    intensity_jitter: float  # +- relative scale and absolute shift on the 0..1 image


class PatchDataset(Dataset):
    """Sample ``n`` -> (image (1, I, J, K) float32, target {"box": (M, 6), "label": (M,)})."""

    def __init__(self, image_paths: list[Path], ps: PatchSettings, seed: int) -> None:
        self.image_paths = image_paths
        self.boxes = [
            np.asarray(json.loads(p.with_suffix(".json").read_text())["boxes"], np.float32).reshape(-1, 6)
            for p in image_paths
        ]
        self.ps = ps
        self.seed = seed

    def __len__(self) -> int:
        return 2**31 - 1

    def __getitem__(self, n: int):
        rng = np.random.default_rng([self.seed, n])
        idx = int(rng.integers(len(self.image_paths)))
        image = np.load(self.image_paths[idx], mmap_mode="r")
        boxes = self.boxes[idx]
        size = np.array(self.ps.patch_size)
        shape = np.array(image.shape)
        if len(boxes) and rng.random() < self.ps.positive_fraction:
            box = boxes[rng.integers(len(boxes))]
            center = (box[:3] + box[3:]) / 2
            margin = np.minimum(size // 4, np.ceil((box[3:] - box[:3]) / 2) + 2)
            start = np.floor(center - rng.uniform(margin, size - margin)).astype(int)
        else:
            start = np.array([rng.integers(0, max(1, s - p + 1)) for s, p in zip(shape, size)])
        patch = crop_padded(image, start, size)
        out = boxes - np.concatenate([start, start]).astype(np.float32)
        centers = (out[:, :3] + out[:, 3:]) / 2
        keep = np.all((centers >= 0) & (centers < size), axis=1)
        out = out[keep]
        out[:, :3] = np.maximum(out[:, :3], 0)
        out[:, 3:] = np.minimum(out[:, 3:], size)
        if self.ps.flip:
            axes = [axis for axis in range(3) if rng.random() < 0.5]
            if axes:
                patch = np.flip(patch, axes)
                out = mirror_boxes(out, axes, size).astype(np.float32)
        j = self.ps.intensity_jitter
        patch = patch * rng.uniform(1 - j, 1 + j) + rng.uniform(-j, j)
        target = {"box": torch.from_numpy(out.copy()), "label": torch.zeros(len(out), dtype=torch.long)}
        return torch.from_numpy(np.ascontiguousarray(patch, dtype=np.float32))[None], target


def collate(batch):
    images = torch.stack([b[0] for b in batch])
    return images, [b[1] for b in batch]

"""Held-out phantom evaluation of a Detector: the figures written into the model card.

A nodule counts as found when a detection's centre lies within its radius; a detection whose
centre lies in no nodule is a false positive.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from lungnode.inference.detector import Detector
from lungnode.inference.types import Detection
from lungnode.training.data import PhantomSettings, phantom_volume

log = logging.getLogger(__name__)


@dataclass
class ScanMatch:
    """Per-nodule hit flags and the number of false positives in one scan."""

    diameters_mm: list[float]
    hits: list[bool]
    false_positives: int


def match(detections: list[Detection], centers_mm: np.ndarray, diameters_mm: np.ndarray) -> ScanMatch:
    centers_mm = np.asarray(centers_mm, dtype=np.float64).reshape(-1, 3)
    radii = np.asarray(diameters_mm, dtype=np.float64) / 2
    det = np.array([d.center_mm for d in detections], dtype=np.float64).reshape(-1, 3)
    inside = np.linalg.norm(det[:, None, :] - centers_mm[None, :, :], axis=2) <= radii[None, :]
    return ScanMatch(
        diameters_mm=[float(d) for d in diameters_mm],
        hits=[bool(v) for v in inside.any(axis=0)],
        false_positives=int((~inside.any(axis=1)).sum()),
    )


@dataclass
class EvalResult:
    scans: int
    nodules: int
    found: int
    nodules_ge6: int
    found_ge6: int
    false_positives: int
    seconds_per_scan: float

    def metrics(self) -> dict[str, float | int]:
        return {
            "eval_scans": self.scans,
            "eval_nodules": self.nodules,
            "sensitivity": round(self.found / max(1, self.nodules), 4),
            "eval_nodules_ge6mm": self.nodules_ge6,
            "sensitivity_ge6mm": round(self.found_ge6 / max(1, self.nodules_ge6), 4),
            "false_positives_per_scan": round(self.false_positives / max(1, self.scans), 3),
            "seconds_per_scan": round(self.seconds_per_scan, 2),
        }


def evaluate(detector: Detector, seeds: list[int], ps: PhantomSettings) -> EvalResult:
    matches: list[ScanMatch] = []
    seconds = 0.0
    for seed in tqdm(seeds, desc="evaluate", dynamic_ncols=True):
        volume, ph = phantom_volume(seed, ps)
        t0 = time.perf_counter()
        detections = detector.detect(volume)
        seconds += time.perf_counter() - t0
        m = match(detections, np.array([n.center_mm for n in ph.nodules]), np.array([n.diameter_mm for n in ph.nodules]))
        log.info("phantom %d: %d/%d nodules found, %d false positives", seed, sum(m.hits), len(m.hits), m.false_positives)
        matches.append(m)
    diam = np.array([d for m in matches for d in m.diameters_mm])
    hits = np.array([h for m in matches for h in m.hits], dtype=bool)
    return EvalResult(
        scans=len(matches),
        nodules=len(hits),
        found=int(hits.sum()),
        nodules_ge6=int((diam >= 6).sum()),
        found_ge6=int(hits[diam >= 6].sum()),
        false_positives=sum(m.false_positives for m in matches),
        seconds_per_scan=seconds / max(1, len(matches)),
    )

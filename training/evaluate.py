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
class ScanResult:
    """One evaluated phantom: its truth and everything the detector returned."""

    centers_mm: np.ndarray
    diameters_mm: np.ndarray
    detections: list[Detection]
    seconds: float

    def match(self, threshold: float) -> ScanMatch:
        return match([d for d in self.detections if d.score >= threshold], self.centers_mm, self.diameters_mm)


@dataclass
class EvalResult:
    scans: list[ScanResult]

    def metrics(self, threshold: float) -> dict[str, float | int]:
        """Sensitivity (all, >= 6 mm) and false positives per scan for detections scoring >= threshold."""
        matches = [s.match(threshold) for s in self.scans]
        diam = np.array([d for m in matches for d in m.diameters_mm])
        hits = np.array([h for m in matches for h in m.hits], dtype=bool)
        n = max(1, len(self.scans))
        return {
            "score_threshold": threshold,
            "eval_scans": len(self.scans),
            "eval_nodules": int(len(hits)),
            "sensitivity": round(float(hits.mean()) if len(hits) else 0.0, 4),
            "eval_nodules_ge6mm": int((diam >= 6).sum()),
            "sensitivity_ge6mm": round(float(hits[diam >= 6].mean()) if (diam >= 6).any() else 0.0, 4),
            "false_positives_per_scan": round(sum(m.false_positives for m in matches) / n, 3),
            "seconds_per_scan": round(sum(s.seconds for s in self.scans) / n, 2),
        }


def evaluate(detector: Detector, seeds: list[int], ps: PhantomSettings, score_threshold: float | None = None) -> EvalResult:
    """Detect on each phantom (at ``score_threshold``, default the card's) and keep truth + output."""
    scans: list[ScanResult] = []
    for seed in tqdm(seeds, desc="evaluate", dynamic_ncols=True):
        volume, ph = phantom_volume(seed, ps)
        t0 = time.perf_counter()
        detections = detector.detect(volume, score_threshold=score_threshold)
        scan = ScanResult(
            centers_mm=np.array([n.center_mm for n in ph.nodules]).reshape(-1, 3),
            diameters_mm=np.array([n.diameter_mm for n in ph.nodules]),
            detections=detections,
            seconds=time.perf_counter() - t0,
        )
        m = scan.match(score_threshold if score_threshold is not None else detector.settings.score_threshold)
        log.info("phantom %d: %d/%d nodules found, %d false positives", seed, sum(m.hits), len(m.hits), m.false_positives)
        scans.append(scan)
    return EvalResult(scans)

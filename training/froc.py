"""LUNA16 FROC evaluation: candidates against annotated nodules, CPM and bootstrap confidence intervals.

Defined as the LUNA16 challenge defines it (Setio et al., Medical Image Analysis 42, 2017) and as its
public evaluation script (``noduleCADEvaluationLUNA16.py``) behaves, so that our figures can be set
beside published ones:

* Positions are world millimetres. LUNA16's coordX/Y/Z are ITK physical coordinates, i.e. LPS, the
  same frame as the rest of lungnode.
* A candidate hits a nodule when its centre lies strictly inside the nodule's sphere (distance < d/2).
  A diameter below zero (the ``-1`` rows of annotations_excluded.csv) means 10 mm, radius 5 mm.
* A nodule hit by several candidates is one true positive carrying the highest of their scores; the
  others are neither TP nor FP. A candidate inside two nodules counts for both.
* A candidate on no nodule but inside an irrelevant finding is ignored; every other candidate is a
  false positive.
* Only a scan's 100 highest-scoring candidates are kept (those scoring strictly above the 101st).
* The FROC curve has a point per distinct score t, starting at (0, 0): sensitivity = nodules hit with
  score >= t over all nodules, FP/scan = false positives with score >= t over all scans, scans without
  nodules or candidates included. Tied scores step diagonally, as sklearn's ``roc_curve`` does.
* Sensitivity at an FP rate is ``numpy.interp`` of that curve (linear in FP/scan; at a vertical step it
  takes the top; beyond the last point it stays at the final sensitivity). CPM is the mean at 1/8, 1/4,
  1/2, 1, 2, 4 and 8 FP/scan.
* Confidence intervals: the scans are resampled with replacement ``bootstraps`` times, the curve is
  recomputed, and the bounds are the sorted samples at ``floor(a n)`` and ``floor((1 - a) n)``,
  a = (1 - confidence) / 2.
* Two models on the same scans (``paired_cpm_difference``): each resample of the scans scores both,
  and the interval is that of the CPM difference, with the same percentile rule.
"""
from __future__ import annotations

import csv
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungnode.inference.types import Detection

log = logging.getLogger(__name__)

OPERATING_POINTS: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
DEFAULT_DIAMETER_MM = 10.0  # what the LUNA16 script uses for a finding recorded with diameter -1
MAX_MARKS_PER_SCAN = 100  # the LUNA16 script's maxNumberOfCADMarks
# (label, lower bound inclusive, upper bound exclusive) in mm; nodules below 3 mm count only in "all".
SIZE_BINS: tuple[tuple[str, float, float], ...] = (
    ("3-6 mm", 3.0, 6.0),
    ("6-10 mm", 6.0, 10.0),
    ("10-20 mm", 10.0, 20.0),
    (">=20 mm", 20.0, math.inf),
)
CSV_HEADER = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
_BAND_POINTS = 121  # log-spaced FP rates at which the bootstrap band is kept, for plotting
# CPMs are means of hit fractions: two equal ones can differ in the last bits by summation order.
CPM_TIE = 1e-9
_CHUNK_CELLS = 4_000_000  # bootstrap samples x curve entries handled at once: bounds memory


@dataclass(frozen=True)
class Candidate:
    """One CAD mark: a world (LPS mm) position and a score, higher = more suspicious."""

    series_uid: str
    center_mm: tuple[float, float, float]
    score: float


@dataclass(frozen=True)
class Annotation:
    """A reference nodule or irrelevant finding; ``diameter_mm`` < 0 means unknown (see module doc)."""

    series_uid: str
    center_mm: tuple[float, float, float]
    diameter_mm: float

    @property
    def size_mm(self) -> float:
        """The diameter the evaluation uses: the recorded one, or 10 mm when it is unknown."""
        return self.diameter_mm if self.diameter_mm >= 0 else DEFAULT_DIAMETER_MM


@dataclass(frozen=True)
class FrocCI:
    """Bootstrap interval of the FROC curve, from scans resampled with replacement."""

    bootstraps: int
    confidence: float
    fps_per_scan: np.ndarray  # log-spaced 1/8 .. 8, where the band below is evaluated
    lower: np.ndarray
    upper: np.ndarray
    operating_points: dict[float, tuple[float, float]]  # FP/scan -> (lower, upper) sensitivity
    cpm: tuple[float, float]


@dataclass(frozen=True)
class SizeRow:
    """FROC figures restricted to nodules with ``min_mm <= diameter < max_mm``, against all false positives.

    Nodules of other sizes are then irrelevant findings: a candidate on one is neither TP nor FP.
    Figures are NaN when the row has no nodules.
    """

    label: str
    min_mm: float
    max_mm: float
    n_nodules: int
    n_detected: int  # hit by any kept candidate, whatever its score
    operating_points: dict[float, float]
    cpm: float
    cpm_ci: tuple[float, float] | None


@dataclass(frozen=True)
class FrocResult:
    """The FROC curve and its summary figures; ``per_size`` is the SIZE_BINS rows, then "all"."""

    sensitivities: np.ndarray
    fps_per_scan: np.ndarray
    thresholds: np.ndarray  # score at each curve point; +inf for the (0, 0) start
    cpm: float
    operating_points: dict[float, float]  # FP/scan -> sensitivity
    ci: FrocCI | None
    n_scans: int
    n_nodules: int
    n_detected: int  # nodules hit by any kept candidate: the curve's final sensitivity numerator
    n_false_positives: int
    n_ignored: int  # candidates on irrelevant findings only
    per_size: list[SizeRow]


# ---------------------------------------------------------------- LUNA16 CSV files


def load_luna16_csv(path: str | Path) -> list[Annotation]:
    """annotations.csv or annotations_excluded.csv: seriesuid,coordX,coordY,coordZ,diameter_mm."""
    with open(path, newline="") as f:
        return [
            Annotation(row["seriesuid"], (float(row["coordX"]), float(row["coordY"]), float(row["coordZ"])), float(row["diameter_mm"]))
            for row in csv.DictReader(f)
        ]


def load_series_uids(path: str | Path) -> list[str]:
    """seriesuids.csv: one series UID a line, no header (a ``seriesuid`` header line is skipped)."""
    lines = [line.strip().split(",")[0] for line in Path(path).read_text().splitlines()]
    return [uid for uid in lines if uid and uid != "seriesuid"]


def load_candidates_csv(path: str | Path) -> list[Candidate]:
    """A LUNA16 submission file: seriesuid,coordX,coordY,coordZ,probability (columns found by name)."""
    with open(path, newline="") as f:
        return [
            Candidate(row["seriesuid"], (float(row["coordX"]), float(row["coordY"]), float(row["coordZ"])), float(row["probability"]))
            for row in csv.DictReader(f)
        ]


def save_candidates_csv(candidates: Iterable[Candidate], path: str | Path) -> None:
    """Write candidates as a LUNA16 submission file, floats at full precision."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_HEADER)
        for c in candidates:
            w.writerow([c.series_uid, *(repr(float(v)) for v in c.center_mm), repr(float(c.score))])


def candidates_from_detections(series_uid: str, detections: Iterable[Detection]) -> list[Candidate]:
    """A detector's output for one series as candidates (Detection centres are already LPS mm)."""
    return [Candidate(series_uid, tuple(float(v) for v in d.center_mm), float(d.score)) for d in detections]


# ---------------------------------------------------------------- matching


@dataclass
class _ScanMatch:
    nodule_scores: np.ndarray  # per nodule: highest score of a candidate inside it, -inf if none
    fp_scores: np.ndarray
    n_ignored: int


def _keep_top(cands: list[Candidate], max_marks: int | None) -> list[Candidate]:
    if max_marks is None or len(cands) <= max_marks:
        return cands
    cut = sorted((c.score for c in cands), reverse=True)[max_marks]
    return [c for c in cands if c.score > cut]


def _inside(points: np.ndarray, findings: list[Annotation]) -> np.ndarray:
    """(n_points, n_findings): point strictly inside the finding's sphere."""
    centres = np.array([a.center_mm for a in findings], dtype=np.float64).reshape(-1, 3)
    radii = np.array([a.size_mm / 2 for a in findings], dtype=np.float64)
    d2 = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
    return d2 < radii[None, :] ** 2


def _match_scan(cands: list[Candidate], nodules: list[Annotation], irrelevant: list[Annotation]) -> _ScanMatch:
    points = np.array([c.center_mm for c in cands], dtype=np.float64).reshape(-1, 3)
    scores = np.array([c.score for c in cands], dtype=np.float64)
    on_nodule = _inside(points, nodules)
    nodule_scores = np.where(on_nodule, scores[:, None], -np.inf).max(axis=0, initial=-np.inf)
    free = ~on_nodule.any(axis=1)
    ignored = free & _inside(points, irrelevant).any(axis=1)
    return _ScanMatch(nodule_scores, scores[free & ~ignored], int(ignored.sum()))


# ---------------------------------------------------------------- curves


@dataclass
class _Ranked:
    """Curve entries (hit nodules and false positives) by descending score, ready for weighted sums.

    Weights are per scan (all ones for the evaluation itself, resampling counts for a bootstrap).
    """

    scores: np.ndarray
    is_tp: np.ndarray
    scan: np.ndarray
    group_end: np.ndarray  # last entry of each run of equal scores: where a curve point sits
    nodule_scan: np.ndarray  # scan of every nodule, hit or not: the sensitivity denominator

    @classmethod
    def build(cls, nod_scan: np.ndarray, nod_score: np.ndarray, fp_scan: np.ndarray, fp_score: np.ndarray) -> _Ranked:
        hit = np.isfinite(nod_score)
        scores = np.concatenate([nod_score[hit], fp_score])
        order = np.argsort(-scores, kind="stable")
        scores = scores[order]
        return cls(
            scores=scores,
            is_tp=np.concatenate([np.ones(hit.sum(), bool), np.zeros(len(fp_score), bool)])[order],
            scan=np.concatenate([nod_scan[hit], fp_scan])[order],
            group_end=np.append(scores[1:] != scores[:-1], True) if len(scores) else np.zeros(0, bool),
            nodule_scan=nod_scan,
        )

    def curves(self, weights: np.ndarray, n_scans: int) -> tuple[np.ndarray, np.ndarray]:
        """FP/scan and sensitivity, shape (len(weights), points); sensitivity is NaN for a sample with no nodules."""
        w = weights[:, self.scan]
        tp = np.cumsum(w * self.is_tp, axis=1)[:, self.group_end]
        fp = np.cumsum(w * ~self.is_tp, axis=1)[:, self.group_end]
        total = weights[:, self.nodule_scan].sum(axis=1, keepdims=True)
        zero = np.zeros((len(weights), 1))
        with np.errstate(invalid="ignore", divide="ignore"):
            sens = np.hstack([zero, tp]) / total
        return np.hstack([zero, fp]) / n_scans, np.where(total > 0, sens, np.nan)


def _interp_rows(fps: np.ndarray, sens: np.ndarray, at: Sequence[float]) -> np.ndarray:
    return np.array([np.interp(at, f, s) for f, s in zip(fps, sens)]).reshape(len(fps), len(at))


def _bounds(samples: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """The LUNA16 script's percentile rule over the valid (non-NaN) bootstrap samples, per column."""
    samples = np.sort(samples[~np.isnan(samples).any(axis=1)], axis=0)
    n = len(samples)
    if n == 0:
        nan = np.full(samples.shape[1], np.nan)
        return nan, nan
    a = (1.0 - confidence) / 2.0
    return samples[min(n - 1, math.floor(a * n))], samples[min(n - 1, math.floor((1.0 - a) * n))]


def _bootstrap(ranked: _Ranked, n_scans: int, resamples: np.ndarray, band_at: np.ndarray) -> np.ndarray:
    """Sensitivity at OPERATING_POINTS then ``band_at`` for each resample (rows of per-scan counts)."""
    at = np.concatenate([OPERATING_POINTS, band_at])
    chunk = max(1, _CHUNK_CELLS // max(1, len(ranked.scores)))
    out = []
    for start in range(0, len(resamples), chunk):
        fps, sens = ranked.curves(resamples[start : start + chunk], n_scans)
        rows = _interp_rows(fps, sens, at)
        rows[np.isnan(sens[:, 0])] = np.nan
        out.append(rows)
    return np.vstack(out)


@dataclass(frozen=True)
class _Matched:
    """Every scan's candidates matched with its nodules: one entry per nodule and per false positive."""

    nod_scan: np.ndarray  # scan index of every nodule
    nod_score: np.ndarray  # its highest hitting score, -inf if missed
    nod_size: np.ndarray
    fp_scan: np.ndarray
    fp_score: np.ndarray
    n_ignored: int


def _match_all(candidates: Iterable[Candidate], annotations: Iterable[Annotation], excluded: Iterable[Annotation],
               scans: list[str], max_marks: int | None) -> _Matched:
    """Match the candidates of ``scans`` (other series are left out, with a warning)."""
    index = {uid: i for i, uid in enumerate(scans)}
    by_scan: dict[str, list[Candidate]] = defaultdict(list)
    for c in candidates:
        by_scan[c.series_uid].append(c)
    outside = sum(len(v) for k, v in by_scan.items() if k not in index)
    if outside:
        log.warning("%d candidates belong to series outside the evaluated scans and are left out", outside)
    nodules: dict[str, list[Annotation]] = defaultdict(list)
    for a in annotations:
        nodules[a.series_uid].append(a)
    irrelevant: dict[str, list[Annotation]] = defaultdict(list)
    for a in excluded:
        irrelevant[a.series_uid].append(a)

    matches = [_match_scan(_keep_top(by_scan[uid], max_marks), nodules[uid], irrelevant[uid]) for uid in scans]
    nod_score = np.array([s for m in matches for s in m.nodule_scores], dtype=np.float64)
    if len(nod_score) == 0:
        raise ValueError(f"no annotated nodule in the {len(scans)} evaluated scans: sensitivity is undefined")
    return _Matched(
        nod_scan=np.array([i for i, m in enumerate(matches) for _ in m.nodule_scores], dtype=int),
        nod_score=nod_score,
        nod_size=np.array([a.size_mm for uid in scans for a in nodules[uid]], dtype=np.float64),
        fp_scan=np.array([i for i, m in enumerate(matches) for _ in m.fp_scores], dtype=int),
        fp_score=np.array([s for m in matches for s in m.fp_scores], dtype=np.float64),
        n_ignored=sum(m.n_ignored for m in matches),
    )


# ---------------------------------------------------------------- evaluation


def evaluate_froc(
    candidates: Iterable[Candidate],
    annotations: Iterable[Annotation],
    excluded: Iterable[Annotation],
    series_uids: Iterable[str],
    *,
    bootstraps: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    max_marks_per_scan: int | None = MAX_MARKS_PER_SCAN,
) -> FrocResult:
    """Score ``candidates`` on the scans ``series_uids`` (LUNA16 rules, see module doc).

    Candidates and annotations of other series are left out. ``bootstraps=0`` skips the intervals.
    Raises ValueError when the scans hold no annotated nodule (sensitivity is then undefined).
    """
    scans = list(dict.fromkeys(series_uids))
    matched = _match_all(candidates, annotations, excluded, scans, max_marks_per_scan)
    nod_scan, nod_score, nod_size = matched.nod_scan, matched.nod_score, matched.nod_size
    fp_scan, fp_score = matched.fp_scan, matched.fp_score

    n = len(scans)
    k = len(OPERATING_POINTS)
    band_at = np.geomspace(OPERATING_POINTS[0], OPERATING_POINTS[-1], _BAND_POINTS)
    resamples = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=bootstraps).astype(np.float64)
    per_size: list[SizeRow] = []
    for label, lo, hi in (*SIZE_BINS, ("all", -math.inf, math.inf)):
        keep = (nod_size >= lo) & (nod_size < hi)
        if not keep.any():
            per_size.append(SizeRow(label, lo, hi, 0, 0, dict.fromkeys(OPERATING_POINTS, math.nan), math.nan, None))
            continue
        ranked = _Ranked.build(nod_scan[keep], nod_score[keep], fp_scan, fp_score)
        fps, sens = ranked.curves(np.ones((1, n)), n)
        at_points = _interp_rows(fps, sens, OPERATING_POINTS)[0]
        boot = _bootstrap(ranked, n, resamples, band_at) if bootstraps else None
        cpm_ci = None if boot is None else tuple(float(b[0]) for b in _bounds(boot[:, :k].mean(axis=1, keepdims=True), confidence))
        per_size.append(SizeRow(
            label, lo, hi, int(keep.sum()), int(np.isfinite(nod_score[keep]).sum()),
            dict(zip(OPERATING_POINTS, map(float, at_points))), float(at_points.mean()), cpm_ci,
        ))

    overall = per_size[-1]  # the loop's last ranked/fps/sens/boot are those of "all" too
    ci = None
    if boot is not None:
        lower, upper = _bounds(boot, confidence)
        ci = FrocCI(
            bootstraps=bootstraps,
            confidence=confidence,
            fps_per_scan=band_at,
            lower=lower[k:],
            upper=upper[k:],
            operating_points={fp: (float(lower[i]), float(upper[i])) for i, fp in enumerate(OPERATING_POINTS)},
            cpm=overall.cpm_ci,
        )
    return FrocResult(
        sensitivities=sens[0],
        fps_per_scan=fps[0],
        thresholds=np.concatenate([[np.inf], ranked.scores[ranked.group_end]]),
        cpm=overall.cpm,
        operating_points=overall.operating_points,
        ci=ci,
        n_scans=n,
        n_nodules=overall.n_nodules,
        n_detected=overall.n_detected,
        n_false_positives=len(fp_score),
        n_ignored=matched.n_ignored,
        per_size=per_size,
    )


# ---------------------------------------------------------------- two models on the same scans


@dataclass(frozen=True)
class PairedComparison:
    """CPM of model A and model B on the same scans, and the bootstrap interval of A - B: every
    resample of the scans scores both models, so what the scans share cancels out."""

    cpm_a: float
    cpm_b: float
    difference_ci: tuple[float, float]
    resamples: int
    confidence: float

    @property
    def difference(self) -> float:
        return self.cpm_a - self.cpm_b

    @property
    def a_is_better(self) -> bool:
        """A beats B by more than the resampling noise: the whole interval of A - B lies above 0 (a
        difference within rounding of 0 is none)."""
        return self.difference_ci[0] > CPM_TIE


def paired_cpm_difference(
    candidates_a: Iterable[Candidate],
    candidates_b: Iterable[Candidate],
    annotations: Iterable[Annotation],
    excluded: Iterable[Annotation],
    series_uids: Iterable[str],
    *,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    max_marks_per_scan: int | None = MAX_MARKS_PER_SCAN,
) -> PairedComparison:
    """Paired bootstrap of the CPM difference between two models' candidates on the same scans.

    Each model's candidates are matched once; a resample only reweights the scans (the same weights for
    both models). Raises ValueError when the scans hold no annotated nodule.
    """
    if resamples < 1:
        raise ValueError("a paired comparison needs at least one resample")
    scans = list(dict.fromkeys(series_uids))
    annotations, excluded = list(annotations), list(excluded)
    n = len(scans)
    weights = np.vstack([np.ones((1, n)), np.random.default_rng(seed).multinomial(
        n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)])
    cpms = []
    for candidates in (candidates_a, candidates_b):
        m = _match_all(candidates, annotations, excluded, scans, max_marks_per_scan)
        ranked = _Ranked.build(m.nod_scan, m.nod_score, m.fp_scan, m.fp_score)
        cpms.append(_bootstrap(ranked, n, weights, np.zeros(0)).mean(axis=1))  # NaN: a resample without nodules
    lower, upper = _bounds((cpms[0] - cpms[1])[1:, None], confidence)
    return PairedComparison(float(cpms[0][0]), float(cpms[1][0]), (float(lower[0]), float(upper[0])), resamples,
                            confidence)

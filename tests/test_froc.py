"""LUNA16 FROC metrics on hand-made cases whose answers are worked out by hand, and on the real lists."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from lungnode.inference.types import Detection
from lungnode.training.eval_report import markdown_table, plot_froc, size_table
from lungnode.training.froc import (
    OPERATING_POINTS,
    Annotation,
    Candidate,
    candidates_from_detections,
    evaluate_froc,
    load_candidates_csv,
    load_luna16_csv,
    load_series_uids,
    save_candidates_csv,
)

REPO = Path(__file__).resolve().parent.parent


def nodule(uid: str, x: float, diameter: float = 6.0) -> Annotation:
    return Annotation(uid, (x, 0.0, 0.0), diameter)


def mark(uid: str, x: float, score: float) -> Candidate:
    return Candidate(uid, (x, 0.0, 0.0), score)


def froc(cands, nods, uids, excluded=(), **kw):
    return evaluate_froc(cands, nods, excluded, uids, bootstraps=kw.pop("bootstraps", 0), **kw)


def sens(result) -> list[float]:
    return [result.operating_points[fp] for fp in OPERATING_POINTS]


def test_perfect_detector_has_cpm_one():
    nods = [nodule("a", 0), nodule("a", 50), nodule("b", -40, 12)]
    r = froc([mark(n.series_uid, n.center_mm[0] + 1, 0.9) for n in nods], nods, ["a", "b", "c"], bootstraps=50)
    assert r.cpm == 1.0 and sens(r) == [1.0] * 7
    assert (r.n_scans, r.n_nodules, r.n_detected, r.n_false_positives) == (3, 3, 3, 0)
    assert r.ci.cpm == (1.0, 1.0)


def test_one_of_two_nodules_without_false_positives_is_half_everywhere():
    r = froc([mark("a", 0, 0.7)], [nodule("a", 0), nodule("b", 0)], ["a", "b"])
    assert sens(r) == [0.5] * 7 and r.cpm == 0.5


def test_false_positive_above_the_nodule_shifts_the_curve():
    # Scans a (one nodule) and b (none). Ranked: FP in b (0.9), the nodule (0.5), FP in a (0.3).
    # Curve: (0, 0) -> (0.5, 0) -> (0.5, 1) -> (1, 1); 1/8 and 1/4 FP/scan lie on the flat start.
    r = froc([mark("b", 0, 0.9), mark("a", 1, 0.5), mark("a", 30, 0.3)], [nodule("a", 0)], ["a", "b"])
    assert r.fps_per_scan.tolist() == [0, 0.5, 0.5, 1.0]
    assert r.sensitivities.tolist() == [0, 0, 1, 1]
    assert r.thresholds.tolist() == [math.inf, 0.9, 0.5, 0.3]
    assert sens(r) == [0, 0, 1, 1, 1, 1, 1]
    assert r.cpm == pytest.approx(5 / 7)


def test_scans_without_nodules_count_in_the_false_positive_denominator():
    # One FP above the nodule: over 4 scans it is 1/4 FP/scan, over the nodule's scan alone 1 FP/scan.
    cands = [mark("a", 40, 0.9), mark("a", 0, 0.5)]
    r = froc(cands, [nodule("a", 0)], ["a", "empty1", "empty2", "empty3"])
    assert r.fps_per_scan.tolist() == [0, 0.25, 0.25]
    assert sens(r) == [0, 1, 1, 1, 1, 1, 1] and r.cpm == pytest.approx(6 / 7)
    alone = froc(cands, [nodule("a", 0)], ["a"])
    assert sens(alone) == [0, 0, 0, 1, 1, 1, 1]


def test_cpm_interpolates_linearly_along_a_tied_step():
    # One scan, two nodules. Nodule 1 at 0.9; nodule 2 and an FP tie at 0.5, so the curve steps
    # diagonally (0, 0.5) -> (1, 1), as sklearn's roc_curve does in the LUNA16 script.
    r = froc([mark("a", 0, 0.9), mark("a", 50, 0.5), mark("a", 100, 0.5)], [nodule("a", 0), nodule("a", 50)], ["a"])
    assert r.fps_per_scan.tolist() == [0, 0, 1] and r.sensitivities.tolist() == [0, 0.5, 1]
    expected = [0.5 + 0.5 * fp for fp in (0.125, 0.25, 0.5)] + [1, 1, 1, 1]
    assert sens(r) == pytest.approx(expected)
    assert r.cpm == pytest.approx((0.5625 + 0.625 + 0.75 + 4) / 7)


def test_candidate_inside_an_irrelevant_finding_is_ignored():
    excluded = [Annotation("a", (50.0, 0.0, 0.0), -1.0)]  # diameter -1: LUNA16 uses 10 mm, radius 5 mm
    cands = [mark("a", 53, 0.9), mark("a", 0, 0.5)]
    r = froc(cands, [nodule("a", 0)], ["a"], excluded)
    assert (r.n_false_positives, r.n_ignored) == (0, 1) and r.cpm == 1.0
    outside = froc([mark("a", 56, 0.9), mark("a", 0, 0.5)], [nodule("a", 0)], ["a"], excluded)
    assert (outside.n_false_positives, outside.n_ignored) == (1, 0) and outside.operating_points[0.125] == 0
    # A hit on a real nodule stays a hit even inside an irrelevant finding.
    both = froc([mark("a", 0, 0.5)], [nodule("a", 0)], ["a"], [Annotation("a", (1.0, 0.0, 0.0), 8.0)])
    assert (both.n_detected, both.n_ignored) == (1, 0)


def test_two_candidates_on_one_nodule_count_once_with_the_higher_score():
    # 0.8 and 0.4 on the nodule, an FP at 0.6: the nodule ranks at 0.8, ahead of the FP.
    r = froc([mark("a", 1, 0.4), mark("a", -1, 0.8), mark("a", 60, 0.6)], [nodule("a", 0)], ["a"])
    assert (r.n_detected, r.n_false_positives) == (1, 1)
    assert r.thresholds.tolist() == [math.inf, 0.8, 0.6] and r.cpm == 1.0


def test_hit_needs_the_centre_strictly_inside_the_radius():
    r = froc([mark("a", 3.0, 0.9)], [nodule("a", 0, 6.0)], ["a"])  # exactly on the 3 mm radius
    assert (r.n_detected, r.n_false_positives) == (0, 1)


def test_only_the_top_100_marks_per_scan_are_scored():
    cands = [mark("a", 100 + i, 0.5 + i / 1000) for i in range(100)] + [mark("a", 0, 0.1)]
    assert froc(cands, [nodule("a", 0)], ["a"]).n_detected == 0
    assert froc(cands, [nodule("a", 0)], ["a"], max_marks_per_scan=None).n_detected == 1


def test_size_rows_bin_nodules_by_diameter():
    diameters = [4.0, 6.0, 8.0, 15.0, 25.0, 2.0]  # 6.0 falls in 6-10; 2 mm only counts in "all"
    nods = [nodule("a", 100 * i, d) for i, d in enumerate(diameters)]
    found = [mark("a", 0, 0.9), mark("a", 100, 0.9), mark("a", 300, 0.9), mark("a", 500, 0.9)]
    r = froc(found, nods, ["a"])
    rows = {row.label: row for row in r.per_size}
    assert list(rows) == ["3-6 mm", "6-10 mm", "10-20 mm", ">=20 mm", "all"]
    assert [(rows[k].n_nodules, rows[k].n_detected, rows[k].cpm) for k in rows] == [
        (1, 1, 1.0), (2, 1, 0.5), (1, 1, 1.0), (1, 0, 0.0), (6, 4, pytest.approx(4 / 6))
    ]
    table = size_table(r).splitlines()
    assert table[0].split() == ["diameter", "nodules", "hit", "sens@1", "sens@2", "sens@4", "CPM", "CPM", "CI"]
    assert table[3].split() == ["6-10", "mm", "2", "1", "0.500", "0.500", "0.500", "0.500", "-"]
    assert len({len(line) for line in table[:-1]}) == 1  # fixed width
    assert "| all | 6 | 4 | 0.667 |" in markdown_table(r)


def test_bootstrap_interval_is_seeded_and_brackets_the_estimate():
    nods = [nodule(f"s{i}", 0) for i in range(20)]
    cands = [mark(f"s{i}", 0, 0.5) for i in range(10)]
    uids = [f"s{i}" for i in range(20)]
    a = froc(cands, nods, uids, bootstraps=300, seed=1)
    assert a.cpm == 0.5
    lo, hi = a.ci.cpm
    assert 0.2 < lo < 0.5 < hi < 0.8
    assert froc(cands, nods, uids, bootstraps=300, seed=1).ci.cpm == (lo, hi)
    assert froc(cands, nods, uids, bootstraps=300, seed=2).ci.cpm != (lo, hi)
    assert froc(cands, nods, uids).ci is None


def test_candidates_round_trip_through_the_submission_csv(tmp_path):
    cands = [Candidate("1.2.3", (-128.6994211, -175.3192718, -298.3875064), 0.123456789), Candidate("1.2.4", (1.0, 2.0, 3.0), 1.0)]
    path = tmp_path / "submission.csv"
    save_candidates_csv(cands, path)
    assert path.read_text().splitlines()[0] == "seriesuid,coordX,coordY,coordZ,probability"
    assert load_candidates_csv(path) == cands


def test_detector_output_becomes_candidates():
    det = Detection(center_mm=(1.0, 2.0, 3.0), box_mm=(0, 1, 2, 2, 3, 4), diameter_mm=2.0, score=0.75)
    assert candidates_from_detections("1.2.3", [det]) == [Candidate("1.2.3", (1.0, 2.0, 3.0), 0.75)]


def test_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    nods = [nodule(f"s{i}", 0) for i in range(6)]
    cands = [mark(f"s{i}", 0, 0.1 * i) for i in range(5)] + [mark(f"s{i}", 40, 0.05 * i) for i in range(6)]
    r = froc(cands, nods, [f"s{i}" for i in range(6)], bootstraps=100)
    path = plot_froc(r, tmp_path / "froc.png", title="test")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def luna16_dir() -> Path:
    root = Path(os.environ.get("LUNGNODE_TEST_DATA", REPO.parent / "shared" / "data")) / "luna16"
    if not (root / "annotations.csv").is_file():
        pytest.skip("LUNA16 lists not found: set LUNGNODE_TEST_DATA or put them in ../shared/data/luna16")
    return root


def test_real_luna16_lists():
    root = luna16_dir()
    annotations = load_luna16_csv(root / "annotations.csv")
    excluded = load_luna16_csv(root / "annotations_excluded.csv")
    uids = load_series_uids(root / "seriesuids.csv")
    assert len(annotations) == 1186 and len({a.series_uid for a in annotations}) == 601
    assert len(excluded) == 35192 and len(uids) == 888 == len(set(uids))
    # An oracle marking every nodule, plus a mark beside every 20th irrelevant finding, scores CPM 1.
    cands = [Candidate(a.series_uid, a.center_mm, 0.9) for a in annotations]
    cands += [Candidate(e.series_uid, (e.center_mm[0] + 0.5, *e.center_mm[1:]), 0.99) for e in excluded[::20]]
    r = evaluate_froc(cands, annotations, excluded, uids, bootstraps=20)
    assert (r.n_scans, r.n_nodules, r.n_detected, r.n_false_positives) == (888, 1186, 1186, 0)
    assert r.cpm == 1.0 and r.n_ignored > 1500

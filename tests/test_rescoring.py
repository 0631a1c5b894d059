"""The second stage: candidate patches cut where the detector points, a classifier that learns to tell
a nodule from a vessel, and a two-stage model built, verified and run from the registry."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from lungnode.inference.detector import Detector
from lungnode.inference.rescoring import Rescorer, box_centres, fuse, patch_views, patches_at
from lungnode.models.registry import ModelIntegrityError, SecondStage, load_model
from lungnode.training.candidate_mining import KIND_REFERENCE, mine
from lungnode.training.data import PhantomSettings, phantom_volume
from lungnode.training.eval_sets import phantom_scans
from lungnode.training.rescorer_attach import WEIGHTS, attach
from lungnode.training.rescorer_fit import RescorerConfig, fit_rescorer, roc_auc

FIRST_STAGE = "lungnode-retina-cpu-v8"  # a shipped one-stage model
PATCH = (16, 16, 12)


def test_patch_is_centred_on_the_box_and_padded_with_air():
    image = np.zeros((40, 50, 20), np.float32)
    image[20, 30, 10] = 1.0
    box = np.array([[19.0, 29.0, 9.0, 22.0, 32.0, 12.0]])  # MONAI corners: voxels 19-21, centre voxel 20
    np.testing.assert_allclose(box_centres(box), [[20.0, 30.0, 10.0]])
    p = patches_at(image, box_centres(box), (8, 8, 6))[0]
    assert p.shape == (8, 8, 6) and p[4, 4, 3] == 1.0 and p.sum() == 1.0
    corner = patches_at(image, [[0.0, 0.0, 0.0]], (8, 8, 6))[0]
    assert corner[:4].sum() == 0 and corner.shape == (8, 8, 6)  # outside the image: zeros


def test_patch_views_are_the_patch_mirrored_and_turned():
    patch = np.zeros((1, 6, 6, 4), np.float32)
    patch[0, 1, 2, 3] = 1.0
    views = patch_views(patch, 16)
    assert views.shape == (16, 1, 6, 6, 4)
    np.testing.assert_array_equal(views[0], patch)  # the patch as cut comes first
    where = {tuple(int(v) for v in np.argwhere(view[0])[0]) for view in views}
    # mirrors send index x to 5 - x in-plane and 3 - x in depth; the turn swaps i and j
    assert where == {(i, j, k) for a, b in ((1, 2), (2, 1)) for i in (a, 5 - a) for j in (b, 5 - b) for k in (3, 0)}
    np.testing.assert_array_equal(patch_views(patch, 8), views[:8])
    with pytest.raises(ValueError, match="square"):
        patch_views(np.zeros((1, 6, 5, 4), np.float32), 16)
    with pytest.raises(ValueError, match="one of"):
        patch_views(patch, 3)


def test_the_classifier_reads_the_mean_logit_over_its_views():
    image = np.zeros((20, 20, 20), np.float32)
    image[11, 10, 10] = 3.0
    box = np.array([[9.0, 9.0, 9.0, 12.0, 12.0, 12.0]])  # centred on voxel 10: the 8-voxel patch spans 6-13

    def network(x):  # a "classifier" that reads one voxel left of the centre: not mirror-symmetric
        return x[:, 0, 2, 4, 4] * 4.0 - 2.0

    stage = SecondStage(onnx_file="x", onnx_sha256="0", channels=[1], parameters=0, patch_size=(8, 8, 8), weight=0.5,
                        min_detector_score=0.05, data="", training={"command": "", "config": {}, "iterations": 0,
                                                                    "seconds": 0.0, "device": "cpu"})
    one = Rescorer(stage, network).rescore(image, box).probabilities
    two = Rescorer(stage.model_copy(update={"views": 2}), network).rescore(image, box).probabilities
    np.testing.assert_allclose(one, [1 / (1 + np.exp(2.0))])  # patch[2, 4, 4] = image[8, 10, 10] = 0
    mean_logit = ((0 * 4.0 - 2.0) + (3.0 * 4.0 - 2.0)) / 2  # mirrored along i, patch[2] = image[11, 10, 10] = 3
    np.testing.assert_allclose(two, [1 / (1 + np.exp(-mean_logit))])


def test_fusion_weight_moves_the_ranking_from_detector_to_classifier():
    det, prob = np.array([0.99, 0.6]), np.array([0.01, 0.9])
    np.testing.assert_allclose(fuse(det, prob, 0.0), det)
    np.testing.assert_allclose(fuse(det, prob, 1.0), prob)
    mid = fuse(det, prob, 0.5)
    np.testing.assert_allclose(mid, np.sqrt(det * prob))
    assert mid[1] > mid[0]  # the vessel look-alike the detector loved drops below the nodule


def test_roc_auc_on_known_cases():
    y = np.array([1, 1, 0, 0])
    assert roc_auc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 1.0
    assert roc_auc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 0.0
    assert roc_auc(y, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert roc_auc(y, np.array([0.9, 0.3, 0.5, 0.1])) == 0.75


def _blob_or_tube(rng, size, nodule: bool) -> np.ndarray:
    """Lung-like noise (0.11 ~ -850 HU after windowing) with a sphere or a tube through the centre."""
    grid = np.stack(np.meshgrid(*[np.arange(s) - s / 2 + rng.uniform(-1, 1) for s in size], indexing="ij"), -1)
    if nodule:
        r = rng.uniform(2.0, 4.5)
        inside = np.linalg.norm(grid, axis=-1) < r
    else:
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        r = rng.uniform(1.5, 3.0)
        along = grid @ axis
        inside = np.linalg.norm(grid - along[..., None] * axis, axis=-1) < r
    x = 0.11 + 0.03 * rng.normal(size=size)
    x[inside] = 0.7 + 0.03 * rng.normal(size=int(inside.sum()))
    return x.astype(np.float16)


def _write_mined(folder: Path, n_scans: int, per_scan: int, seed: int, margin: int) -> None:
    """Patches in the mining format: per scan, nodules (label 1) and vessel cross-sections (label 0)."""
    rng = np.random.default_rng(seed)
    (folder / "scans").mkdir(parents=True)
    size = tuple(s + 2 * margin for s in PATCH)
    for s in range(n_scans):
        label = (np.arange(per_scan) % 3 == 0).astype(np.uint8)
        np.savez(folder / "scans" / f"synthetic-{s}.npz",
                 patches=np.stack([_blob_or_tube(rng, size, bool(v)) for v in label]), label=label,
                 score=rng.uniform(0.5, 1.0, per_scan).astype(np.float32), kind=np.zeros(per_scan, np.uint8),
                 diameter_mm=np.where(label == 1, 6.0, 0.0).astype(np.float32))


def test_rescorer_learns_round_nodules_from_vessels(tmp_path):
    _write_mined(tmp_path / "mined", n_scans=12, per_scan=30, seed=3, margin=2)
    (tmp_path / "mined" / "mining.json").write_text(json.dumps(
        {"model": "synthetic", "model_sha256": "-", "patch_size": list(PATCH), "margin": 2, "floor": 0.05, "per_scan": 30}))
    cfg = RescorerConfig(seed=1, channels=[8, 16, 32], batch_size=32, iterations=120, lr=3e-3, warmup_iterations=10,
                         validation_fraction=0.3, validate_every=60, precision="f32")
    state = fit_rescorer(cfg, [tmp_path / "mined"], tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    assert state["validation"]["val_auc"] >= 0.95, log  # shapes it never saw, from scans held out
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["iterations"] == 120


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    """Two training phantoms' candidates from the shipped one-stage detector."""
    out = tmp_path_factory.mktemp("candidates")
    mine(FIRST_STAGE, phantom_scans(2600, 2601), out, PATCH, margin=2, floor=0.05, per_scan=20)
    return out


def test_mined_patches_are_labelled_from_the_reference_nodules(mined):
    for seed in (2600, 2601):
        z = np.load(mined / "scans" / f"phantom-{seed}.npz")
        _, ph = phantom_volume(seed, PhantomSettings())
        ref = z["kind"] == KIND_REFERENCE
        assert ref.sum() == len(ph.nodules) and np.all(z["label"][ref] == 1)
        np.testing.assert_allclose(sorted(z["diameter_mm"][ref]), sorted(n.diameter_mm for n in ph.nodules), rtol=1e-5)
        cand = ~ref
        assert 0 < cand.sum() <= 20 and np.all(z["score"][cand] >= 0.05)
        assert np.all(np.diff(z["score"][cand]) <= 0)  # highest first
        assert np.all((z["diameter_mm"][cand] > 0) == (z["label"][cand] == 1))
        # Every patch knows where the nearest nodule's centre lies from its centre voxel: a reference patch is
        # cut at its own nodule (less than half a voxel off), a candidate on a nodule points within its radius.
        assert np.all(np.abs(z["offset_vox"][ref]) <= 0.5 + 1e-6)
        on = cand & (z["label"] == 1)
        np.testing.assert_allclose(z["near_diameter_mm"][on], z["diameter_mm"][on])
        spacing = np.array(json.loads((mined / "mining.json").read_text())["model_spacing_mm"])
        near_mm = np.linalg.norm(z["offset_vox"][on] * spacing, axis=1)  # the patch is cut at the rounded voxel:
        assert np.all(near_mm < z["diameter_mm"][on] / 2 + np.linalg.norm(spacing) / 2)  # half a voxel more
        assert z["patches"].shape[1:] == tuple(s + 4 for s in PATCH)
        # A candidate on a nodule and that nodule's reference patch (cut from its world-mm centre, not from
        # the detector's box) show the same thing: both coordinate paths land on the nodule.
        for c in np.flatnonzero(cand & (z["label"] == 1)):
            r = np.flatnonzero(ref & np.isclose(z["diameter_mm"], z["diameter_mm"][c]))[0]
            a, b = (z["patches"][i].astype(np.float32).ravel() for i in (c, r))
            assert np.corrcoef(a, b)[0, 1] > 0.6


@pytest.fixture(scope="module")
def two_stage(mined, tmp_path_factory):
    run = tmp_path_factory.mktemp("rescorer")
    cfg = RescorerConfig(seed=2, channels=[8, 16, 32], batch_size=16, iterations=20, validation_fraction=0.0,
                         validate_every=10, precision="f32")
    fit_rescorer(cfg, [mined], run)
    out = tmp_path_factory.mktemp("models") / "two-stage-test"
    return attach(FIRST_STAGE, run / "checkpoint.pt", out, "0.0.1", (900045, 900045), max_fp_per_scan=4.0, views=16)


def test_attached_model_card_names_and_verifies_both_stages(two_stage):
    spec = load_model(str(two_stage))
    stage = spec.card.second_stage
    assert stage is not None and stage.weight in WEIGHTS and stage.min_detector_score == 0.05
    assert spec.second_stage_path.name == "two-stage-test-rescorer.onnx"
    assert spec.card.onnx_sha256 == load_model(FIRST_STAGE).card.onnx_sha256  # the same detector
    assert "2 phantoms of generator" in stage.data and "weight_selection_cpm_w0" in stage.metrics
    assert spec.card.metrics["eval_scans"] == 1 and stage.views == 16
    md = two_stage.with_suffix(".md").read_text()
    assert "Second stage" in md and stage.onnx_sha256 in md and "16 mirrored/turned copies" in md


def test_tampered_second_stage_is_refused(two_stage, tmp_path):
    for f in two_stage.parent.glob("two-stage-test*"):
        shutil.copy2(f, tmp_path / f.name)
    onnx = tmp_path / "two-stage-test-rescorer.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-1] + b"\0")
    with pytest.raises(ModelIntegrityError, match="rescorer.onnx"):
        load_model(str(tmp_path / "two-stage-test.json"))


def test_two_stage_detector_reports_fused_scores_on_both_backends(two_stage):
    spec = load_model(str(two_stage))
    stage = spec.card.second_stage
    volume, _ = phantom_volume(2600, PhantomSettings())
    ort = Detector(spec, provider="cpu")
    found = ort.candidates(volume, stage.min_detector_score)
    image = found.prepared.image.numpy()
    p_ort = ort.rescorer.rescore(image, found.boxes).probabilities
    p_torch = Rescorer.torch(stage, spec.second_stage_state_dict_path).rescore(image, found.boxes).probabilities
    np.testing.assert_allclose(p_ort, p_torch, atol=1e-4)
    expected = fuse(found.scores, p_ort, stage.weight)
    reported = ort.detect(volume, score_threshold=0.0)
    assert reported and len(reported) <= len(found.scores)
    for d in reported:  # every reported score is one candidate's fused score
        assert np.min(np.abs(expected - d.score)) < 1e-6


class _Sweep:
    """An evaluation's operating points as a step function of the threshold."""

    def __init__(self, points):
        self.points = points  # [(from threshold, sensitivity, FP/scan)], ascending

    def at_threshold(self, t):
        sens, fp = next((s, f) for lo, s, f in reversed(self.points) if t >= lo)
        return {"sensitivity": sens, "sensitivity_ge6mm": sens, "false_positives_per_scan": fp}


def test_operating_point_keeps_the_best_sensitivity_with_the_fewest_false_positives():
    from lungnode.training.export import sweep_threshold

    # 0.3-0.4: too many FP; 0.5-0.7 the same sensitivity with fewer and fewer FP; 0.8 on loses a nodule
    ev = _Sweep([(0.0, 1.0, 9.0), (0.5, 0.96, 1.4), (0.6, 0.96, 1.0), (0.7, 0.96, 0.3), (0.8, 0.92, 0.2)])
    assert sweep_threshold(ev, 2.5, default=0.5) == 0.7
    assert sweep_threshold(ev, 0.25, default=0.5) == 0.99  # only the top sweep points fit: 0.92 there
    assert sweep_threshold(ev, None, default=0.42) == 0.42
    assert sweep_threshold(_Sweep([(0.0, 1.0, 9.0)]), 1.0, default=0.5) == 0.99  # nothing fits: the top


def test_candidate_sets_mined_differently_cannot_train_together(tmp_path):
    from lungnode.training.rescorer_fit import mining_record

    base = {"model": "m", "model_sha256": "abc", "patch_size": [16, 16, 12], "margin": 2, "floor": 0.05, "per_scan": 40}
    for name, record in (("a", base), ("b", {**base, "per_scan": 20}), ("c", {**base, "model_sha256": "other"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "mining.json").write_text(json.dumps(record))
    merged = mining_record([tmp_path / "a", tmp_path / "b"])  # more or fewer candidates a scan: fine
    assert merged["model_sha256"] == "abc" and [f["per_scan"] for f in merged["folders"]] == [40, 20]
    with pytest.raises(ValueError, match="model_sha256"):
        mining_record([tmp_path / "a", tmp_path / "c"])


def test_training_offsets_follow_the_patch_through_shift_mirror_and_turn():
    from lungnode.training.rescorer_fit import augment

    size, margin = np.array([10, 10, 8]), 3
    padded = np.zeros((40, *(size + 2 * margin)), np.float16)
    offsets = np.random.default_rng(0).integers(-3, 4, size=(40, 3)).astype(np.float64)
    for n, d in enumerate(offsets):  # a bright voxel at the nodule centre: the padded patch's centre voxel + offset
        padded[(n, *(np.array(padded.shape[1:]) // 2 + d.astype(int)))] = 1.0
    out, seen = augment(padded, size, np.random.default_rng(1), jitter=0.0, offsets=offsets)
    for x, t in zip(out, seen):
        where = np.argwhere(x == x.max())
        if len(where) == 1 and x.max() > 0.5:  # the shift may push the voxel out of the crop
            np.testing.assert_allclose(where[0] - (size - 1) / 2, t)
    _, none = augment(padded[:2], size, np.random.default_rng(1), jitter=0.0)
    assert np.isnan(none).all()  # no nodule, no offset


def test_offsets_read_in_a_mirrored_or_turned_copy_map_back_to_the_patch():
    from lungnode.inference.rescoring import mirrored_and_turned, unturn_offsets

    patch = np.zeros((1, 8, 8, 6), np.float32)
    patch[0, 6, 2, 1] = 1.0
    centre = (np.array(patch.shape[1:]) - 1) / 2
    for n, view in enumerate(mirrored_and_turned(patch, 16)):
        seen = np.argwhere(view[0])[0] - centre  # where a perfect centre head sees the nodule in this copy
        np.testing.assert_allclose(unturn_offsets(seen[None], n)[0], np.array([6, 2, 1]) - centre)


def _centre_finder(x):
    """A perfect two-output "classifier": logit = the patch's central 2x2x2 voxels, offset = where its
    brightest voxel lies from the patch's centre."""
    centre = (np.array(x.shape[2:]) - 1) / 2
    mid = tuple(slice(int(c), int(c) + 2) for c in centre)
    logits = x[(slice(None), 0, *mid)].reshape(len(x), -1).sum(1) * 4.0 - 2.0
    offsets = np.array([np.unravel_index(np.argmax(p), p.shape) for p in x[:, 0]]) - centre
    return logits, offsets


def test_a_centre_head_moves_the_candidate_onto_the_nodule_and_reads_it_there():
    image = np.zeros((30, 30, 24), np.float32)
    image[17, 13, 12] = 1.0  # the nodule centre, 4 voxels from the box's
    box = np.array([[12.5, 12.5, 11.5, 15.5, 15.5, 14.5]])  # centre (13.5, 13.5, 12.5): between voxels
    stage = SecondStage(onnx_file="x", onnx_sha256="0", channels=[1], parameters=0, patch_size=(12, 12, 10), weight=0.5,
                        min_detector_score=0.05, views=16, recentre_mm=6.0, data="",
                        training={"command": "", "config": {}, "iterations": 0, "seconds": 0.0, "device": "cpu"})
    got = Rescorer(stage, _centre_finder, spacing_mm=(1.0, 1.0, 1.5)).rescore(image, box)
    np.testing.assert_allclose(box_centres(got.boxes)[0], [17, 13, 12])  # onto the nodule's voxel
    np.testing.assert_allclose(got.boxes[0, 3:] - got.boxes[0, :3], box[0, 3:] - box[0, :3])  # same size
    assert got.probabilities[0] > 0.8  # read again where the nodule is: its patch centre is bright
    short = Rescorer(stage.model_copy(update={"recentre_mm": 2.0}), _centre_finder, spacing_mm=(1.0, 1.0, 1.5))
    moved = short.rescore(image, box).shifts[0]
    assert np.linalg.norm(moved * [1.0, 1.0, 1.5]) == pytest.approx(2.0) and moved[0] > 0  # at most 2 mm, towards it
    plain = Rescorer(stage.model_copy(update={"recentre_mm": 0.0}), _centre_finder).rescore(image, box)
    np.testing.assert_array_equal(plain.boxes, box)  # no centre head in the card: no move


def _write_offcentre(folder: Path, n_scans: int, per_scan: int, seed: int, margin: int) -> None:
    """Mined patches with offsets: a sphere up to 3 voxels off the patch centre, or a vessel (no nodule)."""
    rng = np.random.default_rng(seed)
    (folder / "scans").mkdir(parents=True)
    size = np.array(PATCH) + 2 * margin
    grid = np.stack(np.meshgrid(*[np.arange(s) - s // 2 for s in size], indexing="ij"), -1)
    for s in range(n_scans):
        label = (np.arange(per_scan) % 2 == 0).astype(np.uint8)
        patches, offsets = [], []
        for v in label:
            if v:
                d = rng.integers(-3, 4, size=3).astype(float)
                x = 0.11 + 0.03 * rng.normal(size=size)
                x[np.linalg.norm(grid - d, axis=-1) < rng.uniform(2.0, 3.5)] = 0.7
                patches.append(x.astype(np.float16))
                offsets.append(d)
            else:
                patches.append(_blob_or_tube(rng, tuple(size), False))
                offsets.append(np.full(3, np.nan))
        np.savez(folder / "scans" / f"synthetic-{s}.npz", patches=np.stack(patches), label=label,
                 score=rng.uniform(0.5, 1.0, per_scan).astype(np.float32), kind=np.zeros(per_scan, np.uint8),
                 diameter_mm=np.where(label == 1, 6.0, 0.0).astype(np.float32),
                 offset_vox=np.array(offsets, np.float32), near_diameter_mm=np.where(label == 1, 6.0, 0.0).astype(np.float32))
    (folder / "mining.json").write_text(json.dumps({"model": "synthetic", "model_sha256": "-", "patch_size": list(PATCH),
                                                    "margin": margin, "floor": 0.05, "per_scan": per_scan,
                                                    "model_spacing_mm": [1.0, 1.0, 1.5]}))


def test_a_centre_head_learns_where_the_nodule_is_and_exports_with_it(tmp_path):
    from lungnode.models.candidate_classifier import CandidateClassifier, centre_head_cells
    from lungnode.training.rescorer_attach import export_classifier

    _write_offcentre(tmp_path / "mined", n_scans=12, per_scan=30, seed=5, margin=2)
    cfg = RescorerConfig(seed=1, channels=[8, 16, 32], batch_size=32, iterations=150, lr=3e-3, warmup_iterations=10,
                         validation_fraction=0.3, validate_every=150, precision="f32", centre_head=True, near_mm=7.0,
                         centre_weight=0.3)
    _write_mined(tmp_path / "old", 2, 6, seed=1, margin=2)  # mined before offsets were recorded
    (tmp_path / "old" / "mining.json").write_text((tmp_path / "mined" / "mining.json").read_text())
    with pytest.raises(ValueError, match="mined with nodule offsets"):
        fit_rescorer(cfg, [tmp_path / "old"], tmp_path / "old-run")
    state = fit_rescorer(cfg, [tmp_path / "mined"], tmp_path / "run")
    offsets = np.concatenate([np.load(f)["offset_vox"] for f in (tmp_path / "mined" / "scans").glob("*.npz")])
    guess_centre_mm = np.nanmean(np.linalg.norm((offsets + 0.5) * [1.0, 1.0, 1.5], axis=1))  # from the crop's centre
    assert state["validation"]["val_centre_error_mm"] < 0.6 * guess_centre_mm, (state["validation"], guess_centre_mm)
    assert state["validation"]["val_auc"] >= 0.9 and state["centre_head"]
    net = CandidateClassifier([8, 16, 32], centre_head_cells(PATCH, [8, 16, 32]))
    net.load_state_dict(state["network"])
    assert export_classifier(net, tmp_path / "c.onnx", PATCH) < 1e-4  # both outputs agree with PyTorch
    import onnx

    assert [o.name for o in onnx.load(str(tmp_path / "c.onnx")).graph.output] == ["logit", "centre"]
    # Both backends load the two-output classifier from a card and move the same candidates the same way.
    import torch

    torch.save(net.state_dict(), tmp_path / "c.pt")
    stage = SecondStage(onnx_file="c.onnx", onnx_sha256="0", channels=[8, 16, 32], parameters=0, patch_size=PATCH,
                        weight=0.5, min_detector_score=0.05, views=16, recentre_mm=6.0, data="",
                        training={"command": "", "config": {}, "iterations": 0, "seconds": 0.0, "device": "cpu"})
    image = np.load(next((tmp_path / "mined" / "scans").glob("*.npz")))["patches"][0].astype(np.float32)
    boxes = np.array([[4.0, 4.0, 3.0, 9.0, 9.0, 8.0], [8.0, 7.0, 6.0, 12.0, 11.0, 9.0]])
    by_ort = Rescorer.onnx(stage, tmp_path / "c.onnx", provider="cpu", spacing_mm=(1.0, 1.0, 1.5)).rescore(image, boxes)
    by_torch = Rescorer.torch(stage, tmp_path / "c.pt", spacing_mm=(1.0, 1.0, 1.5)).rescore(image, boxes)
    np.testing.assert_allclose(by_ort.boxes, by_torch.boxes, atol=1e-3)
    np.testing.assert_allclose(by_ort.probabilities, by_torch.probabilities, atol=1e-4)
    assert np.any(by_ort.shifts != 0)  # the trained head moved them

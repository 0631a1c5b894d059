"""`lungnode train retune`: the same networks with other inference settings become a new model whose
files verify, whose card says how it runs, and whose operating point is chosen again."""
from __future__ import annotations

import json

import pytest

from lungnode.inference.tta import mirror_views
from lungnode.models.registry import load_model
from lungnode.training.retune import retune

TUNING = (424242, 424242)  # one phantom, apart from the training and card evaluation seeds


def test_retuned_model_runs_its_new_settings_and_chooses_its_threshold(tmp_path):
    import numpy as np

    from lungnode.training.data import PhantomSettings
    from lungnode.training.lidc_shapes import NoduleShape, ShapeLibrary

    source = load_model("default")
    whole = 0 if source.card.inference.whole_image_max_voxels else 20_000_000
    ball = (np.mgrid[-8:9, -8:9, -8:9] ** 2).sum(0) <= 64
    shapes = ShapeLibrary([NoduleShape(ball, (0.7, 0.7, 0.7), 5, "P")]).save(tmp_path / "shapes.npz")
    tuning = PhantomSettings(nodule_shapes=str(shapes), shape_split="all", real_shape_fraction=0.5)
    card_path = retune("default", tmp_path / "models" / "retuned", "2.0.0",
                       {"whole_image_max_voxels": whole, "sw_batch_size": 2, "tta_flips": mirror_views((0,))},
                       TUNING, max_fp_per_scan=2.5, tuning=tuning)
    spec = load_model(str(card_path))  # every file beside the card, sha256-checked
    assert spec.info.name == "retuned" and spec.info.version == "2.0.0"
    assert spec.card.inference.whole_image_max_voxels == whole and spec.card.inference.sw_batch_size == 2
    assert spec.card.inference.tta_flips == ((), (0,))
    assert spec.info.sha256 == source.info.sha256, "the same network"
    assert (spec.card.second_stage is None) == (source.card.second_stage is None)
    card = json.loads(card_path.read_text())
    assert card["data"]["eval_seeds"] == list(TUNING)
    assert 0 < card["inference"]["score_threshold"] <= 1 and "sensitivity" in card["metrics"]
    assert "whole_image_max_voxels" in card["description"] and "2 mirrored views" in card["description"]
    assert "tuning phantoms with 50% real outlines (all split of" in card["description"]
    assert card_path.with_suffix(".md").read_text().startswith("# retuned (version 2.0.0)")


def test_the_first_stage_alone_becomes_a_model_whose_candidates_can_be_mined(tmp_path):
    from lungnode.training.candidate_mining import mine
    from lungnode.training.eval_sets import phantom_scans

    out = tmp_path / "models" / "alone"
    card_path = retune("default", out, "1.0.0", {}, TUNING, None, first_stage_only=True)
    spec = load_model(str(card_path))
    assert spec.card.second_stage is None and not list(out.parent.glob("*rescorer*"))
    assert spec.info.sha256 == load_model("default").info.sha256, "the default model's own detector"
    assert "the first stage alone" in spec.card.description
    folder = mine(str(card_path), phantom_scans(*TUNING), tmp_path / "mined", (32, 32, 24), 3, 0.05, 10)
    assert len(list(folder.glob("*.npz"))) == 1


def test_the_second_stage_reads_more_views_and_its_weight_is_chosen_again(tmp_path):
    from lungnode.training.rescorer_attach import WEIGHTS

    source = load_model("default")
    if source.card.second_stage is None:
        pytest.skip("the default model has no second stage")
    card_path = retune("default", tmp_path / "models" / "views", "1.0.0", {}, TUNING, None, second_stage_views=8)
    stage = load_model(str(card_path)).card.second_stage
    assert stage.views == 8 and stage.weight in WEIGHTS and "weight_selection_cpm_w0.5" in stage.metrics
    assert "its second stage reading 8 views of each patch" in load_model(str(card_path)).card.description
    with pytest.raises(ValueError, match="needs a second stage"):
        retune("default", tmp_path / "alone", "1.0.0", {}, TUNING, None, first_stage_only=True, second_stage_views=8)


def test_an_unknown_setting_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown inference setting"):
        retune("default", tmp_path / "x", "1.0.0", {"window_size": 3}, TUNING, None)


def _fine_tune(tmp_path, init_weights, iterations: int = 2):
    """A real (tiny) `train fit` run from ``init_weights`` with the default model's network and settings."""
    from lungnode.training.fit import TrainConfig, fit

    source = load_model("default")
    cfg = TrainConfig(seed=1, network=source.card.network,
                      phantoms={"model_spacing_fraction": 1.0, "field_of_view_mm": (300, 300), "n_nodules": (2, 2),
                                "diameter_range_mm": (6, 12)},
                      train_seeds=(5, 5), cache_dir=tmp_path / "cache", inference=source.card.inference,
                      batch_size=1, workers=0, cache_processes=1, iterations=iterations, lr=1e-5,
                      warmup_iterations=1, init_weights=init_weights)
    fit(cfg, tmp_path / "run", command="lungnode train fit (test)")
    return tmp_path / "run" / "checkpoint.pt"


def test_a_fine_tuned_detector_replaces_the_first_stage_and_keeps_the_second(tmp_path):
    source = load_model("default")
    checkpoint = _fine_tune(tmp_path, source.state_dict_path)
    card_path = retune("default", tmp_path / "models" / "tuned", "3.0.0", {}, TUNING, max_fp_per_scan=2.5,
                       detector_checkpoint=checkpoint)
    spec = load_model(str(card_path))  # every file beside the card, sha256-checked
    assert spec.info.sha256 != source.info.sha256, "the fine-tuned network, exported to ONNX"
    assert spec.card.export_max_abs_diff < 1e-3
    assert spec.card.training.iterations == 2 and spec.card.training.command == "lungnode train fit (test)"
    assert spec.card.data.train_seeds == [5, 5] and spec.card.data.eval_seeds == list(TUNING)
    if source.card.second_stage is not None:
        assert spec.card.second_stage.onnx_sha256 == source.card.second_stage.onnx_sha256
    assert "detector fine-tuned (2 iterations)" in spec.card.description
    assert "sensitivity" in spec.card.metrics


def test_a_detector_not_fine_tuned_from_the_model_is_refused(tmp_path):
    checkpoint = _fine_tune(tmp_path, None, iterations=1)  # trained from random weights
    with pytest.raises(ValueError, match="not fine-tuned from"):
        retune("default", tmp_path / "x", "1.0.0", {}, TUNING, None, detector_checkpoint=checkpoint)

"""`lungnode train retune`: the same networks with other inference settings become a new model whose
files verify, whose card says how it runs, and whose operating point is chosen again."""
from __future__ import annotations

import json

import pytest

from lungnode.models.registry import load_model
from lungnode.training.retune import retune

TUNING = (424242, 424242)  # one phantom, apart from the training and card evaluation seeds


def test_retuned_model_runs_its_new_settings_and_chooses_its_threshold(tmp_path):
    source = load_model("default")
    whole = 0 if source.card.inference.whole_image_max_voxels else 20_000_000
    card_path = retune("default", tmp_path / "models" / "retuned", "2.0.0",
                       {"whole_image_max_voxels": whole, "sw_batch_size": 2}, TUNING, max_fp_per_scan=2.5)
    spec = load_model(str(card_path))  # every file beside the card, sha256-checked
    assert spec.info.name == "retuned" and spec.info.version == "2.0.0"
    assert spec.card.inference.whole_image_max_voxels == whole and spec.card.inference.sw_batch_size == 2
    assert spec.info.sha256 == source.info.sha256, "the same network"
    assert (spec.card.second_stage is None) == (source.card.second_stage is None)
    card = json.loads(card_path.read_text())
    assert card["data"]["eval_seeds"] == list(TUNING)
    assert 0 < card["inference"]["score_threshold"] <= 1 and "sensitivity" in card["metrics"]
    assert "whole_image_max_voxels" in card["description"]
    assert card_path.with_suffix(".md").read_text().startswith("# retuned (version 2.0.0)")


def test_an_unknown_setting_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown inference setting"):
        retune("default", tmp_path / "x", "1.0.0", {"window_size": 3}, TUNING, None)

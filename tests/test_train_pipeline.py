"""`lungnode train pipeline`: a site's retraining end to end on a tiny site (two small DICOM series),
interrupted and resumed, refusing a changed config, and fine-tuning a shipped second stage."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import yaml

from lungnode.models.candidate_classifier import CandidateClassifier
from lungnode.models.registry import load_model
from lungnode.training import rescorer_fit
from lungnode.training.pipeline import run_pipeline
from lungnode.training.pipeline_steps import STEPS
from lungnode.training.synth import make_phantom, write_dicom_series

ONE_STAGE, TWO_STAGE = "lungnode-retina-cpu-v1", "lungnode-retina-cpu-v16"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A site's datalist: one reviewed series to learn from, another (validation) to tune and evaluate on."""
    root = tmp_path_factory.mktemp("site")
    sections = {}
    for section, seed in (("training", 7), ("validation", 9)):  # one nodule each
        ph = make_phantom(seed, spacing=(1.4, 1.4, 2.5), field_of_view_mm=(358.0, 358.0, 120.0), n_nodules=(1, 1))
        files = write_dicom_series(ph, root / f"series-{seed}", patient_id=f"SITE{seed}")
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        sections[section] = [{"image": str(root / f"series-{seed}"), "series_uid": uid, "label": [0],
                              "box": [[*n.center_mm, n.diameter_mm, n.diameter_mm, n.diameter_mm] for n in ph.nodules],
                              "diameter_mm": [n.diameter_mm for n in ph.nodules]}]
    (root / "site.json").write_text(json.dumps(sections))
    return root / "site.json"


def write_config(tmp_path: Path, site: Path, **changes) -> Path:
    tiny = tmp_path / "rescorer_tiny.yaml"  # a classifier from scratch for the one-stage model, a few steps
    tiny.write_text(yaml.safe_dump({"seed": 1, "channels": [8, 16, 32], "batch_size": 16, "iterations": 5,
                                    "warmup_iterations": 2, "validation_fraction": 0.0, "precision": "f32"}))
    cfg = {"name": "site-test", "out": str(tmp_path / "runs" / "site-test"), "base_model": ONE_STAGE,
           "datalists": [str(site)], "synth": {"copies": 1, "seed": 1},
           "candidates": {"patch_size": [16, 16, 12], "margin": 2, "per_scan": 10},
           "second_stage": {"config": str(tiny), "iterations": 5},
           "operating_point": {"max_fp_per_scan": 4.0, "tune_datalist": str(site), "tune_section": "validation"},
           "eval": [{"name": "site", "datalist": str(site), "section": "validation"}]}
    for key, value in changes.items():
        cfg[key] = value if not isinstance(value, dict) else {**cfg.get(key, {}), **value}
    path = tmp_path / "site_pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def state(config: Path) -> dict:
    return json.loads((Path(yaml.safe_load(config.read_text())["out"]) / "pipeline.json").read_text())


def test_interrupted_pipeline_resumes_after_its_completed_steps_and_then_has_nothing_to_do(site, tmp_path,
                                                                                              monkeypatch, capsys):
    config = write_config(tmp_path, site)

    def power_cut(*args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(rescorer_fit, "fit_rescorer", power_cut)  # the second stage's training is interrupted
    with pytest.raises(RuntimeError, match="power cut"):
        run_pipeline(config)
    first = state(config)["steps"]
    assert [first[s]["status"] for s in STEPS] == ["done", "done", "skipped", "done", "failed", "pending", "pending",
                                                   "pending"]
    assert "power cut" in first["second-stage"]["note"]
    out = tmp_path / "runs" / "site-test"
    assert (out / "inserted" / "datalist.json").is_file() and (out / "candidates" / "mining.json").is_file()
    assert not (out / "candidates.tmp").exists()  # renamed when done
    mining = json.loads((out / "candidates" / "mining.json").read_text())
    assert mining["model"] == ONE_STAGE and len(mining["real_series"]) == 1  # the inserted copy names its source

    monkeypatch.undo()
    assert run_pipeline(config) == 0
    steps = state(config)["steps"]
    for s in ("import", "synth", "fit", "candidates"):  # not run again
        assert steps[s] == first[s]
    assert [steps[s]["status"] for s in STEPS] == ["done", "done", "skipped", "done", "done", "done", "done", "skipped"]
    started = [steps[s]["started"] for s in STEPS]
    assert started == sorted(started) and all(steps[s]["seconds"] is not None for s in STEPS)
    card = Path(steps["attach"]["outputs"]["model"])
    assert card == out / "model" / "site-test.json"
    spec = load_model(str(card))  # a verified two-stage model: v1's detector, the new classifier
    assert spec.card.second_stage is not None and spec.info.sha256 == load_model(ONE_STAGE).info.sha256
    assert (out / "eval" / "figures.txt").read_text().startswith("set")
    printed = capsys.readouterr().out
    assert "CPU: " in printed and "estimated: " in printed and "total" in printed
    assert f"lungnode train promote {card}" in printed  # promote: false prints the command

    assert run_pipeline(config) == 0  # complete: only the summary
    assert "nothing to do" in capsys.readouterr().out
    assert state(config)["steps"] == steps


def test_a_changed_config_refuses_to_resume_and_names_the_step_to_restart_from(site, tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path, site)

    def power_cut(*args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setitem(STEPS, "synth", power_cut)
    with pytest.raises(RuntimeError):
        run_pipeline(config)
    write_config(tmp_path, site, synth={"copies": 2})
    assert run_pipeline(config) == 2
    err = capsys.readouterr().err
    assert "changed since" in err and "synth" in err and "--restart-from synth" in err
    assert run_pipeline(config, restart_from="candidates") == 2  # after the changed step: refused too
    assert state(config)["steps"]["import"]["status"] == "done"  # nothing was undone


def test_the_second_stage_is_fine_tuned_from_the_base_models_own(site, tmp_path, capsys):
    config = write_config(tmp_path, site, base_model=TWO_STAGE, synth={"copies": 0}, candidates={"patch_size": None},
                          second_stage={"config": "configs/rescorer_site.yaml", "iterations": 5})
    assert run_pipeline(config) == 0
    steps = state(config)["steps"]
    run = Path(steps["second-stage"]["outputs"]["checkpoint"]).parent
    base = load_model(TWO_STAGE)
    assert yaml.safe_load((run / "config.yaml").read_text())["init_weights"] == str(base.second_stage_state_dict_path)
    assert f"from {TWO_STAGE}'s second stage" in steps["second-stage"]["note"]
    tuned = torch.load(run / "checkpoint.pt", weights_only=False)["network"]
    shipped = torch.load(base.second_stage_state_dict_path, weights_only=True)
    learned = dict(CandidateClassifier(base.card.second_stage.channels).named_parameters())  # not the norms' statistics
    change = max(float((tuned[k] - shipped[k]).abs().max()) for k in learned)
    assert 0 < change < 0.01  # 5 small steps away from the shipped classifier
    spec = load_model(steps["attach"]["outputs"]["model"])
    assert spec.info.sha256 == base.info.sha256 and spec.card.second_stage.views == base.card.second_stage.views
    assert spec.card.second_stage.onnx_sha256 != base.card.second_stage.onnx_sha256  # replaced
    assert "second stage fine-tuned" in spec.card.description
    assert np.isfinite(spec.card.metrics["score_threshold"])


def test_a_fine_tuned_detector_gets_its_own_candidates_mined_and_a_second_stage_for_them(site, tmp_path):
    base = load_model(ONE_STAGE)
    train = {**base.card.training.config, "train_seeds": None, "datalists": [], "iterations": 2, "batch_size": 1,
             "workers": 0, "cache_dir": str(tmp_path / "cache"), "warmup_iterations": 1, "checkpoint_every": 1}
    (tmp_path / "train_tiny.yaml").write_text(yaml.safe_dump(train))
    config = write_config(tmp_path, site, fit={"enabled": True, "config": str(tmp_path / "train_tiny.yaml")},
                          operating_point={"eval_seeds": [900045, 900045]})
    assert run_pipeline(config) == 0
    steps = state(config)["steps"]
    detector = load_model(steps["fit"]["outputs"]["model"])  # the fine-tuned detector, retuned
    assert detector.info.sha256 != base.info.sha256
    mining = json.loads((Path(steps["candidates"]["outputs"]["candidates"]) / "mining.json").read_text())
    assert mining["model_sha256"] == detector.info.sha256  # its own candidates
    model = load_model(steps["attach"]["outputs"]["model"])
    assert model.info.sha256 == detector.info.sha256 and model.card.second_stage is not None

"""`lungnode train eval` and `promote` with the shipped model on held-out phantoms."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lungnode.cli import main
from lungnode.models.registry import REGISTRY_FILE, load_model
from lungnode.models.retinanet import NetConfig, build_network
from lungnode.training.export import export
from lungnode.training.fit import load_config
from lungnode.training.synth import GENERATOR_VERSION

REPO = Path(__file__).resolve().parent.parent
HELD_OUT = ["990001", "990002"]  # far from the training seeds in configs/train_cpu.yaml


def test_eval_on_held_out_phantoms_prints_froc_and_writes_plot(tmp_path, capsys):
    out = tmp_path / "eval"
    # Two seed ranges pooled into one FROC, as a larger held-out set is judged.
    assert main(["train", "eval", "--phantoms", HELD_OUT[0], HELD_OUT[0], "--phantoms", HELD_OUT[1], HELD_OUT[1],
                 "--name", "heldout", "--out", str(out), "--bootstraps", "50"]) == 0
    printed = capsys.readouterr().out
    assert "LUNA16 FROC" in printed and "phantom-990001" in printed and "phantom-990002" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["heldout_cpm"] <= 1.0 and metrics["heldout_scans"] == 2
    # the metrics say which scans they come from, generator included (a new generator draws other phantoms)
    assert metrics["heldout_set"] == f"phantoms 990001-990001, 990002-990002 (generator {GENERATOR_VERSION})"
    assert (out / "froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "candidates.csv").read_text().startswith("seriesuid,coordX,coordY,coordZ,probability")


@pytest.fixture()
def untrained_model(tmp_path) -> Path:
    """A model with the shipped architecture and random weights: it must score worse."""
    cfg = load_config(REPO / "configs" / "train_cpu.yaml")
    net_cfg = NetConfig.from_dict(load_model("default").card.network)
    torch.manual_seed(0)
    net = build_network(net_cfg, use_list_output=True)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"iteration": 0, "seconds": 0.0, "network": net.state_dict(), "net_config": net_cfg.to_dict(),
                "config": cfg.model_dump(mode="json")}, run / "checkpoint.pt")
    export(run / "checkpoint.pt", tmp_path / "candidate" / "untrained", version="0.0.1", eval_seeds=None)
    return tmp_path / "candidate" / "untrained.json"


def test_promotion_refuses_a_worse_model(untrained_model, tmp_path, capsys):

    from lungnode.models.registry import MODELS_DIR

    registry_dir = tmp_path / "registry"  # a site's registry whose default is the shipped one
    registry_dir.mkdir()
    shipped = json.loads((MODELS_DIR / REGISTRY_FILE).read_text())
    shipped["reference_set"] = None  # the site registers its own
    (registry_dir / REGISTRY_FILE).write_text(json.dumps(shipped))
    assert main(["train", "reference", "--phantoms", *HELD_OUT, "--models-dir", str(registry_dir)]) == 0
    code = main(["train", "promote", str(untrained_model), "--models-dir", str(registry_dir)])
    assert code == 1
    assert "refused" in capsys.readouterr().out
    registry = json.loads((registry_dir / REGISTRY_FILE).read_text())
    assert registry["default"] == shipped["default"]
    assert len(registry["history"]) == len(shipped["history"]) + 2  # the reference set, then the decision
    entry = registry["history"][-1]
    assert entry["current"] == shipped["default"] and entry["accepted"] is False
    assert entry["candidate_cpm"] < entry["current_cpm"] and entry["difference_ci"][0] < 0
    assert entry["reference_digest"] == registry["reference_set"]["digest"]
    assert not (registry_dir / "untrained.onnx").exists()


def test_an_installed_model_brings_every_file_its_card_names(tmp_path):
    from lungnode.training.promote import install

    spec = load_model("default")
    install(spec, tmp_path)
    installed = load_model(str(tmp_path / f"{spec.info.name}.json"))  # each named file there, sha256-checked
    assert installed.onnx_path.parent == tmp_path
    assert (installed.second_stage_path is None) == (spec.second_stage_path is None)
    assert (installed.int8_onnx_path is None) == (spec.int8_onnx_path is None)


def test_card_markdown_follows_new_metrics_and_keeps_hand_written_sections(tmp_path):
    import shutil

    from lungnode.models.registry import MODELS_DIR
    from lungnode.training.card_markdown import rewrite_card_markdown

    card = tmp_path / "lungnode-retina-cpu-v5.json"
    shutil.copy(MODELS_DIR / card.name, card)
    shutil.copy(MODELS_DIR / card.with_suffix(".md").name, card.with_suffix(".md"))
    data = json.loads(card.read_text())
    data["metrics"]["site_cpm"] = 0.777
    card.write_text(json.dumps(data))
    rewrite_card_markdown(card)
    md = card.with_suffix(".md").read_text()
    assert "| site_cpm | 0.777 |" in md
    assert md.count("## How it was made") == 1 and md.count("## Limits") == 1
    assert md.endswith((MODELS_DIR / card.with_suffix(".md").name).read_text().split("performs clinically.\n", 1)[1])

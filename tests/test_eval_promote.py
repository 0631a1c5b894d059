"""`lungnode train eval` and `promote` with the shipped model on held-out phantoms."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lungnode.cli import main
from lungnode.models.registry import DEFAULT_MODEL, REGISTRY_FILE, load_model
from lungnode.models.retinanet import NetConfig, build_network
from lungnode.training.export import export
from lungnode.training.fit import load_config

REPO = Path(__file__).resolve().parent.parent
HELD_OUT = ["990001", "990002"]  # far from the training seeds in configs/train_cpu.yaml


def test_eval_on_held_out_phantoms_prints_froc_and_writes_plot(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["train", "eval", "--phantoms", *HELD_OUT, "--name", "heldout", "--out", str(out),
                 "--bootstraps", "50"]) == 0
    printed = capsys.readouterr().out
    assert "LUNA16 FROC" in printed and "phantom-990001" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["heldout_cpm"] <= 1.0 and metrics["heldout_scans"] == 2
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
    registry_dir = tmp_path / "registry"
    registry_dir.mkdir()
    code = main(["train", "promote", str(untrained_model), "--phantoms", *HELD_OUT, "--models-dir", str(registry_dir)])
    assert code == 1
    assert "refused" in capsys.readouterr().out
    registry = json.loads((registry_dir / REGISTRY_FILE).read_text())
    assert registry["default"] == DEFAULT_MODEL
    (entry,) = registry["history"]
    assert entry["accepted"] is False and entry["candidate_cpm"] < entry["current_cpm"]
    assert not (registry_dir / "untrained.onnx").exists()

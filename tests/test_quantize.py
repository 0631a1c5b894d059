"""`lungnode train quantize`: an 8-bit copy of the detector network, kept only when it finds what the
float32 network finds, and run by the node (on OpenVINO) when the site asks for it."""
from __future__ import annotations

import json
import shutil

import onnx
import pytest

from lungnode.inference import onnx_runtime
from lungnode.inference.detector import Detector
from lungnode.inference.onnx_runtime import network_precision, openvino_available
from lungnode.models.registry import ModelCard, load_model
from lungnode.training.quantize import quantize

CALIBRATION = (424243, 424243)  # apart from the training, card evaluation and check seeds
CHECK = (424242, 424242)

needs_openvino = pytest.mark.skipif(not openvino_available(),
                                    reason="8-bit networks run on OpenVINO only (onnxruntime-openvino, x86-64 Linux)")


def _copy_of_default_model(tmp_path):
    """The default model's card and files, without any 8-bit network, in a folder of its own."""
    spec = load_model("default")
    card = ModelCard.model_validate_json(spec.onnx_path.with_suffix(".json").read_text())
    card.int8 = None
    names = [card.onnx_file, card.state_dict_file] + ([card.second_stage.onnx_file] if card.second_stage else [])
    for name in filter(None, names):
        shutil.copy2(spec.onnx_path.parent / name, tmp_path / name)
    card_path = tmp_path / f"{card.name}.json"
    card_path.write_text(card.model_dump_json(indent=2))
    return card_path


@needs_openvino
def test_an_8bit_network_is_made_checked_and_run_when_asked_for(tmp_path):
    card_path = _copy_of_default_model(tmp_path)
    quantize(str(card_path), CALIBRATION, CHECK, max_cpm_drop=0.05)
    spec = load_model(str(card_path))  # the 8-bit file sha256-checked too
    assert spec.int8_onnx_path is not None and spec.int8_onnx_path.name.endswith("-int8.onnx")
    ops = {n.op_type for n in onnx.load(str(spec.int8_onnx_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops, "convolutions on 8-bit tensors"
    check = spec.card.int8.check
    assert check["phantoms"] == "424242-424242" and check["found_int8"] >= check["found_f32"] > 0
    assert check["cpm_int8"] >= check["cpm_f32"] - 0.05
    assert "424243-424243" in spec.card.int8.calibration
    assert "8-bit network" in card_path.with_suffix(".md").read_text()
    auto = Detector(spec)  # the node's default: bfloat16 where the CPU has it, else float32
    assert auto.precision == ("bf16" if onnx_runtime.cpu_has_bf16() else "f32")
    assert Detector(spec, precision="int8")._detector.network.path == str(spec.int8_onnx_path)
    assert Detector(spec, precision="f32")._detector.network.path == str(spec.onnx_path)


@needs_openvino
def test_an_8bit_network_that_loses_nodules_or_cpm_is_refused_and_leaves_the_model_as_it_was(tmp_path):
    card_path = _copy_of_default_model(tmp_path)
    before = card_path.read_text()
    with pytest.raises(SystemExit, match="8-bit network refused: its CPM"):
        quantize(str(card_path), CALIBRATION, CHECK, max_cpm_drop=-1.0)  # must beat float32 by 1: impossible
    assert card_path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir() if "int8" in p.name) == []
    assert load_model(str(card_path)).int8_onnx_path is None


def test_overlapping_calibration_and_check_phantoms_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="overlap"):
        quantize(str(_copy_of_default_model(tmp_path)), (10, 20), (15, 25), 0.02)


def test_the_precision_is_chosen_from_the_cpu_the_provider_and_the_card(monkeypatch):
    monkeypatch.setattr(onnx_runtime, "openvino_available", lambda: True)
    monkeypatch.setattr(onnx_runtime, "cuda_available", lambda: False)
    monkeypatch.setattr(onnx_runtime, "cpu_has_bf16", lambda: False)
    assert network_precision("auto", "auto", has_int8=True) == "f32", "8-bit only when asked for"
    assert network_precision("int8", "auto", has_int8=True) == "int8"
    assert network_precision("f32", "openvino", has_int8=True) == "f32"
    monkeypatch.setattr(onnx_runtime, "cpu_has_bf16", lambda: True)
    assert network_precision("auto", "auto", has_int8=True) == "bf16"
    assert network_precision("auto", "cpu", has_int8=True) == "f32", "bfloat16 is OpenVINO's"
    assert network_precision("int8", "openvino", has_int8=True) == "int8"
    with pytest.raises(RuntimeError, match="train quantize --model m"):
        network_precision("int8", "auto", has_int8=False, model="m")
    with pytest.raises(RuntimeError, match="OpenVINO only"):
        network_precision("int8", "cpu", has_int8=True)
    with pytest.raises(ValueError, match="unknown ONNX precision"):
        network_precision("fp16", "auto", has_int8=True)


def test_a_card_naming_a_missing_8bit_file_is_a_clear_error(tmp_path):
    card_path = _copy_of_default_model(tmp_path)
    card = json.loads(card_path.read_text())
    card["int8"] = {"onnx_file": "gone-int8.onnx", "onnx_sha256": "0" * 64, "calibration": "", "check": {}}
    card_path.write_text(json.dumps(card))
    with pytest.raises(FileNotFoundError, match="8-bit ONNX file .*gone-int8.onnx"):
        load_model(str(card_path))

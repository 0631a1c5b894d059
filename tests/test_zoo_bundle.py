"""The MONAI zoo lung_nodule_ct_detection network built without torchvision, and `models import-bundle`.

A site loads its own copy of the bundle's models/model.pt: the network must have the bundle's exact
parameter count, state-dict keys and shapes; a file that does not fit must be refused naming the
key; the exported ONNX must compute what the loaded weights compute in PyTorch.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import types

import numpy as np
import pytest
import torch

from lungnode.models import bundle_import, zoo_bundle
from lungnode.models.cli import register as register_models
from lungnode.models.registry import ModelSpec, load_model
from lungnode.inference.detector import Detector
from lungnode.inference.types import Volume

SMALL = (32, 32, 16)  # divisible by the bundle's size_divisible (16, 16, 8)


@pytest.fixture(scope="module")
def zoo_net() -> torch.nn.Module:
    """The zoo network with BatchNorm statistics moved off their defaults, so a loader that
    skipped buffers (or loaded nothing) would compute something else."""
    torch.manual_seed(0)
    net = zoo_bundle.build_zoo_network()
    for name, buf in net.named_buffers():
        if name.endswith("running_mean"):
            buf.copy_(torch.randn_like(buf) * 0.1)
        elif name.endswith("running_var"):
            buf.copy_(torch.rand_like(buf) + 0.5)
    return net.eval()


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lungnode")
    register_models(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def forward(net: torch.nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        return [t.numpy() for t in net(x)]


def test_parameter_count_and_keys_are_the_bundles(zoo_net):
    assert sum(p.numel() for p in zoo_net.parameters()) == 20_902_741 == zoo_bundle.PARAMETERS
    sd = zoo_net.state_dict()
    expected = {
        "feature_extractor.body.conv1.weight": (64, 1, 7, 7, 7),
        "feature_extractor.body.bn1.running_var": (64,),
        "feature_extractor.body.layer1.0.conv1.weight": (64, 64, 1, 1, 1),
        "feature_extractor.body.layer1.0.downsample.0.weight": (256, 64, 1, 1, 1),
        "feature_extractor.body.layer1.0.downsample.0.bias": (256,),
        "feature_extractor.body.layer2.0.conv2.weight": (128, 128, 3, 3, 3),
        "feature_extractor.body.layer2.3.bn3.weight": (512,),
        "feature_extractor.fpn.inner_blocks.0.weight": (256, 256, 1, 1, 1),
        "feature_extractor.fpn.inner_blocks.1.weight": (256, 512, 1, 1, 1),
        "feature_extractor.fpn.layer_blocks.1.weight": (256, 256, 3, 3, 3),
        "classification_head.conv.0.weight": (256, 256, 3, 3, 3),
        "classification_head.conv.1.weight": (256,),  # GroupNorm
        "classification_head.cls_logits.weight": (3 * 1, 256, 3, 3, 3),
        "classification_head.cls_logits.bias": (3,),
        "regression_head.bbox_reg.weight": (3 * 6, 256, 3, 3, 3),
        "regression_head.bbox_reg.bias": (18,),
    }
    assert {k: tuple(sd[k].shape) for k in expected if k in sd} == expected
    # the layer getter stops after layer2: no layer3, layer4, fc in the bundle's file
    assert not [k for k in sd if k.startswith(("feature_extractor.body.layer3", "feature_extractor.body.layer4"))]
    assert not [k for k in sd if ".fc." in k or k.startswith("feature_extractor.body.fc")]


def test_same_keys_shapes_and_outputs_as_monais_own_builder(zoo_net, monkeypatch):
    """Build the network the way the bundle's configs do, with only torchvision's two helpers
    stood in for, and compare the whole state dict and the outputs."""
    from monai.apps.detection.networks import retinanet_network
    from monai.networks.blocks import backbone_fpn_utils
    from monai.networks.nets.resnet import resnet50

    monkeypatch.setattr(
        backbone_fpn_utils, "torchvision_models",
        types.SimpleNamespace(_utils=types.SimpleNamespace(IntermediateLayerGetter=zoo_bundle.LayerGetter)),
    )
    monkeypatch.setattr(retinanet_network, "_validate_trainable_layers", lambda pretrained, n, max_value, default_value: max_value)
    backbone = resnet50(spatial_dims=3, n_input_channels=1, conv1_t_stride=[2, 2, 1], conv1_t_size=[7, 7, 7])
    extractor = retinanet_network.resnet_fpn_feature_extractor(backbone, 3, False, [1, 2], None)
    monai_net = retinanet_network.RetinaNet(
        spatial_dims=3, num_classes=1, num_anchors=3, feature_extractor=extractor, size_divisible=[16, 16, 8],
        use_list_output=True,
    )
    ours = {k: tuple(v.shape) for k, v in zoo_net.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in monai_net.state_dict().items()} == ours
    monai_net.load_state_dict(zoo_net.state_dict(), strict=True)
    x = torch.rand(1, 1, *SMALL, generator=torch.Generator().manual_seed(1))
    for a, b in zip(forward(monai_net.eval(), x), forward(zoo_net, x)):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def imported(zoo_net, tmp_path_factory) -> tuple[str, str]:
    """A site's bundle folder with zoo_net's weights, imported by the CLI: (card path, printed summary)."""
    tmp_path = tmp_path_factory.mktemp("bundle")
    bundle = tmp_path / "lung_nodule_ct_detection"
    (bundle / "models").mkdir(parents=True)
    (bundle / "configs").mkdir()
    (bundle / "configs" / "metadata.json").write_text('{"version": "0.6.9"}')
    torch.save({"model": zoo_net.state_dict()}, bundle / "models" / "model.pt")  # CheckpointSaver's form
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert run_cli(["models", "import-bundle", str(bundle / "models" / "model.pt"),
                        "--out", str(tmp_path / "out"), "--name", "zoo"]) == 0
    return str(tmp_path / "out" / "zoo.json"), printed.getvalue()


def test_import_bundle_round_trip_to_onnx(zoo_net, imported):
    import onnxruntime as ort

    card_path, printed = imported
    assert "20,902,741 parameters" in printed
    spec = load_model(card_path)  # card valid, sha256 of the files checked
    card = spec.card
    assert (card.name, card.version, card.parameters) == ("zoo", "0.6.9", 20_902_741)
    assert card.onnx_opset >= 17 and card.export_max_abs_diff < 1e-3
    assert card.inference.spacing_mm == (0.703125, 0.703125, 1.25) and card.inference.window_hu == (-1024, 300)
    assert card.inference.roi_size == (512, 512, 192) and card.anchor_shapes_voxels[0] == [6.0, 8.0, 4.0]
    assert spec.onnx_path.stat().st_size > 4 * 20_902_741  # float32 weights are in the graph

    session = ort.InferenceSession(str(spec.onnx_path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["cls_0", "cls_1", "cls_2", "box_0", "box_1", "box_2"]
    x = torch.rand(1, 1, 48, 64, 24, generator=torch.Generator().manual_seed(2))  # not the traced size
    ort_out = session.run(None, {"image": x.numpy()})
    torch_out = forward(zoo_net, x)
    assert [o.shape for o in ort_out] == [(1, 3, 12, 16, 12), (1, 3, 6, 8, 6), (1, 3, 3, 4, 3),
                                          (1, 18, 12, 16, 12), (1, 18, 6, 8, 6), (1, 18, 3, 4, 3)]
    assert max(float(np.abs(a - b).max()) for a, b in zip(ort_out, torch_out)) < 1e-3
    # the weights really came from the file: an unloaded network computes something else
    fresh = forward(zoo_bundle.build_zoo_network().eval(), x)
    assert max(float(np.abs(a - b).max()) for a, b in zip(fresh, torch_out)) > 1e-2

    reloaded = torch.load(spec.state_dict_path, weights_only=True)  # the plain state dict shipped beside it
    assert all(torch.equal(reloaded[k], v) for k, v in zoo_net.state_dict().items())


def test_missing_and_misshaped_keys_are_named(zoo_net):
    expected = zoo_net.state_dict()
    bad = dict(expected)
    del bad["regression_head.bbox_reg.bias"]
    bad["classification_head.cls_logits.weight"] = torch.zeros(6, 256, 3, 3, 3)
    bad["feature_extractor.body.layer3.0.conv1.weight"] = torch.zeros(256, 512, 1, 1, 1)
    problems = zoo_bundle.state_dict_problems(expected, bad)
    assert problems == [
        "key classification_head.cls_logits.weight has shape (6, 256, 3, 3, 3), the zoo network needs (3, 256, 3, 3, 3)",
        "missing key regression_head.bbox_reg.bias (shape (18,))",
        "unexpected key feature_extractor.body.layer3.0.conv1.weight",
    ]
    assert zoo_bundle.state_dict_problems(expected, expected) == []


def test_cli_refuses_a_file_that_does_not_fit(zoo_net, tmp_path, capsys):
    sd = dict(zoo_net.state_dict())
    sd["feature_extractor.body.conv1.weight"] = torch.zeros(64, 3, 7, 7, 7)  # an RGB-input ResNet
    torch.save(sd, tmp_path / "model.pt")  # plain state dict form
    assert run_cli(["models", "import-bundle", str(tmp_path / "model.pt"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "feature_extractor.body.conv1.weight has shape (64, 3, 7, 7, 7)" in err and "(64, 1, 7, 7, 7)" in err
    assert not (tmp_path / "out").exists()


def test_files_that_are_not_state_dicts_are_refused(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(zoo_bundle.ZooWeightsError, match="not a state dict"):
        zoo_bundle.read_state_dict(tmp_path / "tensor.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(zoo_bundle.ZooWeightsError, match="not a loadable PyTorch state dict"):
        zoo_bundle.read_state_dict(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="models/model.pt"):
        bundle_import.resolve_weights(tmp_path)


def _scan(hu: np.ndarray, direction: np.ndarray, origin) -> Volume:
    return Volume(hu=hu, spacing=(0.703125, 0.703125, 1.25), origin=tuple(origin), direction=direction, slices=[],
                  study_instance_uid="1.2.3", series_instance_uid="1.2.3.4")


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_detector_feeds_the_bundle_ras_images_whatever_the_scan_orientation(imported, backend):
    """The same patient stored LPS-first and mirrored (columns right-to-left, rows front-to-back) must
    give the same findings in world mm: the zoo network sees RAS axes either way."""
    spec = load_model(imported[0])
    small = spec.card.inference.model_copy(update={"roi_size": (64, 64, 24), "lung_mask": False,
                                                   "body_threshold_hu": -2000.0, "score_threshold": 0.0})
    spec = ModelSpec(spec.info, spec.onnx_path, spec.card.model_copy(update={"inference": small}), spec.state_dict_path)
    detector = Detector(spec, backend=backend)

    rng = np.random.default_rng(5)
    hu = rng.normal(-300, 300, (24, 64, 64)).astype(np.float32)  # (k, j, i)
    lps = _scan(hu, np.eye(3), (-20.0, -30.0, -40.0))
    far_corner = lps.index_to_world(np.array([63, 63, 0]))
    mirrored = _scan(np.ascontiguousarray(hu[:, ::-1, ::-1]), np.diag([-1.0, -1.0, 1.0]), far_corner)

    found = [detector.detect(v)[:20] for v in (lps, mirrored)]
    assert len(found[0]) == 20
    for a, b in zip(*found):
        assert a.score == pytest.approx(b.score, abs=1e-4)
        np.testing.assert_allclose(a.center_mm, b.center_mm, atol=1e-3)
        np.testing.assert_allclose(a.box_mm, b.box_mm, atol=1e-3)

"""The MONAI model-zoo ``lung_nodule_ct_detection`` network, built without torchvision, and its weights.

MONAI builds this network with ``resnet_fpn_feature_extractor``, whose ``BackboneWithFPN`` needs
torchvision's ``IntermediateLayerGetter``. ``LayerGetter`` below does the same job with the same
module tree, so the state-dict keys are exactly those of the bundle's ``models/model.pt`` and a
site can load its own copy of the zoo weights. Architecture, anchors and inference settings are
the bundle's ``configs/train.json`` / ``configs/inference.json``.

The bundle's image axes are (x, y, z) after ``Orientationd(axcodes="RAS")``: voxel axes pointing
to the patient's right, anterior and superior. lungnode's prepared (i, j, k) follow the DICOM
index order (for a usual axial series: left, posterior, slice order), so a caller feeding this
network flips the axes that differ.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from monai.networks.nets.resnet import ResNet, ResNetBottleneck
from torch import nn

from lungnode.models.registry import InferenceSettings
from lungnode.models.retinanet import detector_around

BUNDLE_NAME = "lung_nodule_ct_detection"
PARAMETERS = 20_902_741  # measured on the real bundle; the build below must match it
BLOCK_INPLANES = (64, 128, 256, 512)
RETURNED_LAYERS = (1, 2)
FPN_CHANNELS = 256  # fixed by MONAI's _resnet_fpn_extractor
NUM_CLASSES = 1
SIZE_DIVISIBLE = (16, 16, 8)
FEATURE_MAP_SCALES = (1, 2, 4)  # FPN levels: layer1, layer2, max-pooled layer2
BASE_ANCHOR_SHAPES = ((6, 8, 4), (8, 6, 5), (10, 10, 6))  # (x, y, z) voxels at the first level

# configs/inference.json; the body crop (not in the bundle) is lungnode's and only removes air.
INFERENCE = InferenceSettings(
    spacing_mm=(0.703125, 0.703125, 1.25),
    window_hu=(-1024.0, 300.0),
    patch_size=(192, 192, 80),  # train.json
    roi_size=(512, 512, 192),
    sw_batch_size=1,  # one 512 x 512 x 192 window at a time (GPU memory)
    overlap=0.25,
    score_threshold=0.02,
    nms_threshold=0.22,
    topk_candidates_per_level=1000,
    detections_per_image=300,
    body_threshold_hu=-500.0,
    body_margin_mm=10.0,
)


class ZooWeightsError(ValueError):
    """A file whose tensors do not fit the zoo network; the message names the offending keys."""


class LayerGetter(nn.ModuleDict):
    """torchvision's ``IntermediateLayerGetter``: the model's children up to the last returned one,
    run in order, returning the outputs of ``return_layers`` (child name -> output name)."""

    def __init__(self, model: nn.Module, return_layers: dict[str, str]) -> None:
        pending = set(return_layers)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for name, child in model.named_children():
            layers[name] = child
            pending.discard(name)
            if not pending:
                break
        if pending:
            raise ValueError(f"return_layers {sorted(pending)} are not children of {type(model).__name__}")
        super().__init__(layers)
        self.return_layers = dict(return_layers)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


class BackboneWithFPN(nn.Module):
    """MONAI's ``BackboneWithFPN`` (``body`` + ``fpn`` + ``out_channels``) on ``LayerGetter``."""

    def __init__(self, backbone: nn.Module, returned_layers: tuple[int, ...], in_channels: list[int]) -> None:
        super().__init__()
        self.body = LayerGetter(backbone, {f"layer{k}": str(i) for i, k in enumerate(returned_layers)})
        self.fpn = FeaturePyramidNetwork(
            spatial_dims=3, in_channels_list=in_channels, out_channels=FPN_CHANNELS, extra_blocks=LastLevelMaxPool(3)
        )
        self.out_channels = FPN_CHANNELS

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def build_zoo_network(use_list_output: bool = True) -> RetinaNet:
    """The bundle's RetinaNet with untrained weights (ResNet-50 layers 1-2 + FPN, 3 anchors, 1 class).

    ``use_list_output=True`` returns [cls per level..., box per level...] as the ONNX export does.
    """
    backbone = ResNet(
        block="bottleneck",
        layers=[3, 4, 6, 3],
        block_inplanes=list(BLOCK_INPLANES),
        spatial_dims=3,
        n_input_channels=1,
        conv1_t_stride=(2, 2, 1),
        conv1_t_size=(7, 7, 7),
    )
    in_channels = [BLOCK_INPLANES[k - 1] * ResNetBottleneck.expansion for k in RETURNED_LAYERS]
    return RetinaNet(
        spatial_dims=3,
        num_classes=NUM_CLASSES,
        num_anchors=len(BASE_ANCHOR_SHAPES),
        feature_extractor=BackboneWithFPN(backbone, RETURNED_LAYERS, in_channels),
        size_divisible=SIZE_DIVISIBLE,
        use_list_output=use_list_output,
    )


def build_zoo_anchor_generator() -> AnchorGeneratorWithAnchorShape:
    return AnchorGeneratorWithAnchorShape(feature_map_scales=FEATURE_MAP_SCALES, base_anchor_shapes=BASE_ANCHOR_SHAPES)


def is_zoo_network(network: Mapping) -> bool:
    """Whether a model card's ``network`` entry describes this architecture."""
    return str(network.get("architecture", "")).startswith("monai-model-zoo/")


def build_zoo_detector(network: nn.Module) -> RetinaNetDetector:
    """MONAI's detector (the bundle's anchors) around the zoo network or its ONNX stand-in."""
    return detector_around(network, build_zoo_anchor_generator(), SIZE_DIVISIBLE)


def anchor_shapes_voxels() -> list[list[float]]:
    """Anchor sizes per level, per anchor, in (x, y, z) voxels (the model card's field)."""
    return [[float(s * v) for v in shape] for s in FEATURE_MAP_SCALES for shape in BASE_ANCHOR_SHAPES]


def network_description() -> dict:
    """What the model card records under ``network`` for this architecture."""
    return {
        "architecture": f"monai-model-zoo/{BUNDLE_NAME}",
        "backbone": "3D ResNet-50 (bottleneck, layers [3, 4, 6, 3]), conv1 7x7x7 stride (2, 2, 1), BatchNorm",
        "returned_layers": list(RETURNED_LAYERS),
        "fpn_channels": FPN_CHANNELS,
        "fpn_extra_block": "LastLevelMaxPool",
        "num_classes": NUM_CLASSES,
        "num_anchors": len(BASE_ANCHOR_SHAPES),
        "size_divisible": list(SIZE_DIVISIBLE),
        "feature_map_scales": list(FEATURE_MAP_SCALES),
        "base_anchor_shapes": [list(s) for s in BASE_ANCHOR_SHAPES],
        "image_axes": "RAS",
    }


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a plain state dict or a checkpoint dict holding one under ``"model"``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle of arbitrary objects, truncated file, not a torch file
        raise ZooWeightsError(f"{path} is not a loadable PyTorch state dict: {e}") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj:
        raise ZooWeightsError(f"{path} holds {type(obj).__name__}, not a state dict (or a dict with one under 'model')")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ZooWeightsError(f"{path}: entries that are not tensors: {', '.join(map(str, not_tensors[:5]))}")
    return dict(obj)


def state_dict_problems(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> list[str]:
    """Every missing, mis-shaped and unexpected key, one sentence each."""
    problems = []
    for key, ref in expected.items():
        if key not in found:
            problems.append(f"missing key {key} (shape {tuple(ref.shape)})")
        elif found[key].shape != ref.shape:
            problems.append(f"key {key} has shape {tuple(found[key].shape)}, the zoo network needs {tuple(ref.shape)}")
    problems += [f"unexpected key {key}" for key in found if key not in expected]
    return problems


def load_zoo_network(path: Path, use_list_output: bool = True, shown: int = 10) -> RetinaNet:
    """The zoo network in eval mode with the weights in ``path``, after checking every key and shape."""
    state = read_state_dict(path)
    net = build_zoo_network(use_list_output)
    problems = state_dict_problems(net.state_dict(), state)
    if problems:
        more = f"; ... and {len(problems) - shown} more" if len(problems) > shown else ""
        raise ZooWeightsError(
            f"{path} does not fit the {BUNDLE_NAME} network ({len(problems)} problems): "
            + "; ".join(problems[:shown]) + more
        )
    net.load_state_dict(state, strict=True)
    return net.eval()

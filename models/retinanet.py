"""The nodule detector network: a small 3D ResNet + FPN under MONAI's RetinaNet heads.

Written here (not MONAI's ``resnet_fpn_feature_extractor``) because that helper needs torchvision's
``IntermediateLayerGetter``; the backbone below returns its pyramid levels itself. GroupNorm
everywhere so training with a few patches per batch behaves like inference.
Tensors are (B, 1, I, J, K): the image axes are (i, j, k) so that boxes come out as voxel
(i, j, k) corners.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from monai.apps.detection.networks import retinanet_detector as _monai_detector
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork
from monai.networks.nets.resnet import ResNetBlock
from torch import nn


@dataclass(frozen=True)
class NetConfig:
    """Architecture and anchors; stored in checkpoints and the model card to rebuild the network."""

    widths: tuple[int, ...] = (16, 32, 64)  # stage s works at stride 2**(s+1)
    blocks: tuple[int, ...] = (1, 2, 2)  # residual blocks per stage after its strided entry
    returned_stages: tuple[int, ...] = (1, 2)  # stages fed to the FPN: strides 4 and 8
    fpn_channels: int = 32
    groups: int = 8
    # Anchor (i, j, k) sizes in model voxels at the first returned level; doubled per level.
    base_anchor_shapes: tuple[tuple[float, float, float], ...] = ((4, 4, 3), (7, 7, 5), (11, 11, 8))

    @property
    def size_divisible(self) -> int:
        return 2 ** (max(self.returned_stages) + 1)

    @property
    def feature_map_scales(self) -> tuple[int, ...]:
        first = min(self.returned_stages)
        return tuple(2 ** (s - first) for s in self.returned_stages)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NetConfig":
        return cls(
            widths=tuple(d["widths"]),
            blocks=tuple(d["blocks"]),
            returned_stages=tuple(d["returned_stages"]),
            fpn_channels=int(d["fpn_channels"]),
            groups=int(d["groups"]),
            base_anchor_shapes=tuple(tuple(float(v) for v in s) for s in d["base_anchor_shapes"]),
        )


def _norm(channels: int, groups: int) -> tuple:
    return ("group", {"num_groups": min(groups, channels)})


class PyramidBackbone(nn.Module):
    """Stages of residual blocks, each halving the resolution; returns the chosen stages' maps."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.returned = cfg.returned_stages
        stages: list[nn.Module] = []
        in_ch = 1
        for s, (width, n) in enumerate(zip(cfg.widths, cfg.blocks)):
            norm = _norm(width, cfg.groups)
            down = nn.Sequential(
                nn.Conv3d(in_ch, width, kernel_size=3 if s == 0 else 1, stride=2, padding=1 if s == 0 else 0, bias=False),
                nn.GroupNorm(min(cfg.groups, width), width),
            )
            layers: list[nn.Module] = []
            if s == 0:
                layers += [down, nn.ReLU(inplace=True)]
            else:
                layers.append(ResNetBlock(in_ch, width, spatial_dims=3, stride=2, downsample=down, norm=norm))
            layers += [ResNetBlock(width, width, spatial_dims=3, norm=norm) for _ in range(n - (s > 0))]
            stages.append(nn.Sequential(*layers))
            in_ch = width
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for s, stage in enumerate(self.stages):
            x = stage(x)
            if s in self.returned:
                out[f"p{s}"] = x
        return out


class FeatureExtractor(nn.Module):
    """Backbone + FPN; ``out_channels`` is what RetinaNet's heads read."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.body = PyramidBackbone(cfg)
        self.fpn = FeaturePyramidNetwork(
            spatial_dims=3,
            in_channels_list=[cfg.widths[s] for s in cfg.returned_stages],
            out_channels=cfg.fpn_channels,
            extra_blocks=None,
        )
        self.out_channels = cfg.fpn_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def build_network(cfg: NetConfig, use_list_output: bool = False) -> RetinaNet:
    """MONAI RetinaNet (1 class: nodule) on the small backbone.

    ``use_list_output=True`` makes the network return [cls per level..., box per level...], the
    form exported to ONNX and accepted by RetinaNetDetector.
    """
    net = RetinaNet(
        spatial_dims=3,
        num_classes=1,
        num_anchors=len(cfg.base_anchor_shapes),
        feature_extractor=FeatureExtractor(cfg),
        size_divisible=cfg.size_divisible,
        use_list_output=use_list_output,
    )
    # MONAI initialises the head's hidden convs with std 0.01; under GroupNorm their biases then
    # outgrow the tiny spatial signal within a few steps and the score map goes flat. He init keeps
    # the image-dependent part dominant.
    for head in (net.classification_head, net.regression_head):
        for layer in head.conv:
            if isinstance(layer, nn.Conv3d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
    return net


def build_anchor_generator(cfg: NetConfig) -> AnchorGeneratorWithAnchorShape:
    return AnchorGeneratorWithAnchorShape(
        feature_map_scales=cfg.feature_map_scales, base_anchor_shapes=cfg.base_anchor_shapes
    )


class _NoTorchvisionMatcher:
    """Stands in for torchvision's Matcher, which MONAI type-checks against before trying ATSS."""


def detector_around(network: nn.Module, anchor_generator: AnchorGeneratorWithAnchorShape,
                    size_divisible: Sequence[int]) -> RetinaNetDetector:
    """MONAI's RetinaNetDetector (anchors, matching, losses, decoding, NMS) around ``network``.

    MONAI tests ``isinstance(matcher, torchvision Matcher)`` first; without torchvision that
    placeholder raises, so it is replaced by a class nothing is an instance of.
    """
    _monai_detector.Matcher = _NoTorchvisionMatcher
    return RetinaNetDetector(network, anchor_generator, spatial_dims=3, num_classes=1,
                             size_divisible=size_divisible)


def build_detector(cfg: NetConfig, network: nn.Module) -> RetinaNetDetector:
    return detector_around(network, build_anchor_generator(cfg), cfg.size_divisible)


class AutocastNetwork(nn.Module):
    """Runs the wrapped network under bfloat16 autocast and hands back float32 outputs (training
    with ``precision: bf16``; `make bench`'s PyTorch bf16 row)."""

    def __init__(self, network: nn.Module, device_type: str) -> None:
        super().__init__()
        self.inner, self.device_type = network, device_type

    def forward(self, images: torch.Tensor):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            out = self.inner(images)
        if isinstance(out, dict):
            return {k: [t.float() for t in v] for k, v in out.items()}
        return [t.float() for t in out]

    def __getattr__(self, name: str):
        """The detector reads the network's keys, anchors and divisibility: those of the wrapped one."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())

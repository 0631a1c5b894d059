"""The second stage: a small 3D CNN that rescores each detector candidate from a patch around it.

RetinaNet's score comes from one stride-4 feature cell; a 4-6 mm nodule and a vessel seen end-on
look alike there. A classifier centred on the candidate, seeing 32 x 32 x 36 mm of context at the
model spacing, can tell a blob from a tube that runs on (false-positive reduction, as in the LUNA16
challenge's second track). BatchNorm: it is trained on large balanced batches of whole patches.

With ``centre_head`` it also says where the nodule's centre lies from the patch's centre (model
voxels, i j k), read from the last feature map cell by cell: the detector's box for a 4-6 mm nodule
is often 3-4 mm off its centre, outside the nodule's radius, and the second stage moves it back
(a two-stage detector's box refinement).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class CandidateClassifier(nn.Module):
    """(B, 1, I, J, K) patch in 0..1 -> (B,) logit that the candidate at its centre is a nodule, and
    with a centre head also (B, 3): the nodule centre's offset from the patch centre in voxels."""

    def __init__(self, channels: Sequence[int] = (16, 32, 64, 128), centre_head_cells: int = 0) -> None:
        super().__init__()
        c = list(channels)
        layers: list[nn.Module] = [_block(1, c[0])]
        for cin, cout in zip(c[:-1], c[1:]):
            layers += [nn.MaxPool3d(2), _block(cin, cout), _block(cout, cout)]
        self.features = nn.Sequential(*layers)
        # Mean and max over the remaining cells: the mean says "round thing here", the max keeps a
        # small nodule's response from being averaged away.
        self.head = nn.Linear(2 * c[-1], 1)
        # Where a nodule sits needs the cells' places, which pooling drops: a linear map of the whole
        # last feature map (``centre_head_cells`` = its I * J * K cells; 0: no centre head).
        self.centre = nn.Linear(centre_head_cells * c[-1], 3) if centre_head_cells else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x).flatten(2)
        logit = self.head(torch.cat([f.mean(-1), f.amax(-1)], dim=1))[:, 0]
        if self.centre is None:
            return logit
        return logit, self.centre(f.flatten(1))


def centre_head_cells(patch_size: Sequence[int], channels: Sequence[int]) -> int:
    """Cells of the last feature map for a patch: each of the len(channels) - 1 poolings halves it."""
    n = 1
    for s in patch_size:
        for _ in range(len(channels) - 1):
            s //= 2
        n *= s
    return n

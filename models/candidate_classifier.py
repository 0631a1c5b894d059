"""The second stage: a small 3D CNN that rescores each detector candidate from a patch around it.

RetinaNet's score comes from one stride-4 feature cell; a 4-6 mm nodule and a vessel seen end-on
look alike there. A classifier centred on the candidate, seeing 32 x 32 x 36 mm of context at the
model spacing, can tell a blob from a tube that runs on (false-positive reduction, as in the LUNA16
challenge's second track). BatchNorm: it is trained on large balanced batches of whole patches.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class CandidateClassifier(nn.Module):
    """(B, 1, I, J, K) patch in 0..1 -> (B,) logit that the candidate at its centre is a nodule."""

    def __init__(self, channels: Sequence[int] = (16, 32, 64, 128)) -> None:
        super().__init__()
        c = list(channels)
        layers: list[nn.Module] = [_block(1, c[0])]
        for cin, cout in zip(c[:-1], c[1:]):
            layers += [nn.MaxPool3d(2), _block(cin, cout), _block(cout, cout)]
        self.features = nn.Sequential(*layers)
        # Mean and max over the remaining cells: the mean says "round thing here", the max keeps a
        # small nodule's response from being averaged away.
        self.head = nn.Linear(2 * c[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x).flatten(2)
        return self.head(torch.cat([f.mean(-1), f.amax(-1)], dim=1))[:, 0]

"""Second-stage rescoring: a classifier's view of each candidate, fused with the detector's score.

Patches are cut from the detector's own prepared image (same crop, spacing and window), so the
classifier sees at inference exactly what it was trained on (``lungnode train candidates``).
"""
from __future__ import annotations

import numpy as np
import torch

from lungnode.models.registry import SecondStage

BATCH = 32


def crop_padded(image: np.ndarray, start: np.ndarray, size: np.ndarray) -> np.ndarray:
    """image[start:start+size] with zeros (air after windowing) outside the image."""
    out = np.zeros(tuple(size), dtype=np.float32)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + size, image.shape)
    if np.any(src_hi <= src_lo):
        return out
    dst_lo = src_lo - start
    dst_hi = dst_lo + (src_hi - src_lo)
    out[dst_lo[0] : dst_hi[0], dst_lo[1] : dst_hi[1], dst_lo[2] : dst_hi[2]] = image[
        src_lo[0] : src_hi[0], src_lo[1] : src_hi[1], src_lo[2] : src_hi[2]
    ]
    return out


def box_centres(boxes: np.ndarray) -> np.ndarray:
    """Model-voxel boxes (MONAI corners: voxel m spans [m, m + 1)) -> centres in voxel-index units."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    return (boxes[:, :3] + boxes[:, 3:]) / 2 - 0.5


def patches_at(image: np.ndarray, centres: np.ndarray, size) -> np.ndarray:
    """(N, *size) float32 patches of ``image`` centred on voxel-index ``centres`` (N, 3)."""
    size = np.asarray(size, dtype=int)
    starts = np.floor(np.asarray(centres, dtype=np.float64) + 0.5).astype(int) - size // 2
    return np.stack([crop_padded(image, s, size) for s in starts]) if len(starts) else np.zeros((0, *size), np.float32)


def fuse(detector_scores: np.ndarray, probabilities: np.ndarray, weight: float) -> np.ndarray:
    """Weighted geometric mean: 0 keeps the detector's ranking, 1 is the classifier's alone."""
    d = np.clip(np.asarray(detector_scores, dtype=np.float64), 1e-6, 1.0)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-6, 1.0)
    return d ** (1.0 - weight) * p**weight


class Rescorer:
    """One loaded classifier; ``probabilities`` for the candidates of one prepared image."""

    def __init__(self, stage: SecondStage, network) -> None:
        self.stage = stage
        self.network = network  # callable: (B, 1, I, J, K) float32 numpy -> (B,) logits numpy

    @classmethod
    def onnx(cls, stage: SecondStage, path, threads: int = 0, provider: str = "auto", precision: str = "auto"):
        from lungnode.inference.onnx_runtime import create_session

        session = create_session(str(path), threads, provider, precision)
        name = session.get_inputs()[0].name
        return cls(stage, lambda x: session.run(None, {name: x})[0])

    @classmethod
    def torch(cls, stage: SecondStage, state_dict_path, device: torch.device | str = "cpu"):
        from lungnode.models.candidate_classifier import CandidateClassifier

        net = CandidateClassifier(stage.channels)
        net.load_state_dict(torch.load(state_dict_path, map_location="cpu", weights_only=True))
        net.to(device).eval()

        def run(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return net(torch.from_numpy(x).to(device)).cpu().numpy()

        return cls(stage, run)

    def probabilities(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        patches = patches_at(image, box_centres(boxes), self.stage.patch_size)[:, None]
        logits = [np.asarray(self.network(np.ascontiguousarray(patches[i : i + BATCH]))).reshape(-1)
                  for i in range(0, len(patches), BATCH)]
        logits = np.concatenate(logits) if logits else np.zeros(0)
        return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))

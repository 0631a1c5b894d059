"""Flip test-time augmentation: the network reads the image as given and mirrored, and a candidate
scores the mean over the views of its best score in each (0 in a view that missed it).

A false positive one view alone believes in keeps a fraction of its score, a nodule every view sees
keeps all of it: on held-out phantoms four views (as given, mirrored left-right, front-back, both)
cut false positives at the card's threshold from 7.0 to 4.4 a scan for one nodule in 51 less, and
raised the CPM from 0.387 to 0.420 (shipped v3 model), for four times the network time.
The training patches were mirrored along every axis, so the mirrored views are in distribution.
"""
from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np

FLIPS_LR_AP = ((), (0,), (1,), (0, 1))  # model axes i (left-right) and j (front-back)


def mirror_views(axes: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Every combination of mirrors along ``axes`` (model axes: 0 left-right, 1 front-back, 2
    head-foot), the image as given first: (0, 1) gives FLIPS_LR_AP's four views, (0, 1, 2) eight."""
    axes = sorted(set(int(a) for a in axes))
    if any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"mirror axes must be among 0, 1, 2 (left-right, front-back, head-foot), not {axes}")
    return tuple(c for n in range(len(axes) + 1) for c in combinations(axes, n))


def mirror_boxes(boxes: np.ndarray, axes: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Boxes (i0, j0, k0, i1, j1, k1) in an image mirrored along ``axes`` -> the same boxes in the
    original image, and the other way round (a mirror is its own inverse; training patches use it too)."""
    out = np.array(boxes, dtype=np.float64, copy=True).reshape(-1, 6)
    for a in axes:
        out[:, [a, a + 3]] = shape[a] - out[:, [a + 3, a]]
    return out


def fuse_views(views: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-view (boxes, scores) into one candidate list, highest score first.

    Greedy, highest score first: a candidate takes every not yet taken box whose centre lies inside
    it; from each view only its best such box counts. Box = score-weighted mean of those boxes,
    score = their sum over the number of views.
    """
    n_views = len(views)
    boxes = np.concatenate([np.asarray(b, dtype=np.float64).reshape(-1, 6) for b, _ in views])
    scores = np.concatenate([np.asarray(s, dtype=np.float64).reshape(-1) for _, s in views])
    view = np.concatenate([np.full(len(np.asarray(s).reshape(-1)), v) for v, (_, s) in enumerate(views)])
    centres = (boxes[:, :3] + boxes[:, 3:]) / 2
    free = np.ones(len(scores), bool)
    fused_boxes, fused_scores = [], []
    for seed in np.argsort(-scores, kind="stable"):
        if not free[seed]:
            continue
        inside = free & np.all((centres >= boxes[seed, :3]) & (centres <= boxes[seed, 3:]), axis=1)
        free &= ~inside
        members = np.flatnonzero(inside)
        best = []
        for v in np.unique(view[members]):
            in_view = members[view[members] == v]
            best.append(in_view[np.argmax(scores[in_view])])
        w = scores[best]
        fused_boxes.append((boxes[best] * w[:, None]).sum(0) / w.sum())
        fused_scores.append(w.sum() / n_views)
    return np.array(fused_boxes).reshape(-1, 6), np.array(fused_scores)

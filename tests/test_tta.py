"""Flip test-time augmentation: boxes come back to the original image, views fuse into one score."""
from __future__ import annotations

import numpy as np

import pytest

from lungnode.inference.tta import FLIPS_LR_AP, fuse_views, mirror_boxes, mirror_views


def test_a_box_found_in_a_mirrored_image_lands_on_the_original_object():
    image = np.zeros((40, 30, 20))
    image[5:9, 20:26, 3:7] = 1  # the object: i 5..9, j 20..26, k 3..7
    for axes in [(), (0,), (1,), (0, 1), (0, 1, 2)]:
        mirrored = np.flip(image, axes) if axes else image
        idx = np.argwhere(mirrored)
        found = np.concatenate([idx.min(0), idx.max(0) + 1])[None].astype(float)
        assert np.array_equal(mirror_boxes(found, axes, image.shape)[0], [5, 20, 3, 9, 26, 7])


def test_views_agreeing_keep_their_score_a_lone_view_loses_most_of_it():
    nodule = [10, 10, 10, 20, 20, 20]
    views = [
        (np.array([nodule, [50, 50, 50, 56, 56, 56], [12, 12, 12, 16, 16, 16]]), np.array([0.9, 0.8, 0.3])),
        (np.array([[11, 11, 10, 21, 21, 20]]), np.array([0.7])),
    ]
    boxes, scores = fuse_views(views)
    assert np.allclose(scores, [0.8, 0.4])  # (0.9 + 0.7) / 2; the nested 0.3 box of view 0 adds nothing
    assert np.allclose(boxes[0], (0.9 * np.array(nodule) + 0.7 * np.array([11, 11, 10, 21, 21, 20])) / 1.6)
    assert np.array_equal(boxes[1], [50, 50, 50, 56, 56, 56])


def test_mirror_views_are_every_combination_of_the_axes_the_image_as_given_first():
    assert mirror_views((1, 0)) == FLIPS_LR_AP
    eight = mirror_views((0, 1, 2))
    assert len(eight) == len(set(eight)) == 8 and eight[0] == () and (0, 1, 2) in eight
    assert mirror_views(()) == ((),)
    with pytest.raises(ValueError, match="among 0, 1, 2"):
        mirror_views((3,))


def test_no_candidates_in_any_view():
    boxes, scores = fuse_views([(np.zeros((0, 6)), np.zeros(0))] * 4)
    assert boxes.shape == (0, 6) and scores.shape == (0,)


def test_box_labels_mirror_onto_the_mirrored_voxels():
    """Labels, training flips and test-time unflips share MONAI's box convention (voxel m spans
    [m, m + 1)): a label mirrored like a training patch covers the mirrored voxels exactly. With
    voxel-centre labels each mirror moved a box by a voxel and the network learned half a voxel of bias."""
    import torch

    from lungnode.inference.detector import PreparedImage

    shape = np.array([40, 30, 20])
    prepared = PreparedImage(image=torch.zeros(tuple(shape)), crop_start=np.zeros(3), scale=np.ones(3))
    first, last = np.array([5, 20, 3]), np.array([8, 25, 6])  # voxels covered (inclusive)
    box = np.concatenate([prepared.source_index_to_box(first - 0.5), prepared.source_index_to_box(last + 0.5)])
    for axes in [(0,), (1,), (2,), (0, 1, 2)]:
        mirrored_box = mirror_boxes(box[None], axes, shape)[0]  # as training patches and test-time views are mirrored
        m_first, m_last = first.copy(), last.copy()
        for a in axes:
            m_first[a], m_last[a] = shape[a] - 1 - last[a], shape[a] - 1 - first[a]
        assert np.allclose(prepared.box_to_source_index(mirrored_box[:3]), m_first - 0.5)
        assert np.allclose(prepared.box_to_source_index(mirrored_box[3:]), m_last + 0.5)

"""Lung mask: nodules (also those on the pleura) inside, outside air, table and trachea outside, fast."""
from __future__ import annotations

import time
from functools import lru_cache

import numpy as np
import pytest
from scipy import ndimage

from lungnode.inference.lung_mask import AERATED_HU, inside_lungs, lung_bbox, lung_mask, touching_aerated_lung
from lungnode.inference.types import Volume
from lungnode.inference.volume import load_volume
from lungnode.training.synth import Phantom, make_phantom

from tests.conftest import lidc_series

LUNA_0001 = np.array([56.20840547, 86.34341278, -115.8675792])  # LUNA16 nodule of LIDC-IDRI-0001, LPS mm

# Seeds chosen so the set holds pleural, vascular and free nodules at three kinds of grid.
CASES = [(2, (1.4, 1.4, 2.5)), (10, (0.8, 0.8, 5.0)), (22, (2.0, 2.0, 1.0))]


def phantom_volume(ph: Phantom) -> Volume:
    return Volume(hu=ph.hu, spacing=ph.spacing, origin=ph.origin, direction=np.eye(3), slices=[],
                  study_instance_uid="1.2.3", series_instance_uid="1.2.3.4")


@lru_cache(maxsize=None)
def _case(seed: int, spacing: tuple[float, float, float]) -> tuple[Phantom, Volume, np.ndarray]:
    ph = make_phantom(seed, spacing=spacing, n_nodules=(4, 4))
    vol = phantom_volume(ph)
    return ph, vol, lung_mask(vol)


@pytest.fixture(params=CASES, ids=lambda c: f"seed{c[0]}")
def case(request):
    return _case(*request.param)


def _outside_air(hu: np.ndarray) -> np.ndarray:
    """Air connected to the border of the volume: around the body, in the table, beyond the FOV."""
    labels, _ = ndimage.label(hu < -500)
    faces = np.concatenate([labels[:, 0].ravel(), labels[:, -1].ravel(),
                            labels[:, :, 0].ravel(), labels[:, :, -1].ravel()])
    return np.isin(labels, np.unique(faces[faces > 0]))


def _mm_to_outside(vol: Volume, mask: np.ndarray) -> float:
    outside = _outside_air(vol.hu)
    return float(ndimage.distance_transform_edt(~outside, sampling=vol.spacing[::-1])[mask].min())


def test_every_nodule_centre_is_inside_even_on_the_pleura(case):
    ph, vol, mask = case
    assert mask.shape == ph.hu.shape and mask.dtype == bool
    centres = np.array([n.center_mm for n in ph.nodules])
    assert inside_lungs(mask, vol, centres, 0.0).all(), [(n.attachment, n.diameter_mm) for n in ph.nodules]


def test_the_cases_hold_every_attachment():
    seen = {n.attachment for c in CASES for n in _case(*c)[0].nodules}
    assert seen == {"none", "pleural", "vascular"}


def test_mask_covers_the_lungs_and_stays_off_outside_air_and_table(case):
    ph, vol, mask = case
    lungs = (ph.hu < -500) & ~_outside_air(ph.hu)  # lungs and airways
    assert (mask & lungs).sum() / lungs.sum() > 0.95
    assert mask.sum() < 1.5 * lungs.sum()
    assert _mm_to_outside(vol, mask) >= 5.0  # never reaches the skin, the table or the air around them


def test_trachea_above_the_lungs_is_left_out(case):
    ph, vol, mask = case
    top = ph.hu.shape[0] - 1  # phantoms store their planes from the feet up
    trachea = (ph.hu[top] < -500) & ~_outside_air(ph.hu)[top]
    assert trachea.sum() * ph.spacing[0] * ph.spacing[1] > 50.0  # the trachea's section is there ...
    assert not mask[top].any()  # ... and not in the mask


def test_storage_order_does_not_change_the_mask(case):
    ph, vol, mask = case
    nk = ph.hu.shape[0]
    flipped = Volume(hu=ph.hu[::-1].copy(), spacing=vol.spacing,
                     origin=(vol.origin[0], vol.origin[1], vol.origin[2] + (nk - 1) * vol.spacing[2]),
                     direction=np.diag([1.0, 1.0, -1.0]), slices=[], study_instance_uid="1", series_instance_uid="2")
    again = lung_mask(flipped)[::-1]
    assert (again != mask).mean() < 0.002  # only the block grid's phase differs


def test_bbox_and_tolerance(case):
    ph, vol, mask = case
    box = lung_bbox(mask, vol, 10.0)
    assert mask[box].sum() == mask.sum()
    for axis, sl in enumerate(box):
        pad = int(np.ceil(10.0 / vol.spacing[2 - axis]))
        hits = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        assert sl.start == max(hits[0] - pad, 0) and sl.stop == min(hits[-1] + pad + 1, mask.shape[axis])
    assert lung_bbox(np.zeros_like(mask), vol, 5.0) == tuple(slice(0, n) for n in mask.shape)
    # A point 8 mm outside the mask (straight out from its edge along x) needs the tolerance.
    k, j, i = (np.array(mask.shape) // 2)
    row = np.nonzero(mask[k, j])[0]
    edge_i = row.max()
    point = vol.index_to_world(np.array([edge_i + 8.0 / vol.spacing[0], j, k]))
    assert not inside_lungs(mask, vol, point[None], 2.0)[0]
    assert inside_lungs(mask, vol, point[None], 9.0)[0]
    far = vol.index_to_world(np.array([-50.0, j, k]))  # off the grid
    assert inside_lungs(mask, vol, np.stack([point, far]), 9.0).tolist() == [True, False]


def _real(case_name: str):
    vol = load_volume(lidc_series(case_name))
    t0 = time.perf_counter()
    mask = lung_mask(vol)
    seconds = time.perf_counter() - t0
    litres = mask.sum() * np.prod(vol.spacing) / 1e6
    print(f"\n{case_name}: lung_mask {vol.hu.shape} in {seconds:.2f} s, {litres:.2f} L")
    return vol, mask, seconds


def _two_lungs(vol: Volume, mask: np.ndarray) -> tuple[float, float]:
    """Litres of mask to the right and left of the gap between the lungs (the emptiest central column)."""
    profile = mask.sum(axis=(0, 1))
    hits = np.nonzero(profile)[0]
    third = (hits[-1] - hits[0]) // 3
    gap = hits[0] + third + int(np.argmin(profile[hits[0] + third:hits[-1] - third]))
    litre = np.prod(vol.spacing) / 1e6
    return profile[:gap].sum() * litre, profile[gap:].sum() * litre


def test_lidc_0001_nodule_inside_and_plausible_lungs():
    vol, mask, _ = _real("LIDC-IDRI-0001")
    assert inside_lungs(mask, vol, LUNA_0001[None], 0.0)[0]
    right, left = _two_lungs(vol, mask)
    assert 2.0 < right + left < 8.0 and min(right, left) > 0.35 * (right + left), (right, left)
    assert _mm_to_outside(vol, mask) >= 5.0


def test_lidc_0002_thin_slices_fast():
    vol, mask, seconds = _real("LIDC-IDRI-0002")
    assert vol.hu.shape == (261, 512, 512)
    right, left = _two_lungs(vol, mask)
    assert 2.0 < right + left < 8.0 and min(right, left) > 0.35 * (right + left), (right, left)


def test_a_bright_structure_under_the_lung_base_is_no_lung_finding():
    """Seen on a real scan the project does not have: a bright structure below the lung base, under the
    diaphragm, within the mask's tolerance (5 mm), was marked. Here the place is 5 mm below LIDC-IDRI-0002's
    lowest mask slice, under its voxel farthest from aerated lung: the mask test lets it through, the
    aerated-lung test (the card's 2 mm beyond the finding's radius) does not. Every nodule borders aerated
    lung: the LUNA16 nodule of LIDC-IDRI-0001 (23 mm) passes with no tolerance at all."""
    vol, mask, _ = _real("LIDC-IDRI-0002")
    lowest = int(np.flatnonzero(mask.any(axis=(1, 2))).max())
    depth = ndimage.distance_transform_edt(~(mask & (vol.hu < AERATED_HU)), sampling=vol.spacing[::-1])
    j, i = np.unravel_index(int(np.argmax(np.where(mask[lowest], depth[lowest], -1.0))), mask[lowest].shape)
    below = lowest + int(5.0 // vol.spacing[2])  # slices run from head to feet in this series
    point = vol.index_to_world(np.array([[i, j, below]], float))
    print(f"5 mm below the lung base: {depth[below, j, i]:.1f} mm from aerated lung, {vol.hu[below, j, i]:.0f} HU")
    assert not mask[below, j, i] and inside_lungs(mask, vol, point, 5.0)[0], "the case: the mask's tolerance reaches it"
    for diameter in (6.0, 8.0, 10.0):
        assert not touching_aerated_lung(mask, vol, point, np.array([diameter / 2]), 2.0)[0], diameter
    vol1, mask1, _ = _real("LIDC-IDRI-0001")
    assert touching_aerated_lung(mask1, vol1, LUNA_0001[None], np.array([23.35 / 2]), 0.0)[0]

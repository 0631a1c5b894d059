"""A fast lung mask from HU, to crop the detector's input and drop detections outside the lungs.

Everything runs on a coarse copy (about ``downsample_mm`` voxels, a mean of a few strided samples per
block, so noise cannot split the lungs) in an axial frame (slices from head to feet, whatever the
series' storage order), and the result is upsampled by nearest neighbour. Steps: air-like voxels
(< -400 HU) not connected in their slice to the edge of the image (outside air, table foam, the
field-of-view padding); the trachea and main bronchi, tracked down from the top while their
cross-sections stay small and central; the largest one or two remaining pieces; holes filled per slice
(vessels, nodules inside the lung); a per-slice closing with a disk (per lung, so the mediastinum is
not bridged) that takes in nodules resting on the pleura; a small 3D dilation; never beyond the body.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from lungnode.inference.types import Volume

AIR_HU = -400.0
AERATED_HU = -600.0  # aerated lung parenchyma (about -850 HU) and airways; nodules, vessels and soft tissue lie above
_IN_PLANE = np.array([[[0, 0, 0], [0, 0, 0], [0, 0, 0]],
                      [[0, 1, 0], [1, 1, 1], [0, 1, 0]],
                      [[0, 0, 0], [0, 0, 0], [0, 0, 0]]], bool)  # connectivity within one slice only
_AIRWAY_MAX_MM2 = 700.0  # larger cross-sections are lung (a wide trachea is ~ 5 cm2)
_AIRWAY_MIN_MM2 = 40.0
_AIRWAY_OFF_CENTRE_MM = 30.0
_SECOND_LUNG_FRACTION = 0.15


def lung_mask(volume: Volume, *, downsample_mm: float = 2.5, closing_mm: float = 15.0,
              dilation_mm: float = 3.0) -> np.ndarray:
    """Boolean mask, shape of ``volume.hu``: both lungs with vessels, nodules (also those on the
    pleura) and a ``dilation_mm`` rim; no trachea, main bronchi, outside air or table."""
    view = _AxialView(volume)
    factors = [max(1, int(round(downsample_mm / s))) for s in volume.spacing[::-1]]  # (k, j, i)
    coarse = view.to_axial(_block_sample(volume.hu, factors))
    px = view.to_axial_spacing(np.asarray(volume.spacing[::-1]) * factors)  # mm per coarse voxel (s, r, c)
    air = coarse < AIR_HU
    outside = _touching_slice_edge(air)
    body = ~outside
    candidates = air & ~outside
    candidates &= ~_airways(candidates, body, px, view.lateral_axis)
    lungs = _largest_pieces(candidates)
    box = _box(lungs, np.ceil((closing_mm + dilation_mm) / px).astype(int) + 1)
    part = _fill_slices(lungs[box])
    part = _close_each_lung(part, px, closing_mm, view.lateral_axis)
    lungs[box] = ndimage.binary_dilation(part, structure=_ellipsoid(dilation_mm, px)) & body[box]
    return _upsample(view.from_axial(lungs), factors, volume.hu.shape)


def lung_bbox(mask: np.ndarray, volume: Volume, margin_mm: float) -> tuple[slice, slice, slice]:
    """(k, j, i) slices around the mask plus ``margin_mm`` on every side; the whole volume if it is empty."""
    return _box(mask, np.ceil(margin_mm / np.asarray(volume.spacing[::-1])).astype(int))


def inside_lungs(mask: np.ndarray, volume: Volume, centers_mm: np.ndarray, tolerance_mm: float) -> np.ndarray:
    """For each LPS point (N, 3): whether its voxel is in the mask or a mask voxel's centre lies
    within ``tolerance_mm`` of it."""
    centers = np.asarray(centers_mm, dtype=np.float64).reshape(-1, 3)
    return np.array([_near(mask, volume, c, tolerance_mm) for c in centers], bool).reshape(-1)


def touching_aerated_lung(mask: np.ndarray, volume: Volume, centers_mm: np.ndarray, radii_mm: np.ndarray,
                          tolerance_mm: float, aerated_hu: float = AERATED_HU) -> np.ndarray:
    """For each LPS point (N, 3) with its finding's radius: whether aerated lung (mask voxels below
    ``aerated_hu``) lies within radius + ``tolerance_mm`` of it. Every lung nodule, on the pleura too,
    borders aerated lung; the tissue the mask's closing takes in below the lung base (liver and spleen
    under the diaphragm's dome, bowel) does not, so a bright structure there is no lung finding even
    where the mask reaches it."""
    centers = np.asarray(centers_mm, dtype=np.float64).reshape(-1, 3)
    radii = np.broadcast_to(np.asarray(radii_mm, dtype=np.float64), (len(centers),))
    return np.array([_near(mask, volume, c, r + tolerance_mm, aerated_hu) for c, r in zip(centers, radii)],
                    bool).reshape(-1)


def _near(mask: np.ndarray, volume: Volume, center_mm: np.ndarray, reach_mm: float,
          below_hu: float | None = None) -> bool:
    """Whether a voxel of ``mask`` (below ``below_hu``, when given) lies within ``reach_mm`` of the
    point (its own voxel counts)."""
    spacing_kji = np.asarray(volume.spacing[::-1])
    kji = volume.world_to_index(np.asarray(center_mm, dtype=np.float64).reshape(1, 3))[0, ::-1]
    near = np.rint(kji).astype(int)
    reach = np.ceil(reach_mm / spacing_kji).astype(int)
    lo, hi = np.maximum(near - reach, 0), np.minimum(near + reach + 1, mask.shape)
    if np.any(hi <= lo):
        return False
    window = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    found = mask[window] if below_hu is None else mask[window] & (volume.hu[window] < below_hu)
    if np.all((near >= 0) & (near < mask.shape)) and found[tuple(near - lo)]:
        return True
    hits = np.argwhere(found) + lo
    return len(hits) > 0 and float(np.min(np.linalg.norm((hits - kji) * spacing_kji, axis=1))) <= reach_mm


class _AxialView:
    """Maps the stored (k, j, i) array to (slice head->feet, row, column) and back, by transposes and flips."""

    def __init__(self, volume: Volume):
        d = np.asarray(volume.direction)  # columns: world directions of i, j, k
        slice_ijk = int(np.argmax(np.abs(d[2])))
        self._order = [2 - slice_ijk, *(a for a in range(3) if a != 2 - slice_ijk)]  # array axes -> view axes
        self._flip = d[2, slice_ijk] > 0  # slices must run superior (head) to inferior
        x_weight = [abs(d[0, 2 - a]) for a in self._order[1:]]
        self.lateral_axis = 1 + int(np.argmax(x_weight))  # axis (1 or 2) of the view that runs left-right

    def to_axial(self, a: np.ndarray) -> np.ndarray:
        a = np.transpose(a, self._order)
        return a[::-1] if self._flip else a

    def to_axial_spacing(self, spacing_kji: np.ndarray) -> np.ndarray:
        return spacing_kji[self._order]

    def from_axial(self, a: np.ndarray) -> np.ndarray:
        a = a[::-1] if self._flip else a
        return np.ascontiguousarray(np.transpose(a, np.argsort(self._order)))


def _block_sample(hu: np.ndarray, factors: list[int]) -> np.ndarray:
    """Coarse (k, j, i) array: the mean of up to 8 strided samples of each block (cheap, and quiet)."""
    shape = [n // f for n, f in zip(hu.shape, factors)]
    offsets = [(0, f // 2) if f > 1 else (0,) for f in factors]
    total = np.zeros(shape, np.float32)
    count = 0
    for ok in offsets[0]:
        for oj in offsets[1]:
            for oi in offsets[2]:
                part = hu[ok:ok + factors[0] * shape[0]:factors[0], oj:oj + factors[1] * shape[1]:factors[1],
                          oi:oi + factors[2] * shape[2]:factors[2]]
                total += np.maximum(part, -1024)  # FOV padding (e.g. -3024) counts as air, not below it
                count += 1
    return total / count


def _box(mask: np.ndarray, pad: np.ndarray) -> tuple[slice, slice, slice]:
    """The bounding box of mask grown by pad voxels per axis (the whole array when mask is empty)."""
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    out = []
    for axis in range(3):
        hits = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        out.append(slice(max(int(hits[0]) - pad[axis], 0), min(int(hits[-1]) + pad[axis] + 1, mask.shape[axis])))
    return tuple(out)


def _upsample(coarse: np.ndarray, factors: list[int], shape: tuple[int, int, int]) -> np.ndarray:
    out = coarse
    for axis, (f, n) in enumerate(zip(factors, shape)):
        idx = np.minimum(np.arange(n) // f, coarse.shape[axis] - 1)
        out = np.take(out, idx, axis=axis)
    return out


def _touching_slice_edge(air: np.ndarray) -> np.ndarray:
    """Air connected, within its own slice, to the edge of the image: the air around the body."""
    labels, _ = ndimage.label(air, structure=_IN_PLANE)
    edge = np.concatenate([labels[:, 0].ravel(), labels[:, -1].ravel(),
                           labels[:, :, 0].ravel(), labels[:, :, -1].ravel()])
    keep = np.zeros(labels.max() + 1, bool)
    keep[edge] = True
    keep[0] = False
    return keep[labels]


def _airways(candidates: np.ndarray, body: np.ndarray, px: np.ndarray, lateral_axis: int) -> np.ndarray:
    """Trachea and main bronchi: from the top, small central air sections, followed slice by slice
    while they stay small (they end where they merge into a lung's section)."""
    labels, _ = ndimage.label(candidates, structure=_IN_PLANE)
    area_px = np.bincount(labels.ravel()) * px[1] * px[2]
    airway = np.zeros_like(candidates)
    prev = None
    for s in range(labels.shape[0]):
        lab = labels[s]
        if prev is None:
            if area_px[np.unique(lab)[1:]].max(initial=0) > _AIRWAY_MAX_MM2:
                break  # the lungs are here and no trachea was found above them
            seeds = [n for n in np.unique(lab)[1:] if _central(lab == n, body[s], px, lateral_axis)
                     and _AIRWAY_MIN_MM2 <= area_px[n] <= _AIRWAY_MAX_MM2]
            if seeds:
                prev = np.isin(lab, seeds)
                airway[s] = prev
            continue
        grown = ndimage.binary_dilation(prev)
        feed = prev.sum() * px[1] * px[2]
        keep = [n for n in np.unique(lab[grown])
                if n and area_px[n] <= min(_AIRWAY_MAX_MM2, 1.7 * feed + 100.0)]
        if not keep:
            break
        prev = np.isin(lab, keep)
        airway[s] = prev
    return airway


def _central(piece: np.ndarray, body: np.ndarray, px: np.ndarray, lateral_axis: int) -> bool:
    """Whether a section lies near the body's left-right midline."""
    axis = lateral_axis - 1
    piece_at = np.nonzero(piece.any(axis=1 - axis))[0].mean()
    body_at = np.nonzero(body.any(axis=1 - axis))[0].mean()
    return abs(piece_at - body_at) * px[lateral_axis] < _AIRWAY_OFF_CENTRE_MM


def _largest_pieces(candidates: np.ndarray) -> np.ndarray:
    """The largest connected piece, and the second when it is big enough to be the other lung."""
    labels, n = ndimage.label(candidates)
    if n == 0:
        return candidates
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1]
    keep = [order[0] + 1]
    if n > 1 and sizes[order[1]] >= _SECOND_LUNG_FRACTION * sizes[order[0]]:
        keep.append(order[1] + 1)
    return np.isin(labels, keep)


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    """Holes filled in each slice (padding keeps the first and last slices off the 3D border)."""
    padded = np.pad(mask, ((1, 1), (0, 0), (0, 0)))
    return ndimage.binary_fill_holes(padded, structure=_IN_PLANE)[1:-1]


def _close_each_lung(mask: np.ndarray, px: np.ndarray, radius_mm: float, lateral_axis: int) -> np.ndarray:
    """Per-slice closing with a disk, done separately either side of the gap between the lungs."""
    if not mask.any():
        return mask
    profile = mask.sum(axis=tuple(a for a in range(3) if a != lateral_axis))
    hits = np.nonzero(profile)[0]
    lo, hi = hits[0] + (hits[-1] - hits[0]) // 3, hits[0] + 2 * (hits[-1] - hits[0]) // 3
    split = lo + int(np.argmin(profile[lo:hi + 1]))
    disk = _ellipsoid(radius_mm, np.array([np.inf, px[1], px[2]]))
    pad = [(0, 0)] + [(r, r) for r in (disk.shape[1] // 2, disk.shape[2] // 2)]
    out = np.zeros_like(mask)
    for side in (slice(0, split), slice(split, mask.shape[lateral_axis])):
        index = [slice(None)] * 3
        index[lateral_axis] = side
        part = np.pad(mask[tuple(index)], pad)
        closed = ndimage.binary_erosion(ndimage.binary_dilation(part, structure=disk), structure=disk)
        out[tuple(index)] = closed[:, pad[1][0]:closed.shape[1] - pad[1][1], pad[2][0]:closed.shape[2] - pad[2][1]]
    return out | mask


def _ellipsoid(radius_mm: float, px: np.ndarray) -> np.ndarray:
    """Structuring element: the voxels within radius_mm (an axis with infinite spacing stays flat)."""
    half = [int(radius_mm // p) if np.isfinite(p) else 0 for p in px]
    grids = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    dist2 = sum((g * (p if np.isfinite(p) else 0.0)) ** 2 for g, p in zip(grids, px))
    return dist2 <= radius_mm**2

"""Synthetic chest CT phantoms with known nodules.

They train the first detector (no patient data can leave the hospital) and are sent as real DICOM
studies through the node in end-to-end tests. Each phantom is built from simple vectorised shapes
(body, chest wall, ribs, spine, mediastinum, heart, airways, branching vessel trees, lungs) so the
detector sees the same distractors as on real scans: vessels crossing a slice look like nodules,
nodules touch the pleura or a vessel. Everything is drawn from one seed, so a phantom is reproducible.
Nodules take this module's shape model, or real outlines from ``lidc_shapes`` (``nodule_model``).

World coordinates are DICOM patient coordinates (LPS mm): x to the patient's left, y posterior,
z superior. ``hu[k, j, i]`` is (slice, row, column); voxel (i, j, k) lies at origin + (i, j, k) * spacing.
"""
from __future__ import annotations

import argparse
import json
import math
import random
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

KINDS = ("solid", "part-solid", "ground-glass")
# Bumped whenever the same seed draws a different phantom, so cached training images are remade.
# 2: vessel branches that stop at full width taper to a point instead of ending in a round cap.
# 3: airways taper to a point too (no hollow round caps), and their walls scale with the lumen
#    (18-30 % of its radius, not a fixed 1.2-2.2 mm that made small bronchi thick rings).
# 4: a nodule is placed only where it shows: at least half of it on aerated lung, and an isolated one
#    ("none") on aerated lung with its surroundings clear, as insertion into real CT does. Before, a
#    nodule could land inside a large vessel and be labelled where nothing but the vessel is seen.
GENERATOR_VERSION = 4
ATTACHMENTS = ("none", "pleural", "vascular")
_KIND_WEIGHTS = {"solid": 0.6, "part-solid": 0.2, "ground-glass": 0.2}
_ATTACHMENT_WEIGHTS = {"none": 0.4, "pleural": 0.3, "vascular": 0.3}
PARENCHYMA_HU = -600.0  # below: aerated lung (a nodule drawn there shows against it)
MIN_VISIBLE_FRACTION = 0.5  # of a nodule's volume on aerated lung, else the image shows something else


@dataclass(frozen=True)
class NoduleSpec:
    """One nodule drawn into a phantom: the ground truth for training and tests."""

    center_mm: tuple[float, float, float]  # LPS world mm (DICOM patient coords)
    diameter_mm: float
    kind: str  # "solid" | "part-solid" | "ground-glass"
    attachment: str  # "none" | "pleural" | "vascular"


@dataclass
class Phantom:
    """An axial CT volume (identity direction) in Hounsfield units with its nodules."""

    hu: np.ndarray  # int16, shape (k, j, i) = (slices, rows, cols)
    spacing: tuple[float, float, float]  # (i, j, k) mm = (col, row, slice)
    origin: tuple[float, float, float]  # LPS mm of voxel (0, 0, 0)
    nodules: list[NoduleSpec]


# ----------------------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """Voxel grid: axis coordinates in mm and index lookups."""

    shape: tuple[int, int, int]  # (k, j, i)
    spacing: tuple[float, float, float]  # (i, j, k)
    origin: tuple[float, float, float]

    @cached_property
    def _axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple((self.origin[a] + self.spacing[a] * np.arange(self.shape[2 - a])).astype(np.float32)
                     for a in range(3))

    def axis(self, a: int) -> np.ndarray:
        """World coordinate of every index along axis a (0 = x/i, 1 = y/j, 2 = z/k), float32."""
        return self._axes[a]

    def index(self, p: np.ndarray) -> np.ndarray:
        """World points (..., 3) -> nearest (k, j, i) indices (..., 3), not clipped."""
        ijk = np.rint((np.asarray(p, float) - self.origin) / self.spacing).astype(int)
        return ijk[..., ::-1]

    def inside(self, mask: np.ndarray, p: np.ndarray) -> np.ndarray:
        """Whether world points (..., 3) fall on True voxels of mask (False off the grid)."""
        return self.lookup(mask, p, False)

    def lookup(self, values: np.ndarray, p: np.ndarray, off_grid) -> np.ndarray:
        """The voxel values at world points (..., 3); ``off_grid`` where a point misses the grid."""
        kji = self.index(p)
        ok = np.all((kji >= 0) & (kji < np.asarray(self.shape)), axis=-1)
        out = np.full(ok.shape, off_grid, dtype=values.dtype)
        kji = kji[ok]
        out[ok] = values[kji[:, 0], kji[:, 1], kji[:, 2]]
        return out

    def box(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """(k, j, i) slices covering the world box [lo, hi], or None when it misses the grid."""
        out = []
        for a in (2, 1, 0):  # plain floats: this runs once per vessel piece
            o, s, n = self.origin[a], self.spacing[a], self.shape[2 - a]
            i0 = max(math.floor((lo[a] - o) / s), 0)
            i1 = min(math.ceil((hi[a] - o) / s) + 1, n)
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)

    def box_coords(self, sl: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable z (k,1,1), y (1,j,1), x (1,1,i) world coordinates of a box."""
        z = self.axis(2)[sl[0]][:, None, None]
        y = self.axis(1)[sl[1]][None, :, None]
        x = self.axis(0)[sl[2]][None, None, :]
        return z, y, x


def _units(v: np.ndarray) -> np.ndarray:
    """Rows (or one vector) scaled to unit length."""
    return v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-9)


def _perpendiculars(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random unit vector perpendicular to each row (or to the one vector) d."""
    v = rng.normal(size=d.shape)
    return _units(v - d * (v * d).sum(-1, keepdims=True))


def _fibonacci_sphere(n: int) -> np.ndarray:
    """n roughly even unit directions, for cheap inside-the-lung checks."""
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)


_SPHERE = _fibonacci_sphere(40)


# ----------------------------------------------------------------------------------------------
# Drawing primitives (box-local, soft edged for partial volume)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tube:
    """A tapered capsule: one piece of a vessel or airway."""

    p0: Sequence[float]  # world mm
    p1: Sequence[float]
    r0: float
    r1: float


def _tube_coverage(grid: Grid, t: _Tube, grow: float, edge: float):
    """(box, fraction of each voxel inside the tube widened by `grow` mm) or None."""
    (x0, y0, z0), (x1, y1, z1) = t.p0, t.p1
    rmax = max(t.r0, t.r1) + grow + edge
    sl = grid.box((min(x0, x1) - rmax, min(y0, y1) - rmax, min(z0, z1) - rmax),
                  (max(x0, x1) + rmax, max(y0, y1) + rmax, max(z0, z1) + rmax))
    if sl is None:
        return None
    z, y, x = grid.box_coords(sl)
    ax, ay, az = x1 - x0, y1 - y0, z1 - z0
    dx, dy, dz = x - np.float32(x0), y - np.float32(y0), z - np.float32(z0)
    s = (dx * np.float32(ax / (ax * ax + ay * ay + az * az + 1e-6)) + dy * np.float32(ay / (ax * ax + ay * ay + az * az + 1e-6))
         + dz * np.float32(az / (ax * ax + ay * ay + az * az + 1e-6)))
    np.clip(s, 0.0, 1.0, out=s)
    dist = np.sqrt((dx - s * np.float32(ax)) ** 2 + (dy - s * np.float32(ay)) ** 2 + (dz - s * np.float32(az)) ** 2)
    cov = (np.float32(t.r0 + grow + edge / 2) + np.float32(t.r1 - t.r0) * s - dist) * np.float32(1.0 / edge)
    return sl, np.clip(cov, 0.0, 1.0, out=cov)


def _paint_tubes(hu, grid, tubes, value, edge, *, grow=0.0, within=None, brighten_only=False):
    """Blend `value` into hu over the tubes (optionally only inside the `within` mask)."""
    for t in tubes:
        got = _tube_coverage(grid, t, grow, edge)
        if got is None:
            continue
        sl, c = got
        if within is not None:
            c = c * within[sl]
        h = hu[sl]
        new = h + c * (value - h)
        hu[sl] = np.maximum(h, new) if brighten_only else new


# ----------------------------------------------------------------------------------------------
# Anatomy
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Body:
    """Per-seed anatomical proportions (mm, LPS)."""

    a: float  # body half width
    b: float  # body half depth
    yc: float  # body centre y
    fat: float  # subcutaneous fat thickness
    wall: float  # chest wall muscle thickness
    z_apex: float
    z_base: float  # lowest point of the costophrenic recesses
    z_hilum: float
    ys: float  # vertebral body centre y
    rv: float  # vertebral body radius
    med_half: float  # half width of the upper mediastinum
    med_x: float


def _sample_body(rng: np.random.Generator, grid: Grid, fov_x: float) -> _Body:
    z = grid.axis(2)
    a = min(rng.uniform(125.0, 172.0), 0.47 * fov_x)
    b = min(rng.uniform(0.62, 0.78) * a, 0.38 * fov_x)
    yc = -rng.uniform(0.04, 0.12) * b - 10.0
    z_top = float(z[-1])
    span = float(z[-1] - z[0])
    z_apex = z_top - rng.uniform(8.0, 35.0)
    length = min(rng.uniform(200.0, 275.0), span - (z_top - z_apex) - 5.0)
    z_base = z_apex - length
    wall = rng.uniform(7.0, 13.0)
    fat = rng.uniform(4.0, 24.0)
    rv = rng.uniform(15.0, 21.0)
    ys = yc + b - fat - rv - rng.uniform(45.0, 55.0) * b / 110.0
    return _Body(
        a=a, b=b, yc=yc, fat=fat, wall=wall, z_apex=z_apex, z_base=z_base,
        z_hilum=z_apex - length * rng.uniform(0.38, 0.48), ys=ys, rv=rv,
        med_half=rng.uniform(20.0, 30.0), med_x=rng.uniform(-6.0, 6.0),
    )


def _ellipse2(x, y, cx, cy, ax, by):
    """Squared normalised elliptical radius."""
    return ((x - cx) / ax) ** 2 + ((y - cy) / by) ** 2


def _smooth_field(rng, shape, sigma) -> np.ndarray:
    """Zero-mean unit-std smooth random field (float32)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return f / (f.std() + 1e-6)


@dataclass
class _Anatomy:
    """The drawn volume plus what nodule placement needs."""

    hu: np.ndarray  # float32
    lung: np.ndarray  # bool
    vessels: list[_Tube]


def _build_anatomy(rng: np.random.Generator, grid: Grid, body: _Body) -> _Anatomy:
    nj, ni = grid.shape[1:]
    x, y, z = grid.axis(0), grid.axis(1), grid.axis(2)
    X, Y = x[None, :], y[:, None]  # 2D (j, i) broadcast
    sx = grid.spacing[0]

    hu = np.full(grid.shape, -1000.0, np.float32)

    # CT table: curved carbon shell over a foam core, just below the back.
    y_back = body.yc + body.b
    tab_top = y_back + rng.uniform(1.0, 6.0)
    curve = tab_top - 0.0004 * X**2  # cradle: edges curve up toward the patient
    shell = (Y >= curve) & (Y < curve + 2.0) & (np.abs(X) < 230)
    core = (Y >= curve + 2.0) & (Y < curve + 22.0) & (np.abs(X) < 225)
    base = (Y >= curve + 22.0) & (Y < curve + 25.0) & (np.abs(X) < 230)
    hu[:, core] = -880.0
    hu[:, shell | base] = rng.uniform(150.0, 400.0)

    # Body: flattened at the back where it lies on the table; subcutaneous fat over muscle.
    yy = (Y - body.yc) / body.b
    back = np.where(yy > 0, 3.0, 2.0)  # higher exponent behind: a flatter back
    r_body = np.sqrt((X / body.a) ** 2 + np.abs(yy) ** back)
    zs = (1.0 + 0.025 * np.sin((z - body.z_base) / 90.0 + rng.uniform(0, 6)))[:, None, None]
    body3 = r_body[None] < zs
    np.copyto(hu, np.float32(rng.uniform(-110.0, -85.0)), where=body3)
    inner_a, inner_b = body.a - body.fat, body.b - body.fat
    r_muscle = np.sqrt((X / inner_a) ** 2 + np.abs((Y - body.yc) / inner_b) ** back)
    muscle3 = r_muscle[None] < zs
    np.copyto(hu, np.float32(rng.uniform(35.0, 55.0)), where=muscle3)

    # Thoracic cavity: bean shape (the spine and back muscles push in from behind).
    ca, cb = inner_a - body.wall, inner_b - body.wall
    cav_yc = body.yc + 0.5 * body.wall
    r_cav2 = _ellipse2(X, Y, 0.0, cav_yc, ca, cb)
    # Vertebra and paraspinal muscles: a wedge that widens toward the back.
    spine_notch = (_ellipse2(X, Y, 0.0, body.ys, body.rv + 4.0, body.rv + 4.0) < 1.0) | (
        (Y > body.ys + 0.3 * body.rv) & (np.abs(X) < body.rv + 16.0))
    # The upper thorax is narrower: the cavity shrinks above the hila.
    narrow = rng.uniform(0.12, 0.25) * np.clip((z - body.z_hilum) / (body.z_apex + 20.0 - body.z_hilum), 0, 1) ** 1.5
    cav_scale = (1.0 - narrow).astype(np.float32)
    cavity = (r_cav2[None] < (cav_scale**2)[:, None, None]) & ~spine_notch[None]
    # Inside: soft tissue (neck above the lungs, liver/spleen below them), fat in the mediastinum.
    organ = np.where(X < 0, rng.uniform(50.0, 62.0), rng.uniform(32.0, 45.0)).astype(np.float32)
    np.copyto(hu, organ[None], where=cavity)

    # Lungs: one ellipse per side, tapering to the apex, cut by the cavity, mediastinum and diaphragm.
    theta_noise = rng.normal(0, 1, size=(2, 4))
    r_lung2 = np.empty((nj, ni), np.float32)
    z_dia = np.empty((nj, ni), np.float32)
    dome_l = rng.uniform(35.0, 60.0)
    for side, sign in ((0, -1.0), (1, 1.0)):
        cx = sign * ca * rng.uniform(0.45, 0.55)
        cy = cav_yc + cb * rng.uniform(0.0, 0.1)
        ax = ca * rng.uniform(0.55, 0.62)
        by = cb * rng.uniform(0.95, 1.08)
        half = np.broadcast_to((X < 0) if sign < 0 else (X >= 0), (nj, ni))
        th = np.arctan2(Y - cy, X - cx)
        wobble = 1.0 + sum(0.035 * theta_noise[side, n] * np.cos((n + 2) * th + n) for n in range(4))
        r2 = _ellipse2(X, Y, cx, cy, ax, by) / wobble**2
        r_lung2[half] = r2[half]
        # Diaphragm dome: highest under the lung centre, deep recesses laterally and posteriorly;
        # the right dome sits higher over the liver.
        dome = dome_l + (rng.uniform(8.0, 22.0) if sign < 0 else 0.0)
        zd = body.z_base + dome * (1.0 - np.clip(r2, 0, 1.4) / 1.4) - 15.0 * np.clip((Y - cy) / by, 0, 1)
        z_dia[half] = zd[half]
    apex_len = rng.uniform(65.0, 95.0)
    s2 = (np.clip((body.z_apex - z) / apex_len, 0.0, 1.0) ** 1.5).astype(np.float32)  # a narrow, domed apex
    lung = r_lung2[None] < s2[:, None, None]
    lung &= z[:, None, None] > z_dia[None]
    lung &= cavity
    # Mediastinum: central band, narrower behind (azygo-oesophageal recess).
    t_med = np.clip((body.z_apex - 20.0 - z) / 60.0, 0.0, 1.0)
    med_half = (body.med_half * (0.8 + 0.2 * t_med)).astype(np.float32)
    narrowing = (1.0 - 0.45 * np.clip((Y - cav_yc) / cb, 0, 1)).astype(np.float32)  # (j, 1)
    band = np.abs(X[None] - body.med_x) < med_half[:, None, None] * narrowing[None]
    lung &= ~band

    # Mediastinal fat in the band (inside the cavity, above the diaphragm).
    med = band & cavity & (z[:, None, None] > z_dia[None] + 5.0)
    np.copyto(hu, np.float32(rng.uniform(-100.0, -70.0)), where=med)

    # Heart in pericardial fat, left of midline, resting on the diaphragm.
    hc = np.array([body.med_x + rng.uniform(12.0, 25.0), cav_yc - 0.3 * cb, body.z_base + rng.uniform(55.0, 70.0)])
    hax = np.array([rng.uniform(45.0, 58.0), rng.uniform(0.45, 0.6) * cb, rng.uniform(40.0, 52.0)])
    rot = rng.uniform(-0.6, -0.3)
    sl = grid.box(hc - hax.max() - 8, hc + hax.max() + 8)
    if sl is not None:
        zz, yy3, xx = grid.box_coords(sl)
        u = (xx - hc[0]) * math.cos(rot) + (yy3 - hc[1]) * math.sin(rot)
        v = -(xx - hc[0]) * math.sin(rot) + (yy3 - hc[1]) * math.cos(rot)
        e = (u / hax[0]) ** 2 + (v / hax[1]) ** 2 + ((zz - hc[2]) / hax[2]) ** 2
        fat_e = (u / (hax[0] + 6)) ** 2 + (v / (hax[1] + 6)) ** 2 + ((zz - hc[2]) / (hax[2] + 6)) ** 2
        inside_cav = cavity[sl]
        h = hu[sl]
        h[(fat_e < 1) & inside_cav] = rng.uniform(-100.0, -70.0)
        h[(e < 1) & inside_cav] = rng.uniform(35.0, 50.0)
        lung[sl] &= ~(fat_e < 1)

    # Great vessels: ascending aorta, arch, descending aorta, superior vena cava.
    r_ao = rng.uniform(12.0, 17.0)
    z_arch = body.z_hilum + rng.uniform(25.0, 40.0)
    asc = np.array([body.med_x - 8.0, cav_yc - 0.35 * cb, 0.0])
    desc = np.array([body.med_x + 18.0, body.ys - body.rv - r_ao + 2.0, 0.0])
    blood = rng.uniform(35.0, 50.0)
    great = [
        _Tube(asc + [0, 0, hc[2]], asc + [0, 0, z_arch], r_ao, r_ao),
        _Tube(asc + [0, 0, z_arch], desc + [0, 0, z_arch + 8.0], r_ao, r_ao * 0.9),
        _Tube(desc + [0, 0, z_arch + 8.0], desc + [0, 0, body.z_base - 40.0], r_ao * 0.9, r_ao * 0.85),
        _Tube(asc + [-r_ao - 9.0, 4.0, hc[2] + 20.0], asc + [-r_ao - 9.0, 4.0, body.z_apex + 10.0], 9.0, 9.0),
        _Tube(np.array([body.med_x + 10.0, cav_yc - 0.2 * cb, hc[2] + 25.0]),
              np.array([body.med_x + 10.0, cav_yc - 0.05 * cb, body.z_hilum + 5.0]), 13.0, 12.0),
    ]
    for t in great:
        cov = _tube_coverage(grid, t, 0.0, sx)
        if cov is not None:
            gsl, c = cov
            hu[gsl] += c * (blood - hu[gsl])
            lung[gsl] &= ~(c > 0.05)

    # Oesophagus between trachea and spine.
    oes = _Tube(np.array([body.med_x + 6.0, body.ys - body.rv - 8.0, body.z_base - 20.0]),
                np.array([body.med_x + 3.0, body.ys - body.rv - 9.0, float(z[-1]) + 10]), 7.0, 7.0)
    cov = _tube_coverage(grid, oes, 0.0, sx)
    if cov is not None:
        gsl, c = cov
        hu[gsl] += c * (40.0 - hu[gsl])

    # Lung parenchyma: denser toward the back (gravity), smooth texture.
    base_hu = rng.uniform(-880.0, -830.0)
    grad = rng.uniform(30.0, 70.0)
    paren2d = (base_hu + grad * np.clip((Y - cav_yc) / cb + 0.5, 0, 1.5)).astype(np.float32)
    paren2d = np.broadcast_to(paren2d, (nj, ni))
    np.copyto(hu, paren2d[None], where=lung)
    _add_lung_texture(rng, grid, hu, lung)

    # Airways: trachea down to the carina, main bronchi to the hila, lobar/segmental bronchi.
    carina = np.array([body.med_x, body.ys - body.rv - 22.0, body.z_hilum + rng.uniform(15.0, 25.0)])
    r_tr = rng.uniform(7.0, 10.0)
    airways = [_Tube(carina, carina + [0.0, -6.0, float(z[-1]) - carina[2] + 20.0], r_tr, r_tr)]
    vessel_roots = []
    for sign in (-1.0, 1.0):
        hilum = np.array([body.med_x + sign * (med_half.max() + rng.uniform(2.0, 8.0)), cav_yc + rng.uniform(-5.0, 10.0),
                          body.z_hilum])
        r_mb = r_tr * (0.8 if sign < 0 else 0.7)
        airways.append(_Tube(carina, hilum, r_mb, r_mb * 0.9))
        down = _units(np.array([sign * 0.6, 0.1, -0.8]))
        up = _units(np.array([sign * 0.5, 0.1, 0.85]))
        airways += _grow_trees(rng, grid, lung, [(hilum, down, r_mb * 0.75), (hilum, up, r_mb * 0.6)],
                               min_radius=2.0, max_tubes=60, length=(4.0, 7.0), taper_from=0.0)
        # Pulmonary arteries and veins: trunks leave points spread up and down the hilum toward
        # random points in the lung, so the trees reach every lobe.
        n_roots = int(rng.integers(14, 20))
        targets = _lung_points(rng, grid, lung, n_roots, x_sign=sign)
        starts = hilum + rng.uniform([-4.0, -18.0, -45.0], [4.0, 12.0, 20.0], (len(targets), 3))
        for p0, tgt in zip(starts, targets):
            vessel_roots.append((p0, _units(tgt - p0), rng.uniform(3.5, 7.5)))
    r_min = max(0.6, 0.5 * min(grid.spacing[:2]))  # thinner ones vanish in partial volume
    vessels = _grow_trees(rng, grid, lung, vessel_roots, min_radius=r_min, max_tubes=8000, length=(5.0, 9.0))

    vessel_hu = rng.uniform(30.0, 50.0)
    edge = 0.8 * min(grid.spacing[:2]) + 0.3
    # Vessels stay inside the pleura; near the hilum they merge with the mediastinum.
    near_hilum = lung | med
    _paint_tubes(hu, grid, vessels, vessel_hu, edge, within=near_hilum)
    # Bronchial walls are a fraction of the lumen's radius, thinning with it down to the tips.
    wall = rng.uniform(0.18, 0.3)
    walls = [_Tube(t.p0, t.p1, t.r0 * (1 + wall), t.r1 * (1 + wall)) for t in airways]
    _paint_tubes(hu, grid, walls, 35.0, edge)
    _paint_tubes(hu, grid, airways, -1000.0, edge)
    for t in walls:  # airways are not lung parenchyma for nodule placement
        cov = _tube_coverage(grid, t, 0.0, edge)
        if cov is not None:
            lung[cov[0]] &= ~(cov[1] > 0.5)

    _draw_spine_and_ribs(rng, grid, hu, body, cb, cav_yc, r_cav2, cav_scale)
    return _Anatomy(hu=hu, lung=lung, vessels=vessels)


def _add_lung_texture(rng, grid: Grid, hu: np.ndarray, lung: np.ndarray) -> None:
    """Low-contrast patchy texture: two smooth 2D fields mixed along z (cheap, varies per slice)."""
    nj, ni = grid.shape[1:]
    step = 4
    small = (nj // step + 1, ni // step + 1)
    sig = 4.0 / (step * grid.spacing[0])
    amp = rng.uniform(8.0, 20.0)
    fields = []
    for _ in range(2):
        f = _smooth_field(rng, small, sig)
        f = ndimage.zoom(f, (nj / small[0], ni / small[1]), order=1)[:nj, :ni]
        fields.append(f * amp)
    w = 2 * np.pi * grid.axis(2) / rng.uniform(25.0, 45.0)
    tex = fields[0][None] * np.cos(w)[:, None, None]
    tex += fields[1][None] * np.sin(w)[:, None, None]
    np.add(hu, tex, out=hu, where=lung)


def _lung_points(rng, grid: Grid, lung: np.ndarray, n: int, *, x_sign: float) -> np.ndarray:
    """Up to n random points inside the lung on one side (x_sign -1 right, +1 left)."""
    x, y, z = grid.axis(0), grid.axis(1), grid.axis(2)
    lo = np.array([0.0 if x_sign > 0 else x[0], y[0], z[0]])
    hi = np.array([x[-1] if x_sign > 0 else 0.0, y[-1], z[-1]])
    pts = rng.uniform(lo, hi, (40 * n, 3))
    return pts[grid.inside(lung, pts)][:n]


def _grow_trees(rng, grid: Grid, lung: np.ndarray, roots: list[tuple[np.ndarray, np.ndarray, float]], *,
                min_radius: float, max_tubes: int, length: tuple[float, float],
                taper_from: float | None = None) -> list[_Tube]:
    """Branching tapered trees from the hilum outwards, grown a generation at a time for all roots.

    Pieces may cross the mediastinum until a branch has entered the lung; after that a branch whose
    next piece would leave the lung tries a few other courses and then ends. When the cap is near,
    a random part of the youngest generation is kept, so the cap prunes the finest twigs. Every end
    wider than ``taper_from`` (default 1.5 x min_radius) gets a cone to a fine tip.
    """
    origin = np.array([r[0] for r in roots], float)
    p = origin.copy()
    d = _units(np.array([r[1] for r in roots], float))
    r = np.array([r[2] for r in roots], float)
    home = origin.copy()
    tubes: list[_Tube] = []
    ends: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # branches stopped at full width
    while len(p) and len(tubes) < max_tubes:
        room = (max_tubes - len(tubes)) // 2
        if len(p) > room:
            keep = np.zeros(len(p), bool)
            keep[rng.choice(len(p), room, replace=False)] = True
            ends.append((p[~keep], d[~keep], r[~keep]))
            p, d, r, home = p[keep], d[keep], r[keep], home[keep]
        n = len(p)
        seg = np.minimum(r * rng.uniform(*length, n) + 4.0, 40.0)[:, None]
        r_end = r * rng.uniform(0.9, 0.97, n)
        entered = grid.inside(lung, p)
        q1 = np.empty_like(p)
        q2 = np.empty_like(p)
        d2 = np.empty_like(p)
        done = np.zeros(n, bool)
        for _ in range(2):
            todo = ~done
            a = _units(d[todo] + 0.25 * _perpendiculars(d[todo], rng))
            b = _units(a + 0.25 * _perpendiculars(a, rng))
            m1 = p[todo] + a * seg[todo] / 2
            m2 = m1 + b * seg[todo] / 2
            ahead = m2 + b * 3.0  # stop short of the pleura rather than run along it
            ok = ~entered[todo] | (grid.inside(lung, m1) & grid.inside(lung, m2) & grid.inside(lung, ahead))
            idx = np.nonzero(todo)[0]
            q1[idx[ok]], q2[idx[ok]], d2[idx[ok]] = m1[ok], m2[ok], b[ok]
            done[idx[ok]] = True
            bad = idx[~ok]
            d[bad] = _units(d[bad] + 0.8 * _perpendiculars(d[bad], rng))
            if done.all():
                break
        ends.append((p[~done], d[~done], r[~done]))
        r_mid = (r + r_end) / 2
        for a, b, c, r0, r1, r2 in zip(p[done].tolist(), q1[done].tolist(), q2[done].tolist(), r[done].tolist(),
                                       r_mid[done].tolist(), r_end[done].tolist()):
            tubes += [_Tube(tuple(a), tuple(b), r0, r1), _Tube(tuple(b), tuple(c), r1, r2)]
        # Asymmetric bifurcation: the larger child keeps the course, the smaller one swings out;
        # both drift away from their hilum so the trees fill the lung.
        p, d, r_end, home = q2[done], d2[done], r_end[done], home[done]
        n = len(p)
        outward = _units(p - home)
        u = _perpendiculars(d, rng)
        kids_p, kids_d, kids_r, kids_h = [], [], [], []
        parent = np.zeros(n, bool)
        for ratio, angle, sign in (((0.8, 0.93), (0.15, 0.45), 1.0), ((0.65, 0.88), (0.5, 1.0), -1.0)):
            rr = r_end * rng.uniform(*ratio, n)
            ang = rng.uniform(*angle, n)[:, None]
            nd = _units(np.cos(ang) * d + sign * np.sin(ang) * u + 0.3 * outward)
            live = rr >= min_radius
            parent |= live
            kids_p.append(p[live]), kids_d.append(nd[live]), kids_r.append(rr[live]), kids_h.append(home[live])
        ends.append((p[~parent], d[~parent], r_end[~parent]))  # both children too thin: the branch ends here
        p, d, r, home = (np.concatenate(k) for k in (kids_p, kids_d, kids_r, kids_h))
    ends.append((p, d, r))
    taper_from = 1.5 * min_radius if taper_from is None else taper_from
    return tubes + _tapered_ends(rng, grid, lung, *(np.concatenate(e) for e in zip(*ends)), taper_from=taper_from)


def _tapered_ends(rng, grid: Grid, lung: np.ndarray, p: np.ndarray, d: np.ndarray, r: np.ndarray, *,
                  taper_from: float) -> list[_Tube]:
    """A cone to a fine tip on every branch that stopped at full width (at the pleura or the cap).

    Real vessels thin out towards the periphery; a wide branch ending in a round cap is a bright
    blob that looks like a nodule, and the first models learnt to fire on exactly those. The cone
    is shortened (up to three halvings) until its tip lies inside the lung, else kept at the shortest.
    The same holds for airways, whose hollow round caps were the first models' commonest false positive.
    """
    wide = r > taper_from
    if not wide.any():  # also a tree with no roots (a small field of view), whose arrays are 1-D
        return []
    p, d, r = p[wide], d[wide], r[wide]
    lengths = (r * rng.uniform(5.0, 8.0, len(r)))[:, None] / [1.0, 2.0, 4.0, 8.0]  # (ends, tries)
    tips = p[:, None] + d[:, None] * lengths[..., None]
    inside = grid.inside(lung, tips)
    first = np.where(inside.any(axis=1), inside.argmax(axis=1), 3)  # the longest inside, else the shortest
    tips = tips[np.arange(len(r)), first]
    return [_Tube(tuple(a), tuple(b), r0, 0.3) for a, b, r0 in zip(p.tolist(), tips.tolist(), r.tolist())]


def _draw_spine_and_ribs(rng, grid: Grid, hu, body: _Body, cb, cav_yc, r_cav2, cav_scale) -> None:
    """Vertebra (cortex, cancellous bone, discs, canal, posterior arch) and a ring of ribs."""
    x, y, z = grid.axis(0), grid.axis(1), grid.axis(2)
    X, Y = x[None, :], y[:, None]
    cortex_hu = rng.uniform(700.0, 1100.0)
    cancellous_hu = rng.uniform(180.0, 300.0)
    rv = body.rv
    r_spine = np.sqrt(X**2 / 1.1 + (Y - body.ys) ** 2)
    vb = r_spine < rv
    shell = vb & (r_spine > rv - 1.8)
    canal_c = body.ys + rv + 9.0
    r_canal = np.sqrt(X**2 + (Y - canal_c) ** 2)
    canal = r_canal < 8.0
    arch = (r_canal >= 8.0) & (r_canal < 13.0) & (Y > canal_c - 6.0)
    spinous = (np.abs(X) < 3.5) & (Y > canal_c + 10.0) & (Y < canal_c + 32.0)
    transverse = (np.abs(Y - canal_c - 0.3 * np.abs(X)) < 4.0) & (np.abs(X) < 30.0) & (np.abs(X) > 8.0)
    post = (arch | spinous | transverse) & ~canal
    hu[:, vb] = cancellous_hu
    hu[:, shell | post] = cortex_hu
    hu[:, canal] = 15.0
    # Intervertebral discs every ~27 mm.
    pitch = rng.uniform(24.0, 30.0)
    disc_k = np.nonzero(((z - rng.uniform(0, pitch)) % pitch) < 5.0)[0]
    inner = vb & ~shell
    for k in disc_k:
        hu[k][inner] = 85.0

    # Ribs: a helical band just outside the cavity wall, sloping down toward the front.
    rib_t = rng.uniform(7.0, 10.0)
    r_cav = np.sqrt(r_cav2)
    ring = (r_cav >= cav_scale.min()) & (r_cav < 1.0 + rib_t / cb) & ~(_ellipse2(X, Y, 0, body.ys, 30.0, 40.0) < 1.0)
    jj, ii = np.nonzero(ring)
    if jj.size == 0:
        return
    xr, yr = x[ii], y[jj]
    phi = np.arctan2(np.abs(xr), yr - cav_yc)  # 0 at the back, pi at the front
    radial = (r_cav[jj, ii][None] / cav_scale[:, None] - 1.0) * cb / rib_t  # 0..1 across the rib
    pitch = rng.uniform(24.0, 30.0)
    height = rng.uniform(9.0, 12.0)
    drop = pitch * rng.uniform(2.5, 3.5) * (1.0 - np.cos(phi)) / 2  # steepest at the side
    zz = z[:, None]
    u = (zz + drop[None] + rng.uniform(0, pitch)) % pitch  # mm from the rib's lower edge
    rib = (u < height) & (radial >= 0) & (radial < 1) & (zz < body.z_apex + 10.0) & (zz > body.z_base - 35.0)
    cart = phi[None] > np.pi * 0.78  # costal cartilage at the front
    edge = (u < 1.6) | (u > height - 1.6) | (radial < 0.22) | (radial > 0.78)
    vals = np.where(cart, 130.0, np.where(edge, cortex_hu, cancellous_hu + 60.0)).astype(np.float32)
    cur = hu[:, jj, ii]
    hu[:, jj, ii] = np.where(rib & (np.abs(xr) > 10.0)[None], vals, cur)

    # Sternum in front.
    st_y = cav_yc - cb - 4.0
    st = _ellipse2(X, Y, 0.0, st_y, rng.uniform(12.0, 18.0), 6.0)
    st_mask = st < 1.0
    ks = np.nonzero((z > body.z_base + 40.0) & (z < body.z_apex - 10.0))[0]
    if ks.size:
        vals2d = np.where(st > 0.6, cortex_hu * 0.8, cancellous_hu).astype(np.float32)
        sub = hu[ks[0]:ks[-1] + 1]
        sub[:, st_mask] = vals2d[st_mask]


# ----------------------------------------------------------------------------------------------
# Nodules
# ----------------------------------------------------------------------------------------------


def _weighted(rng, names: Sequence[str], table: dict[str, float]) -> str:
    w = np.array([table.get(n, 1.0) for n in names], float)
    return str(names[rng.choice(len(names), p=w / w.sum())])


def _place_nodule(rng, grid: Grid, anat: _Anatomy, body: _Body, r: float, attachment: str,
                  taken: list[tuple[np.ndarray, float]]) -> np.ndarray | None:
    """A centre for a nodule of radius r with the wanted attachment, clear of the other nodules."""
    lo = np.array([-body.a, body.yc - body.b, body.z_base])
    hi = np.array([body.a, body.yc + body.b, body.z_apex])
    reach = r * 1.25 + 1.0
    vessels = [t for t in anat.vessels if 0.8 <= (t.r0 + t.r1) / 2 <= 3.5]
    for _ in range(80):
        if attachment == "vascular" and vessels:
            t = vessels[rng.integers(len(vessels))]
            a, b = np.asarray(t.p0), np.asarray(t.p1)
            p = a + rng.uniform(0.2, 0.8) * (b - a)
            w = _perpendiculars(_units(b - a), rng)
            c = p + w * ((t.r0 + t.r1) / 2 + r * rng.uniform(0.6, 0.9))
            if not grid.inside(anat.lung, c + reach * _SPHERE).all():
                continue
        else:
            p = rng.uniform(lo, hi)
            if not grid.inside(anat.lung, p):
                continue
            if attachment == "pleural":
                a = rng.uniform(0, 2 * np.pi)
                d = _units(np.array([math.cos(a), math.sin(a), rng.uniform(-0.3, 0.3)]))
                steps = p + d * np.arange(1.0, 200.0, 1.0)[:, None]
                out = ~grid.inside(anat.lung, steps)
                if not out.any():
                    continue
                b = steps[max(int(np.argmax(out)) - 1, 0)]
                beyond = grid.index(b + np.outer([2.0, 5.0], d))
                if np.any((beyond < 0) | (beyond >= grid.shape)):
                    continue
                if np.any(anat.hu[beyond[:, 0], beyond[:, 1], beyond[:, 2]] < -300):
                    continue  # an airway, not the pleura
                c = b - d * r * rng.uniform(0.55, 0.9)
                if not grid.inside(anat.lung, np.stack([c, c - d * (r + 2.0)])).all():
                    continue
                if grid.inside(anat.lung, c + reach * _SPHERE).mean() < 0.55:
                    continue
            else:
                c = p
                if not grid.inside(anat.lung, c + (reach + 1.5) * _SPHERE).all():
                    continue
        if not _shows(grid, anat, c, r, isolated=attachment == "none"):
            continue
        if all(np.linalg.norm(c - q) > r + rq + 4.0 for q, rq in taken):
            return c
    return None


def _shows(grid: Grid, anat: "_Anatomy", c: np.ndarray, r: float, *, isolated: bool) -> bool:
    """Whether a nodule at c would be seen as one: at least MIN_VISIBLE_FRACTION of its volume (the
    centre and two inner shells) on aerated lung; an isolated one also centred on aerated lung with
    80 % of a ring around it clear (the rule insertion into real CT uses). Drawn onto a large vessel it
    would only brighten the vessel, and a reader would see a vessel where the label says nodule."""
    def aerated(points: np.ndarray) -> np.ndarray:
        return grid.inside(anat.lung, points) & (grid.lookup(anat.hu, points, 0) < PARENCHYMA_HU)

    inner = np.concatenate([c[None], c + 0.45 * r * _SPHERE, c + 0.85 * r * _SPHERE])
    if aerated(inner).mean() < MIN_VISIBLE_FRACTION:
        return False
    if isolated:
        ring = c + (r * 1.25 + 2.5) * _SPHERE
        return bool(aerated(c[None])[0]) and aerated(ring).mean() >= 0.8
    return True


@dataclass(frozen=True)
class NoduleField:
    """A nodule drawn on a box of a grid, before it is blended into an image."""

    box: tuple[slice, slice, slice]  # (k, j, i) slices of the grid
    coverage: np.ndarray  # fraction of each voxel inside the nodule (soft edge: partial volume)
    hu: np.ndarray  # the nodule's own density at each voxel


def nodule_field(rng: np.random.Generator, shape: tuple[int, int, int], spacing: Sequence[float],
                 origin: Sequence[float], center_mm: np.ndarray, radius_mm: float, kind: str,
                 edge_mm: float) -> NoduleField | None:
    """Lobulated (sometimes spiculated) ellipsoid; part-solid = solid core inside a ground-glass halo.

    The shape model of the phantoms, shared with the insertion of nodules into real scans; the grid is
    axis aligned (voxel (i, j, k) at origin + (i, j, k) * spacing). None when the nodule misses the grid.
    """
    grid = Grid(tuple(shape), tuple(spacing), tuple(origin))
    c, r, edge = np.asarray(center_mm, float), radius_mm, edge_mm
    axes = rng.uniform(0.85, 1.15, 3)
    axes *= r / np.prod(axes) ** (1 / 3)
    rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    n_lobes = int(rng.integers(3, 8))
    lobe_dir = _units(rng.normal(size=(n_lobes, 3)))
    lobe_amp = rng.uniform(-0.08, 0.15, n_lobes)
    lobe_w = rng.uniform(0.15, 0.4, n_lobes)
    if kind == "solid" and r > 4.0 and rng.random() < 0.3:  # spicules
        n_sp = int(rng.integers(4, 10))
        lobe_dir = np.vstack([lobe_dir, _units(rng.normal(size=(n_sp, 3)))])
        lobe_amp = np.concatenate([lobe_amp, rng.uniform(0.3, 0.7, n_sp)])
        lobe_w = np.concatenate([lobe_w, rng.uniform(0.004, 0.012, n_sp)])
    reach = axes.max() * (1.0 + max(lobe_amp.max(), 0.0)) + 2 * edge
    sl = grid.box(c - reach, c + reach)
    if sl is None:
        return None
    z, y, x = grid.box_coords(sl)
    dx, dy, dz = x - c[0], y - c[1], z - c[2]
    u = [(rot[0, a] * dx + rot[1, a] * dy + rot[2, a] * dz) / axes[a] for a in range(3)]
    rho = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2) + 1e-6
    surface = np.ones_like(rho)
    for k, amp, w in zip(lobe_dir, lobe_amp, lobe_w):
        cos = (u[0] * k[0] + u[1] * k[1] + u[2] * k[2]) / rho
        surface += amp * np.exp((cos - 1.0) / w)
    cov = np.clip((surface - rho) * r / edge + 0.5, 0.0, 1.0)

    def core(f: float) -> np.ndarray:  # a sphere of f times the radius, a little off centre
        off = rng.uniform(-1, 1, 3) * (1 - f) * 0.4
        rc = np.sqrt((u[0] - off[0]) ** 2 + (u[1] - off[1]) ** 2 + (u[2] - off[2]) ** 2)
        return np.clip((f - rc) * r / edge + 0.5, 0.0, 1.0)

    return NoduleField(box=sl, coverage=cov, hu=nodule_density(rng, kind, rho.shape, core))


def nodule_density(rng: np.random.Generator, kind: str, shape: tuple[int, ...],
                   core: Callable[[float], np.ndarray]) -> np.ndarray:
    """HU of a nodule's voxels by kind: solid 0-60; ground glass -600 to -320; part-solid = ground glass
    with a solid core, ``core(f)`` being the coverage of a core of fraction f (0.3-0.6) of the nodule."""
    if kind == "solid":
        return np.full(shape, rng.uniform(0.0, 60.0), np.float32)
    value = np.full(shape, rng.uniform(-600.0, -320.0), np.float32)
    if kind == "part-solid":
        inner = core(rng.uniform(0.3, 0.6))
        value += inner * (rng.uniform(0.0, 50.0) - value)
    return value


# How a nodule is drawn: nodule_field's signature; lidc_shapes.ShapeLibrary.field_model gives real outlines.
NoduleModel = Callable[..., "NoduleField | None"]


def _draw_nodule(rng, grid: Grid, hu: np.ndarray, lung: np.ndarray, c: np.ndarray, r: float, kind: str,
                 edge: float, model: NoduleModel) -> None:
    """Draw one nodule into the phantom, only where the lung is (it rests against the pleura)."""
    field = model(rng, grid.shape, grid.spacing, grid.origin, c, r, kind, edge)
    if field is None:
        return
    cov = field.coverage * lung[field.box]
    h = hu[field.box]
    hu[field.box] = np.maximum(h, h + cov * (field.hu - h))


def add_nodules(rng: np.random.Generator, n_range: tuple[int, int], diameter_range: tuple[float, float],
                kinds: Sequence[str], attachments: Sequence[str], *,
                place: Callable[[float, str, list[tuple[np.ndarray, float]]], np.ndarray | None],
                draw: Callable[[np.ndarray, float, str], None],
                taken: Sequence[tuple[np.ndarray, float]] = (),
                to_world: Callable[[np.ndarray], np.ndarray] = lambda c: c) -> list[NoduleSpec]:
    """Draw n (inclusive range) nodules: kind and attachment by the usual frequencies, a log-uniform
    diameter (small nodules are the common ones); one that finds no place shrinks 15 % a step down to
    the smallest diameter, then is left out. ``place(r, attachment, taken)`` finds a centre clear of the
    (centre, radius) pairs in ``taken`` (it starts with the given ones), ``draw(c, r, kind)`` draws it;
    ``to_world`` maps a centre to the LPS mm of its NoduleSpec."""
    n = int(rng.integers(n_range[0], n_range[1] + 1))
    lo, hi = np.log(diameter_range[0]), np.log(diameter_range[1])
    taken = list(taken)
    specs = []
    for _ in range(n):
        kind = _weighted(rng, kinds, _KIND_WEIGHTS)
        attachment = _weighted(rng, attachments, _ATTACHMENT_WEIGHTS)
        d = float(np.exp(rng.uniform(lo, hi)))
        c = None
        while c is None and d >= diameter_range[0] * 0.999:
            c = place(d / 2, attachment, taken)
            if c is None:
                d *= 0.85
        if c is None:
            continue
        draw(c, d / 2, kind)
        taken.append((c, d / 2))
        specs.append(NoduleSpec(tuple(round(float(v), 2) for v in to_world(c)), round(d, 2), kind, attachment))
    return specs


# ----------------------------------------------------------------------------------------------
# Scanner: noise and reconstruction kernel
# ----------------------------------------------------------------------------------------------


def _kernel_energy(sigma: float) -> float:
    """Sum of squared weights of scipy's discrete Gaussian (how much it shrinks white noise variance)."""
    if sigma <= 0:
        return 1.0
    delta = np.zeros(64)
    delta[32] = 1.0
    return float((ndimage.gaussian_filter1d(delta, sigma) ** 2).sum())


def _scan(rng, hu: np.ndarray, spacing, noise_hu, blur_mm, body: _Body) -> np.ndarray:
    """Add correlated noise (white noise shaped by the kernel blur) and quantise to int16."""
    sigma_ij = rng.uniform(*blur_mm) / spacing[0]
    sigma_k = 0.3
    target = rng.uniform(*noise_hu) * (body.a / 150.0)  # bigger patients: noisier images
    gain = target / math.sqrt(_kernel_energy(sigma_ij) ** 2 * _kernel_energy(sigma_k))
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    noise *= np.float32(gain)
    hu += noise
    del noise
    out = ndimage.gaussian_filter(hu, (sigma_k, sigma_ij, sigma_ij), truncate=3.0)
    np.clip(out, -1024, 3071, out=out)
    return out.astype(np.int16)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def make_phantom(
    seed: int,
    *,
    spacing: Sequence[float] = (0.7, 0.7, 2.5),
    field_of_view_mm: float | Sequence[float] = (358.0, 358.0, 330.0),
    n_nodules: tuple[int, int] = (1, 4),
    diameter_range_mm: tuple[float, float] = (4.0, 25.0),
    kinds: Sequence[str] = KINDS,
    attachments: Sequence[str] = ATTACHMENTS,
    noise_hu: tuple[float, float] = (8.0, 30.0),
    blur_mm: tuple[float, float] = (0.25, 0.75),
    z_fov_fraction: tuple[float, float] = (0.75, 1.0),
    nodule_model: NoduleModel | None = None,
) -> Phantom:
    """A synthetic chest CT for `seed` (same seed, same phantom).

    field_of_view_mm is (x, y, z) or one number for a square in-plane field (z stays 330 mm); the
    scanned z length is that times a random fraction in z_fov_fraction. n_nodules is an inclusive
    range; kinds/attachments restrict what is drawn (solid, attached nodules are the common ones).
    ``nodule_model`` draws each nodule in place of ``nodule_field`` (real outlines: lidc_shapes).
    """
    unknown = (set(kinds) - set(KINDS)) | (set(attachments) - set(ATTACHMENTS))
    if unknown:
        raise ValueError(f"unknown nodule kind/attachment: {sorted(unknown)}")
    fov = (float(field_of_view_mm),) * 2 + (330.0,) if np.isscalar(field_of_view_mm) else tuple(field_of_view_mm)
    sx, sy, sz = (float(s) for s in spacing)
    rng = np.random.default_rng(seed)
    ni, nj = math.ceil(fov[0] / sx - 1e-6), math.ceil(fov[1] / sy - 1e-6)
    nk = max(16, int(round(fov[2] * rng.uniform(*z_fov_fraction) / sz)))
    origin = (-(ni - 1) * sx / 2, -(nj - 1) * sy / 2, round(rng.uniform(-420.0, -150.0), 2))  # exact in DICOM text
    grid = Grid((nk, nj, ni), (sx, sy, sz), origin)
    body = _sample_body(rng, grid, fov[0])
    anat = _build_anatomy(rng, grid, body)
    edge = 0.8 * min(sx, sy) + 0.3
    nodules = add_nodules(
        rng, n_nodules, diameter_range_mm, list(kinds), list(attachments),
        place=lambda r, attachment, taken: _place_nodule(rng, grid, anat, body, r, attachment, taken),
        draw=lambda c, r, kind: _draw_nodule(rng, grid, anat.hu, anat.lung, c, r, kind, edge,
                                             nodule_model or nodule_field),
    )
    hu = _scan(rng, anat.hu, (sx, sy, sz), noise_hu, blur_mm, body)
    return Phantom(hu=hu, spacing=(sx, sy, sz), origin=tuple(float(o) for o in origin), nodules=nodules)


# ----------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------


def write_dicom_series(
    phantom: Phantom,
    out_dir: Path,
    *,
    patient_id: str,
    patient_name: str = "PHANTOM^LUNG",
    study_instance_uid: str | None = None,
    accession_number: str = "",
    series_description: str = "Synthetic chest CT",
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
    series_number: int = 1,
) -> list[Path]:
    """Write the phantom as a CT Image Storage series, one file per slice (file names shuffled).

    Stored values are HU + 1024 (unsigned 16 bit, RescaleIntercept -1024). A compressed transfer
    syntax (e.g. RLE Lossless, JPEG 2000 Lossless) is encoded with pydicom's ``Dataset.compress``.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage, generate_uid

    ts = UID(transfer_syntax_uid)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_instance_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    now = datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    nk, nj, ni = phantom.hu.shape
    sx, sy, sz = phantom.spacing
    stored = (np.clip(phantom.hu.astype(np.int32), -1024, 64511) + 1024).astype(np.uint16)

    # File names in a shuffled order so readers must sort by ImagePositionPatient.
    order = list(range(nk))
    random.Random(series_uid).shuffle(order)
    if nk > 1 and order == sorted(order):
        order.reverse()

    paths = []
    for n, k in enumerate(range(nk - 1, -1, -1)):  # instance 1 = most superior slice, as scanners do
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
        ds.AccessionNumber = accession_number
        ds.Modality = "CT"
        ds.Manufacturer = "lungnode"
        ds.ManufacturerModelName = "synthetic phantom"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Chest CT"
        ds.SeriesDescription = series_description
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = f"{sz:g}"
        ds.KVP = "120"
        ds.DataCollectionDiameter = f"{ni * sx:.1f}"
        ds.ReconstructionDiameter = f"{ni * sx:.1f}"
        ds.ConvolutionKernel = "STANDARD"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = n + 1
        z = phantom.origin[2] + k * sz
        ds.ImagePositionPatient = [f"{phantom.origin[0]:.4f}", f"{phantom.origin[1]:.4f}", f"{z:.4f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z:.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = nj, ni
        ds.PixelSpacing = [f"{sy:g}", f"{sx:g}"]  # row spacing, column spacing
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.WindowCenter, ds.WindowWidth = "-600", "1500"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        if ts.is_compressed:
            ds.compress(ts, stored[k])
        else:
            meta.TransferSyntaxUID = ts
            ds.PixelData = stored[k].tobytes()
        path = out_dir / f"IM{order[k]:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_nifti(phantom: Phantom, path: Path) -> Path:
    """Write the phantom with its LPS geometry."""
    return write_nifti_image(phantom.hu, phantom.spacing, phantom.origin, np.eye(3), path)


def write_nifti_image(hu: np.ndarray, spacing: Sequence[float], origin: Sequence[float], direction: np.ndarray,
                      path: Path) -> Path:
    """Write a (k, j, i) array with its LPS geometry (SimpleITK stores it as NIfTI's RAS header);
    direction's columns are the world directions of i, j, k."""
    import SimpleITK as sitk

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in origin))
    img.SetDirection(tuple(float(v) for v in np.asarray(direction, float).ravel()))
    sitk.WriteImage(img, str(path), useCompression=path.suffix == ".gz")
    return path


def phantom_seed(seed: int, index: int) -> int:
    """Seed of the index-th phantom of a data set made with `seed` (independent streams)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def generate_dataset(out_dir: Path, n: int, seed: int, *, fmt: str = "nifti",
                     spacing: Sequence[float] = (0.7, 0.7, 2.5), **phantom_kw) -> Path:
    """Write n phantoms and a MONAI-style datalist.json (boxes: LPS world mm, "cccwhd"); returns its path."""
    from tqdm import tqdm

    if fmt not in ("nifti", "dicom"):
        raise ValueError(f"format must be 'nifti' or 'dicom', not {fmt!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for idx in tqdm(range(n), desc="phantoms", unit="phantom"):
        s = phantom_seed(seed, idx)
        ph = make_phantom(s, spacing=spacing, **phantom_kw)
        name = f"phantom_{idx:05d}"
        if fmt == "nifti":
            target = write_nifti(ph, out_dir / "images" / f"{name}.nii.gz")
        else:
            target = out_dir / "images" / name
            write_dicom_series(ph, target, patient_id=f"PHANTOM{idx:05d}", patient_name=f"PHANTOM^{idx:05d}")
        entries.append({
            "image": target.relative_to(out_dir).as_posix(),
            "box": [[*nod.center_mm, nod.diameter_mm, nod.diameter_mm, nod.diameter_mm] for nod in ph.nodules],
            "label": [0] * len(ph.nodules),
            "diameter_mm": [nod.diameter_mm for nod in ph.nodules],
            "kind": [nod.kind for nod in ph.nodules],
            "attachment": [nod.attachment for nod in ph.nodules],
            "seed": s,
            "generator": GENERATOR_VERSION,  # the same seed draws another phantom under another generator
        })
    datalist = out_dir / "datalist.json"
    datalist.write_text(json.dumps({"training": entries}, indent=1))
    return datalist


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def size_bin(d: float) -> str:
    return "<6 mm" if d < 6 else "6-10 mm" if d < 10 else "10-20 mm" if d < 20 else ">=20 mm"


def summarize(datalist: Path, what: str = "phantoms") -> str:
    """Readable summary of a generated data set: counts by size, kind and attachment."""
    entries = json.loads(Path(datalist).read_text())["training"]
    sizes = Counter(size_bin(d) for e in entries for d in e["diameter_mm"])
    kinds = Counter(k for e in entries for k in e["kind"])
    attach = Counter(a for e in entries for a in e["attachment"])
    total = sum(kinds.values())
    order = ["<6 mm", "6-10 mm", "10-20 mm", ">=20 mm"]
    generators = sorted({e["generator"] for e in entries if "generator" in e})
    made = f" (generator {', '.join(map(str, generators))})" if generators else ""
    return "\n".join([
        f"{len(entries)} {what}{made}, {total} nodules, written under {Path(datalist).parent}",
        "  by size:       " + ", ".join(f"{b} {sizes[b]}" for b in order),
        "  by kind:       " + ", ".join(f"{k} {kinds[k]}" for k in KINDS),
        "  by attachment: " + ", ".join(f"{a} {attach[a]}" for a in ATTACHMENTS),
        f"  datalist:      {datalist}",
    ])


def shape_model(library: Path | None, split: str, fraction: float) -> NoduleModel | None:
    """The nodule model with real outlines from a `train shapes` library (None: the generator's own shapes)."""
    if not library:
        return None
    from lungnode.training.lidc_shapes import library_split

    return library_split(library, split).field_model(fraction)


def _cmd_synth(args: argparse.Namespace) -> int:
    model = shape_model(args.nodule_shapes, args.shape_split, args.real_shape_fraction)
    if args.insert_into or args.insert_into_datalist:
        from lungnode.training.insertion import generate_inserted_dataset, sources_from_datalist, sources_from_series

        sources = sources_from_series([Path(d) for d in args.insert_into or []], args.annotations)
        for d in args.insert_into_datalist or []:
            sources += sources_from_datalist(Path(d))
        datalist = generate_inserted_dataset(sources, Path(args.out), args.n, args.seed, fmt=args.format,
                                             nodule_model=model)
        print(summarize(datalist, "real series with simulated nodules"))
        return 0
    datalist = generate_dataset(Path(args.out), args.n, args.seed, fmt=args.format, spacing=tuple(args.spacing),
                                nodule_model=model)
    print(summarize(datalist))
    return 0


def add_command(tsub) -> None:
    """Register `lungnode train synth`."""
    p = tsub.add_parser("synth", help="write synthetic chest CT phantoms with known nodules and a datalist.json")
    p.add_argument("--out", required=True, help="output folder (images/ and datalist.json)")
    p.add_argument("--n", type=int, default=10, help="number of phantoms")
    p.add_argument("--seed", type=int, default=0, help="data set seed (same seed, same phantoms)")
    p.add_argument("--format", choices=("nifti", "dicom"), default="nifti")
    p.add_argument("--spacing", type=float, nargs=3, default=(0.7, 0.7, 2.5), metavar=("X", "Y", "Z"),
                   help="voxel size in mm (column, row, slice)")
    p.add_argument("--insert-into", action="append", metavar="SERIES_DIR",
                   help="instead of phantoms, write --n copies of this real CT series (repeat for more, used in "
                        "turn) with simulated nodules inserted; its own spacing is kept")
    p.add_argument("--insert-into-datalist", action="append", metavar="DATALIST",
                   help="like --insert-into, for every DICOM series of a datalist's training section (e.g. `train "
                        "import feedback`): its nodules are kept clear of and listed, its rejected findings carried")
    p.add_argument("--annotations", metavar="CSV",
                   help="with --insert-into: LUNA16-style annotations.csv; the series' labelled nodules are "
                        "kept clear of and listed in the datalist")
    add_shape_arguments(p)
    p.set_defaults(func=_cmd_synth)


def add_shape_arguments(p: argparse.ArgumentParser, default_split: str = "train") -> None:
    """--nodule-shapes and its companions (train synth: the training split; train eval: the evaluation split)."""
    p.add_argument("--nodule-shapes", type=Path, metavar="NPZ",
                   help="draw nodules with real outlines from this library (`lungnode train shapes`) instead of "
                        "the generated shape model")
    p.add_argument("--shape-split", choices=("train", "eval", "all"), default=default_split,
                   help=f"with --nodule-shapes: the outlines of the training or the evaluation patients (default "
                        f"{default_split})")
    p.add_argument("--real-shape-fraction", type=float, default=1.0,
                   help="with --nodule-shapes: the share of nodules drawn with a real outline (the rest generated)")

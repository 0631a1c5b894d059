"""Synthetic phantoms: reproducible, nodules where the labels say, valid DICOM and datalist output."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import ExplicitVRLittleEndian, RLELossless
from scipy import ndimage

from lungnode.training.synth import (
    GENERATOR_VERSION,
    Phantom,
    add_command,
    generate_dataset,
    make_phantom,
    phantom_seed,
    write_dicom_series,
    write_nifti,
)

COARSE = (1.4, 1.4, 2.5)
HU_RANGE = {"solid": (-120, 160), "ground-glass": (-760, -180), "part-solid": (-760, 160)}


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    # n_nodules fixed high so every kind/attachment shows up across the few seeds used below.
    return make_phantom(7, spacing=COARSE, n_nodules=(4, 4))


def _voxel(ph: Phantom, xyz) -> tuple[int, int, int]:
    i, j, k = np.rint((np.asarray(xyz) - ph.origin) / ph.spacing).astype(int)
    return int(k), int(j), int(i)


def _inner_air(hu: np.ndarray) -> np.ndarray:
    """Air-like voxels not connected to the air around the body: the lungs and airways."""
    air = hu < -400
    lab, _ = ndimage.label(air)
    border = np.unique(np.concatenate([lab[:, 0].ravel(), lab[:, -1].ravel(), lab[:, :, 0].ravel(), lab[:, :, -1].ravel()]))
    return air & ~np.isin(lab, border[border > 0])


def test_same_seed_same_phantom_and_different_seed_differs():
    a = make_phantom(11, spacing=COARSE)
    b = make_phantom(11, spacing=COARSE)
    c = make_phantom(12, spacing=COARSE)
    assert a.hu.dtype == np.int16 and a.hu.ndim == 3
    assert np.array_equal(a.hu, b.hu) and a.nodules == b.nodules and a.origin == b.origin
    assert a.hu.shape != c.hu.shape or not np.array_equal(a.hu, c.hu)


def test_phantom_looks_like_a_chest(phantom):
    hu = phantom.hu
    nk, nj, ni = hu.shape
    assert (nj, ni) == (256, 256) and phantom.spacing == COARSE
    mid = hu[nk // 2]
    assert mid[0, 0] < -900  # air in the corner
    assert (mid > 300).sum() > 100  # ribs and spine
    lungs = _inner_air(hu)
    assert 0.03 < lungs.mean() < 0.35
    assert -900 < np.median(hu[lungs]) < -750
    # Vessels: plenty of soft-tissue voxels inside the lung region's bounding box rows.
    filled = ndimage.binary_fill_holes(lungs[nk // 2])
    inside = filled & ~lungs[nk // 2]
    assert inside.sum() > 20


def test_nodules_lie_in_the_lungs_with_their_kinds_hu(phantom):
    assert 1 <= len(phantom.nodules) <= 4
    lungs = _inner_air(phantom.hu)
    centers = [np.array(n.center_mm) for n in phantom.nodules]
    for n, c in zip(phantom.nodules, centers):
        assert 4.0 * 0.85**8 <= n.diameter_mm <= 25.0
        k, j, i = _voxel(phantom, c)
        lo, hi = HU_RANGE[n.kind]
        assert lo <= phantom.hu[k, j, i] <= hi, (n, phantom.hu[k, j, i])
        # A shell just outside the nodule is mostly lung (less for ones resting on the pleura).
        r = n.diameter_mm / 2
        offsets = np.array([[dx, dy, dz] for dx in (-1, 0, 1) for dy in (-1, 0, 1) for dz in (-1, 0, 1) if dx or dy or dz], float)
        shell = c + offsets / np.linalg.norm(offsets, axis=1, keepdims=True) * (r * 1.3 + 4.0)
        kji = np.array([_voxel(phantom, p) for p in shell])
        frac = lungs[kji[:, 0], kji[:, 1], kji[:, 2]].mean()
        assert frac >= (0.25 if n.attachment == "pleural" else 0.45), (n, frac)
    for a in range(len(centers)):
        for b in range(a + 1, len(centers)):
            gap = np.linalg.norm(centers[a] - centers[b])
            assert gap > (phantom.nodules[a].diameter_mm + phantom.nodules[b].diameter_mm) / 2


def test_all_kinds_and_attachments_occur():
    seen_k, seen_a = set(), set()
    for s in range(6):
        for n in make_phantom(s, spacing=(2.8, 2.8, 5.0), n_nodules=(4, 4)).nodules:
            seen_k.add(n.kind)
            seen_a.add(n.attachment)
    assert seen_k == {"solid", "part-solid", "ground-glass"}
    assert seen_a == {"none", "pleural", "vascular"}


def _read_series(folder: Path):
    files = sorted(folder.glob("*.dcm"))
    dss = [pydicom.dcmread(f) for f in files]
    order = sorted(range(len(dss)), key=lambda n: float(dss[n].ImagePositionPatient[2]))
    dss = [dss[n] for n in order]
    vol = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss])
    return files, order, dss, vol


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless])
def test_dicom_round_trip_keeps_hu_and_geometry(phantom, tmp_path, syntax):
    paths = write_dicom_series(phantom, tmp_path, patient_id="SYN1", accession_number="A1",
                               transfer_syntax_uid=syntax)
    assert len(paths) == phantom.hu.shape[0]
    files, order, dss, vol = _read_series(tmp_path)
    assert order != sorted(order), "file names must not be in slice order"
    assert np.array_equal(vol, phantom.hu)
    first = dss[0]
    assert first.file_meta.TransferSyntaxUID == syntax
    assert len({d.SeriesInstanceUID for d in dss}) == 1 and len({d.SOPInstanceUID for d in dss}) == len(dss)
    assert first.Modality == "CT" and first.PatientID == "SYN1" and first.AccessionNumber == "A1"
    assert list(first.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    # World -> voxel mapping from the DICOM geometry lands on each nodule's centre.
    ipp0 = np.array([float(v) for v in first.ImagePositionPatient])
    row_sp, col_sp = (float(v) for v in first.PixelSpacing)
    dz = float(dss[1].ImagePositionPatient[2]) - float(dss[0].ImagePositionPatient[2])
    assert ipp0 == pytest.approx(phantom.origin) and dz == pytest.approx(phantom.spacing[2])
    for n in phantom.nodules:
        x, y, z = n.center_mm
        i, j, k = round((x - ipp0[0]) / col_sp), round((y - ipp0[1]) / row_sp), round((z - ipp0[2]) / dz)
        lo, hi = HU_RANGE[n.kind]
        assert lo <= vol[k, j, i] <= hi
        assert vol[k, j, i] == phantom.hu[_voxel(phantom, n.center_mm)]


def test_dciodvfy_finds_no_errors(phantom, tmp_path):
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    for syntax in (ExplicitVRLittleEndian, RLELossless):
        paths = write_dicom_series(phantom, tmp_path / str(syntax), patient_id="SYN1", transfer_syntax_uid=syntax)
        res = subprocess.run([exe, str(paths[len(paths) // 2])], capture_output=True, text=True, timeout=60)
        errors = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]
        assert not errors, errors


def test_nifti_keeps_lps_geometry(phantom, tmp_path):
    path = write_nifti(phantom, tmp_path / "p.nii.gz")
    img = sitk.ReadImage(str(path))
    assert img.GetSpacing() == pytest.approx(phantom.spacing)
    assert img.GetOrigin() == pytest.approx(phantom.origin, abs=1e-3)
    assert np.array_equal(sitk.GetArrayFromImage(img), phantom.hu)
    n = phantom.nodules[0]
    idx = img.TransformPhysicalPointToIndex(n.center_mm)
    assert sitk.GetArrayFromImage(img)[idx[2], idx[1], idx[0]] == phantom.hu[_voxel(phantom, n.center_mm)]


def test_datalist_matches_the_phantoms(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_command(parser.add_subparsers())
    args = parser.parse_args(["synth", "--out", str(tmp_path), "--n", "2", "--seed", "5",
                              "--spacing", "2.8", "2.8", "5.0"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert f"2 phantoms (generator {GENERATOR_VERSION})" in out and str(tmp_path) in out
    data = json.loads((tmp_path / "datalist.json").read_text())
    assert len(data["training"]) == 2
    for idx, e in enumerate(data["training"]):
        assert e["generator"] == GENERATOR_VERSION
        ph = make_phantom(phantom_seed(5, idx), spacing=(2.8, 2.8, 5.0))
        assert (tmp_path / e["image"]).is_file() and not Path(e["image"]).is_absolute()
        assert len(e["box"]) == len(e["label"]) == len(e["diameter_mm"]) == len(e["kind"]) == len(ph.nodules)
        assert set(e["label"]) <= {0}
        for box, n in zip(e["box"], ph.nodules):
            assert box == pytest.approx([*n.center_mm, n.diameter_mm, n.diameter_mm, n.diameter_mm])
        img = sitk.ReadImage(str(tmp_path / e["image"]))
        assert np.array_equal(sitk.GetArrayFromImage(img), ph.hu)


def test_dicom_dataset_has_one_series_per_phantom(tmp_path):
    datalist = generate_dataset(tmp_path, 1, 3, fmt="dicom", spacing=(2.8, 2.8, 5.0))
    e = json.loads(datalist.read_text())["training"][0]
    files = list((tmp_path / e["image"]).glob("*.dcm"))
    assert len(files) == make_phantom(phantom_seed(3, 0), spacing=(2.8, 2.8, 5.0)).hu.shape[0]


def test_vessel_branches_taper_to_a_point_inside_the_lung():
    """A branch that stops at full width (pleura ahead, or the tube cap) would be a round bright cap,
    a nodule look-alike; every such end must thin out to a tip inside the lung instead."""
    from lungnode.training.synth import Grid, _grow_trees

    grid = Grid((90, 90, 90), (1.5, 1.5, 1.5), (-67.5, -67.5, -67.5))
    z, y, x = grid.box_coords(tuple(slice(0, n) for n in grid.shape))
    lung = (x**2 + y**2 + z**2) < 65.0**2
    roots = [(np.zeros(3), np.array(d, float), 4.0) for d in np.vstack([np.eye(3), -np.eye(3)])]
    tubes = _grow_trees(np.random.default_rng(3), grid, lung, roots, min_radius=0.6, max_tubes=120,
                        length=(5.0, 9.0))  # the pleura stops some branches, the cap of 120 the rest
    starts = {t.p0 for t in tubes}
    leaves = [t for t in tubes if t.p1 not in starts]
    assert len(leaves) > 20
    assert max(t.r1 for t in leaves) <= 1.5  # no wide open end (the roots are 4 mm)
    cones = [t for t in leaves if t.r1 == 0.3]
    assert len(cones) >= 10, "the pleura and the cap stop wide branches here: their ends must be cones"
    assert grid.inside(lung, np.array([t.p1 for t in cones])).mean() > 0.9


def test_airway_branches_all_end_in_cones():
    """Airways stop at a 2 mm lumen; a bronchus that ended there open and round was a hollow ring with
    a wall, the early models' commonest false positive. With taper_from=0 every end is a cone."""
    from lungnode.training.synth import Grid, _grow_trees

    grid = Grid((90, 90, 90), (1.5, 1.5, 1.5), (-67.5, -67.5, -67.5))
    z, y, x = grid.box_coords(tuple(slice(0, n) for n in grid.shape))
    lung = (x**2 + y**2 + z**2) < 65.0**2
    roots = [(np.zeros(3), np.array(d, float), 6.0) for d in np.vstack([np.eye(3), -np.eye(3)])]
    tubes = _grow_trees(np.random.default_rng(5), grid, lung, roots, min_radius=2.0, max_tubes=60,
                        length=(4.0, 7.0), taper_from=0.0)
    starts = {t.p0 for t in tubes}
    leaves = [t for t in tubes if t.p1 not in starts]
    assert len(leaves) >= 6
    assert all(t.r1 == 0.3 for t in leaves), sorted(t.r1 for t in leaves)
    # Without the taper (generator 2's airways) the same trees end in wide open caps.
    untapered = _grow_trees(np.random.default_rng(5), grid, lung, roots, min_radius=2.0, max_tubes=60,
                            length=(4.0, 7.0), taper_from=1e9)
    starts = {t.p0 for t in untapered}
    assert min(t.r1 for t in untapered if t.p1 not in starts) >= 2.0 * 0.9


def test_focus_phantoms_hold_only_the_hard_cases_and_the_rest_are_unchanged(tmp_path):
    """A training mix with focus_fraction draws that share of phantoms with only small juxtavascular
    nodules (what v11 missed); the other phantoms are exactly those of the plain mix."""
    from lungnode.models.registry import InferenceSettings
    from lungnode.training.data import PhantomMix, build_cache
    from lungnode.training.fit import PhantomConfig

    plain = PhantomMix(model_spacing_mm=(2.8, 2.8, 5.0), **PhantomConfig().model_dump())
    focus_cfg = PhantomConfig(focus_fraction=0.4, focus_n_nodules=(3, 3), focus_diameter_range_mm=(5, 8))
    focus = PhantomMix(model_spacing_mm=(2.8, 2.8, 5.0), **focus_cfg.model_dump())
    drawn = [focus.for_seed(s) for s in range(200)]
    picked = [s for s, ps in zip(range(200), drawn) if ps.attachments is not None]
    assert 60 <= len(picked) <= 100
    for s, ps in zip(range(200), drawn):
        if ps.attachments is None:
            assert ps == plain.for_seed(s)
        else:
            assert (ps.attachments, ps.n_nodules, ps.diameter_range_mm) == (("vascular",), (3, 3), (5, 8))
            assert ps.spacing_mm == plain.for_seed(s).spacing_mm
    inf = InferenceSettings(spacing_mm=(2.8, 2.8, 5.0), window_hu=(-1024, 500), patch_size=(32, 32, 16),
                            roi_size=(32, 32, 16), overlap=0.25, score_threshold=0.5, nms_threshold=0.1,
                            topk_candidates_per_level=100, detections_per_image=10, body_threshold_hu=-500,
                            body_margin_mm=10, lung_mask=False)
    [img] = build_cache(tmp_path, picked[:1], focus, inf)
    meta = json.loads(img.with_suffix(".json").read_text())
    assert len(meta["boxes"]) == 3 and all(5 <= d <= 8 for d in meta["diameters_mm"])
    with pytest.raises(ValueError):
        PhantomConfig(focus_attachments=["beside the heart"])


def _aerated_share(empty: Phantom, n) -> float:
    """The share of a nodule's inner ball (0.85 of its radius) that is aerated lung (< -600 HU) in the
    same phantom drawn without nodules: how much of the nodule shows against lung."""
    z, y, x = np.meshgrid(*(ph_axis(empty, a) for a in (2, 1, 0)), indexing="ij")
    ball = (x - n.center_mm[0]) ** 2 + (y - n.center_mm[1]) ** 2 + (z - n.center_mm[2]) ** 2 <= (0.85 * n.diameter_mm / 2) ** 2
    return float((empty.hu[ball] < -600).mean())


def ph_axis(ph: Phantom, a: int) -> np.ndarray:
    return ph.origin[a] + ph.spacing[a] * np.arange(ph.hu.shape[2 - a])


@pytest.mark.parametrize("seed", range(20, 30))
def test_every_labelled_nodule_shows_against_lung(seed):
    """A nodule drawn onto a large vessel only brightens the vessel: the label would mark a nodule
    where a reader sees a vessel (generator 3 did this to some; the model missed exactly those). Most of
    each nodule must lie on aerated lung, and an isolated one ("none") be centred on it."""
    ph = make_phantom(seed, spacing=COARSE, n_nodules=(5, 5))
    empty = make_phantom(seed, spacing=COARSE, n_nodules=(0, 0))  # the same anatomy, no nodules
    assert ph.nodules
    for n in ph.nodules:
        share = _aerated_share(empty, n)
        assert share >= 0.4, f"{n.diameter_mm} mm {n.attachment} nodule: only {share:.0%} of it on lung"
        if n.attachment == "none":
            assert empty.hu[_voxel(empty, n.center_mm)] < -600

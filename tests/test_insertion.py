"""Simulated nodules in real CT: the kind's HU at the centre, inside the lungs, clear of labelled
nodules, nothing else changed, reproducible, and a DICOM series that reloads with them in place."""
from __future__ import annotations

import argparse
import json
from functools import lru_cache

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from lungnode.inference.lung_mask import inside_lungs, lung_mask
from lungnode.inference.types import Volume
from lungnode.inference.volume import load_volume
from lungnode.training.insertion import insert_nodules, write_derived_series
from lungnode.training.synth import ATTACHMENTS, NoduleSpec, add_command, make_phantom

from tests.conftest import lidc_series

HU_RANGE = {"solid": (-120, 160), "ground-glass": (-760, -180), "part-solid": (-760, 160)}
LUNA_0001 = ((56.20840547, 86.34341278, -115.8675792), 23.35064438)  # centre LPS mm, diameter
DIRECTIONS = np.array([[a, b, c] for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if a or b or c], float)
DIRECTIONS /= np.linalg.norm(DIRECTIONS, axis=1, keepdims=True)


@lru_cache(maxsize=None)
def _empty_phantom(seed: int) -> tuple[Volume, np.ndarray]:
    """A phantom drawn without nodules, as a Volume, and its lung mask."""
    ph = make_phantom(seed, spacing=(1.4, 1.4, 2.5), n_nodules=(0, 0))
    assert ph.nodules == []
    vol = Volume(hu=ph.hu, spacing=ph.spacing, origin=ph.origin, direction=np.eye(3), slices=[],
                 study_instance_uid="1.2.3", series_instance_uid="1.2.3.4")
    return vol, lung_mask(vol)


def _hu_at(vol: Volume, hu: np.ndarray, xyz) -> np.ndarray:
    """HU at LPS points (..., 3), nearest voxel."""
    i, j, k = np.moveaxis(np.rint(vol.world_to_index(np.asarray(xyz, float))).astype(int), -1, 0)
    return hu[k, j, i]


def _centre_hu(vol: Volume, hu: np.ndarray, spec: NoduleSpec) -> float:
    """Mean of the 3 x 3 in-plane voxels at the centre (the noise of one voxel is large on real CT)."""
    i, j, k = np.rint(vol.world_to_index(np.asarray(spec.center_mm))).astype(int)
    return float(hu[k, j - 1:j + 2, i - 1:i + 2].mean())


def _check(vol: Volume, mask: np.ndarray, hu: np.ndarray, specs: list[NoduleSpec], avoid) -> None:
    """What every insertion must satisfy, whatever the scan."""
    assert hu.shape == vol.hu.shape and hu is not vol.hu
    centres = np.array([s.center_mm for s in specs])
    assert inside_lungs(mask, vol, centres, 0.0).all()
    for s in specs:
        lo, hi = HU_RANGE[s.kind]
        assert lo <= _centre_hu(vol, hu, s) <= hi, (s, _centre_hu(vol, hu, s))
        assert _centre_hu(vol, vol.hu, s) < -500  # it went into aerated lung, not onto a vessel
        for c, r in avoid:
            assert np.linalg.norm(np.asarray(s.center_mm) - c) > s.diameter_mm / 2 + r + 4.0
    for a in range(len(specs)):
        for b in range(a + 1, len(specs)):
            assert np.linalg.norm(centres[a] - centres[b]) > (specs[a].diameter_mm + specs[b].diameter_mm) / 2
    # Nothing changed away from the nodules (an axis reaches 1.25 r, a spicule 1.7 times that).
    changed = np.argwhere(np.abs(hu - vol.hu) > 0.5)[:, ::-1]
    world = vol.index_to_world(changed)
    reach = np.array([s.diameter_mm / 2 * 2.2 + 3.0 for s in specs])
    assert (np.linalg.norm(world[:, None] - centres[None], axis=2) <= reach[None]).any(axis=1).all()


@pytest.mark.parametrize("attachment", ATTACHMENTS)
def test_phantom_insertion_by_attachment(attachment):
    vol, mask = _empty_phantom(4)
    lung_points = np.argwhere(mask & (vol.hu < -700))
    avoid = [(vol.index_to_world(lung_points[len(lung_points) // 2][::-1].astype(float)), 15.0)]
    hu, specs = insert_nodules(vol, 11, n=(3, 3), diameter_range_mm=(8.0, 20.0), attachments=(attachment,),
                               avoid=avoid, lungs=mask)
    assert len(specs) == 3 and {s.attachment for s in specs} == {attachment}
    _check(vol, mask, hu, specs, avoid)
    for s in specs:
        c, r = np.asarray(s.center_mm), s.diameter_mm / 2
        if attachment == "pleural":  # thick tissue just past the nodule, in some direction
            walls = [(_hu_at(vol, vol.hu, c + d * (r * 1.2 + np.array([2.0, 5.0, 8.0])[:, None])) > -300).all()
                     for d in DIRECTIONS]
            assert any(walls), s
        elif attachment == "vascular":  # a vessel within reach of its surface
            near = _hu_at(vol, vol.hu, c + np.linspace(r * 0.8, r + 1.5, 6)[:, None, None] * DIRECTIONS)
            assert (near > -300).any(), s
        else:  # free in the parenchyma
            assert (_hu_at(vol, vol.hu, c + r * 0.6 * DIRECTIONS) < -500).mean() > 0.7, s


def test_same_seed_same_nodules_and_the_volume_is_untouched():
    vol, mask = _empty_phantom(5)
    before = vol.hu.copy()
    a = insert_nodules(vol, 3, lungs=mask)
    b = insert_nodules(vol, 3, lungs=mask)
    c = insert_nodules(vol, 4, lungs=mask)
    assert np.array_equal(vol.hu, before)
    assert a[1] == b[1] and np.array_equal(a[0], b[0]) and 1 <= len(a[1]) <= 3
    assert a[1] != c[1]
    with pytest.raises(ValueError):
        insert_nodules(vol, 3, kinds=("calcified",), lungs=mask)


def test_lidc_0001_insertion_written_as_dicom_reloads_in_place(tmp_path):
    vol = load_volume(lidc_series("LIDC-IDRI-0001"))
    mask = lung_mask(vol)
    avoid = [(np.asarray(LUNA_0001[0]), LUNA_0001[1] / 2)]
    hu, specs = insert_nodules(vol, 3, n=(3, 3), diameter_range_mm=(8.0, 20.0), avoid=avoid, lungs=mask)
    assert len(specs) == 3
    _check(vol, mask, hu, specs, avoid)

    paths = write_derived_series(vol, hu, tmp_path, n_nodules=len(specs))
    again = load_volume(sorted(paths))
    assert again.hu.shape == vol.hu.shape and again.spacing == pytest.approx(vol.spacing)
    assert again.origin == pytest.approx(vol.origin) and np.allclose(again.direction, vol.direction)
    assert np.abs(again.hu - np.rint(hu)).max() == 0
    assert again.series_instance_uid != vol.series_instance_uid and again.study_instance_uid != vol.study_instance_uid  # kept out of the patient's study
    for s in specs:  # the nodule is where its NoduleSpec says
        lo, hi = HU_RANGE[s.kind]
        assert lo <= _centre_hu(again, again.hu, s) <= hi
    assert _hu_at(again, again.hu, LUNA_0001[0]) == _hu_at(vol, vol.hu, LUNA_0001[0])  # the real one untouched
    ds = pydicom.dcmread(paths[0])
    source = pydicom.dcmread(vol.slices[0].path)
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] and "simulated" in ds.DerivationDescription
    assert ds.SOPInstanceUID != source.SOPInstanceUID and ds.PatientID == source.PatientID
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert len({pydicom.dcmread(p).SOPInstanceUID for p in paths}) == len(paths)


def test_train_synth_insert_into_writes_images_and_datalist(small_ct_series, tmp_path, capsys):
    source = load_volume(small_ct_series)
    lung_points = np.argwhere(lung_mask(source) & (source.hu < -700))
    labelled_at = tuple(round(float(v), 2) for v in source.index_to_world(lung_points[len(lung_points) // 2][::-1]))
    csv_path = tmp_path / "annotations.csv"  # a labelled nodule there, as a site's annotations would list it
    csv_path.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n"
                        f"{source.series_instance_uid},{labelled_at[0]},{labelled_at[1]},{labelled_at[2]},12.0\n"
                        "1.2.3.999,0,0,0,5.0\n")
    parser = argparse.ArgumentParser()
    add_command(parser.add_subparsers())
    out = tmp_path / "out"
    args = parser.parse_args(["synth", "--out", str(out), "--n", "2", "--seed", "1", "--insert-into",
                              str(small_ct_series[0].parent), "--annotations", str(csv_path)])
    assert args.func(args) == 0
    assert "2 real series with simulated nodules" in capsys.readouterr().out
    entries = json.loads((out / "datalist.json").read_text())["training"]
    assert len(entries) == 2 and entries[0]["seed"] != entries[1]["seed"]
    for e in entries:
        assert e["source_series"] == source.series_instance_uid
        labelled = [b for b, k in zip(e["box"], e["kind"]) if k == "labelled"]
        assert labelled == [[*labelled_at, 12.0, 12.0, 12.0]]
        img = sitk.ReadImage(str(out / e["image"]))
        arr = sitk.GetArrayFromImage(img)
        assert arr.shape == source.hu.shape and img.GetOrigin() == pytest.approx(source.origin, abs=1e-3)
        inserted = [(b, d) for b, d, k in zip(e["box"], e["diameter_mm"], e["kind"]) if k != "labelled"]
        assert 1 <= len(inserted) <= 3
        for box, d in inserted:
            assert np.linalg.norm(np.subtract(box[:3], labelled_at)) > (d + 12.0) / 2 + 4.0
            assert _hu_at(source, arr, box[:3]) > _hu_at(source, source.hu, box[:3]) + 100  # denser than before

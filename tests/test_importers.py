"""`lungnode train import`: every source gives the boxes its annotations mean, in world mm, on the right
image; de-identified copies keep the boxes valid and leak nothing; the datalist validates and splits
by patient. Fixtures are a small synthetic CT written as DICOM and as .mhd; real-data checks use
LIDC-IDRI-0001/0002 and the LUNA16 lists when present."""
from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.datadict import tag_for_keyword
from pydicom.sr.codedict import codes
from scipy import ndimage

from lungnode.inference.types import Detection, DetectionResult, ModelInfo
from lungnode.inference.volume import load_volume
from lungnode.reports.build import build_results
from lungnode.training.importers import deidentify
from lungnode.training.importers.command import add_command
from lungnode.training.importers.datalist import (
    Box,
    LabeledScan,
    read_datalist,
    summary_table,
    write_datalist,
)
from lungnode.training.importers.dicom_objects import import_dicom_objects
from lungnode.training.importers.image_index import ImageIndex
from lungnode.training.importers.lidc_xml import import_lidc_xml
from lungnode.training.importers.luna16 import import_luna16
from lungnode.training.synth import Phantom, make_phantom, write_dicom_series, write_nifti
from tests.conftest import need_tool, shared_data

LUNA16_0001 = (56.20840547, 86.34341278, -115.8675792, 23.35064438)
UID_0001 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
UID_0002 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.619372068417051974713149104919"


@dataclass
class Ct:
    phantom: Phantom
    folder: Path
    datasets: list[pydicom.Dataset]  # headers sorted by z (= k)

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def study_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)

    def voxel(self, xyz) -> np.ndarray:
        """(i, j, k) of a world point."""
        return (np.asarray(xyz, float) - self.phantom.origin) / self.phantom.spacing


def _write_ct(phantom: Phantom, folder: Path, study_uid: str | None = None, series_number: int = 1) -> Ct:
    paths = write_dicom_series(phantom, folder, patient_id="PAT-DOE-1", patient_name="DOE^JANE",
                               study_instance_uid=study_uid, accession_number="ACC-DOE", series_number=series_number)
    headers = sorted((pydicom.dcmread(p) for p in paths), key=lambda d: float(d.ImagePositionPatient[2]))
    return Ct(phantom, folder, headers)


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    # Coarse (2 x 2 x 4 mm, 179 x 179 x 40) so the whole module stays fast.
    return make_phantom(11, spacing=(2.0, 2.0, 4.0), field_of_view_mm=(358.0, 358.0, 160.0), n_nodules=(2, 2),
                        diameter_range_mm=(8.0, 16.0), z_fov_fraction=(1.0, 1.0))


@pytest.fixture(scope="module")
def ct(phantom, tmp_path_factory) -> Ct:
    return _write_ct(phantom, tmp_path_factory.mktemp("ct") / "series")


@pytest.fixture(scope="module")
def ct2(phantom, ct, tmp_path_factory) -> Ct:
    """The same phantom as another series of the same study."""
    return _write_ct(phantom, tmp_path_factory.mktemp("ct2") / "series", study_uid=ct.study_uid, series_number=2)


@pytest.fixture(scope="module")
def real_index() -> ImageIndex:
    root = shared_data()
    if root is None:
        pytest.skip("real LIDC-IDRI data not found: set LUNGNODE_TEST_DATA or put it in ../shared/data")
    return ImageIndex.build([root / "LIDC-IDRI-0001", root / "LIDC-IDRI-0002"], progress=False)


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="lungnode train")
    add_command(parser.add_subparsers(dest="train_command", required=True))
    args = parser.parse_args(["import", *argv, "--quiet"])
    return args.func(args)


def _cube_close(box: list[float], centre, diameter: float, tol_mm: float = 1e-3) -> bool:
    return np.allclose(box[:3], centre, atol=tol_mm) and np.allclose(box[3:], diameter, atol=tol_mm)


# ----------------------------------------------------------------------------------------------
# LUNA16
# ----------------------------------------------------------------------------------------------


def _luna_csv(path: Path, rows) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
        w.writerows(rows)
    return path


def test_luna16_same_boxes_from_mhd_and_from_dicom(ct, tmp_path):
    nods = ct.phantom.nodules
    ann = _luna_csv(tmp_path / "annotations.csv", [[ct.series_uid, *n.center_mm, n.diameter_mm] for n in nods]
                    + [["1.2.3.404", 0.0, 0.0, 0.0, 5.0]])
    excl = _luna_csv(tmp_path / "excluded.csv", [[ct.series_uid, -20.0, 10.0, -250.0, -1]])
    mhd = write_nifti(ct.phantom, tmp_path / "mhd" / f"{ct.series_uid}.mhd")

    for images, expected_image in (([tmp_path / "mhd"], mhd), ([ct.folder], ct.folder)):
        result = import_luna16(ann, ImageIndex.build(images, progress=False), excluded=excl, progress=False)
        assert [s.reason for s in result.skipped] == ["image not found under the image folders"]
        (scan,) = result.scans
        assert scan.image == expected_image and scan.series_uid == ct.series_uid and scan.source == "luna16"
        assert len(scan.boxes) == len(nods)
        for box, n in zip(scan.boxes, nods, strict=True):
            assert _cube_close(box.cccwhd(), n.center_mm, n.diameter_mm)
        assert [b.cccwhd() for b in scan.ignore] == [[-20.0, 10.0, -250.0, 10.0, 10.0, 10.0]]  # -1: LUNA16's 10 mm

    datalist = tmp_path / "out" / "datalist.json"
    assert _cli("luna16", "--annotations", str(ann), "--excluded", str(excl), "--images", str(ct.folder),
                "--out", str(datalist)) == 0
    item = json.loads(datalist.read_text())["training"][0]
    assert Path(item["image"]) == ct.folder.resolve()  # outside the datalist folder: absolute
    assert item["label"] == [0, 0] and item["source"] == "luna16" and len(item["ignore_box"]) == 1


def test_luna16_nodule_outside_the_image_skips_the_scan(ct, tmp_path):
    n = ct.phantom.nodules[0]
    ann = _luna_csv(tmp_path / "a.csv", [[ct.series_uid, n.center_mm[0], n.center_mm[1], -n.center_mm[2], 8.0]])
    result = import_luna16(ann, ImageIndex.build([ct.folder], progress=False), progress=False)
    assert result.scans == []
    assert "outside the image" in result.skipped[0].reason


def test_real_luna16_world_coordinates_are_dicom_patient_coordinates(real_index):
    """The README's check: the 0001 nodule lies on column 316, row 367 of InstanceNumber 43."""
    series = real_index.series[UID_0001]
    geometry = series.geometry
    i, j, k = geometry.world_to_index(LUNA16_0001[:3])
    assert (round(i), round(j)) == (316, 367)
    inst = next(s for s in series.instances if s.sop_instance_uid == geometry.sop_uids[round(k)])
    assert pydicom.dcmread(inst.path, stop_before_pixels=True).InstanceNumber == 43


def test_real_luna16_lists(real_index):
    root = shared_data() / "luna16"
    result = import_luna16(root / "annotations.csv", real_index, excluded=root / "annotations_excluded.csv",
                           series_list=root / "seriesuids.csv", progress=False)
    scans = {s.series_uid: s for s in result.scans}
    assert set(scans) == {UID_0001, UID_0002}
    assert [b.cccwhd() for b in scans[UID_0001].boxes] == [[*LUNA16_0001[:3], *[LUNA16_0001[3]] * 3]]
    assert len(scans[UID_0001].ignore) == 25
    assert scans[UID_0002].boxes == [] and len(scans[UID_0002].ignore) == 53
    assert len(result.skipped) == 888 - 2


# ----------------------------------------------------------------------------------------------
# LIDC reader XML
# ----------------------------------------------------------------------------------------------


def _outline(cx: float, cy: float, r: float) -> np.ndarray:
    """Pixels just outside a disk, in contour order (how LIDC readers' edge maps look)."""
    yy, xx = np.mgrid[int(cy - r) - 3:int(cy + r) + 4, int(cx - r) - 3:int(cx + r) + 4]
    inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    ring = ndimage.binary_dilation(inside) & ~inside
    pts = np.c_[xx[ring], yy[ring]]
    return pts[np.argsort(np.arctan2(pts[:, 1] - cy, pts[:, 0] - cx))]


def _roi_xml(ds: pydicom.Dataset, points) -> str:
    edges = "".join(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>" for x, y in points)
    return (f"<roi><imageZposition>{float(ds.ImagePositionPatient[2])}</imageZposition>"
            f"<imageSOP_UID>{ds.SOPInstanceUID}</imageSOP_UID><inclusion>TRUE</inclusion>{edges}</roi>")


def _sphere_nodule(ct: Ct, centre, diameter: float, shift_px=(0, 0)) -> str:
    """A reader's outlines of a sphere, slice by slice."""
    i, j, _ = ct.voxel(centre)
    rois = []
    for ds in ct.datasets:
        dz = float(ds.ImagePositionPatient[2]) - centre[2]
        if abs(dz) < diameter / 2:
            r_px = np.sqrt((diameter / 2) ** 2 - dz**2) / ct.phantom.spacing[0]
            if r_px >= 1:
                rois.append(_roi_xml(ds, _outline(i + shift_px[0], j + shift_px[1], r_px)))
    return f"<unblindedReadNodule><noduleID>n</noduleID>{''.join(rois)}</unblindedReadNodule>"


def _point(ct: Ct, xyz, tag: str) -> str:
    i, j, k = np.rint(ct.voxel(xyz)).astype(int)
    if tag == "nonNodule":
        ds = ct.datasets[k]
        return (f"<nonNodule><nonNoduleID>x</nonNoduleID><imageZposition>{float(ds.ImagePositionPatient[2])}"
                f"</imageZposition><imageSOP_UID>{ds.SOPInstanceUID}</imageSOP_UID>"
                f"<locus><xCoord>{i}</xCoord><yCoord>{j}</yCoord></locus></nonNodule>")
    return f"<unblindedReadNodule><noduleID>s</noduleID>{_roi_xml(ct.datasets[k], [(i, j)])}</unblindedReadNodule>"


def _lidc_xml(path: Path, series_uid: str, sessions: list[list[str]]) -> Path:
    body = "".join(f"<readingSession><servicingRadiologistID>{n}</servicingRadiologistID>{''.join(s)}</readingSession>"
                   for n, s in enumerate(sessions))
    path.write_text(f'<?xml version="1.0"?><LidcReadMessage xmlns="http://www.nih.gov"><ResponseHeader>'
                    f"<SeriesInstanceUid>{escape(series_uid)}</SeriesInstanceUid></ResponseHeader>{body}</LidcReadMessage>")
    return path


def test_lidc_consensus_of_three_of_four_readers(ct, tmp_path):
    a = np.array(ct.phantom.nodules[0].center_mm)
    b = np.array(ct.phantom.nodules[1].center_mm)
    small = a + [40.0, 0.0, 0.0]
    shifts = [(0, 0), (1, 0), (0, -1), (-1, 1)]
    sessions = [
        [_sphere_nodule(ct, a, 16.0, shifts[0]), _sphere_nodule(ct, b, 12.0), _point(ct, small, "small")],
        [_sphere_nodule(ct, a, 16.0, shifts[1]), _sphere_nodule(ct, b, 12.0), _point(ct, small, "nonNodule")],
        [_sphere_nodule(ct, a, 16.0, shifts[2])],
        [_sphere_nodule(ct, a, 16.0, shifts[3])],
    ]
    xml = _lidc_xml(tmp_path / "069.xml", ct.series_uid, sessions)
    (tmp_path / "other.xml").write_text("<IdriReadMessage/>")
    index = ImageIndex.build([ct.folder], progress=False)

    result = import_lidc_xml([tmp_path], index, progress=False)
    assert [s.reason for s in result.skipped] == ["XML skipped: not a LIDC CT read (IdriReadMessage)"]
    (scan,) = result.scans
    assert scan.image == ct.folder and scan.source == "lidc-xml" and scan.patient_id == "PAT-DOE-1"
    (nodule,) = scan.boxes
    mean_shift = np.mean(shifts, axis=0) * ct.phantom.spacing[0]
    assert np.linalg.norm(np.array(nodule.center_mm) - (a + [*mean_shift, 0])) < 1.0
    assert abs(nodule.diameter_mm - 16.0) < 0.15 * 16.0 and nodule.size_mm == (nodule.diameter_mm,) * 3
    # B (2 readers) and the point marks at `small` are don't-care regions
    assert len(scan.ignore) == 2
    near_b, near_small = sorted(scan.ignore, key=lambda x: np.linalg.norm(np.array(x.center_mm) - b))
    assert np.linalg.norm(np.array(near_b.center_mm) - b) < 1.0 and abs(near_b.diameter_mm - 12.0) < 2.0
    assert np.linalg.norm(np.array(near_small.center_mm) - small) < 3.0 and near_small.diameter_mm == 10.0

    (two,) = import_lidc_xml([xml], index, min_readers=2, progress=False).scans
    assert len(two.boxes) == 2


def test_real_lidc_xml_matches_luna16(real_index):
    root = shared_data()
    result = import_lidc_xml([root / "LIDC-IDRI-0001" / "lidc_xml", root / "LIDC-IDRI-0002" / "lidc_xml"],
                             real_index, progress=False)
    scans = {s.series_uid: s for s in result.scans}
    (nodule,) = scans[UID_0001].boxes
    assert np.linalg.norm(np.array(nodule.center_mm) - LUNA16_0001[:3]) < 2.0
    assert abs(nodule.diameter_mm - LUNA16_0001[3]) < 0.15 * LUNA16_0001[3]
    # 0002 is negative for LUNA16: its large nodule was outlined by only 2 readers -> don't care
    assert scans[UID_0002].boxes == []
    big = [b for b in scans[UID_0002].ignore if b.diameter_mm > 15]
    assert len(big) == 1 and np.linalg.norm(np.array(big[0].center_mm) - (59.8, 71.5, -104.1)) < 3.0

    two = {s.series_uid: s for s in import_lidc_xml([root / "LIDC-IDRI-0002" / "lidc_xml"], real_index,
                                                    min_readers=2, progress=False).scans}
    assert [round(b.diameter_mm) for b in two[UID_0002].boxes] == [23]


# ----------------------------------------------------------------------------------------------
# DICOM SEG and SR
# ----------------------------------------------------------------------------------------------


def _sphere_mask(ct: Ct, centre, diameter: float) -> np.ndarray:
    k, j, i = np.indices(ct.phantom.hu.shape)
    world = np.stack([i, j, k], -1) * ct.phantom.spacing + ct.phantom.origin
    return np.linalg.norm(world - centre, axis=-1) <= diameter / 2


def _write_seg(ct: Ct, path: Path) -> Path:
    nodules = np.zeros(ct.phantom.hu.shape, bool)
    for n in ct.phantom.nodules:
        nodules |= _sphere_mask(ct, n.center_mm, n.diameter_mm)
    lung = np.zeros_like(nodules)
    lung[5:30, 60:120, 30:80] = True
    descriptions = [
        hd.seg.SegmentDescription(segment_number=number, segment_label=label, segmented_property_category=category,
                                  segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for number, label, category, kind in (
            (1, "Lung", codes.SCT.Organ, codes.SCT.Lung),
            (2, "Nodules", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Nodule))
    ]
    seg = hd.seg.Segmentation(
        source_images=ct.datasets, pixel_array=np.stack([lung, nodules], axis=-1).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=50, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="test", manufacturer_model_name="test", software_versions="1", device_serial_number="1")
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def _write_results(ct: Ct, folder: Path, model: ModelInfo, manufacturer: str) -> dict[str, Path]:
    """The result objects lungnode sends to the PACS (one POINT + Diameter per phantom nodule in the SR,
    one sphere per nodule in the SEG), made by ``model`` of ``manufacturer``: {modality: path}."""
    volume = load_volume(sorted(ct.folder.glob("*.dcm")))
    detections = [Detection(n.center_mm, (*(np.array(n.center_mm) - 5), *(np.array(n.center_mm) + 5)),
                            n.diameter_mm, 0.9) for n in ct.phantom.nodules]
    result = DetectionResult(ct.study_uid, ct.series_uid, model, detections)
    paths = {}
    for ds in build_results(result, volume, ct.datasets[0], manufacturer=manufacturer):
        if ds.Modality in ("SR", "SEG"):
            paths[ds.Modality] = folder / ds.Modality.lower() / f"{ds.Modality.lower()}.dcm"
            paths[ds.Modality].parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(paths[ds.Modality])
    return paths


def _write_device_sr(ct: Ct, path: Path) -> Path:
    """Another vendor's AI SR (lungnode's format, not lungnode's model or name)."""
    return _write_results(ct, path.parent, ModelInfo("m", "1", "0" * 64), "OtherVendor AI")["SR"]


def _write_reader_sr(ct: Ct, path: Path, centre, semi_axes) -> Path:
    """A radiologist's TID 1500 SR with one ellipsoid nodule."""
    c = np.asarray(centre, float)
    points = np.concatenate([[c - e * a, c + e * a] for e, a in zip(np.eye(3), semi_axes, strict=True)])
    surface = hd.sr.VolumeSurface(
        graphic_type=hd.sr.GraphicTypeValues3D.ELLIPSOID, graphic_data=points,
        frame_of_reference_uid=ct.datasets[0].FrameOfReferenceUID,
        source_images=[hd.sr.SourceImageForSegmentation(ct.datasets[0].SOPClassUID, ct.datasets[0].SOPInstanceUID)])
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="N1"),
        referenced_volume_surface=surface, finding_type=codes.SCT.Nodule)
    person = hd.sr.ObserverContext(observer_type=codes.DCM.Person,
                                   observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                                       name="READER^ONE"))
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_person_context=person),
                                     procedure_reported=codes.LN.CTUnspecifiedBodyRegion, imaging_measurements=[group])
    sr = hd.sr.Comprehensive3DSR(evidence=ct.datasets, content=report[0], series_instance_uid=hd.UID(),
                                 series_number=60, sop_instance_uid=hd.UID(), instance_number=1, manufacturer="test")
    path.parent.mkdir(parents=True, exist_ok=True)
    sr.save_as(path)
    return path


@pytest.fixture(scope="module")
def label_objects(ct, ct2, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("objects")
    return {
        "seg": _write_seg(ct, folder / "seg" / "seg.dcm"),
        "device_sr": _write_device_sr(ct, folder / "sr1" / "sr.dcm"),
        "reader_sr": _write_reader_sr(ct2, folder / "sr2" / "sr.dcm", ct.phantom.nodules[1].center_mm, (6.0, 4.0, 5.0)),
    }


def test_seg_components_become_true_extent_boxes(ct, label_objects):
    index = ImageIndex.build([ct.folder, label_objects["seg"].parent], progress=False)
    result = import_dicom_objects(index, progress=False)
    (scan,) = result.scans
    assert scan.source == "dicom-seg" and scan.image == ct.folder and scan.series_uid == ct.series_uid
    assert len(scan.boxes) == len(ct.phantom.nodules)  # the "Lung" segment is not a nodule
    for n in ct.phantom.nodules:
        box = min(scan.boxes, key=lambda b: np.linalg.norm(np.array(b.center_mm) - n.center_mm))
        assert np.all(np.abs(np.array(box.center_mm) - n.center_mm) <= np.array(ct.phantom.spacing) / 2 + 1e-6)
        assert np.all(np.abs(np.array(box.size_mm) - n.diameter_mm) <= 2 * np.array(ct.phantom.spacing))
        assert abs(box.diameter_mm - n.diameter_mm) < 0.2 * n.diameter_mm


def test_device_sr_needs_consent_and_seg_wins_over_sr(ct, label_objects):
    sr_only = ImageIndex.build([ct.folder, label_objects["device_sr"].parent], progress=False)
    refused = import_dicom_objects(sr_only, progress=False)
    assert refused.scans == [] and "device" in refused.skipped[0].reason

    (scan,) = import_dicom_objects(sr_only, accept_device_sr=True, progress=False).scans
    assert scan.source == "dicom-sr"
    for box, n in zip(scan.boxes, ct.phantom.nodules, strict=True):
        assert _cube_close(box.cccwhd(), n.center_mm, n.diameter_mm, tol_mm=1e-3)

    both = ImageIndex.build([ct.folder, label_objects["seg"].parent, label_objects["device_sr"].parent],
                            progress=False)
    result = import_dicom_objects(both, accept_device_sr=True, progress=False)
    assert [s.source for s in result.scans] == ["dicom-seg"]
    assert "superseded" in result.skipped[0].reason


@pytest.fixture(scope="module")
def own_results(ct, tmp_path_factory) -> dict[str, Path]:
    return _write_results(ct, tmp_path_factory.mktemp("own"), ModelInfo("lungnode-retinanet", "1.0", "0" * 64),
                          "lungnode")


def test_lungnode_own_sr_and_seg_are_never_ground_truth(ct, label_objects, own_results, tmp_path):
    """Its results go back into the PACS beside the CT; importing them would train the model on its own
    output, so they are refused even with --accept-device-sr, and a reader's SEG still labels the CT."""
    folders = [own_results["SR"].parent, own_results["SEG"].parent]
    own = import_dicom_objects(ImageIndex.build([ct.folder, *folders], progress=False), accept_device_sr=True,
                               progress=False)
    assert own.scans == []
    assert sorted(s.reason for s in own.skipped) == [
        "SEG: lungnode's own output (Manufacturer 'lungnode'), never ground truth",
        "SR: lungnode's own output (Manufacturer 'lungnode'), never ground truth",
    ]

    # A PACS or a de-identification that drops the Manufacturer: the SEG's algorithm and the SR's
    # device observer still name lungnode.
    for modality, path in own_results.items():
        ds = pydicom.dcmread(path)
        del ds.Manufacturer
        (tmp_path / modality).mkdir()
        ds.save_as(tmp_path / modality / path.name)
    renamed = import_dicom_objects(ImageIndex.build([ct.folder, tmp_path / "SR", tmp_path / "SEG"],
                                                    progress=False), accept_device_sr=True, progress=False)
    assert renamed.scans == []
    assert sorted(s.reason for s in renamed.skipped) == [
        "SEG: lungnode's own output (segmentation algorithm 'lungnode-retinanet lungnode'), never ground truth",
        "SR: lungnode's own output (device observer 'lungnode-retinanet 1.0 lungnode lungnode-retinanet'), "
        "never ground truth",
    ]

    with_reader = import_dicom_objects(
        ImageIndex.build([ct.folder, label_objects["seg"].parent, *folders], progress=False),
        accept_device_sr=True, progress=False)
    assert [(s.source, s.series_uid) for s in with_reader.scans] == [("dicom-seg", ct.series_uid)]
    assert len(with_reader.scans[0].boxes) == len(ct.phantom.nodules)
    assert sorted(s.what for s in with_reader.skipped) == sorted(str(p) for p in own_results.values())


def test_reader_sr_ellipsoid_gives_its_extent(ct2, label_objects):
    index = ImageIndex.build([ct2.folder, label_objects["reader_sr"].parent], progress=False)
    (scan,) = import_dicom_objects(index, progress=False).scans
    assert scan.source == "dicom-sr" and scan.series_uid == ct2.series_uid
    (box,) = scan.boxes
    assert np.allclose(box.center_mm, ct2.phantom.nodules[1].center_mm, atol=1e-3)
    assert np.allclose(box.size_mm, (12.0, 8.0, 10.0), atol=1e-3)
    assert box.diameter_mm == pytest.approx((12.0 * 8.0 * 10.0) ** (1 / 3), rel=1e-4)


def test_pull_from_orthanc(ct, ct2, phantom, label_objects, tmp_path):
    from lungnode.peers import OrthancServer

    need_tool("Orthanc")
    distractor = _write_ct(phantom, tmp_path / "distractor", study_uid=ct.study_uid, series_number=3)
    with OrthancServer(tmp_path / "orthanc") as orthanc:
        orthanc.upload([*sorted(ct.folder.glob("*.dcm")), *sorted(ct2.folder.glob("*.dcm")),
                        *sorted(distractor.folder.glob("*.dcm")), label_objects["seg"], label_objects["reader_sr"]])
        download = tmp_path / "pulled"
        datalist = tmp_path / "datalist.json"
        assert _cli("dicom", "--orthanc-url", orthanc.url, "--study", ct.study_uid, "--download-dir", str(download),
                    "--out", str(datalist)) == 0
    pulled = {p.name for p in download.iterdir()}
    assert ct.series_uid in pulled and ct2.series_uid in pulled and distractor.series_uid not in pulled
    items = read_datalist(datalist).training
    assert sorted((i.source, i.series_uid) for i in items) == sorted(
        [("dicom-seg", ct.series_uid), ("dicom-sr", ct2.series_uid)])
    assert all(Path(i.image).parent.name == "pulled" for i in items)


# ----------------------------------------------------------------------------------------------
# CSV
# ----------------------------------------------------------------------------------------------


def test_csv_world_and_voxel_coordinates_agree(ct, tmp_path):
    n = ct.phantom.nodules[0]
    world = tmp_path / "world.csv"
    world.write_text(f"series_uid,x_mm,y_mm,z_mm,diameter_mm\n{ct.series_uid},{n.center_mm[0]},{n.center_mm[1]},"
                     f"{n.center_mm[2]},{n.diameter_mm}\n1.2.3.9,,,,\n")
    i, j, k = ct.voxel(n.center_mm)
    voxel = tmp_path / "voxel.csv"
    voxel.write_text(f"series_uid,i,j,k,diameter_mm\n{ct.series_uid},{i},{j},{k},{n.diameter_mm}\n")

    out_w, out_v = tmp_path / "w" / "datalist.json", tmp_path / "v" / "datalist.json"
    assert _cli("csv", "--csv", str(world), "--images", str(ct.folder), "--out", str(out_w)) == 0
    assert _cli("csv", "--csv", str(voxel), "--images", str(ct.folder), "--voxel", "--out", str(out_v)) == 0
    (a,), (b,) = read_datalist(out_w).training, read_datalist(out_v).training
    assert a.source == b.source == "csv" and np.allclose(a.box, b.box, atol=1e-6)
    assert _cube_close(a.box[0], n.center_mm, n.diameter_mm)
    assert _cli("csv", "--csv", str(voxel), "--images", str(ct.folder), "--out", str(out_v)) == 2  # needs --voxel


def test_csv_negative_scan_and_cli_summary(ct, tmp_path, capsys):
    listed = tmp_path / "neg.csv"
    listed.write_text(f"series_uid,x_mm,y_mm,z_mm,diameter_mm\n{ct.series_uid},,,,\n1.2.3.9,,,,\n")
    assert _cli("csv", "--csv", str(listed), "--images", str(ct.folder), "--out", str(tmp_path / "d.json")) == 0
    (item,) = read_datalist(tmp_path / "d.json").training
    assert item.box == [] and item.series_uid == ct.series_uid
    out = capsys.readouterr().out
    assert "total           1        1       0" in out and "1  image not found under the image folders: 1.2.3.9" in out

    missing = tmp_path / "missing.csv"
    missing.write_text("series_uid,x_mm,y_mm,z_mm,diameter_mm\n1.2.3.9,1,2,3,4\n")
    assert _cli("csv", "--csv", str(missing), "--images", str(ct.folder), "--out", str(tmp_path / "d.json")) == 1
    assert read_datalist(tmp_path / "d.json").training[0].series_uid == ct.series_uid  # not overwritten


# ----------------------------------------------------------------------------------------------
# De-identification
# ----------------------------------------------------------------------------------------------


def _identifying_copy(ct: Ct, folder: Path) -> Path:
    """The CT with the kind of identifying extras hospital series carry."""
    folder.mkdir(parents=True)
    for p in ct.folder.glob("*.dcm"):
        ds = pydicom.dcmread(p)
        ds.InstitutionName = "St DOE Hospital"
        ds.ImageComments = "Jane DOE, follow-up"
        ds.PatientBirthDate = "19500101"
        ds.OperatorsName = "DOE^JOHN"
        ds.private_block(0x0009, "ACME", create=True).add_new(0x01, "LO", "DOE private")
        ref = pydicom.Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = ct.datasets[0].SOPInstanceUID
        ds.ReferencedImageSequence = [ref]
        ds.save_as(folder / p.name)
    return folder


def test_deidentified_copies_keep_geometry_and_boxes_and_leak_nothing(ct, tmp_path):
    src = _identifying_copy(ct, tmp_path / "src")
    n = ct.phantom.nodules[0]
    listed = tmp_path / "n.csv"
    listed.write_text(f"series_uid,x_mm,y_mm,z_mm,diameter_mm\n{ct.series_uid},{n.center_mm[0]},{n.center_mm[1]},"
                      f"{n.center_mm[2]},{n.diameter_mm}\n")
    out = tmp_path / "share"
    datalist = out / "datalist.json"
    assert _cli("csv", "--csv", str(listed), "--images", str(src), "--out", str(datalist),
                "--deidentify", str(out / "images")) == 0
    assert (tmp_path / "share" / "images.deid-key").exists()  # beside the images, not in them
    (item,) = read_datalist(datalist).training
    assert item.image.startswith("images/") and item.series_uid != ct.series_uid
    assert _cube_close(item.box[0], n.center_mm, n.diameter_mm)

    files = sorted((out / item.image).glob("*.dcm"))
    assert len(files) == len(ct.datasets)
    copies = [pydicom.dcmread(f) for f in files]
    original_uids = {str(d.SOPInstanceUID) for d in ct.datasets} | {ct.series_uid, ct.study_uid,
                                                                     str(ct.datasets[0].FrameOfReferenceUID)}
    for f, ds in zip(files, copies, strict=True):
        assert b"DOE" not in f.read_bytes() and b"19500101" not in f.read_bytes()
        assert ds.PatientIdentityRemoved == "YES" and ds.PatientName == "" and ds.PatientID.startswith("ANON-")
        assert "InstitutionName" not in ds and "ImageComments" not in ds and "StudyDescription" not in ds
        assert not any(e.tag.is_private for e in ds)
        new_uids = {ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID}
        assert not new_uids & original_uids
        assert ds.SOPClassUID == ct.datasets[0].SOPClassUID
    assert len({d.FrameOfReferenceUID for d in copies}) == 1
    assert {d.SeriesInstanceUID for d in copies} == {item.series_uid}
    # references inside sequences follow the same mapping
    sop_uids = {d.SOPInstanceUID for d in copies}
    assert all(d.ReferencedImageSequence[0].ReferencedSOPInstanceUID in sop_uids for d in copies)

    before, after = load_volume(sorted(src.glob("*.dcm"))), load_volume(files)
    assert np.array_equal(before.hu, after.hu) and before.origin == after.origin and before.spacing == after.spacing

    again = tmp_path / "again.json"  # same key, same pseudonyms
    assert _cli("csv", "--csv", str(listed), "--images", str(src), "--out", str(again),
                "--deidentify", str(out / "images")) == 0
    assert read_datalist(again).training[0].series_uid == item.series_uid


def test_deidentify_refuses_burned_in_text_and_rewrites_volumes(ct, tmp_path):
    deid = deidentify.Deidentifier(b"k" * 32)
    ds = ct.datasets[0].copy()
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(deidentify.DeidentificationError):
        deid.dataset(ds)

    mhd = write_nifti(ct.phantom, tmp_path / "in" / f"{ct.series_uid}.mhd")
    scan = LabeledScan(mhd, ct.series_uid, "luna16", [Box.cube((0, 0, 0), 5)])
    copy = deid.copy_scan(scan, ImageIndex({}, {}), tmp_path / "out")
    assert copy.image.name == f"{deid.uid(ct.series_uid)}.mhd" and ct.series_uid not in copy.image.read_text()
    a, b = sitk.ReadImage(str(mhd)), sitk.ReadImage(str(copy.image))
    assert a.GetOrigin() == b.GetOrigin() and a.GetSpacing() == b.GetSpacing()
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


def test_profile_table_names_real_attributes():
    unknown = [k for k in deidentify._EMPTY | deidentify._REMOVE if tag_for_keyword(k) is None]
    assert unknown == []
    assert len(deidentify.METHOD) <= 64  # LO


# ----------------------------------------------------------------------------------------------
# Datalist
# ----------------------------------------------------------------------------------------------


def _scan(tmp: Path, uid: str, patient: str, boxes=()) -> LabeledScan:
    return LabeledScan(tmp / "images" / f"{uid}.nii.gz", uid, "csv", list(boxes), [], patient)


def test_split_keeps_a_patients_scans_together_and_append_keeps_splits(tmp_path):
    scans = [_scan(tmp_path, f"1.2.{p}.{s}", f"P{p}", [Box.cube((0, 0, 0), 7.0)]) for p in range(30) for s in range(2)]
    path = tmp_path / "datalist.json"
    dl = write_datalist(path, scans, val_fraction=0.2, test_fraction=0.2, seed=3)
    where = {i.series_uid: s for s in ("training", "validation", "test") for i in getattr(dl, s)}
    assert all(len(getattr(dl, s)) > 0 for s in ("training", "validation", "test"))
    for p in range(30):
        assert where[f"1.2.{p}.0"] == where[f"1.2.{p}.1"]
    assert read_datalist(path).training[0].image.startswith("images/")

    new = _scan(tmp_path, "1.2.99.0", "P99")
    replaced = _scan(tmp_path, "1.2.0.0", "P0", [Box.cube((1, 1, 1), 9.0)] * 2)
    dl2 = write_datalist(path, [new, replaced], val_fraction=0.2, test_fraction=0.2, seed=3, append=True)
    where2 = {i.series_uid: s for s in ("training", "validation", "test") for i in getattr(dl2, s)}
    assert len(where2) == 61 and all(where2[u] == where[u] for u in where)
    assert [len(i.box) for s in ("training", "validation", "test") for i in getattr(dl2, s)
            if i.series_uid == "1.2.0.0"] == [2]
    table = summary_table(dl2, [])
    assert table.splitlines()[-3].split()[:5] == ["total", "61", "1", "61", "0"]


def test_writer_refuses_invalid_boxes(tmp_path):
    bad = _scan(tmp_path, "1.2.3", "P", [Box((0.0, 0.0, 0.0), (5.0, 0.0, 5.0), 5.0)])
    with pytest.raises(ValueError):
        write_datalist(tmp_path / "d.json", [bad])
    assert not (tmp_path / "d.json").exists()

"""Report stage: SR, key images, presentation state, segmentation and KOS for a synthetic CT study,
checked as a PACS and dciodvfy would. The presentation state, SEG and KOS in detail: test_overlays.py."""
from __future__ import annotations

import copy
import shutil
import subprocess
from datetime import date
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from lungnode.inference.types import Detection, DetectionResult, ModelInfo, SliceRef, Volume
from lungnode.reports.build import build_results
from lungnode.reports.key_images import BOX_RGB, FOOTER_RGB

DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"
N_SLICES, SIZE = 20, 64
SPACING = (0.7, 0.7, 2.5)  # (i, j, k) mm
ORIGIN = (-22.4, -30.0, -100.0)
MODEL = ModelInfo(name="lungnode-retinanet", version="1.2.0", sha256="ab" * 32)


@pytest.fixture(scope="module")
def study():
    """20 axial 64x64 CT slice headers (LPS, head-first supine) and the matching Volume."""
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    headers, slices = [], []
    for k in range(N_SLICES):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientID, ds.PatientName = "LN-0001", "Test^Patient"
        ds.PatientBirthDate, ds.PatientSex = "19500101", "F"
        ds.AccessionNumber, ds.StudyID = "ACC123", "S1"
        ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "20240102", "101500", ""
        ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = "CT", "ACME", 3, k + 1
        ds.ImagePositionPatient = [ORIGIN[0], ORIGIN[1], ORIGIN[2] + k * SPACING[2]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [SPACING[1], SPACING[0]]
        ds.Rows = ds.Columns = SIZE
        ds.SamplesPerPixel = 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.WindowCenter, ds.WindowWidth = ["-600", "40"], ["1500", "400"]
        ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
        headers.append(ds)
        slices.append(SliceRef(ds.SOPInstanceUID, CTImageStorage, Path(f"/nonexistent/{k}.dcm"),
                               tuple(float(v) for v in ds.ImagePositionPatient)))
    hu = np.full((N_SLICES, SIZE, SIZE), -850, dtype=np.int16)  # lung parenchyma
    hu[:, :, :4] = 40  # a soft-tissue rim
    volume = Volume(hu=hu, spacing=SPACING, origin=ORIGIN, direction=np.eye(3), slices=slices,
                    study_instance_uid=study_uid, series_instance_uid=series_uid)
    return headers, volume


def _detection(volume: Volume, ijk: tuple[float, float, float], diameter: float, score: float) -> Detection:
    centre = volume.index_to_world(np.array(ijk))
    half = np.array([diameter / 2] * 3)
    lo, hi = centre - half, centre + half
    return Detection(tuple(centre), (*lo, *hi), diameter, score)


@pytest.fixture(scope="module")
def detections(study):
    _, volume = study
    return [
        _detection(volume, (20.0, 24.0, 6.0), 8.4, 0.91),
        _detection(volume, (44.0, 40.0, 13.0), 5.6, 0.47),
    ]


@pytest.fixture(scope="module")
def outputs(study, detections):
    headers, volume = study
    result = DetectionResult(volume.study_instance_uid, volume.series_instance_uid, MODEL, detections)
    return build_results(result, volume, headers[0], version=2, institution="General Hospital")


def _reread(ds: pydicom.Dataset) -> hd.sr.Comprehensive3DSR:
    """The SR as a receiver parses it after transfer (written as a DICOM file, then read back)."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return hd.sr.srread(buffer)


def _groups(sr: pydicom.Dataset) -> list:
    return _reread(sr).content.get_volumetric_roi_measurement_groups()


def _dciodvfy_errors(ds: pydicom.Dataset, tmp_path: Path) -> list[str]:
    if not Path(DCIODVFY).is_file():
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def by_kind(outputs: list[pydicom.Dataset]) -> tuple[pydicom.Dataset, list[pydicom.Dataset], pydicom.Dataset,
                                                      pydicom.Dataset]:
    """(SR, key images, presentation state, KOS), checking build_results' order: SR, SCs, PR, SEG (when
    made), KO. The SEG: `seg_of`."""
    sr, *key_images, gsps, kos = [ds for ds in outputs if ds.Modality != "SEG"]
    made = ["SR", *["OT"] * len(key_images), "PR"]
    assert [ds.Modality for ds in outputs] in ([*made, "KO"], [*made, "SEG", "KO"])
    return sr, key_images, gsps, kos


def seg_of(outputs: list[pydicom.Dataset]) -> pydicom.Dataset:
    """The segmentation, which build_results puts just before the KOS."""
    by_kind(outputs)
    assert outputs[-2].Modality == "SEG"
    return outputs[-2]


def test_outputs_go_into_the_source_study_as_new_versioned_series(study, outputs):
    headers, volume = study
    sr, key_images, gsps, kos = by_kind(outputs)
    seg = seg_of(outputs)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert gsps.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1"  # Grayscale Softcopy Presentation State
    assert kos.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert len(key_images) == 2
    for ds in outputs:
        assert ds.StudyInstanceUID == headers[0].StudyInstanceUID
        assert ds.PatientID == "LN-0001" and str(ds.PatientName) == "Test^Patient"
        assert ds.AccessionNumber == "ACC123" and str(ds.StudyDate) == "20240102"
        assert ds.SeriesInstanceUID != volume.series_instance_uid
        assert ds.InstitutionName == "General Hospital"
        assert str(ds.SeriesDate) == date.today().strftime("%Y%m%d"), "series dated when made"
    assert key_images[0].SeriesInstanceUID == key_images[1].SeriesInstanceUID
    assert len({ds.SeriesInstanceUID for ds in (sr, key_images[0], gsps, seg, kos)}) == 5, "one series per kind"
    assert [ds.SeriesNumber for ds in (sr, key_images[0], gsps, kos, seg)] == [9020, 9021, 9022, 9023, 9024]
    assert sr.SeriesDescription == "lungnode AI nodules v2"
    assert key_images[0].SeriesDescription == "lungnode AI key images v2"
    assert gsps.SeriesDescription == "lungnode AI nodule marks v2"
    assert kos.SeriesDescription == "lungnode AI key objects v2"
    assert seg.SeriesDescription == "lungnode AI nodule masks v2"
    assert len({ds.SOPInstanceUID for ds in outputs}) == 6


def test_reprocessing_gets_new_uids_and_a_higher_series_number(study, detections, outputs):
    headers, volume = study
    result = DetectionResult(volume.study_instance_uid, volume.series_instance_uid, MODEL, detections)
    again = build_results(result, volume, headers[0], version=3)
    for new, old in zip(again, outputs, strict=True):
        assert new.SeriesInstanceUID != old.SeriesInstanceUID and new.SOPInstanceUID != old.SOPInstanceUID
        assert new.SeriesNumber == old.SeriesNumber + 10
    assert again[0].SeriesDescription == "lungnode AI nodules v3"
    assert np.array_equal(again[1].pixel_array, outputs[1].pixel_array)  # deterministic pixels


def test_sr_has_one_finding_per_detection_with_centre_diameter_and_score(study, detections, outputs):
    headers, volume = study
    sr = outputs[0]
    groups = _groups(sr)
    assert len(groups) == 2
    for group, det, label in zip(groups, detections, ("N1", "N2")):
        assert group.tracking_identifier == label
        assert group.tracking_uid
        assert group.finding_type == codes.SCT.Nodule
        assert [site.value for site in group.finding_sites] == [codes.SCT.Lung]
        surface = group.roi
        assert surface.graphic_type == hd.sr.GraphicTypeValues3D.POINT
        assert surface.frame_of_reference_uid == headers[0].FrameOfReferenceUID
        np.testing.assert_allclose(surface.graphic_data[0], det.center_mm, atol=1e-3)
        (diameter,) = group.get_measurements(name=codes.SCT.Diameter)
        assert diameter.value == pytest.approx(det.diameter_mm) and diameter.unit == codes.UCUM.Millimeter
        (score,) = group.get_measurements(name=codes.DCM.CertaintyOfFinding)
        assert score.value == pytest.approx(det.score)
    assert len({g.tracking_uid for g in groups}) == 2


def test_sr_references_the_centre_slices_of_the_source_series(study, detections, outputs):
    headers, volume = study
    sr = outputs[0]
    by_uid = {s.sop_instance_uid: k for k, s in enumerate(volume.slices)}
    referenced = []
    for group in _groups(sr):
        (image,) = group.roi.source_images_for_segmentation
        referenced.append(image.referenced_sop_instance_uid)
    assert [by_uid.get(uid) for uid in referenced] == [6, 13]
    evidence = {uid for _, _, uid, _ in _reread(sr).get_evidence()}
    assert set(referenced) <= evidence <= set(by_uid)


def _diameter_circles(sr: pydicom.Dataset) -> list:
    """Per TID 1501 group: (tracking UID, the diameter's 2D coordinates), as a receiver reads them."""
    out = []
    for group in _reread(sr).content.get_image_measurement_groups():
        (diameter,) = group.get_measurements(name=codes.SCT.Diameter)
        (coords,) = diameter.referenced_coordinates
        out.append((group.tracking_uid, group.tracking_identifier, diameter.value, coords))
    return out


def test_sr_draws_each_finding_as_a_circle_on_its_centre_slice(study, detections, outputs):
    """Viewers that only read image coordinates get a circle on the source slice through each centre,
    tied to the 3D finding by tracking UID."""
    headers, _ = study
    sr = outputs[0]
    volumetric = {g.tracking_uid: g.tracking_identifier for g in _groups(sr)}
    circles = _diameter_circles(sr)
    assert len(circles) == len(detections)
    for (uid, label, value, coords), det, number in zip(circles, detections, (1, 2)):
        assert volumetric[uid] == label == f"N{number}"
        assert value == pytest.approx(det.diameter_mm)
        assert coords.graphic_type == hd.sr.GraphicTypeValues.CIRCLE
        image = coords.ContentSequence[0].ReferencedSOPSequence[0]
        header = nearest_slice(headers, det.center_mm)
        assert image.ReferencedSOPInstanceUID == header.SOPInstanceUID
        centre, edge = np.asarray(coords.value)
        np.testing.assert_allclose(centre, pixel_of(header, det.center_mm), atol=1.0)
        assert np.linalg.norm(edge - centre) * float(header.PixelSpacing[1]) == pytest.approx(det.diameter_mm / 2)


def test_sr_is_unverified_and_names_the_algorithm(outputs):
    sr = outputs[0]
    assert sr.VerificationFlag == "UNVERIFIED"
    texts = {(item.ConceptNameCodeSequence[0].CodeMeaning, item.TextValue)
             for item in _walk(sr) if item.ValueType == "TEXT"}
    assert ("Algorithm Name", MODEL.name) in texts and ("Algorithm Version", MODEL.version) in texts


def nearest_slice(headers: list[pydicom.Dataset], point_mm) -> pydicom.Dataset:
    """The source image whose plane is nearest to a world point (from the headers, not the Volume)."""
    return min(headers, key=lambda h: abs(float(h.ImagePositionPatient[2]) - point_mm[2]))


def pixel_of(header: pydicom.Dataset, point_mm) -> np.ndarray:
    """(column, row) DICOM image coordinates of a world point on an axial image (pixel centres at +0.5)."""
    offset = np.asarray(point_mm, float) - np.asarray(header.ImagePositionPatient, float)
    orientation = np.asarray(header.ImageOrientationPatient, float)
    row_dir, col_dir = orientation[:3], orientation[3:]
    spacing_row, spacing_col = (float(v) for v in header.PixelSpacing)
    return np.array([offset @ row_dir / spacing_col + 0.5, offset @ col_dir / spacing_row + 0.5])


def test_sr_observer_is_the_algorithm(outputs):
    observer = _reread(outputs[0]).content.get_observer_contexts()[0]
    assert observer.observer_type == codes.DCM.Device
    attributes = observer.observer_identifying_attributes
    assert attributes.model_name == MODEL.name and MODEL.version in attributes.name


def test_key_image_shows_lung_window_box_and_references_its_slice(study, detections, outputs):
    _, volume = study
    key = outputs[1]
    pixels = key.pixel_array
    assert key.PhotometricInterpretation == "RGB" and pixels.shape == (key.Rows, key.Columns, 3)
    centre_slice = volume.slices[6].sop_instance_uid
    assert [r.ReferencedSOPInstanceUID for r in key.SourceImageSequence] == [centre_slice]
    assert key.BurnedInAnnotation == "YES"
    scale = key.Columns // SIZE
    # N1's box spans voxels 20 +- 6 (8.4 mm / 0.7 mm / 2) in i and 24 +- 6 in j. On the centre row the
    # outline sits just outside each box edge (a few pixels of gap), the box itself shows lung.
    row = pixels[int((24 + 0.5) * scale)]
    # (continuous voxel index v lies at pixel column (v + 0.5) * scale: voxel centres)
    left_edge, right_edge = int((20 - 6 + 0.5) * scale), int((20 + 6 + 0.5) * scale)
    lung = round((-850 + 1350) / 1500 * 255)
    assert (row[left_edge:right_edge] == lung).all(), "nothing drawn over the nodule"
    outside_left, outside_right = row[left_edge - 8:left_edge], row[right_edge:right_edge + 8]
    assert (outside_left == BOX_RGB).all(axis=-1).any() and (outside_right == BOX_RGB).all(axis=-1).any()
    assert not (pixels[: int(10 * scale)] == BOX_RGB).all(axis=-1).any(), "no outline far above the box"
    rim = round((40 + 1350) / 1500 * 255)  # soft tissue, lung window -1350..150 HU
    assert tuple(row[0]) == (rim, rim, rim)
    assert list(key.PatientOrientation) == ["L", "P"]
    footer = pixels[-key.Rows // 16:]
    assert (footer == FOOTER_RGB).all(axis=-1).any(), "the disclaimer footer is burned in"


@pytest.mark.parametrize("index", [0, 1, 2, 3, 4, 5])  # SR, key image x 2, presentation state, SEG, KOS
def test_outputs_pass_dciodvfy(outputs, index, tmp_path):
    assert _dciodvfy_errors(outputs[index], tmp_path) == []


def test_not_processed_study_gets_an_sr_saying_why(study, tmp_path):
    headers, _ = study
    reason = "series 2 (Thorax \u2013 Lunge nativ): slice spacing 5.0 mm > 3.0 mm"  # not in ISO_IR 100
    result = DetectionResult(headers[0].StudyInstanceUID, None, MODEL, [], not_processed_reason=reason)
    outputs = build_results(result, None, headers[0])
    assert len(outputs) == 1, "nothing to mark or flag: no presentation state, no KOS"
    sr = outputs[0]
    assert sr.StudyInstanceUID == headers[0].StudyInstanceUID and sr.AccessionNumber == "ACC123"
    texts = [item.TextValue for item in _walk(_reread(sr)) if item.ValueType == "TEXT"]
    assert any(reason in t and "Not processed" in t for t in texts)
    assert not _groups(sr)
    assert _dciodvfy_errors(sr, tmp_path) == []


def test_study_without_nodules_gets_an_sr_saying_so(study, tmp_path):
    headers, volume = study
    result = DetectionResult(volume.study_instance_uid, volume.series_instance_uid, MODEL, [])
    outputs = build_results(result, volume, headers[0])
    assert len(outputs) == 1, "nothing to mark or flag: no presentation state, no SEG, no KOS"
    sr = outputs[0]
    assert sr.VerificationFlag == "UNVERIFIED"
    codes_found = [(item.ConceptNameCodeSequence[0].CodeValue, item.ConceptCodeSequence[0].CodeValue)
                   for item in _walk(sr) if item.ValueType == "CODE"]
    assert (codes.SCT.Nodule.value, codes.SCT.Absent.value) in codes_found
    assert not _groups(sr)
    assert _dciodvfy_errors(sr, tmp_path) == []


def test_source_without_optional_study_attributes_still_gives_valid_objects(study, detections, tmp_path):
    """Anonymised sources (like LIDC) lack StudyID/AccessionNumber; the objects keep them empty."""
    headers, volume = study
    source = copy.deepcopy(headers[0])  # Dataset.copy() shares the elements
    del source.StudyID, source.AccessionNumber, source.PatientBirthDate
    result = DetectionResult(volume.study_instance_uid, volume.series_instance_uid, MODEL, detections[:1])
    objects = build_results(result, volume, source)
    assert [ds.Modality for ds in objects] == ["SR", "OT", "PR", "SEG", "KO"]
    for ds in objects:
        assert "AccessionNumber" in ds and not ds.AccessionNumber and ds.PatientID == "LN-0001"
        assert _dciodvfy_errors(ds, tmp_path) == []


def test_result_for_another_study_is_refused(study, detections):
    headers, volume = study
    result = DetectionResult(generate_uid(), volume.series_instance_uid, MODEL, detections)
    with pytest.raises(ValueError, match="study"):
        build_results(result, volume, headers[0])


def _walk(ds: pydicom.Dataset):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _walk(item)

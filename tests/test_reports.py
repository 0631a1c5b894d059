"""Report stage: SR + key images for a synthetic CT study, checked as a PACS and dciodvfy would."""
from __future__ import annotations

import shutil
import subprocess
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


def test_outputs_go_into_the_source_study_as_new_versioned_series(study, outputs):
    headers, volume = study
    sr, *key_images = outputs
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert len(key_images) == 2
    for ds in outputs:
        assert ds.StudyInstanceUID == headers[0].StudyInstanceUID
        assert ds.PatientID == "LN-0001" and str(ds.PatientName) == "Test^Patient"
        assert ds.AccessionNumber == "ACC123" and str(ds.StudyDate) == "20240102"
        assert ds.SeriesInstanceUID != volume.series_instance_uid
        assert ds.InstitutionName == "General Hospital"
    assert sr.SeriesInstanceUID != key_images[0].SeriesInstanceUID
    assert key_images[0].SeriesInstanceUID == key_images[1].SeriesInstanceUID
    assert sr.SeriesDescription == "lungnode AI nodules v2"
    assert key_images[0].SeriesDescription == "lungnode AI key images v2"
    assert len({ds.SOPInstanceUID for ds in outputs}) == 3


def test_reprocessing_gets_new_uids_and_a_higher_series_number(study, detections, outputs):
    headers, volume = study
    result = DetectionResult(volume.study_instance_uid, volume.series_instance_uid, MODEL, detections)
    again = build_results(result, volume, headers[0], version=3)
    assert again[0].SeriesInstanceUID != outputs[0].SeriesInstanceUID
    assert again[1].SeriesInstanceUID != outputs[1].SeriesInstanceUID
    assert again[0].SeriesNumber > outputs[0].SeriesNumber
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


@pytest.mark.parametrize("index", [0, 1, 2])
def test_outputs_pass_dciodvfy(outputs, index, tmp_path):
    assert _dciodvfy_errors(outputs[index], tmp_path) == []


def test_not_processed_study_gets_an_sr_saying_why(study, tmp_path):
    headers, _ = study
    reason = "series 2 (Thorax \u2013 Lunge nativ): slice spacing 5.0 mm > 3.0 mm"  # not in ISO_IR 100
    result = DetectionResult(headers[0].StudyInstanceUID, None, MODEL, [], not_processed_reason=reason)
    outputs = build_results(result, None, headers[0])
    assert len(outputs) == 1
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
    assert len(outputs) == 1
    sr = outputs[0]
    codes_found = [(item.ConceptNameCodeSequence[0].CodeValue, item.ConceptCodeSequence[0].CodeValue)
                   for item in _walk(sr) if item.ValueType == "CODE"]
    assert (codes.SCT.Nodule.value, codes.SCT.Absent.value) in codes_found
    assert not _groups(sr)
    assert _dciodvfy_errors(sr, tmp_path) == []


def test_source_without_optional_study_attributes_still_gives_valid_objects(study, detections, tmp_path):
    """Anonymised sources (like LIDC) lack StudyID/AccessionNumber; the objects keep them empty."""
    headers, volume = study
    source = headers[0].copy()
    del source.StudyID, source.AccessionNumber, source.PatientBirthDate
    result = DetectionResult(volume.study_instance_uid, volume.series_instance_uid, MODEL, detections[:1])
    sr, key = build_results(result, volume, source)
    for ds in (sr, key):
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

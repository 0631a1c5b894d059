"""The presentation state (AI marks over the original slices), the segmentation (nodule masks) and the
KOS, checked as a viewer reads them: which image each mark or mask frame is on, where, how big, with
what label, and that the display is the series' own."""
from __future__ import annotations

import copy
import dataclasses
import logging
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import EnhancedCTImageStorage, generate_uid

from lungnode.inference.types import DetectionResult, SliceRef
from lungnode.reports.build import build_results
from tests.test_reports import (  # noqa: F401 (fixtures)
    MODEL,
    N_SLICES,
    SIZE,
    _detection,
    _dciodvfy_errors,
    by_kind,
    detections,
    nearest_slice,
    outputs,
    pixel_of,
    seg_of,
    study,
)


def marks(gsps: pydicom.Dataset) -> list[tuple[str, np.ndarray, str, tuple, str]]:
    """Per annotation: (referenced SOP instance, circle points, label, label box, layer)."""
    out = []
    for annotation in gsps.GraphicAnnotationSequence:
        (image,) = annotation.ReferencedImageSequence
        (circle,) = annotation.GraphicObjectSequence
        (text,) = annotation.TextObjectSequence
        assert circle.GraphicType == "CIRCLE" and circle.GraphicAnnotationUnits == "PIXEL"
        assert text.BoundingBoxAnnotationUnits == "PIXEL"
        box = (*text.BoundingBoxTopLeftHandCorner, *text.BoundingBoxBottomRightHandCorner)
        out.append((image.ReferencedSOPInstanceUID, np.reshape(circle.GraphicData, (-1, 2)),
                    text.UnformattedTextValue, box, annotation.GraphicLayer))
    return out


def test_each_nodule_is_circled_and_labelled_on_the_slice_through_its_centre(study, detections, outputs):
    headers, _ = study
    _, _, gsps, _ = by_kind(outputs)
    found = marks(gsps)
    assert len(found) == len(detections)
    for (uid, circle, label, box, layer), det in zip(found, detections):
        header = nearest_slice(headers, det.center_mm)
        assert uid == header.SOPInstanceUID
        centre, edge = circle
        np.testing.assert_allclose(centre, pixel_of(header, det.center_mm), atol=1.0)
        radius_mm = np.linalg.norm(edge - centre) * float(header.PixelSpacing[1])
        assert radius_mm == pytest.approx(det.diameter_mm / 2)
        assert layer == "LUNGNODE_AI"
        left, top, right, bottom = box
        assert bottom <= centre[1] - np.linalg.norm(edge - centre), "the label sits above the circle"
        assert left <= centre[0] <= right and 0 <= left and right <= SIZE
    assert [m[2] for m in found] == ["N1 8.4 mm 0.91", "N2 5.6 mm 0.47"]
    assert [layer.GraphicLayer for layer in gsps.GraphicLayerSequence] == ["LUNGNODE_AI"]


def test_marks_carry_the_sr_tracking_identifiers(outputs):
    sr, _, gsps, _ = by_kind(outputs)
    sr_tracking = {}
    for item in sr.ContentSequence[-1].ContentSequence:  # Imaging Measurements > groups
        ids = {c.ConceptNameCodeSequence[0].CodeMeaning: c.get("TextValue", c.get("UID"))
               for c in item.ContentSequence if c.ValueType in ("TEXT", "UIDREF")}
        sr_tracking[ids["Tracking Unique Identifier"]] = ids["Tracking Identifier"]
    for annotation in gsps.GraphicAnnotationSequence:
        for obj in (*annotation.GraphicObjectSequence, *annotation.TextObjectSequence):
            assert sr_tracking[obj.TrackingUID] == obj.TrackingID


def test_state_covers_the_whole_series_with_its_own_window(study, outputs):
    """Applying the state keeps the series' display: every slice referenced, its rescale and windows."""
    headers, volume = study
    _, _, gsps, _ = by_kind(outputs)
    (series,) = gsps.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == volume.series_instance_uid
    assert [r.ReferencedSOPInstanceUID for r in series.ReferencedImageSequence] == [h.SOPInstanceUID for h in headers]
    (voi,) = gsps.SoftcopyVOILUTSequence
    assert [float(v) for v in voi.WindowCenter] == [-600, 40] and [float(v) for v in voi.WindowWidth] == [1500, 400]
    assert list(voi.WindowCenterWidthExplanation) == ["LUNG", "MEDIASTINUM"]
    assert float(gsps.RescaleIntercept) == -1024 and float(gsps.RescaleSlope) == 1 and gsps.RescaleType == "HU"
    assert gsps.ContentLabel == "LUNGNODE_AI" and gsps.PresentationLUTShape == "IDENTITY"


def test_series_without_a_window_is_shown_in_a_lung_window(study, detections, tmp_path):
    headers, volume = study
    source = copy.deepcopy(headers[0])
    del source.WindowCenter, source.WindowWidth, source.WindowCenterWidthExplanation
    result = DetectionResult(volume.study_instance_uid, volume.series_instance_uid, MODEL, detections[:1])
    _, _, gsps, _ = by_kind(build_results(result, volume, source))
    (voi,) = gsps.SoftcopyVOILUTSequence
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (-600, 1500)
    assert _dciodvfy_errors(gsps, tmp_path) == []


def test_marks_near_the_image_edge_stay_inside_it(study, tmp_path):
    """A nodule at the top right corner: the circle's second point and the label box stay in the image
    (the label goes below the circle), so the state is valid and the mark is drawn."""
    headers, volume = study
    corner = _detection(volume, (SIZE - 3.0, 2.0, 9.0), 7.0, 0.88)
    result = DetectionResult(volume.study_instance_uid, volume.series_instance_uid, MODEL, [corner])
    _, _, gsps, _ = by_kind(build_results(result, volume, headers[0]))
    ((uid, circle, label, box, _),) = marks(gsps)
    assert uid == nearest_slice(headers, corner.center_mm).SOPInstanceUID
    assert (circle >= 0).all() and (circle <= SIZE).all()
    centre, edge = circle
    assert edge[0] < centre[0] and np.linalg.norm(edge - centre) * 0.7 == pytest.approx(3.5)
    left, top, right, bottom = box
    assert 0 <= left < right <= SIZE and top >= centre[1] + np.linalg.norm(edge - centre) and bottom <= SIZE
    assert label == "N1 7.0 mm 0.88"
    assert _dciodvfy_errors(gsps, tmp_path) == []


def test_kos_flags_the_centre_slices_shown_with_the_marks_and_the_results(study, detections, outputs):
    headers, _ = study
    sr, key_images, gsps, kos = by_kind(outputs)
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113000"  # "Of Interest"
    assert kos.ContentTemplateSequence[0].TemplateIdentifier == "2010"
    refs = [item for item in kos.ContentSequence if item.ValueType in ("IMAGE", "COMPOSITE")]
    referenced = [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in refs]
    centre_slices = [nearest_slice(headers, d.center_mm).SOPInstanceUID for d in detections]
    seg = seg_of(outputs)
    expected = [*centre_slices, sr.SOPInstanceUID, gsps.SOPInstanceUID, seg.SOPInstanceUID,
                *(k.SOPInstanceUID for k in key_images)]
    assert referenced == expected
    for item in refs[: len(centre_slices)]:
        (state,) = item.ReferencedSOPSequence[0].ReferencedSOPSequence
        assert state.ReferencedSOPInstanceUID == gsps.SOPInstanceUID, "each key slice opens with the marks"
    evidence = {ref.ReferencedSOPInstanceUID
                for study_item in kos.CurrentRequestedProcedureEvidenceSequence
                for series in study_item.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert evidence == set(expected)
    observer = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in kos.ContentSequence}
    assert observer["Device Observer Model Name"].TextValue == MODEL.name


def test_enhanced_ct_marks_and_key_slices_name_their_frame(study, detections, tmp_path, caplog):
    """One multi-frame Enhanced CT instance: the marks, the SR circles and the KOS point at the frame
    through each centre, and the rescale/window come from the shared functional groups. No SEG (its
    frames cannot be matched to the source frames), and the log says why."""
    headers, volume = study
    uid = generate_uid()
    source = copy.deepcopy(headers[0])
    source.SOPClassUID, source.SOPInstanceUID, source.NumberOfFrames = EnhancedCTImageStorage, uid, N_SLICES
    for keyword in ("RescaleIntercept", "RescaleSlope", "RescaleType", "WindowCenter", "WindowWidth",
                    "WindowCenterWidthExplanation", "ImagePositionPatient"):
        delattr(source, keyword)
    rescale, window, shared = pydicom.Dataset(), pydicom.Dataset(), pydicom.Dataset()
    rescale.RescaleIntercept, rescale.RescaleSlope, rescale.RescaleType = "-1024", "1", "HU"
    window.WindowCenter, window.WindowWidth = "-500", "1400"
    shared.PixelValueTransformationSequence, shared.FrameVOILUTSequence = [rescale], [window]
    source.SharedFunctionalGroupsSequence = [shared]
    frames = [SliceRef(uid, EnhancedCTImageStorage, Path("/nonexistent/enhanced.dcm"), s.position_mm,
                       frame_number=k + 1) for k, s in enumerate(volume.slices)]
    enhanced = dataclasses.replace(volume, slices=frames)
    result = DetectionResult(volume.study_instance_uid, volume.series_instance_uid, MODEL, detections)
    with caplog.at_level(logging.INFO, logger="lungnode.reports.seg"):
        objects = build_results(result, enhanced, source)
    sr, _, gsps, kos = by_kind(objects)
    assert "SEG" not in [ds.Modality for ds in objects]
    assert f"no SEG for series {volume.series_instance_uid}: multi-frame (Enhanced CT)" in caplog.text
    centre_frames = [int(nearest_slice(headers, d.center_mm).InstanceNumber) for d in detections]
    assert [int(a.ReferencedImageSequence[0].ReferencedFrameNumber) for a in gsps.GraphicAnnotationSequence] \
        == centre_frames
    key_slices = [i for i in kos.ContentSequence if i.ValueType == "IMAGE"][: len(detections)]
    assert [int(i.ReferencedSOPSequence[0].ReferencedFrameNumber) for i in key_slices] == centre_frames
    (voi,) = gsps.SoftcopyVOILUTSequence
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (-500, 1400) and float(gsps.RescaleIntercept) == -1024
    for ds in objects:
        assert _dciodvfy_errors(ds, tmp_path) == [], ds.Modality


def _reread_seg(seg: pydicom.Dataset) -> pydicom.Dataset:
    """The SEG as a viewer gets it: written as a DICOM file, read back."""
    buffer = BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def _segment_voxels(seg: pydicom.Dataset) -> dict[int, np.ndarray]:
    """Per segment number, the world (LPS mm) centres of its set pixels, placed through the SEG's own
    per-frame plane positions and its shared orientation and pixel spacing."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    row_dir, col_dir = orientation[:3], orientation[3:]
    spacing_row, spacing_col = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    out: dict[int, list] = {}
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        origin = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        rows, columns = np.nonzero(frame)
        out.setdefault(number, []).append(
            origin + np.outer(columns * spacing_col, row_dir) + np.outer(rows * spacing_row, col_dir))
    return {number: np.concatenate(points) for number, points in out.items()}


def test_seg_masks_are_spheres_of_the_detected_size_at_the_detected_centres(study, detections, outputs):
    _, volume = study
    seg = _reread_seg(seg_of(outputs))
    assert seg.SegmentationType == "BINARY"
    voxels = _segment_voxels(seg)
    assert sorted(voxels) == [1, 2]
    spacing = np.asarray(volume.spacing)  # (x, y, z) here: the study is axial, LPS-aligned
    for number, det in enumerate(detections, start=1):
        points = voxels[number]
        assert np.all(np.abs(points.mean(axis=0) - det.center_mm) <= spacing), f"N{number} centroid"
        extent = np.ptp(points, axis=0) + spacing  # voxel centres -> voxel edges
        assert np.all(np.abs(extent - det.diameter_mm) <= 2 * spacing), f"N{number} extent {extent}"
        assert np.all(np.linalg.norm(points - det.center_mm, axis=1) <= det.diameter_mm / 2), "inside the ball"


def test_seg_stores_only_nodule_frames_each_naming_its_ct_slice(study, detections, outputs):
    headers, _ = study
    seg = _reread_seg(seg_of(outputs))
    by_position = {tuple(round(float(v), 3) for v in h.ImagePositionPatient): h.SOPInstanceUID for h in headers}
    frames = seg.PerFrameFunctionalGroupsSequence
    assert 0 < len(frames) < 2 * len(headers), "only frames that hold a nodule"
    for item in frames:
        position = tuple(round(float(v), 3) for v in item.PlanePositionSequence[0].ImagePositionPatient)
        (source,) = item.DerivationImageSequence[0].SourceImageSequence
        assert source.ReferencedSOPInstanceUID == by_position[position]
    for number, det in enumerate(detections, start=1):
        centre_frames = [i.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                         for i in frames if i.SegmentIdentificationSequence[0].ReferencedSegmentNumber == number]
        assert nearest_slice(headers, det.center_mm).SOPInstanceUID in centre_frames
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == headers[0].SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in series.ReferencedInstanceSequence} == set(by_position.values())
    assert seg.FrameOfReferenceUID == headers[0].FrameOfReferenceUID


def test_seg_segments_are_the_sr_findings_by_the_algorithm(outputs):
    sr, _, _, _ = by_kind(outputs)
    seg = seg_of(outputs)
    sr_tracking = {}
    for item in sr.ContentSequence[-1].ContentSequence:  # Imaging Measurements > groups
        ids = {c.ConceptNameCodeSequence[0].CodeMeaning: c.get("TextValue", c.get("UID"))
               for c in item.ContentSequence if c.ValueType in ("TEXT", "UIDREF")}
        sr_tracking[ids["Tracking Identifier"]] = ids["Tracking Unique Identifier"]
    segments = seg.SegmentSequence
    assert [(int(s.SegmentNumber), s.SegmentLabel) for s in segments] == [(1, "N1"), (2, "N2")]
    for segment in segments:
        assert sr_tracking[segment.TrackingID] == segment.TrackingUID
        assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"  # Morph. abnormal structure
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "27925004"  # Nodule
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (MODEL.name, MODEL.version)
        assert algorithm.AlgorithmSource == "lungnode"
    assert seg.Manufacturer == "lungnode" and seg.ManufacturerModelName == MODEL.name

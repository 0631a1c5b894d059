"""The whole path with real parts: a real Orthanc routes a CT study to a real `lungnode serve` process,
which sends SR, key images, the presentation state with the AI marks, the SEG with the nodule masks and
the KOS back into the same Orthanc study."""
from __future__ import annotations

import io
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests

from lungnode.peers import PEER_ENV, NodeProcess, OrthancServer, free_port, wait_for
from lungnode.training.froc import load_luna16_csv
from tests.conftest import lidc_series, need_tool, shared_data

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASSES = {"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.4"}
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"  # Grayscale Softcopy Presentation State
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
# What dciodvfy prints first when it recognised the IOD of each result class.
IOD_NAMES = {SR_CLASS: "Comprehensive3DSR", GSPS_CLASS: "GrayscaleSoftcopyPresentationState",
             KOS_CLASS: "KeyObjectSelectionDocument", SEG_CLASS: "Segmentation", **{c: "SCImage" for c in SC_CLASSES}}


def content_items(ds, value_type: str):
    """Every content item of one value type in an SR tree."""
    for item in ds.get("ContentSequence", []):
        if item.ValueType == value_type:
            yield item
        yield from content_items(item, value_type)


def sr_points(sr) -> list[np.ndarray]:
    return [np.array(i.GraphicData, dtype=float) for i in content_items(sr, "SCOORD3D") if i.GraphicType == "POINT"]


def dciodvfy_errors(ds) -> list[str]:
    tool = need_tool("dciodvfy")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "object.dcm"
        ds.save_as(path, enforce_file_format=True)
        out = subprocess.run([tool, str(path)], capture_output=True, text=True)
    assert IOD_NAMES[ds.SOPClassUID] in out.stderr + out.stdout, out.stderr  # it recognised the IOD
    return [ln for ln in (out.stderr + out.stdout).splitlines() if ln.startswith("Error")]


@pytest.fixture(scope="module")
def pacs_and_node(tmp_path_factory):
    need_tool("Orthanc")
    work = tmp_path_factory.mktemp("e2e")
    node_port = free_port()
    orthanc = OrthancServer(work / "orthanc", modalities={"lungnode": ("LUNGNODE", "127.0.0.1", node_port)})
    orthanc.start()
    node = NodeProcess(work / "node", stable_seconds=2, pacs=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
                       orthanc_url=orthanc.url, allowed_callers="ORTHANC,STORESCU", send_retry_first_seconds=1)
    node.dicom_port = node_port
    node.env["LUNGNODE_DICOM_PORT"] = str(node_port)
    node.start()
    yield orthanc, node
    node.stop()
    orthanc.stop()


def phantom_study(tmp_path: Path, seed: int, patient_id: str):
    from lungnode.training.synth import make_phantom, write_dicom_series

    phantom = make_phantom(seed, spacing=(0.703125, 0.703125, 2.5), field_of_view_mm=(360.0, 360.0, 200.0),
                           n_nodules=(2, 3), diameter_range_mm=(8.0, 20.0))
    files = write_dicom_series(phantom, tmp_path / patient_id, patient_id=patient_id, accession_number=f"ACC-{seed}")
    return phantom, files


def wait_done(node: NodeProcess, study_uid: str, version: int = 1, timeout: float = 600) -> dict:
    def delivered() -> bool:
        s = node.study(study_uid)
        return bool(s and s["version"] >= version and s["state"] in ("done", "not_processed") and s["deliveries"]
                    and s["deliveries"][-1]["state"] == "sent")
    wait_for(delivered, timeout, f"study {study_uid} to be processed and delivered", interval=0.5)
    return node.study(study_uid)


def objects_by_class(orthanc: OrthancServer, study_uid: str) -> dict[str, list]:
    """Every instance of the Orthanc study, parsed, by SOP class."""
    found: dict[str, list] = {}
    for series in orthanc.series_of_study(study_uid):
        for raw in orthanc.instance_files(series):
            ds = pydicom.dcmread(io.BytesIO(raw))
            found.setdefault(str(ds.SOPClassUID), []).append(ds)
    return found


def result_objects(orthanc: OrthancServer, study_uid: str) -> tuple[list, list]:
    found = objects_by_class(orthanc, study_uid)
    return found.get(SR_CLASS, []), [ds for c in sorted(SC_CLASSES) for ds in found.get(c, [])]


def result_counts(orthanc: OrthancServer, study_uid: str) -> tuple[int, int, int, int]:
    """How many SRs, presentation states, SEGs and KOS the study holds (a replaced run leaves one each)."""
    found = objects_by_class(orthanc, study_uid)
    return tuple(len(found.get(c, [])) for c in (SR_CLASS, GSPS_CLASS, SEG_CLASS, KOS_CLASS))


def sr_centres_by_tracking_uid(sr) -> dict[str, np.ndarray]:
    """The 3D centre of each SR finding (TID 1411 group), keyed by its tracking UID."""
    centres = {}
    for group in content_items(sr, "CONTAINER"):
        items = group.get("ContentSequence", [])
        uid = next((i.UID for i in items if i.ValueType == "UIDREF"), None)
        point = next((i for i in items if i.ValueType == "SCOORD3D" and i.GraphicType == "POINT"), None)
        if uid and point is not None:
            centres[uid] = np.array(point.GraphicData, dtype=float)
    return centres


def pixel_to_world(image, column: float, row: float) -> np.ndarray:
    """DICOM image coordinates (pixel centres at +0.5) on a single-frame image -> LPS mm."""
    orientation = np.array(image.ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in image.PixelSpacing)
    return (np.array(image.ImagePositionPatient, dtype=float) + (column - 0.5) * column_spacing * orientation[:3]
            + (row - 0.5) * row_spacing * orientation[3:])


def assert_marks_on_found_nodules(phantom, sr, gsps, cts: list, slice_mm: float) -> None:
    """Each presentation-state circle lies on a source image in the PACS that passes through its SR
    finding's centre (z within half a slice), and every phantom nodule the SR found has a circle whose
    centre, taken back to world coordinates through that image's own geometry, is inside the nodule."""
    images = {ct.SOPInstanceUID: ct for ct in cts}
    centres = sr_centres_by_tracking_uid(sr)
    marks = []
    for annotation in gsps.GraphicAnnotationSequence:
        (ref,) = annotation.ReferencedImageSequence
        image = images[ref.ReferencedSOPInstanceUID]  # KeyError: the mark is not on a CT image of the study
        (circle,) = annotation.GraphicObjectSequence
        centre = centres[circle.TrackingUID]
        assert abs(float(image.ImagePositionPatient[2]) - centre[2]) <= slice_mm / 2 + 1e-3
        column, row = circle.GraphicData[:2]
        marks.append(pixel_to_world(image, column, row))
    assert len(marks) == len(centres)
    for nodule in phantom.nodules:
        if min(np.linalg.norm(p - np.array(nodule.center_mm)) for p in centres.values()) < nodule.diameter_mm / 2:
            distance = min(np.linalg.norm(m - np.array(nodule.center_mm)) for m in marks)
            assert distance < nodule.diameter_mm / 2, f"no mark inside the found nodule at {nodule.center_mm}"


def assert_seg_segments_are_the_sr_findings_on_study_slices(seg, sr, cts: list) -> None:
    """One segment per SR finding with its tracking UID, and every mask frame names a CT image of the
    study in the PACS lying at the frame's own position."""
    centres = sr_centres_by_tracking_uid(sr)
    assert sorted(s.TrackingUID for s in seg.SegmentSequence) == sorted(centres)
    images = {ct.SOPInstanceUID: ct for ct in cts}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        (source,) = frame.DerivationImageSequence[0].SourceImageSequence
        image = images[source.ReferencedSOPInstanceUID]  # KeyError: the frame is not on a CT image of the study
        np.testing.assert_allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in image.ImagePositionPatient], atol=1e-3)


def assert_kos_flags_objects_of_the_study(kos, found: dict[str, list]) -> None:
    in_study = {ds.SOPInstanceUID for objects in found.values() for ds in objects}
    referenced = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in content_items(kos, "IMAGE")]
    referenced += [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in content_items(kos, "COMPOSITE")]
    assert referenced and set(referenced) <= in_study, "the KOS flags objects that are in the PACS study"
    (gsps,), (seg,) = found[GSPS_CLASS], found[SEG_CLASS]
    assert gsps.SOPInstanceUID in referenced and found[SR_CLASS][0].SOPInstanceUID in referenced
    assert seg.SOPInstanceUID in referenced


def assert_finds(phantom, sr) -> None:
    """The SR's findings land on the phantom's nodules (a centre within the radius). The shipped model
    finds 25 of the 29 nodules of twelve phantoms made like these at its threshold (seeds 90001-90012,
    8-20 mm; it misses a 13 mm juxtapleural one of seed 90001's two), not all, so at least half of each
    study's nodules must be found here; the misses are printed."""
    points = sr_points(sr)
    found = []
    for nodule in phantom.nodules:
        d = [np.linalg.norm(p - np.array(nodule.center_mm)) for p in points]
        hit = bool(d) and min(d) < nodule.diameter_mm / 2
        found.append(hit)
        if not hit:
            print(f"missed: {nodule.diameter_mm:.1f} mm {nodule.kind} nodule at {nodule.center_mm}")
    assert sum(found) >= max(1, (len(found) + 1) // 2), f"{sum(found)}/{len(found)} nodules found; SR points {points}"


def test_orthanc_routed_phantom_study_comes_back_with_sr_key_images_and_marks(pacs_and_node, tmp_path):
    orthanc, node = pacs_and_node
    phantom, files = phantom_study(tmp_path, 90001, "E2E-ORTHANC")
    (study_id,) = orthanc.upload(files)
    study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
    orthanc.send_to_modality("lungnode", study_id)  # what the PACS routing rule does
    state = wait_done(node, study_uid)
    assert state["state"] == "done", state
    found = objects_by_class(orthanc, study_uid)
    srs, scs = result_objects(orthanc, study_uid)
    assert len(srs) == 1, "one SR in the same Orthanc study"
    sr = srs[0]
    assert sr.StudyInstanceUID == study_uid and sr.PatientID == "E2E-ORTHANC" and sr.AccessionNumber == "ACC-90001"
    assert_finds(phantom, sr)
    assert len(scs) == len(sr_points(sr)) >= 1, "one key image per finding"
    assert len(found[GSPS_CLASS]) == len(found[SEG_CLASS]) == len(found[KOS_CLASS]) == 1, \
        "one presentation state, one SEG and one KOS"
    (gsps,), (seg,), (kos,) = found[GSPS_CLASS], found[SEG_CLASS], found[KOS_CLASS]
    assert gsps.PatientID == seg.PatientID == kos.PatientID == "E2E-ORTHANC"
    assert_marks_on_found_nodules(phantom, sr, gsps, found[CT_CLASS], slice_mm=phantom.spacing[2])
    assert_seg_segments_are_the_sr_findings_on_study_slices(seg, sr, found[CT_CLASS])
    assert_kos_flags_objects_of_the_study(kos, found)
    for ds in (sr, gsps, seg, kos, scs[0]):
        assert dciodvfy_errors(ds) == [], ds.Modality


def test_storescu_sender_and_late_instance_replaces_results(pacs_and_node, tmp_path):
    orthanc, node = pacs_and_node
    phantom, files = phantom_study(tmp_path, 90002, "E2E-STORESCU")
    study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
    sent = subprocess.run([need_tool("storescu"), "-aet", "STORESCU", "-aec", "LUNGNODE", "127.0.0.1",
                           str(node.dicom_port), *map(str, files)], env=PEER_ENV, capture_output=True, text=True)
    assert sent.returncode == 0, sent.stderr
    wait_done(node, study_uid)
    srs, _ = result_objects(orthanc, study_uid)
    assert len(srs) == 1
    assert_finds(phantom, srs[0])
    first_series = srs[0].SeriesInstanceUID
    first = objects_by_class(orthanc, study_uid)
    assert len(first[GSPS_CLASS]) == len(first[SEG_CLASS]) == len(first[KOS_CLASS]) == 1
    first_overlays = {first[c][0].SeriesInstanceUID for c in (GSPS_CLASS, SEG_CLASS, KOS_CLASS)}

    late = pydicom.dcmread(files[0])
    late.ImageComments = "re-sent after a correction"
    late.save_as(tmp_path / "late.dcm")
    subprocess.run([need_tool("storescu"), "-aet", "STORESCU", "-aec", "LUNGNODE", "127.0.0.1",
                    str(node.dicom_port), str(tmp_path / "late.dcm")], env=PEER_ENV, check=True)
    wait_done(node, study_uid, version=2)
    wait_for(lambda: result_counts(orthanc, study_uid) == (1, 1, 1, 1), 30,
             "the old SR, marks, SEG and KOS to be replaced")
    srs, _ = result_objects(orthanc, study_uid)
    assert len(srs) == 1 and srs[0].SeriesInstanceUID != first_series, "results replaced, not duplicated"
    again = objects_by_class(orthanc, study_uid)
    overlays = {again[c][0].SeriesInstanceUID for c in (GSPS_CLASS, SEG_CLASS, KOS_CLASS)}
    assert not overlays & first_overlays, "the presentation state, SEG and KOS are the new run's"
    assert [int(again[c][0].SeriesNumber) for c in (GSPS_CLASS, KOS_CLASS, SEG_CLASS)] == [9022, 9023, 9024], \
        "v2: 9000 + 10 x 2 + 2, 3, 4"


def test_unknown_caller_is_rejected(pacs_and_node):
    _, node = pacs_and_node
    out = subprocess.run([need_tool("echoscu"), "-aet", "STRANGER", "-aec", "LUNGNODE", "127.0.0.1",
                          str(node.dicom_port)], env=PEER_ENV, capture_output=True, text=True)
    assert out.returncode != 0 and "reject" in out.stderr.lower()


def test_real_lidc_series_goes_through_the_whole_path(pacs_and_node):
    orthanc, node = pacs_and_node
    files = lidc_series("LIDC-IDRI-0001")
    (study_id,) = orthanc.upload(files)
    study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
    orthanc.send_to_modality("lungnode", study_id)
    state = wait_done(node, study_uid)
    assert state["state"] == "done", state
    srs, scs = result_objects(orthanc, study_uid)
    assert len(srs) == 1 and srs[0].PatientID == "LIDC-IDRI-0001"
    assert dciodvfy_errors(srs[0]) == []
    assert len(scs) == len(sr_points(srs[0]))
    found = objects_by_class(orthanc, study_uid)
    overlays = found.get(GSPS_CLASS, []) + found.get(SEG_CLASS, []) + found.get(KOS_CLASS, [])
    assert len(overlays) == (3 if scs else 0), "marks, SEG and KOS exactly when something was found"
    for ds in overlays:
        assert dciodvfy_errors(ds) == [], ds.Modality
    # Its LUNA16 nodule (23 mm) is found and ranked first (N1); every other mark is a false one. The shipped
    # model's card gives 1 false mark on this scan at its threshold (v16 at 0.5 gave 4): more is a regression.
    nodules = [a for a in load_luna16_csv(shared_data() / "luna16" / "annotations.csv")
               if a.series_uid == pydicom.dcmread(files[0]).SeriesInstanceUID]
    points = sr_points(srs[0])
    assert len(nodules) == 1 and points, f"LUNA16 nodules {nodules}, SR points {points}"
    nodule = nodules[0]
    on_nodule = [np.linalg.norm(p - np.array(nodule.center_mm)) < nodule.size_mm / 2 for p in points]
    assert on_nodule[0], f"N1 at {points[0]} is not the LUNA16 nodule at {nodule.center_mm} ({nodule.size_mm} mm)"
    false_marks = on_nodule.count(False)
    print(f"LIDC-IDRI-0001: {len(points)} finding(s) in {state['seconds']:.1f} s: the nodule (N1) and "
          f"{false_marks} false mark(s)")
    assert false_marks <= 1, f"{false_marks} false marks on LIDC-IDRI-0001 (the card says 1)"


def test_node_killed_after_receiving_delivers_after_restart_once_pacs_is_up(tmp_path):
    """Crash after the acknowledgement, PACS down at first: the results still arrive, exactly once."""
    need_tool("Orthanc")
    pacs_port = free_port()
    node = NodeProcess(tmp_path / "node", stable_seconds=3600, pacs=f"ORTHANC@127.0.0.1:{pacs_port}",
                       send_retry_first_seconds=1, send_retry_max_seconds=2)
    node.start()
    phantom, files = phantom_study(tmp_path, 90003, "E2E-RESTART")
    study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
    subprocess.run([need_tool("storescu"), "-aet", "PACS", "-aec", "LUNGNODE", "127.0.0.1", str(node.dicom_port),
                    *map(str, files)], env=PEER_ENV, check=True, capture_output=True)
    node.kill()  # SIGKILL right after the images were acknowledged

    node.env["LUNGNODE_STABLE_SECONDS"] = "1"
    node.start()
    wait_for(lambda: (s := node.study(study_uid)) and s["deliveries"] and s["deliveries"][0]["attempts"] >= 1,
             600, "processing and a first (failed) delivery attempt", interval=0.5)
    assert node.study(study_uid)["deliveries"][0]["state"] == "pending"
    with OrthancServer(tmp_path / "orthanc", dicom_port=pacs_port) as orthanc:
        wait_done(node, study_uid)
        srs, _ = result_objects(orthanc, study_uid)
        assert len(srs) == 1
        assert_finds(phantom, srs[0])
    node.stop()


def test_study_without_a_readable_series_gets_a_not_processed_sr(pacs_and_node, tmp_path):
    orthanc, node = pacs_and_node
    from lungnode.training.synth import make_phantom, write_dicom_series

    scout = make_phantom(90004, spacing=(1.4, 1.4, 5.0), field_of_view_mm=(360.0, 360.0, 60.0), n_nodules=(1, 1))
    files = write_dicom_series(scout, tmp_path / "thin", patient_id="E2E-TOOFEW", accession_number="ACC-FEW")
    (study_id,) = orthanc.upload(files)
    study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
    orthanc.send_to_modality("lungnode", study_id)
    state = wait_done(node, study_uid)
    assert state["state"] == "not_processed"
    assert "slices" in state["reason"]
    srs, scs = result_objects(orthanc, study_uid)
    assert len(srs) == 1 and scs == []
    assert result_counts(orthanc, study_uid) == (1, 0, 0, 0), "nothing to mark, segment or flag"
    texts = [t.TextValue for t in content_items(srs[0], "TEXT")]
    assert any("not processed" in t.lower() and "slices" in t for t in texts), texts
    assert dciodvfy_errors(srs[0]) == []


def test_rest_api_lists_studies_reruns_and_resends(pacs_and_node, tmp_path):
    orthanc, node = pacs_and_node
    phantom, files = phantom_study(tmp_path, 90005, "E2E-API")
    study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
    subprocess.run([need_tool("storescu"), "-aet", "STORESCU", "-aec", "LUNGNODE", "127.0.0.1", str(node.dicom_port),
                    *map(str, files)], env=PEER_ENV, check=True, capture_output=True)
    wait_done(node, study_uid)
    listed = {s["study_uid"]: s for s in node.http.get(f"{node.url}/api/studies", timeout=10).json()}
    assert listed[study_uid]["patient_id"] == "E2E-API" and listed[study_uid]["state"] == "done"
    assert requests.get(f"{node.url}/health", timeout=10).json()["status"] == "ok"

    assert node.http.post(f"{node.url}/api/studies/{study_uid}/resend", timeout=10).ok
    wait_for(lambda: len(node.study(study_uid)["deliveries"]) == 2 and node.study(study_uid)["deliveries"][-1]["state"]
             == "sent", 60, "the re-send")
    assert len(result_objects(orthanc, study_uid)[0]) == 1, "a re-send stores the same objects again, no copy"

    assert node.http.post(f"{node.url}/api/studies/{study_uid}/rerun", timeout=10).ok
    wait_done(node, study_uid, version=2)
    wait_for(lambda: len(result_objects(orthanc, study_uid)[0]) == 1, 30, "the re-run to replace the SR")
    assert node.http.post(f"{node.url}/api/studies/1.2.3.4.5.999/rerun", timeout=10).status_code == 409

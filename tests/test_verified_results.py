"""A radiologist's completed review sent back as a verified results version: the report builders with a
`Verification` (SR VERIFIED with the verifying observer, overlays, HL7 / FHIR final, an added nodule never
the model's), then the whole path with a real Orthanc as the PACS and a real `lungnode serve`: confirm one
finding, reject the others, add one, complete -> a second, verified SR in the same Orthanc study; with
the setting off nothing new reaches Orthanc."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from datetime import datetime, timezone

import hl7
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from lungnode.inference.types import Detection, DetectionResult
from lungnode.inference.volume import load_volume
from lungnode.peers import NodeProcess, OrthancServer, free_port, wait_for
from lungnode.reports.build import build_results
from lungnode.reports.fhir_report import build_bundle, bundle_json
from lungnode.reports.fhir_send import post_bundle
from lungnode.reports.hl7_oru import build_oru
from lungnode.reports.report_facts import report_facts
from lungnode.reports.verification import ADDED_SCORE, Verification, verified_detections
from tests.conftest import need_tool
from tests.test_end_to_end import (GSPS_CLASS, KOS_CLASS, SEG_CLASS, SR_CLASS, dciodvfy_errors, objects_by_class,
                                   phantom_study, sr_points, wait_done)
from tests.test_reports import MODEL, _dciodvfy_errors, _reread, detections, study  # noqa: F401 (fixtures)
from tests.test_ris import fhir_search, fhir_server  # noqa: F401 (fixture)
from tests.test_web import LONG, browser, logged_in_page  # noqa: F401 (browser is a fixture)

try:
    from playwright.sync_api import expect
except ImportError:
    expect = None

RADIOLOGIST, PASSWORD = "dr.lan", "radiologist-password-1"
COMPLETED = datetime(2026, 3, 4, 10, 20, 30, tzinfo=timezone.utc)


# --- the builders ---------------------------------------------------------------------------------
def verify(volume, detections):
    """N1 confirmed, N2 rejected, one nodule added: the verified result and its verification."""
    added_centre = tuple(float(c) for c in volume.index_to_world(np.array([30.0, 40.0, 10.0])))
    kept, added = verified_detections(detections, [1], [(added_centre, 7.5)])
    verification = Verification("Nguyen^Lan", "General Hospital", COMPLETED, 1, added)
    return DetectionResult(volume.study_instance_uid, volume.series_instance_uid, MODEL, kept), verification


@pytest.fixture(scope="module")
def verified(study, detections):  # noqa: F811
    """The verified version's objects, its detections and the numbers of the added ones."""
    headers, volume = study
    result, verification = verify(volume, detections)
    objects = build_results(result, volume, headers[0], version=2, verification=verification)
    return objects, result.detections, verification.added


@pytest.fixture(scope="module")
def facts(small_ct_series):
    """The RIS facts of a verified version of a CT series on disk (the facts name its slices' numbers)."""
    volume = load_volume(small_ct_series)
    header = pydicom.dcmread(small_ct_series[0], stop_before_pixels=True)
    centre = volume.index_to_world(np.array([60.0, 120.0, 10.0]))
    model_finding = Detection(tuple(centre), (*(centre - 3), *(centre + 3)), 6.0, 0.97)
    result, verification = verify(volume, [model_finding, model_finding])
    return report_facts(result, volume, header, 2, verification=verification)


def test_verified_detections_keep_the_confirmed_geometry_and_box_the_added_nodule(verified, detections):  # noqa: F811
    _, kept, added = verified
    assert kept[0] == detections[0] and added == frozenset({2}) and len(kept) == 2
    centre, box = np.array(kept[1].center_mm), np.array(kept[1].box_mm)
    assert np.allclose(box, [*(centre - 3.75), *(centre + 3.75)]) and kept[1].score == ADDED_SCORE


def concepts(items) -> set[str]:
    """The concept name code values of every content item under ``items``."""
    out = set()
    for item in items:
        out.add(item.ConceptNameCodeSequence[0].CodeValue)
        out |= concepts(item.get("ContentSequence", []))
    return out


def test_the_verified_sr_names_the_radiologist_and_never_gives_the_added_nodule_to_the_model(verified, tmp_path):
    objects, _, _ = verified
    sr = objects[0]
    assert (sr.VerificationFlag, sr.CompletionFlag, sr.PreliminaryFlag) == ("VERIFIED", "COMPLETE", "FINAL")
    (observer,) = sr.VerifyingObserverSequence
    assert (observer.VerifyingObserverName, observer.VerifyingOrganization) == ("Nguyen^Lan", "General Hospital")
    assert observer.VerificationDateTime == COMPLETED  # when the review was completed, not when it was built
    assert sr.SeriesDescription == "lungnode verified nodules v2" and int(sr.SeriesNumber) == 9020

    groups = _reread(sr).content.get_volumetric_roi_measurement_groups()
    assert [str(g.tracking_identifier) for g in groups] == ["N1", "N2"]
    confirmed, added = groups
    assert codes.DCM.AlgorithmName.value in concepts(confirmed)
    assert codes.DCM.CertaintyOfFinding in [m.name for m in confirmed.get_measurements()]
    assert codes.DCM.AlgorithmName.value not in concepts(added), "the model did not find the added nodule"
    assert [m.name for m in added.get_measurements()] == [codes.SCT.Diameter]
    def found_by_person(group) -> bool:
        evaluations = [(e.name, e.value) for e in group.get_qualitative_evaluations()]
        return (codes.DCM.ObserverType, codes.DCM.Person) in evaluations
    assert found_by_person(added) and not found_by_person(confirmed)
    person_observer_name = "121008"
    persons = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == person_observer_name]
    assert [str(i.PersonName) for i in persons] == ["Nguyen^Lan"]

    kinds = {ds.SOPClassUID: ds for ds in objects}
    seg = kinds[SEG_CLASS]
    assert [s.SegmentAlgorithmType for s in seg.SegmentSequence] == ["AUTOMATIC", "MANUAL"]
    assert "SegmentationAlgorithmIdentificationSequence" in seg.SegmentSequence[0]
    assert "SegmentationAlgorithmIdentificationSequence" not in seg.SegmentSequence[1]
    gsps = kinds[GSPS_CLASS]
    assert gsps.ContentLabel == "LUNGNODE_REVIEW"
    labels = [t.UnformattedTextValue for a in gsps.GraphicAnnotationSequence for t in a.TextObjectSequence]
    assert labels == ["N1 8.4 mm 0.91", "N2 7.5 mm radiologist"]
    for ds in objects:
        assert _dciodvfy_errors(ds, tmp_path) == [], ds.Modality


def test_hl7_and_fhir_say_final_and_verified_and_give_the_added_nodule_no_score(facts):
    message = hl7.parse(build_oru(facts))
    assert str(message.segment("OBR")(25)) == "F" and str(message.segment("ORC")(5)) == "CM"
    certainty = [str(obx(4)) for obx in message.segments("OBX") if str(obx(3)).startswith("111012")]
    assert certainty == ["1"], "only the model's finding has a detection confidence"
    comment = next(str(obx(5)) for obx in message.segments("OBX") if str(obx(3)).startswith("121106"))
    assert "verified by Lan Nguyen" in comment and "1 added by the radiologist" in comment

    bundle = json.loads(build_bundle(facts, "urn:test").model_dump_json(exclude_none=True))
    report = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    assert report["status"] == "final" and report["resultsInterpreter"] == [{"display": "Lan Nguyen"}]
    n1, n2 = report["contained"]
    assert "device" in n1 and "performer" not in n1
    assert "device" not in n2 and n2["performer"] == [{"display": "Lan Nguyen"}]
    assert all(c["code"]["coding"][0]["code"] != "111012" for c in n2["component"] if "coding" in c["code"])


def test_a_fhir_server_takes_the_verified_report(facts, fhir_server):  # noqa: F811
    """Medplum's R4 validator accepts the radiologist as a reference by name and the added nodule's Observation."""
    post_bundle(fhir_server, bundle_json(facts, "urn:x").encode(), timeout=30)
    (report,) = fhir_search(fhir_server, "DiagnosticReport")
    assert report["status"] == "final" and report["resultsInterpreter"] == [{"display": "Lan Nguyen"}]
    assert [o.get("performer") for o in report["contained"]] == [None, [{"display": "Lan Nguyen"}]]


# --- the whole path -------------------------------------------------------------------------------
def pacs_and_node(work, send_verified: bool):
    need_tool("Orthanc")
    orthanc = OrthancServer(work / "orthanc")
    orthanc.start()
    node = NodeProcess(work / "node", stable_seconds=1, pacs=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
                       orthanc_url=orthanc.url, send_retry_first_seconds=1,
                       send_verified_results=str(send_verified).lower())
    node.start()
    added = subprocess.run([sys.executable, "-m", "lungnode.cli", "users", "add", RADIOLOGIST, "--role", "radiologist"],
                           input=PASSWORD + "\n", text=True, capture_output=True, env=node.env, timeout=60)
    assert added.returncode == 0, added.stderr
    return orthanc, node


def review(node: NodeProcess, uid: str, version: int) -> dict:
    """Confirm N1, reject the others, add one nodule on the middle slice, complete; the answer."""
    doctor = node.login(RADIOLOGIST, PASSWORD)
    url = f"{node.url}/api/studies/{uid}/feedback"
    n = len(node.study(uid)["result"]["detections"])
    doctor.put(f"{url}/findings/1", json={"version": version, "verdict": "confirmed"}, timeout=10).raise_for_status()
    for k in range(2, n + 1):
        doctor.put(f"{url}/findings/{k}", json={"version": version, "verdict": "rejected", "reason": "vessel"},
                   timeout=10).raise_for_status()
    viewer = doctor.get(f"{node.url}/api/studies/{uid}/viewer", timeout=60).json()
    click = {"slice": viewer["slices"] // 2, "column_px": viewer["columns"] / 3, "row_px": viewer["rows"] / 2}
    doctor.post(f"{url}/added", json={"version": version, **click, "diameter_mm": 7.5}, timeout=60).raise_for_status()
    done = doctor.post(f"{url}/complete", json={"version": version}, timeout=10)
    assert done.status_code == 200, done.text
    return done.json()


def srs_in(orthanc: OrthancServer, uid: str) -> list:
    return objects_by_class(orthanc, uid).get(SR_CLASS, [])


def test_a_completed_review_reaches_orthanc_as_a_verified_sr_with_matching_overlays(tmp_path, browser):  # noqa: F811
    orthanc, node = pacs_and_node(tmp_path, send_verified=True)
    try:
        _, files = phantom_study(tmp_path, 90001, "VERIFIED-1")
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        subprocess.run([need_tool("storescu"), "-aet", "MODALITY", "-aec", "LUNGNODE", "127.0.0.1",
                        str(node.dicom_port), *map(str, files)], check=True, capture_output=True)
        first = wait_done(node, uid)
        assert len(first["result"]["detections"]) >= 2
        (ai_sr,) = srs_in(orthanc, uid)
        assert ai_sr.VerificationFlag == "UNVERIFIED"

        answer = review(node, uid, 1)
        assert answer["send_verified"] is True and answer["verification"]["state"] in ("pending", "made")
        s = wait_done(node, uid, version=2)
        assert s["verified"] == {"version": 2, "reviewed_version": 1, "user": RADIOLOGIST,
                                 "completed_at": answer["completion"]["completed_at"]}
        assert s["shown_version"] == 2 and s["added_by_radiologist"] == [2] and len(s["result"]["detections"]) == 2
        assert s["review"]["complete"] is True and s["review"]["version"] == 1  # the review it came from

        wait_for(lambda: len(srs_in(orthanc, uid)) == 1 and srs_in(orthanc, uid)[0].VerificationFlag == "VERIFIED",
                 60, "the verified SR to replace the AI's in Orthanc")
        (sr,) = srs_in(orthanc, uid)
        assert sr.StudyInstanceUID == uid and sr.CompletionFlag == "COMPLETE"
        assert sr.VerifyingObserverSequence[0].VerifyingObserverName == RADIOLOGIST
        points = sr_points(sr)
        assert len(points) == 2, "the confirmed finding and the added nodule, nothing else"
        assert np.allclose(points[0], first["result"]["detections"][0]["center_mm"], atol=1e-3)
        assert np.allclose(points[1], answer["added"][0]["center_mm"], atol=1e-3)
        found = objects_by_class(orthanc, uid)
        assert all(len(found[c]) == 1 for c in (GSPS_CLASS, SEG_CLASS, KOS_CLASS))
        assert len(found[SEG_CLASS][0].SegmentSequence) == 2
        for ds in (sr, found[GSPS_CLASS][0], found[SEG_CLASS][0], found[KOS_CLASS][0]):
            assert dciodvfy_errors(ds) == [], ds.Modality

        oru = hl7.parse((node.data_dir / "results" / uid / "v2" / "oru.hl7").read_bytes().decode())
        assert str(oru.segment("OBR")(25)) == "F"
        fhir = json.loads((node.data_dir / "results" / uid / "v2" / "fhir.json").read_text())
        assert next(e["resource"]["status"] for e in fhir["entry"]
                    if e["resource"]["resourceType"] == "DiagnosticReport") == "final"

        # The page shows the verified findings and asks for nothing; the worklist says who verified them.
        page = logged_in_page(browser, node, f"/studies/{uid}", user=RADIOLOGIST, password=PASSWORD)
        expect(page.locator("#review-state")).to_have_attribute("data-review", "verified", timeout=LONG)
        expect(page.locator("#findings tbody tr")).to_have_count(2)
        expect(page.locator("#findings tbody tr").nth(1).locator("td.score")).to_have_text("radiologist")
        expect(page.locator("#findings button.confirm")).to_have_count(0)
        expect(page.locator("#complete-review")).to_be_hidden()
        expect(page.locator("#reopen-review")).to_be_visible()
        expect(page.locator('[data-fact="verified"]')).to_contain_text(f"Verified by {RADIOLOGIST}")
        page.goto(f"{node.url}/?lang=en")
        expect(page.locator(f'tr[data-study-uid="{uid}"] td.review')).to_contain_text(f"Verified by {RADIOLOGIST}")
        page.context.close()

        # Reopened and completed again: another verified version; the review asked about stays version 1.
        doctor = node.login(RADIOLOGIST, PASSWORD)
        url = f"{node.url}/api/studies/{uid}/feedback"
        reopened = doctor.delete(f"{url}/complete", params={"version": 1}, timeout=10).json()
        assert reopened["version"] == 1 and reopened["completion"] is None and reopened["latest_version"] == 2
        assert node.study(uid)["shown_version"] == 1, "the reviewed findings are shown while the review is open"
        doctor.post(f"{url}/complete", json={"version": 1}, timeout=10).raise_for_status()
        assert wait_done(node, uid, version=3)["verified"]["version"] == 3

        logs = sorted((node.data_dir / "audit").glob("audit-*.log"))
        lines = [line for p in logs for line in p.read_text().splitlines()]
        records = [line for line in lines if 'csd-code="VERIFIED"' in line and uid in line]
        assert len(records) == 2 and all(f'UserID="{RADIOLOGIST}"' in r for r in records)
    finally:
        node.stop()
        orthanc.stop()


def test_with_the_setting_off_a_completed_review_sends_nothing(tmp_path):
    orthanc, node = pacs_and_node(tmp_path, send_verified=False)
    try:
        _, files = phantom_study(tmp_path, 90002, "VERIFIED-OFF")
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        subprocess.run([need_tool("storescu"), "-aet", "MODALITY", "-aec", "LUNGNODE", "127.0.0.1",
                        str(node.dicom_port), *map(str, files)], check=True, capture_output=True)
        wait_done(node, uid)
        before = {ds.SOPInstanceUID for objects in objects_by_class(orthanc, uid).values() for ds in objects}
        answer = review(node, uid, 1)
        assert answer["send_verified"] is False and answer["verification"] is None
        node.stop()  # the worker had its chances; a restart makes nothing either
        node.start()
        s = node.study(uid)
        assert s["version"] == 1 and s["verified"] is None and len(s["deliveries"]) == 1
        after = {ds.SOPInstanceUID for objects in objects_by_class(orthanc, uid).values() for ds in objects}
        assert after == before
    finally:
        node.stop()
        orthanc.stop()

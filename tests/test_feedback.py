"""Radiologist feedback on a real `lungnode serve` process fed over DICOM: verdicts, added nodules and
"review complete" through the API (who may write, what is stored, audited and kept across a restart, what
the worklist shows), the export to a training datalist, and the study page's controls in chromium."""
from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lungnode.peers import NodeProcess, free_port
from lungnode.training.eval_sets import datalist_scans
from lungnode.training.importers.datalist import read_datalist
from lungnode.web.i18n import LABELS
from tests.conftest import send_to_node, wait_processed
from tests.test_web import LONG, browser, logged_in_page  # noqa: F401 (browser is a fixture)

try:
    from playwright.sync_api import expect
except ImportError:
    expect = None

EN = LABELS["en"]
DOCTOR, DOCTOR_PASSWORD = "dr.lan", "radiologist-password-1"
VIEWER, VIEWER_PASSWORD = "ward.nurse", "viewer-password-12"
REASONS = ["vessel", "other", "scar", "airway"]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    node = NodeProcess(tmp_path_factory.mktemp("feedback") / "node", stable_seconds=1,
                       pacs=f"PACS@127.0.0.1:{free_port()}", send_retry_first_seconds=1, send_retry_max_seconds=30)
    node.start()
    for name, role, password in ((DOCTOR, "radiologist", DOCTOR_PASSWORD), (VIEWER, "viewer", VIEWER_PASSWORD)):
        added = subprocess.run([sys.executable, "-m", "lungnode.cli", "users", "add", name, "--role", role],
                               input=password + "\n", text=True, capture_output=True, env=node.env, timeout=60)
        assert added.returncode == 0, added.stderr
    yield node
    node.stop()


def phantom(tmp_path_factory, seed: int, patient: str) -> list[Path]:
    """A 512 x 512 phantom with three or four nodules (test_web's recipe, more nodules): findings to judge."""
    from lungnode.training.synth import make_phantom, write_dicom_series

    ct = make_phantom(seed, spacing=(0.703125, 0.703125, 2.5), field_of_view_mm=(360.0, 360.0, 200.0),
                      n_nodules=(3, 4), diameter_range_mm=(8.0, 20.0))
    return write_dicom_series(ct, tmp_path_factory.mktemp(patient), patient_id=patient, accession_number=f"ACC-{patient}")


@pytest.fixture(scope="module")
def study(node, tmp_path_factory) -> str:
    uid = send_to_node(node, phantom(tmp_path_factory, 90001, "FB-1"))
    s = wait_processed(node, uid)
    assert len(s["result"]["detections"]) >= 3, "three findings or more to confirm, reject and reject otherwise"
    return uid


@pytest.fixture(scope="module")
def doctor(node):
    return node.login(DOCTOR, DOCTOR_PASSWORD)


def feedback_url(node: NodeProcess, uid: str, path: str = "") -> str:
    return f"{node.url}/api/studies/{uid}/feedback{path}"


def slice_world_mm(path: Path, column_px: float, row_px: float) -> np.ndarray:
    """The LPS point at image pixel position (column_px, row_px) of a slice, from its own header (PS3.3
    C.7.6.2.1.1; pixel (i, j) covers [i, i+1) x [j, j+1), so its centre is at i + 0.5)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    row_dir, col_dir = np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float)
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    return (np.array(ds.ImagePositionPatient, float) + (column_px - 0.5) * column_spacing * row_dir
            + (row_px - 0.5) * row_spacing * col_dir)


def feedback_records(node: NodeProcess) -> list[ET.Element]:
    records = [ET.fromstring(line) for path in sorted((node.data_dir / "audit").glob("audit-*.log"))
               for line in path.read_text().splitlines()]
    return [r for r in records if r.find("EventIdentification/EventTypeCode[@csd-code='FEEDBACK']") is not None]


def detail(record: ET.Element) -> str:
    return base64.b64decode(record.find(".//ParticipantObjectDetail[@type='feedback']").get("value")).decode()


def test_radiologist_confirms_rejects_and_adds_a_nodule_and_it_is_stored_with_user_and_time(node, study, doctor):
    s = node.study(study)
    version, detections = s["version"], s["result"]["detections"]
    first = doctor.get(feedback_url(node, study), timeout=10).json()
    assert (first["version"], first["findings"], first["can_write"]) == (version, len(detections), True)
    assert first["verdicts"] == first["added"] == [] and first["completion"] is None
    assert s["review"] is None  # nothing recorded yet

    started = time.time()
    judged = doctor.put(feedback_url(node, study, "/findings/1"), json={"version": version, "verdict": "confirmed"},
                        timeout=10)
    assert judged.status_code == 200, judged.text
    early = doctor.post(feedback_url(node, study, "/complete"), json={"version": version}, timeout=10)
    assert early.status_code == 409 and "N2" in early.json()["detail"]  # says which findings still need a verdict
    for n in range(2, len(detections) + 1):
        reason = REASONS[(n - 2) % len(REASONS)]
        body = {"version": version, "verdict": "rejected", "reason": reason,
                "reason_text": "calcified granuloma" if reason == "other" else None}
        r = doctor.put(feedback_url(node, study, f"/findings/{n}"), json=body, timeout=10)
        assert r.status_code == 200, r.text

    refused = {  # what the API refuses, and the status a user sees
        "/findings/2": ({"version": version, "verdict": "rejected"}, 422),  # no reason
        "/findings/3": ({"version": version, "verdict": "rejected", "reason": "other"}, 422),  # "other" without text
        f"/findings/{len(detections) + 1}": ({"version": version, "verdict": "confirmed"}, 422),  # no such finding
        "/findings/1": ({"version": version + 1, "verdict": "confirmed"}, 409),  # not the study's version
    }
    for path, (body, status) in refused.items():
        assert doctor.put(feedback_url(node, study, path), json=body, timeout=10).status_code == status, path

    viewer = doctor.get(f"{node.url}/api/studies/{study}/viewer", timeout=60).json()
    k, column_px, row_px = viewer["slices"] // 2, viewer["columns"] * 0.3 + 0.25, viewer["rows"] * 0.6 + 0.75
    added = doctor.post(feedback_url(node, study, "/added"), timeout=60, json={
        "version": version, "slice": k, "column_px": column_px, "row_px": row_px, "diameter_mm": 7.5})
    assert added.status_code == 200, added.text
    (nodule,) = added.json()["added"]
    slice_file = next(p for p in (node.data_dir / "incoming" / study / s["series_uid"]).glob("*.dcm")
                      if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID == nodule["sop_uid"])
    assert np.allclose(nodule["center_mm"], slice_world_mm(slice_file, column_px, row_px), atol=1e-3)
    assert nodule["diameter_mm"] == 7.5 and nodule["click"] == {"slice": k, "column_px": column_px, "row_px": row_px}

    done = doctor.post(feedback_url(node, study, "/complete"), json={"version": version}, timeout=10)
    assert done.status_code == 200, done.text

    stored = node.http.get(feedback_url(node, study), timeout=10).json()  # read back by another user (the admin)
    assert stored["can_write"] is True and stored["completion"]["completed_by"] == DOCTOR
    assert [(v["finding"], v["verdict"], v["reason"]) for v in stored["verdicts"]] == \
        [(1, "confirmed", None)] + [(n, "rejected", REASONS[(n - 2) % len(REASONS)])
                                   for n in range(2, len(detections) + 1)]
    for v, d in zip(stored["verdicts"], detections):
        assert v["user"] == DOCTOR and started <= v["at"] <= time.time()
        assert v["box_mm"] == pytest.approx(d["box_mm"]) and v["diameter_mm"] == pytest.approx(d["diameter_mm"])
    assert stored["added"][0]["user"] == DOCTOR and started <= stored["added"][0]["at"] <= time.time()
    assert stored["counts"] == {"version": version, "confirmed": 1, "rejected": len(detections) - 1, "added": 1,
                                "complete": True}

    # A verdict changed after completion reopens the review; withdrawn, the review cannot complete.
    changed = doctor.put(feedback_url(node, study, "/findings/2"), json={
        "version": version, "verdict": "rejected", "reason": "artefact"}, timeout=10).json()
    assert changed["completion"] is None and changed["verdicts"][1]["reason"] == "artefact"
    withdrawn = doctor.delete(feedback_url(node, study, "/findings/2"), params={"version": version}, timeout=10).json()
    assert [v["finding"] for v in withdrawn["verdicts"]] == [n for n in range(1, len(detections) + 1) if n != 2]
    assert doctor.post(feedback_url(node, study, "/complete"), json={"version": version}, timeout=10).status_code == 409
    doctor.put(feedback_url(node, study, "/findings/2"), json={"version": version, "verdict": "rejected",
                                                                "reason": "vessel"}, timeout=10).raise_for_status()
    doctor.post(feedback_url(node, study, "/complete"), json={"version": version}, timeout=10).raise_for_status()


def test_a_viewer_reads_the_review_but_gets_403_on_every_write(node, study, doctor):
    viewer = node.login(VIEWER, VIEWER_PASSWORD)
    version = node.study(study)["version"]
    seen = viewer.get(feedback_url(node, study), timeout=10)
    assert seen.status_code == 200 and seen.json()["can_write"] is False
    writes = [("put", "/findings/1", {"version": version, "verdict": "confirmed"}),
              ("delete", "/findings/1", None), ("post", "/complete", {"version": version}),
              ("post", "/added", {"version": version, "slice": 0, "column_px": 5, "row_px": 5}),
              ("delete", "/complete", None)]
    for method, path, body in writes:
        r = getattr(viewer, method)(feedback_url(node, study, path), json=body, params={"version": version}, timeout=10)
        assert r.status_code == 403, (method, path, r.text)
        assert "radiologist" in r.json()["detail"]
    # and a radiologist's write without the session's CSRF token is refused like any other POST
    bare = doctor.put(feedback_url(node, study, "/findings/1"), json={"version": version, "verdict": "confirmed"},
                      headers={"X-CSRF-Token": ""}, timeout=10)
    assert bare.status_code == 403
    assert node.http.get(feedback_url(node, study), timeout=10).json()["counts"]["complete"] is True  # unchanged


def test_every_write_is_in_the_audit_trail(node, study):
    records = [r for r in feedback_records(node)
               if r.find("ParticipantObjectIdentification").get("ParticipantObjectID") == study]
    n = len(node.study(study)["result"]["detections"])
    # the first test's writes: n verdicts, 1 added, complete, then change, withdraw, judge again, complete
    assert len(records) == n + 2 + 4
    for r in records:
        who = r.find("ActiveParticipant[@UserIsRequestor='true']")
        assert (who.get("UserID"), who.get("NetworkAccessPointID")) == (DOCTOR, "127.0.0.1")
        assert r.find("EventIdentification/EventID").get("csd-code") == "110110"  # Patient Record
    texts = [detail(r) for r in records]
    actions = [r.find("EventIdentification").get("EventActionCode") for r in records]
    assert texts[0] == "v1 N1 confirmed" and actions[0] == "C"
    assert any(re.fullmatch(r"v1 N\d rejected: other \(calcified granuloma\)", t) for t in texts)
    assert any(t.startswith("v1 added nodule A1 at (") and t.endswith(", 7.5 mm") for t in texts)
    assert ("v1 N2 rejected: artefact", "U") in zip(texts, actions)
    assert ("v1 N2 verdict withdrawn", "D") in zip(texts, actions)
    assert texts[-1] == "v1 review complete"


def test_the_worklist_shows_the_review_state_and_a_restart_keeps_it(node, study):
    n = len(node.study(study)["result"]["detections"])
    expected = {"version": 1, "confirmed": 1, "rejected": n - 1, "added": 1, "complete": True}
    before = node.http.get(feedback_url(node, study), timeout=10).json()
    node.stop()
    node.start()
    listed = {s["study_uid"]: s for s in node.http.get(f"{node.url}/api/studies", timeout=10).json()}
    assert listed[study]["review"] == expected
    after = node.http.get(feedback_url(node, study), timeout=10).json()
    assert after == before


def test_train_import_feedback_exports_completed_reviews_that_datalist_scans_loads(node, study, small_ct_series,
                                                                                   doctor, tmp_path):
    small = send_to_node(node, small_ct_series)  # processed, and reviewed only halfway: skipped
    wait_processed(node, small)
    started = doctor.post(feedback_url(node, small, "/added"), timeout=60, json={
        "version": 1, "slice": 3, "column_px": 40, "row_px": 50, "diameter_mm": 5})
    assert started.status_code == 200, started.text
    s, review = node.study(study), node.http.get(feedback_url(node, study), timeout=10).json()

    out = tmp_path / "data" / "feedback.json"
    run = subprocess.run([sys.executable, "-m", "lungnode.cli", "train", "import", "feedback", "--data-dir",
                          str(node.data_dir), "--out", str(out), "--quiet"], capture_output=True, text=True,
                         env=node.env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "skipped: 1" in run.stdout and "review not complete" in run.stdout and small in run.stdout
    items = json.loads(out.read_text())["training"]
    (item,) = items
    folder = (node.data_dir / "incoming" / study / s["series_uid"]).resolve()
    assert item["image"] == str(folder) and item["series_uid"] == s["series_uid"] and item["source"] == "feedback"

    def cccwhd(box_mm):
        lo, hi = np.array(box_mm[:3]), np.array(box_mm[3:])
        return [*((lo + hi) / 2), *(hi - lo)]

    confirmed = [v for v in review["verdicts"] if v["verdict"] == "confirmed"]
    rejected = [v for v in review["verdicts"] if v["verdict"] == "rejected"]
    (added,) = review["added"]
    assert np.allclose(item["box"], [cccwhd(v["box_mm"]) for v in confirmed] + [[*added["center_mm"], 7.5, 7.5, 7.5]],
                       atol=1e-3)
    assert item["diameter_mm"] == pytest.approx([v["diameter_mm"] for v in confirmed] + [7.5], abs=1e-3)
    assert item["label"] == [0, 0]
    assert np.allclose(item["negative_box"], [cccwhd(v["box_mm"]) for v in rejected], atol=1e-3)
    assert item["negative_reason"] == [v["reason"] for v in rejected]
    read_datalist(out)  # the validator accepts the new fields

    (scan,) = datalist_scans(out, "training")
    assert scan.series_uid == s["series_uid"]
    loaded = scan.load()
    assert len(loaded.annotations) == 2 and loaded.volume.series_instance_uid == s["series_uid"]
    assert np.allclose(loaded.annotations[1].center_mm, added["center_mm"], atol=1e-3)


@pytest.fixture(scope="module")
def browser_study(node, tmp_path_factory) -> str:
    uid = send_to_node(node, phantom(tmp_path_factory, 90001, "FB-2"))
    s = wait_processed(node, uid)
    assert len(s["result"]["detections"]) >= 2
    return uid


def test_the_study_page_confirms_rejects_and_adds_a_nodule_on_the_slice(node, browser, browser_study):  # noqa: F811
    uid = browser_study
    page = logged_in_page(browser, node, f"/studies/{uid}", user=DOCTOR, password=DOCTOR_PASSWORD)
    rows = page.locator("#findings tbody tr")
    n = len(node.study(uid)["result"]["detections"])
    expect(rows).to_have_count(n, timeout=LONG)
    expect(page.locator("#review-state")).to_have_text(EN["review_none"])

    rows.nth(0).locator("button.confirm").click()
    expect(rows.nth(0).locator("[data-verdict]")).to_have_text(EN["verdict_confirmed"])
    expect(rows.nth(0)).to_contain_text(DOCTOR)
    rows.nth(1).locator("select.reason").select_option("other")
    rows.nth(1).locator("input.reason-text").fill("pleural plaque")
    rows.nth(1).locator("button.reject").click()
    expect(rows.nth(1).locator("[data-verdict]")).to_have_text(f"{EN['verdict_rejected']}: {EN['reason_other']} "
                                                                "(pleural plaque)")
    for i in range(2, n):
        rows.nth(i).locator("select.reason").select_option("vessel")
        rows.nth(i).locator("button.reject").click()
        expect(rows.nth(i).locator("[data-verdict]")).to_have_text(f"{EN['verdict_rejected']}: {EN['reason_vessel']}")

    page.locator("#add-diameter").fill("9")
    page.locator("#add-nodule").click()
    expect(page.locator("#add-hint")).to_be_visible()
    stack = page.locator("#stack").bounding_box()
    page.mouse.click(stack["x"] + stack["width"] * 0.25, stack["y"] + stack["height"] * 0.5)
    expect(page.locator("#added tbody tr")).to_have_count(1)
    expect(page.locator("#added tbody tr")).to_contain_text("9.0 mm")
    expect(page.locator("#overlay ellipse.added.centre")).to_have_count(1)
    viewer = node.http.get(f"{node.url}/api/studies/{uid}/viewer", timeout=60).json()
    (added,) = node.http.get(feedback_url(node, uid), timeout=10).json()["added"]
    assert added["click"]["slice"] == int(page.locator("#slider").input_value())
    assert added["click"]["column_px"] == pytest.approx(viewer["columns"] * 0.25, abs=2)
    assert added["click"]["row_px"] == pytest.approx(viewer["rows"] * 0.5, abs=2)

    page.locator("#complete-review").click()
    expect(page.locator("#review-state")).to_contain_text(EN["review_complete"])
    expect(page.locator("#reopen-review")).to_be_visible()
    rows.nth(1).locator("button.withdraw").click()  # withdrawn: the review is open again
    expect(rows.nth(1).locator("[data-verdict]")).to_have_count(0)
    expect(page.locator("#review-state")).to_have_text(
        f"1 confirmed, {n - 2} rejected, 1 added")
    page.locator("#complete-review").click()
    expect(page.locator("#notice")).to_contain_text("N2")  # says what is missing

    page.goto(f"{node.url}/?lang=en")
    expect(page.locator(f'tr[data-study-uid="{uid}"] td.review')).to_have_text(f"1 confirmed, {n - 2} rejected, 1 added")
    page.context.close()

    viewer_page = logged_in_page(browser, node, f"/studies/{uid}?lang=vi", user=VIEWER, password=VIEWER_PASSWORD)
    expect(viewer_page.locator("#read-only")).to_have_text(LABELS["vi"]["read_only"])
    expect(viewer_page.locator("#findings button")).to_have_count(0)
    expect(viewer_page.locator("#add-bar")).to_be_hidden()
    viewer_page.context.close()

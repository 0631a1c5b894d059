"""The reading-room page in a real browser (Debian chromium driven by playwright), its JSON/PNG endpoints
and /metrics, against a real `lungnode serve` process that storescu feeds over DICOM. The browser logs in
through the login form; the API calls use the node's logged-in admin session.

The node's PACS is a port where nothing listens, so deliveries stay pending with their error: what a
PACS admin sees while the PACS is down."""
from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import pydicom
import pytest
import requests
from PIL import Image
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lungnode.dicom_node.db import DONE, FAILED, NOT_PROCESSED, PROCESSING, QUEUED, InstanceRecord, JobDB
from lungnode.metrics import STATES, job_metrics
from lungnode.peers import NodeProcess, free_port, wait_for
from lungnode.web.i18n import LABELS
from tests.conftest import REPO, send_to_node, wait_processed

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the browser test skips; the API and metrics tests still run
    sync_playwright = None

SCREENSHOTS = REPO / "var" / "screenshots"
EN, VI = LABELS["en"], LABELS["vi"]
LONG = 300_000  # ms: receiving, the 1 s quiet time and detection on 2 shared cores


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    work = tmp_path_factory.mktemp("web")
    node = NodeProcess(work / "node", stable_seconds=1, pacs=f"PACS@127.0.0.1:{free_port()}",
                       send_retry_first_seconds=1, send_retry_max_seconds=30)
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory) -> list[Path]:
    """A 512 x 512 phantom with nodules the shipped model finds (the end-to-end tests' recipe)."""
    from lungnode.training.synth import make_phantom, write_dicom_series

    phantom = make_phantom(90001, spacing=(0.703125, 0.703125, 2.5), field_of_view_mm=(360.0, 360.0, 200.0),
                           n_nodules=(2, 3), diameter_range_mm=(8.0, 20.0))
    return write_dicom_series(phantom, tmp_path_factory.mktemp("phantom"), patient_id="WEB-1",
                              patient_name="NGUYEN^VAN AN", accession_number="ACC-WEB1")


@pytest.fixture(scope="module")
def scout_files(tmp_path_factory) -> list[Path]:
    """12 thick slices: a series the node refuses to read, with the reason."""
    from lungnode.training.synth import make_phantom, write_dicom_series

    scout = make_phantom(90004, spacing=(1.4, 1.4, 5.0), field_of_view_mm=(360.0, 360.0, 60.0), n_nodules=(1, 1))
    return write_dicom_series(scout, tmp_path_factory.mktemp("scout"), patient_id="WEB-2",
                              patient_name="TRAN^THI BICH", accession_number="ACC-WEB2")


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        pytest.skip("playwright is not installed (pip install playwright; no `playwright install` needed)")
    executable = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(executable).exists():
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True)
        yield browser
        browser.close()


def logged_in_page(browser, node: NodeProcess, path: str, user: str = "admin", password: str | None = None):
    """A fresh browser (no cookies) opens `path`, is sent to the login form, logs in, and is back at `path`."""
    page = browser.new_context(viewport={"width": 1360, "height": 420}).new_page()
    page.goto(f"{node.url}{path}")
    expect(page).to_have_url(re.compile(r"/login\?next="))
    page.locator("#username").fill(user)
    page.locator("#password").fill(password or node.admin_password)
    page.locator("#login-submit").click()
    expect(page).to_have_url(f"{node.url}{path}")
    return page


@pytest.fixture(scope="module")
def small_study(node, small_ct_series) -> str:
    """The small conftest phantom, sent and processed (for the endpoint and button tests)."""
    uid = send_to_node(node, small_ct_series)
    wait_processed(node, uid)
    return uid


def test_worklist_shows_a_study_arrive_and_finish_and_its_page_shows_the_findings(node, browser, phantom_files,
                                                                                  scout_files):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = logged_in_page(browser, node, "/")
    expect(page.locator("h1")).to_have_text(EN["worklist"])
    expect(page.locator("#empty")).to_contain_text("LUNGNODE")  # an empty worklist says where to send

    scout = send_to_node(node, scout_files)
    uid = send_to_node(node, phantom_files)
    scout_row = page.locator(f'tr[data-study-uid="{scout}"]')
    expect(scout_row.locator(".badge[data-state]")).to_have_text(EN["state_not_processed"], timeout=LONG)
    expect(scout_row.locator(".why")).to_contain_text("slices, fewer than")  # and why
    row = page.locator(f'tr[data-study-uid="{uid}"]')
    expect(row).to_be_visible(timeout=30_000)  # polled in, no reload
    expect(row.locator(".badge[data-state]")).to_have_text(EN["state_done"], timeout=LONG)
    api = node.study(uid)
    n = len(api["result"]["detections"])
    assert n >= 1, "the shipped model finds nodules in this phantom (see its model card)"
    for text in ("NGUYEN, VAN AN", "WEB-1", "ACC-WEB1", "Chest CT", api["model"]):
        expect(row).to_contain_text(text)
    expect(row.locator(".findings")).to_have_text(str(n))
    expect(row.locator(".badge.pending")).to_have_text(EN["delivery_pending"])  # the PACS is down
    page.screenshot(path=SCREENSHOTS / "worklist.png", full_page=True)

    row.locator("td.patient a").click()
    expect(page).to_have_url(re.compile(f"/studies/{re.escape(uid)}\\?lang=en$"))
    findings = page.locator("#findings tbody tr")
    expect(findings).to_have_count(n)
    first = api["result"]["detections"][0]
    expect(findings.first).to_contain_text(f"{first['diameter_mm']:.1f} mm")
    expect(findings.first).to_contain_text(f"{first['score']:.2f}")
    expect(page.locator("#key-images img")).to_have_count(n)
    page.wait_for_function("[...document.querySelectorAll('#key-images img')].every(i => i.naturalWidth > 0)")

    viewer = node.http.get(f"{node.url}/api/studies/{uid}/viewer", timeout=60).json()
    assert len(viewer["nodules"]) == n
    slider = page.locator("#slider")
    slider.focus()
    page.keyboard.press("Home")  # scroll to the first slice, away from every nodule's
    expect(slider).to_have_value("0")
    target = viewer["nodules"][0]
    page.locator('#goto button[data-nodule="1"]').click()
    expect(slider).to_have_value(str(target["slice"]))
    expect(page.locator("#slice-label")).to_have_text(f"Slice {target['slice'] + 1} of {viewer['slices']}")
    expect(page.locator('#overlay rect.centre[data-nodule="1"]')).to_be_visible()
    page.wait_for_function(f"(i => i.complete && i.naturalWidth === {viewer['columns']} && "
                           f"i.src.endsWith('/slices/{target['slice']}'))(document.getElementById('slice'))")
    delivery = page.locator("#deliveries tbody tr").first
    expect(delivery).to_contain_text(api["deliveries"][0]["destination"])
    expect(delivery.locator(".error")).not_to_be_empty(timeout=30_000)  # the PACS error is shown
    page.screenshot(path=SCREENSHOTS / "study.png", full_page=True)

    page.locator("a[data-lang=vi]").click()
    expect(page).to_have_url(re.compile(r"\?lang=vi$"))
    expect(page.locator("section.card h2").nth(1)).to_have_text(VI["nodules"])
    expect(page.locator("#facts .badge[data-state]")).to_have_text(VI["state_done"])
    expect(page.locator("#rerun")).to_have_text(VI["rerun"])
    expect(page.locator("#resend")).to_have_text(VI["resend"])
    expect(page.locator("#findings tbody tr")).to_have_count(n)
    page.screenshot(path=SCREENSHOTS / "study_vi.png", full_page=True)

    page.locator("a.back").click()  # the language stays in the links
    expect(page).to_have_url(re.compile(r"/\?lang=vi$"))
    expect(page.locator("h1")).to_have_text(VI["worklist"])
    expect(row.locator(".badge[data-state]")).to_have_text(VI["state_done"])
    expect(row.locator("td.patient a")).to_have_attribute("href", re.compile(r"lang=vi$"))
    page.screenshot(path=SCREENSHOTS / "worklist_vi.png", full_page=True)
    page.context.close()


def test_login_form_refuses_a_wrong_password_and_logout_ends_the_session(node, browser):
    page = browser.new_context().new_page()
    page.goto(f"{node.url}/?lang=vi")
    expect(page).to_have_url(re.compile(r"/login\?next=%2F%3Flang%3Dvi&lang=vi$"))
    expect(page.locator("h1")).to_have_text(VI["login"])
    page.locator("#username").fill("admin")
    page.locator("#password").fill(node.admin_password + "-wrong")
    page.locator("#login-submit").click()
    expect(page.locator("#login-failed")).to_have_text(VI["login_failed"])
    expect(page.locator("#username")).to_have_value("admin")
    page.locator("#password").fill(node.admin_password)
    page.locator("#login-submit").click()
    expect(page).to_have_url(f"{node.url}/?lang=vi")
    expect(page.locator("#user")).to_have_text(f"admin · {VI['role_admin']}")
    page.locator("#logout").click()
    expect(page).to_have_url(re.compile(r"/login\?lang=vi$"))
    page.goto(f"{node.url}/")  # the session is over: back to the login form
    expect(page).to_have_url(re.compile(r"/login\?next=%2F$"))
    page.context.close()


def test_rerun_and_resend_buttons_ask_first_and_show_what_happened(node, browser, small_study):
    page = logged_in_page(browser, node, f"/studies/{small_study}")
    asked: list[str] = []
    answer = {"accept": False}

    def on_dialog(dialog) -> None:
        asked.append(dialog.message)
        dialog.accept() if answer["accept"] else dialog.dismiss()

    page.on("dialog", on_dialog)
    expect(page.locator("#facts .badge[data-state]")).to_have_text(EN["state_done"], timeout=30_000)
    found = len(node.study(small_study)["result"]["detections"])
    if found:  # the page lists what the node found, or says it found nothing
        expect(page.locator("#findings tbody tr")).to_have_count(found)
    else:
        expect(page.locator("#no-findings")).to_be_visible()

    page.locator("#rerun").click()  # cancelled: nothing happens
    assert asked == [EN["confirm_rerun"]]
    expect(page.locator("#notice")).to_be_hidden()
    assert node.study(small_study)["version"] == 1

    answer["accept"] = True
    page.locator("#rerun").click()
    expect(page.locator("#notice")).to_have_text(EN["rerun_ok"])
    wait_processed(node, small_study, version=2)
    expect(page.locator('#facts [data-fact="version"] dd')).to_have_text("2", timeout=30_000)

    page.locator("#resend").click()
    assert asked[-1] == EN["confirm_resend"]
    expect(page.locator("#notice")).to_have_text(EN["resend_ok"])
    deliveries = node.study(small_study)["deliveries"]
    assert [d["state"] for d in deliveries] == ["superseded", "superseded", "pending"]
    rows = page.locator("#deliveries tbody tr")
    expect(rows).to_have_count(3)
    expect(rows.first.locator(".badge")).to_have_text(EN["delivery_state_pending"])
    expect(rows.last.locator(".badge")).to_have_text(EN["delivery_state_superseded"])
    page.context.close()


def test_page_endpoints_answer_with_images_and_documented_models(node, small_study, small_ct_series):
    study = node.http.get(f"{node.url}/api/studies/{small_study}", timeout=10).json()
    viewer = node.http.get(f"{node.url}/api/studies/{small_study}/viewer", timeout=60).json()
    first = pydicom.dcmread(small_ct_series[0], stop_before_pixels=True)
    assert viewer["series_uid"] == study["series_uid"]
    assert [n["number"] for n in viewer["nodules"]] == list(range(1, len(study["result"]["detections"]) + 1))
    assert (viewer["rows"], viewer["columns"]) == (first.Rows, first.Columns)
    last = viewer["slices"] - 1
    r = node.http.get(f"{node.url}/api/studies/{small_study}/slices/{last}", timeout=30)
    assert r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (viewer["columns"], viewer["rows"])
    assert node.http.get(f"{node.url}/api/studies/{small_study}/slices/{last + 1}", timeout=10).status_code == 404
    beyond = len(study["key_images"]) + 1
    assert node.http.get(f"{node.url}/api/studies/{small_study}/key-images/{beyond}", timeout=10).status_code == 404
    assert node.http.get(f"{node.url}/api/studies/1.2.3.999/viewer", timeout=10).status_code == 404
    assert node.http.get(f"{node.url}/studies/1.2.3.999", timeout=10).status_code == 404

    listed = {s["study_uid"]: s for s in node.http.get(f"{node.url}/api/studies", timeout=10).json()}
    assert listed[small_study]["pending_deliveries"] == sum(d["state"] == "pending" for d in study["deliveries"])

    spec = node.http.get(f"{node.url}/openapi.json", timeout=10).json()
    for path in ("/api/studies", "/api/studies/{study_uid}", "/api/studies/{study_uid}/viewer",
                 "/api/studies/{study_uid}/slices/{k}", "/api/studies/{study_uid}/key-images/{number}",
                 "/api/studies/{study_uid}/rerun", "/api/studies/{study_uid}/resend", "/metrics"):
        operation = next(iter(spec["paths"][path].values()))
        assert operation["summary"], path
    assert {"StudySummary", "StudyDetail", "DeliveryOut", "Viewer", "NoduleMark"} <= set(spec["components"]["schemas"])
    assert "/" not in spec["paths"], "the HTML pages stay out of the API description"


def test_key_image_endpoint_returns_the_burned_in_images(node, phantom_files):
    uid = str(pydicom.dcmread(phantom_files[0], stop_before_pixels=True).StudyInstanceUID)
    if node.study(uid) is None:  # the browser test, which sends it, was skipped
        send_to_node(node, phantom_files)
    study = wait_processed(node, uid)
    assert [k["number"] for k in study["key_images"]] == list(range(1, len(study["result"]["detections"]) + 1))
    full = Image.open(io.BytesIO(node.http.get(node.url + study["key_images"][0]["url"], timeout=30).content))
    thumb = Image.open(io.BytesIO(node.http.get(node.url + study["key_images"][0]["thumbnail_url"], timeout=30).content))
    assert full.mode == "RGB" and max(full.size) >= 512 and max(thumb.size) == 256


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """Prometheus text -> {sample name: {label items: value}} (/metrics needs no login)."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_metrics_match_the_job_database(node, small_study):
    wait_for(lambda: all(s["state"] not in (QUEUED, PROCESSING) for s in node.http.get(
        f"{node.url}/api/studies", timeout=10).json()), 300, "the queue to drain", interval=0.5)
    m = scrape(node.url)
    db = JobDB(node.data_dir / "lungnode.sqlite3")
    try:
        studies, pending = db.studies(limit=10_000), db.pending_count()
    finally:
        db.close()
    done = [s for s in studies if s.state == DONE]
    assert m["lungnode_studies_received_total"][()] == len(studies) >= 1
    for state in STATES:
        assert m["lungnode_studies"][(("state", state),)] == sum(s.state == state for s in studies), state
    assert m["lungnode_queue_depth"][()] == 0
    assert m["lungnode_deliveries_pending"][()] == pending >= 1
    assert m["lungnode_inference_seconds_count"][()] == len(done)
    assert m["lungnode_inference_seconds_sum"][()] == pytest.approx(sum(s.seconds for s in done))


def test_metrics_count_every_state_from_the_database(tmp_path):
    """Failed, not processed, waiting and processing studies, counted from a job database as written."""
    db = JobDB(tmp_path / "jobs.sqlite3")
    for i in range(6):
        db.record_instance(InstanceRecord(f"1.2.{i}.1", f"1.2.{i}", f"1.2.{i}.0", "1.2.840.10008.5.1.4.1.1.2",
                                          tmp_path / f"{i}.dcm", f"digest{i}", 1, "MODALITY"), now=100.0 + i)
    db.queue_stable_studies(0, now=1000.0)  # all six queued; claim_next takes the oldest first
    for uid, state, seconds in (("1.2.0", DONE, 4.0), ("1.2.1", DONE, 40.0), ("1.2.2", NOT_PROCESSED, 0.5)):
        assert db.claim_next().study_uid == uid
        db.finish(uid, state, reason=None, series_uid=None, model="m", findings=0, seconds=seconds)
    db.claim_next()
    db.fail("1.2.3", "ValueError: broken", max_attempts=1)
    db.claim_next()  # 1.2.4 processing, 1.2.5 still queued
    db.add_delivery("1.2.0", 1, "PACS@h:104", tmp_path)
    db.close()

    text = generate_latest(job_metrics(tmp_path / "jobs.sqlite3")).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("lungnode_studies_received_total", ())] == 6
    for state, count in ((DONE, 2), (NOT_PROCESSED, 1), (FAILED, 1), (PROCESSING, 1), (QUEUED, 1), ("receiving", 0)):
        assert samples[("lungnode_studies", (("state", state),))] == count, state
    assert samples[("lungnode_queue_depth", ())] == 2
    assert samples[("lungnode_deliveries_pending", ())] == 1
    assert samples[("lungnode_inference_seconds_bucket", (("le", "5.0"),))] == 1
    assert samples[("lungnode_inference_seconds_bucket", (("le", "60.0"),))] == 2
    assert samples[("lungnode_inference_seconds_sum", ())] == 44.0

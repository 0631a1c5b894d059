"""Reports to the RIS: the HL7 v2.5.1 ORU^R01 over MLLP and the FHIR R4 transaction Bundle.

Real parts only: the RIS is python-hl7's MLLP server (tests/mllp_ris.py) in its own process, the FHIR
server is Medplum's FHIR engine with its R4 validator (tests/fhir_server, `npm install --prefix
tests/fhir_server`), the node is a real `lungnode serve` process fed by a real C-STORE.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import hl7
import numpy as np
import pydicom
import pytest
import requests
from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

from lungnode.config import DicomPeer, HostPort, Settings
from lungnode.inference.types import Detection, DetectionResult, ModelInfo
from lungnode.inference.volume import load_volume
from lungnode.peers import NodeProcess, free_port, wait_for
from lungnode.reports.fhir_report import bundle_json
from lungnode.reports.fhir_send import post_bundle
from lungnode.reports.hl7_oru import MessageParties, build_oru, message_control_id
from lungnode.reports.mllp_send import send_hl7
from lungnode.reports.report_facts import report_facts
from lungnode.reports.send import SendError, send_files

TESTS = Path(__file__).resolve().parent
FHIR_SERVER = TESTS / "fhir_server"
MODEL = ModelInfo("lungnode-retina-cpu-v2", "2.0.0", "ab" * 32)
DICOM_UID = "urn:dicom:uid"


# --- real peers -----------------------------------------------------------------------------------
class MllpRis:
    """python-hl7's MLLP server as a RIS process that logs and acknowledges every message."""

    def __init__(self, workdir: Path, port: int | None = None, ack: str = "AA", text: str = "") -> None:
        self.port = port or free_port()
        self.log = workdir / f"ris-{self.port}.jsonl"
        self.args = [sys.executable, str(TESTS / "mllp_ris.py"), str(self.port), str(self.log), ack, text]
        self.proc: subprocess.Popen | None = None

    def start(self) -> "MllpRis":
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "listening"
        return self

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.proc.stdout.close()

    def messages(self) -> list[str]:
        if not self.log.exists():
            return []
        return [json.loads(line)["message"] for line in self.log.read_text(encoding="utf-8").splitlines()]

    @property
    def peer(self) -> HostPort:
        return HostPort(host="127.0.0.1", port=self.port)


FHIR_SERVER_MISSING = "FHIR test server not installed: needs node >= 20.19 and `npm install --prefix tests/fhir_server`"


def fhir_server_installed() -> bool:
    return shutil.which("node") is not None and (FHIR_SERVER / "node_modules" / "@medplum" / "fhir-router").is_dir()


@contextmanager
def running_fhir_server(workdir: Path) -> Iterator[str]:
    """A fresh FHIR R4 server (Medplum's engine, in memory) on a free loopback port; yields its base URL."""
    port = free_port()
    with open(workdir / f"fhir-server-{port}.log", "wb") as log:
        proc = subprocess.Popen([shutil.which("node"), str(FHIR_SERVER / "server.mjs"), str(port)], stdout=log,
                                stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: requests.get(f"{url}/Patient", timeout=2).ok, 60, "the FHIR server to start")
            yield url
        finally:
            proc.terminate()
            proc.wait(10)


@pytest.fixture
def fhir_server(tmp_path):
    if not fhir_server_installed():
        pytest.skip(FHIR_SERVER_MISSING)
    with running_fhir_server(tmp_path) as url:
        yield url


def fhir_search(url: str, resource_type: str, **params: str) -> list[dict]:
    r = requests.get(f"{url}/{resource_type}", params=params, timeout=10)
    r.raise_for_status()
    return [e["resource"] for e in r.json().get("entry", [])]


# --- results to report ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ct(small_ct_series):
    """A real CT series on disk, its volume and a source header."""
    return small_ct_series, load_volume(small_ct_series), pydicom.dcmread(small_ct_series[0], stop_before_pixels=True)


def detections_in(volume, n: int) -> list[Detection]:
    """`n` nodule detections at known places inside the volume (what the detector would hand over)."""
    out = []
    for i in range(n):
        centre = volume.index_to_world(np.array([60.0 + 40 * i, 120.0 + 10 * i, 10.0 + 8 * i]))
        d = 6.0 + 2.5 * i
        out.append(Detection(tuple(centre), (*(centre - d / 2), *(centre + d / 2)), d, 0.97 - 0.01 * i))
    return out


def facts_for(ct, n: int, reason: str | None = None, version: int = 1, source=None):
    files, volume, header = ct
    result = DetectionResult(volume.study_instance_uid, None if reason else volume.series_instance_uid, MODEL,
                             [] if reason else detections_in(volume, n), not_processed_reason=reason)
    return report_facts(result, None if reason else volume, source or header, version)


def obx_groups(message: hl7.Message) -> dict[str, dict[str, str]]:
    """OBX sub-ID -> {observation code: value} for the nodule groups."""
    groups: dict[str, dict[str, str]] = {}
    for obx in message.segments("OBX"):
        if str(obx(4)):
            groups.setdefault(str(obx(4)), {})[str(obx(3)(1)(1))] = str(obx(5))
    return groups


def obx_value(message: hl7.Message, code: str) -> str:
    return next(message.unescape(str(o(5))) for o in message.segments("OBX") if str(o(3)(1)(1)) == code)


# --- ORU builder ----------------------------------------------------------------------------------
def test_oru_names_patient_order_study_and_one_obx_group_per_nodule(ct):
    files, volume, header = ct
    facts = facts_for(ct, 3)
    message = hl7.parse(build_oru(facts, MessageParties("LUNGNODE", "CT-ROOM", "RIS_APP", "HOSP")))
    msh, pid, orc, obr = (message.segment(s) for s in ("MSH", "PID", "ORC", "OBR"))
    assert [str(msh(i)) for i in (3, 4, 5, 6, 12)] == ["LUNGNODE", "CT-ROOM", "RIS_APP", "HOSP", "2.5.1"]
    assert str(msh(9)) == "ORU^R01^ORU_R01" and str(msh(10)) == message_control_id(facts.study_uid, 1)
    assert str(pid(3)(1)(1)) == header.PatientID == "RX-TEST" and str(pid(5)) == "PHANTOM^LUNG"
    assert str(orc(1)) == "RE" and str(orc(5)) == "CM"
    assert str(orc(2)) == str(orc(3)) == str(obr(2)) == str(obr(3)) == header.AccessionNumber == "ACC1"
    assert str(obr(25)) == "F"
    assert obx_value(message, "110180") == volume.study_instance_uid  # DCM Study Instance UID
    assert obx_value(message, "111001") == MODEL.name and obx_value(message, "111003") == MODEL.version
    assert obx_value(message, "NODULES") == "3"

    groups = obx_groups(message)
    assert sorted(groups) == ["1", "2", "3"]
    for number, detection in enumerate(detections_in(volume, 3), start=1):
        g = groups[str(number)]
        assert float(g["81827009"]) == pytest.approx(detection.diameter_mm, abs=0.051)  # SCT Diameter
        assert float(g["111012"]) == pytest.approx(detection.score, abs=5e-4)  # certainty of finding
        assert [float(v) for v in g["111010"].split("^")] == pytest.approx(detection.center_mm, abs=0.051)
        slice_uid = g["121112"].split("^")[0]  # the source slice: a real instance of the series
        slice_file = next(f for f in files if pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID == slice_uid)
        z = float(pydicom.dcmread(slice_file, stop_before_pixels=True).ImagePositionPatient[2])
        assert abs(z - detection.center_mm[2]) <= volume.spacing[2] / 2 + 1e-3
        assert g["INSTANCE"] == str(pydicom.dcmread(slice_file, stop_before_pixels=True).InstanceNumber)
    units = {str(o(3)(1)(1)): str(o(6)) for o in message.segments("OBX") if str(o(4)) == "1"}
    assert units["81827009"] == "mm^millimeter^UCUM" and units["111010"] == "mm^millimeter^UCUM"
    assert all(str(o(11)) == "F" for o in message.segments("OBX"))


def test_oru_escapes_delimiters_in_names_accession_and_reason(ct):
    source = pydicom.dcmread(ct[0][0], stop_before_pixels=True)
    source.PatientName = "Nguyễn & Trần^Thị|Hoa"
    source.AccessionNumber = "A|1^2~3"
    reason = "series 1.2 (Thorax & Lung \\ 5mm | soft): 12 slices < 40\nsecond line"
    text = build_oru(facts_for(ct, 0, reason=reason, source=source))
    segments = text.split("\r")
    assert text.endswith("\r") and all(s[:3].isalpha() for s in segments if s)  # no segment was split
    message = hl7.parse(text)
    pid, orc = message.segment("PID"), message.segment("ORC")
    assert len(pid) == 9 and len(orc) == 10  # no field was split either
    assert message.unescape(str(pid(5)(1)(1))) == "Nguyễn & Trần"
    assert message.unescape(str(pid(5)(1)(2))) == "Thị|Hoa"
    assert message.unescape(str(orc(2))) == "A|1^2~3"
    assert obx_value(message, "121106") == f"Not processed: {reason}".replace("\n", "\r")  # \.br\ is a CR


def test_a_frame_of_a_multiframe_slice_is_named_in_both_reports(ct):
    facts = facts_for(ct, 2)
    facts = replace(facts, nodules=[facts.nodules[0], replace(facts.nodules[1], slice_frame_number=17)])
    groups = obx_groups(hl7.parse(build_oru(facts)))
    assert "121190" not in groups["1"] and groups["2"]["121190"] == "17"  # DCM Referenced Frames
    observations = contained_observations(bundle_json(facts, "urn:x"))
    frames = [[c.get("valueInteger") for c in o["component"] if c["code"].get("coding", [{}])[0].get(
        "code") == "121190"] for o in observations]
    assert frames == [[], [17]]


def test_not_processed_study_is_a_cancelled_order_with_the_reason(ct):
    message = hl7.parse(build_oru(facts_for(ct, 0, reason="no eligible CT series: too few slices")))
    assert str(message.segment("OBR")(25)) == "X"  # table 0123: no results available, order canceled
    assert str(message.segment("ORC")(5)) == "CA"
    assert obx_value(message, "121106") == "Not processed: no eligible CT series: too few slices"
    assert obx_groups(message) == {} and "NODULES" not in [str(o(3)(1)(1)) for o in message.segments("OBX")]


def test_control_id_is_stable_per_study_version():
    assert message_control_id("1.2.3", 1) == message_control_id("1.2.3", 1)
    assert len({message_control_id("1.2.3", 1), message_control_id("1.2.3", 2), message_control_id("1.2.4", 1)}) == 3
    assert len(message_control_id("1.2.3", 1)) <= 20  # MSH-10 length in 2.5.1


# --- MLLP -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", ["AA", "CA"])
def test_ris_receives_the_message_and_its_acceptance_is_success(ct, tmp_path, code):
    ris = MllpRis(tmp_path, ack=code).start()
    try:
        text = build_oru(facts_for(ct, 2))
        ack = hl7.parse(send_hl7(ris.peer, text, timeout=10))
        assert str(ack.segment("MSA")(1)) == code
        assert ris.messages() == [text]
    finally:
        ris.stop()


def test_ris_refusal_is_an_error_with_the_ack_text(ct, tmp_path):
    ris = MllpRis(tmp_path, ack="AE", text="Unknown accession ACC1").start()
    try:
        with pytest.raises(SendError, match="refused the message with AE: Unknown accession ACC1"):
            send_hl7(ris.peer, build_oru(facts_for(ct, 1)), timeout=10)
    finally:
        ris.stop()


def test_silent_or_absent_ris_is_an_error(ct, tmp_path):
    text = build_oru(facts_for(ct, 1))
    ris = MllpRis(tmp_path, ack="NONE").start()
    try:
        started = time.monotonic()
        with pytest.raises(SendError, match="no acknowledgement within 1 s"):
            send_hl7(ris.peer, text, timeout=1)
        assert time.monotonic() - started < 5
    finally:
        ris.stop()
    with pytest.raises(SendError, match="connection"):
        send_hl7(ris.peer, text, timeout=5)  # nobody listens there now


# --- FHIR -----------------------------------------------------------------------------------------
def entries(bundle_text: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for e in json.loads(bundle_text)["entry"]:
        out.setdefault(e["resource"]["resourceType"], []).append(e)
    return out


def contained_observations(bundle_text: str) -> list[dict]:
    """The nodule Observations, contained in the bundle's DiagnosticReport."""
    return entries(bundle_text)["DiagnosticReport"][0]["resource"].get("contained", [])


def test_fhir_bundle_validates_and_has_one_observation_per_nodule(ct):
    files, volume, header = ct
    text = bundle_json(facts_for(ct, 3), "urn:oid:1.2.3.4.5")
    bundle = Bundle.model_validate_json(text)
    assert bundle.type == "transaction"
    by_type = entries(text)
    report = by_type["DiagnosticReport"][0]
    assert report["resource"]["status"] == "final"
    assert report["resource"]["code"]["coding"][0]["code"] == "24627-2"
    assert report["request"]["method"] == "PUT" and report["request"]["url"].startswith("DiagnosticReport?identifier=")
    assert report["resource"]["basedOn"][0]["identifier"]["value"] == "ACC1"
    assert "Observation" not in by_type  # contained in the report: four entries whatever the nodule count
    observations = report["resource"]["contained"]
    assert len(observations) == 3 and len(by_type) == 4
    assert [r["reference"] for r in report["resource"]["result"]] == [f"#{o['id']}" for o in observations]
    for r, detection in zip(observations, detections_in(volume, 3)):
        assert r["bodySite"]["coding"][0]["code"] == "39607008"  # SCT Lung
        diameter = r["component"][0]["valueQuantity"]
        assert (diameter["value"], diameter["system"], diameter["code"]) == (
            round(detection.diameter_mm, 1), "http://unitsofmeasure.org", "mm")
        centre = [c["valueQuantity"]["value"] for c in r["component"] if c["code"].get("text", "").startswith("Center")]
        assert centre == pytest.approx(detection.center_mm, abs=0.051)
        assert r["device"]["reference"] == by_type["Device"][0]["fullUrl"]
    patient = by_type["Patient"][0]
    assert patient["resource"]["identifier"] == [{"system": "urn:oid:1.2.3.4.5", "value": "RX-TEST"}]
    study = by_type["ImagingStudy"][0]
    assert study["resource"]["identifier"][0] == {"system": DICOM_UID, "value": f"urn:oid:{volume.study_instance_uid}"}
    for kind in ("Patient", "ImagingStudy", "Device"):  # created only if not there yet
        for e in by_type[kind]:
            ident = e["resource"]["identifier"][0]
            condition = "identifier=" + quote(f"{ident['system']}|{ident['value']}", safe="")
            assert e["request"] == {"method": "POST", "url": kind, "ifNoneExist": condition}
    again = contained_observations(bundle_json(facts_for(ct, 3), "urn:oid:1.2.3.4.5"))
    assert [o["identifier"] for o in again] == [o["identifier"] for o in observations]


def test_not_processed_fhir_report_is_cancelled_with_the_reason(ct):
    by_type = entries(bundle_json(facts_for(ct, 0, reason="no eligible CT series: too few slices"), "urn:x"))
    report = by_type["DiagnosticReport"][0]["resource"]
    assert report["status"] == "cancelled" and "too few slices" in report["conclusion"]
    assert "contained" not in report and "result" not in report


def test_study_without_patient_id_still_reports_without_a_patient(ct):
    source = pydicom.dcmread(ct[0][0], stop_before_pixels=True)
    source.PatientID = ""  # Type 2: may be empty
    facts = facts_for(ct, 1, source=source)
    assert str(hl7.parse(build_oru(facts)).segment("PID")(3)) == ""
    text = bundle_json(facts, "urn:x")
    Bundle.model_validate_json(text)
    by_type = entries(text)
    assert sorted(by_type) == ["Device", "DiagnosticReport"]  # no Patient to name
    assert "subject" not in by_type["DiagnosticReport"][0]["resource"]


def test_fhir_server_takes_the_bundle_and_a_resend_or_new_version_duplicates_nothing(ct, fhir_server):
    v1 = bundle_json(facts_for(ct, 3), "urn:x").encode()
    answer = post_bundle(fhir_server, v1, timeout=30)
    assert [e["response"]["status"][:3] for e in answer["entry"]] == ["201"] * 4
    post_bundle(fhir_server, v1, timeout=30)  # the same again: a resend
    counts = {t: len(fhir_search(fhir_server, t)) for t in ("Patient", "ImagingStudy", "Device", "DiagnosticReport")}
    assert counts == {"Patient": 1, "ImagingStudy": 1, "Device": 1, "DiagnosticReport": 1}
    (stored,) = fhir_search(fhir_server, "DiagnosticReport")
    assert len(stored["contained"]) == 3 and [r["reference"] for r in stored["result"]] == ["#n1", "#n2", "#n3"]

    post_bundle(fhir_server, bundle_json(facts_for(ct, 1, version=2), "urn:x").encode(), timeout=30)
    ident = entries(v1.decode())["DiagnosticReport"][0]["resource"]["identifier"][0]
    (report,) = fhir_search(fhir_server, "DiagnosticReport", identifier=f"{ident['system']}|{ident['value']}")
    assert len(report["result"]) == 1 and len(report["contained"]) == 1 and "version 2" in report["conclusion"]
    (patient,) = fhir_search(fhir_server, "Patient", identifier="urn:x|RX-TEST")
    assert report["subject"]["reference"] == f"Patient/{patient['id']}"


def test_fhir_server_refusal_is_an_error_with_its_outcome(ct, fhir_server):
    bundle = json.loads(bundle_json(facts_for(ct, 1), "urn:x"))
    del bundle["entry"][-1]["resource"]["code"]  # DiagnosticReport.code is required
    with pytest.raises(SendError, match="HTTP 400.*DiagnosticReport.code"):
        post_bundle(fhir_server, json.dumps(bundle).encode(), timeout=30)


# --- settings -------------------------------------------------------------------------------------
def test_ris_settings_from_the_environment(monkeypatch):
    s = Settings()
    assert s.ris_hl7 is None and s.fhir_url is None  # off by default
    monkeypatch.setenv("LUNGNODE_RIS_HL7", "ris.hospital.lan:2575")
    monkeypatch.setenv("LUNGNODE_FHIR_URL", "https://fhir.hospital.lan/fhir")
    monkeypatch.setenv("LUNGNODE_HL7_RECEIVING_APPLICATION", "RADIS")
    s = Settings()
    assert (s.ris_hl7.host, s.ris_hl7.port, str(s.ris_hl7)) == ("ris.hospital.lan", 2575, "ris.hospital.lan:2575")
    assert s.fhir_url == "https://fhir.hospital.lan/fhir" and s.hl7_receiving_application == "RADIS"
    monkeypatch.setenv("LUNGNODE_RIS_HL7", "ris.hospital.lan")
    with pytest.raises(ValidationError, match="host:port"):
        Settings()


# --- the node -------------------------------------------------------------------------------------
def test_node_reports_to_ris_once_despite_crash_ris_down_and_restart(tmp_path):
    """Killed after receiving, RIS down at first: the ORU still arrives, exactly once, also after a
    restart; a resend is the same message again (same MSH-10). With the FHIR test server installed the
    same run delivers to it too, and the resend adds no duplicate there."""
    from lungnode.training.synth import make_phantom, write_dicom_series

    with ExitStack() as stack:
        fhir = stack.enter_context(running_fhir_server(tmp_path)) if fhir_server_installed() else None
        if fhir is None:
            print(f"{FHIR_SERVER_MISSING}: this run checks the HL7 delivery only")
        ris = MllpRis(tmp_path)
        stack.callback(lambda: ris.proc and ris.stop())
        node = NodeProcess(tmp_path / "node", stable_seconds=3600, ris_hl7=f"127.0.0.1:{ris.port}",
                           send_retry_first_seconds=1, send_retry_max_seconds=2, **({"fhir_url": fhir} if fhir else {}))
        node.start()
        stack.callback(node.stop)
        phantom = make_phantom(90011, spacing=(1.4, 1.4, 2.5), field_of_view_mm=(360.0, 360.0, 200.0),
                               n_nodules=(2, 3), diameter_range_mm=(8.0, 20.0))
        files = write_dicom_series(phantom, tmp_path / "ct", patient_id="RIS-1", accession_number="ACC-RIS-1")
        study_uid = pydicom.dcmread(files[0]).StudyInstanceUID
        send_files(DicomPeer(ae_title="LUNGNODE", host="127.0.0.1", port=node.dicom_port), files, "PACS")
        node.kill()  # a crash right after the images were acknowledged
        node.env["LUNGNODE_STABLE_SECONDS"] = "1"
        node.start()

        def deliveries() -> dict[str, dict]:
            return {d["kind"]: d for d in (node.study(study_uid) or {}).get("deliveries", [])}

        wait_for(lambda: deliveries().get("hl7", {}).get("attempts", 0) >= 1
                 and (fhir is None or deliveries().get("fhir", {}).get("state") == "sent"), 600,
                 "processing and a first (failed) HL7 attempt", interval=0.5)
        hl7_row = deliveries()["hl7"]
        assert hl7_row["state"] == "pending" and "connection" in hl7_row["last_error"]
        assert hl7_row["destination"] == f"HL7 127.0.0.1:{ris.port}"
        assert sorted(deliveries()) == (["fhir", "hl7"] if fhir else ["hl7"])  # no PACS configured: none queued

        ris.start()  # the RIS comes up
        wait_for(lambda: deliveries()["hl7"]["state"] == "sent", 60, "the ORU to be delivered", interval=0.5)
        detections = node.study(study_uid)["result"]["detections"]
        assert len(detections) >= 1, "the phantom's nodules should be found (see the model card)"
        (text,) = ris.messages()
        message = hl7.parse(text)
        assert str(message.segment("OBR")(2)) == "ACC-RIS-1" and str(message.segment("PID")(3)(1)(1)) == "RIS-1"
        assert str(message.segment("OBR")(25)) == "F"
        groups = obx_groups(message)
        assert len(groups) == len(detections)
        assert [float(groups[str(i)]["81827009"]) for i in range(1, len(detections) + 1)] == pytest.approx(
            [d["diameter_mm"] for d in detections], abs=0.051)
        if fhir:
            assert deliveries()["fhir"]["destination"] == f"FHIR {fhir}"
            (report,) = fhir_search(fhir, "DiagnosticReport")
            assert report["status"] == "final" and len(report["result"]) == len(detections)
            assert len(report["contained"]) == len(detections)

        node.stop()
        node.start()  # a restart after delivery sends nothing again
        time.sleep(3)  # several rounds of the sender
        assert ris.messages() == [text]
        assert requests.get(f"{node.url}/health", timeout=10).json()["pending_deliveries"] == 0

        assert node.http.post(f"{node.url}/api/studies/{study_uid}/resend", timeout=10).ok
        wait_for(lambda: len(ris.messages()) == 2 and all(d["state"] == "sent" for d in
                 node.study(study_uid)["deliveries"]), 60, "the resend", interval=0.5)
        assert ris.messages() == [text, text]  # the same bytes: MSH-10 tells the RIS it is a resend
        if fhir:
            (report,) = fhir_search(fhir, "DiagnosticReport")
            assert len(report["contained"]) == len(detections)


def test_facts_refuse_detections_without_their_volume(ct):
    files, volume, header = ct
    result = DetectionResult(volume.study_instance_uid, volume.series_instance_uid, MODEL, detections_in(volume, 1))
    with pytest.raises(ValueError, match="volume"):
        report_facts(result, None, header, 1)

"""HL7 v2.5.1 ORU^R01 (unsolicited observation result) for one processed study, for the RIS.

The RIS files a result against its order, so the order is named the way it knows it: ORC-2/ORC-3
(placer/filler order number) and OBR-2/OBR-3/OBR-18 carry the DICOM Accession Number (OBR-18 as IHE
Scheduled Workflow does). The observations use the codes of the DICOM SR (TID 1500) so the two
reports say the same thing:

* study-level OBX (no sub-ID): Study and Series Instance UID (DCM 110180 / 112002, ST), algorithm name
  and version (DCM 111001 / 111003), the nodule count, and a comment (DCM 121106) with the summary;
* one OBX group per nodule, tied together by OBX-4 sub-ID = the nodule number (N1 = 1, as in the SR
  and on the key images): finding (DCM 121071 = SCT Nodule), finding site (SCT Lung), diameter
  (SCT 81827009, UCUM mm), certainty of finding (DCM 111012, UCUM 1), centre (DCM 111010, NA
  x^y^z in DICOM patient coordinates LPS, mm), the source slice (DCM 121112, RP pointer to the SOP
  Instance UID, type Image, subtype DICOM), its Instance Number and, for a multi-frame instance, the
  frame (DCM 121190 Referenced Frames).

Result status: a read study is OBR-25 'F' (final results) with ORC-5 'CM' (order completed). A study
the node could not read gets OBR-25 'X' - HL7 table 0123 "No results available; Order canceled" - and
ORC-5 'CA' (table 0038 "Order was canceled"): 'X' is the one 2.5.1 status that says no result will
come from this order, which is true (only a re-run after new images can produce one); the reason is
in the comment OBX, so the RIS shows why. The OBX values themselves are final facts (OBX-11 'F').
A version a radiologist verified is also 'F'; its comment names them, and a nodule they added has no
certainty OBX (the model did not find it).

Text is UTF-8 (MSH-18 'UNICODE UTF-8') and only the delimiters are escaped: python-hl7's escape()
turns every non-ASCII character into \\Xhh\\, which is undefined for characters beyond Latin-1
(e.g. Vietnamese names). MSH-10 is derived from the study and version, so a resend of the same
results is recognisable as such, and a new version is a new message.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from lungnode.reports.report_facts import NoduleFacts, ReportFacts
from lungnode.reports.sr import CHEST_CT, DETECTION_CONFIDENCE

VERSION = "2.5.1"
FIELD, COMPONENT, REPETITION, ESCAPE, SUBCOMPONENT = "|", "^", "~", "\\", "&"
SEGMENT_END = "\r"
NODULE_COUNT = Code("NODULES", "L", "Number of lung nodules detected")
INSTANCE_NUMBER = Code("INSTANCE", "L", "Instance Number of the source slice")
MM = (codes.UCUM.Millimeter.value, "millimeter", "UCUM")
NO_UNITS = ("1", "no units", "UCUM")
_ESCAPES = {ESCAPE: "\\E\\", FIELD: "\\F\\", COMPONENT: "\\S\\", SUBCOMPONENT: "\\T\\", REPETITION: "\\R\\"}

Field = str | tuple[str, ...]  # one value, or its components
Obx = tuple[str, Code, str, Field, Field]  # value type, observation code, sub-ID, value, units


@dataclass(frozen=True)
class MessageParties:
    """MSH-3..6: who sends the message and who it is for (what the RIS admin sets up)."""

    sending_application: str = "LUNGNODE"
    sending_facility: str = "RADIOLOGY"
    receiving_application: str = "RIS"
    receiving_facility: str = "RADIOLOGY"


def message_control_id(study_uid: str, version: int) -> str:
    """MSH-10 (at most 20 characters in 2.5.1): the same for the same results, different otherwise."""
    return hashlib.sha256(f"{study_uid}/v{version}".encode()).hexdigest()[:20].upper()


def escape(text: str) -> str:
    """HL7 escape sequences for the delimiters; line breaks become \\.br\\ (formatted-text break)."""
    out = "".join(_ESCAPES.get(c, c) for c in text)
    return out.replace("\r\n", "\\.br\\").replace("\n", "\\.br\\").replace("\r", "\\.br\\")


def build_oru(facts: ReportFacts, parties: MessageParties = MessageParties()) -> str:
    """The ORU^R01 message text: segments ended by carriage returns, as sent over MLLP."""
    processed = facts.not_processed_reason is None
    now = _ts(facts.created.strftime("%Y%m%d%H%M%S"), facts.created.strftime("%z"))
    accession = facts.accession
    segments = [
        _segment("MSH", {3: parties.sending_application, 4: parties.sending_facility,
                         5: parties.receiving_application, 6: parties.receiving_facility, 7: now,
                         9: ("ORU", "R01", "ORU_R01"), 10: message_control_id(facts.study_uid, facts.version),
                         11: "P", 12: VERSION, 18: "UNICODE UTF-8"}),
        _segment("PID", {1: "1", 3: _patient_id(facts), 5: _patient_name(facts), 7: facts.patient.birth_date,
                         8: facts.patient.sex if facts.patient.sex in ("M", "F", "O") else "U"}),
        _segment("ORC", {1: "RE", 2: accession, 3: accession, 5: "CM" if processed else "CA", 9: now}),
        _segment("OBR", {1: "1", 2: accession, 3: accession, 4: _ce(CHEST_CT),
                         7: _ts(facts.study_date + facts.study_time.split(".")[0], facts.timezone_offset)
                         if facts.study_date else "",
                         18: accession, 22: now, 24: "CT", 25: "F" if processed else "X"}),
    ]
    observations: list[Obx] = [
        ("ST", codes.DCM.StudyInstanceUID, "", facts.study_uid, ""),
    ]
    if facts.series_uid:
        observations.append(("ST", codes.DCM.SeriesInstanceUID, "", facts.series_uid, ""))
    observations += [("ST", codes.DCM.AlgorithmName, "", facts.model.name, ""),
                     ("ST", codes.DCM.AlgorithmVersion, "", facts.model.version, "")]
    if processed:
        observations.append(("NM", NODULE_COUNT, "", str(len(facts.nodules)), ""))
    observations.append(("TX", codes.DCM.Comment, "", facts.summary, ""))
    for nodule in facts.nodules:
        observations += _nodule_observations(nodule)
    for set_id, (value_type, code, sub_id, value, units) in enumerate(observations, start=1):
        segments.append(_segment("OBX", {1: str(set_id), 2: value_type, 3: _ce(code), 4: sub_id, 5: value,
                                         6: units, 11: "F", 14: now}))
    return "".join(s + SEGMENT_END for s in segments)


def _nodule_observations(n: NoduleFacts) -> list[Obx]:
    sub = str(n.number)
    centre = tuple(f"{c:.1f}" for c in n.center_mm)
    out: list[Obx] = [
        ("CE", codes.DCM.Finding, sub, _ce(codes.SCT.Nodule), ""),
        ("CE", codes.SCT.FindingSite, sub, _ce(codes.SCT.Lung), ""),
        ("NM", codes.SCT.Diameter, sub, f"{n.diameter_mm:.1f}", MM),
        *([("NM", DETECTION_CONFIDENCE, sub, f"{n.score:.3f}", NO_UNITS)] if n.score is not None else []),
        ("NA", Code(codes.DCM.Center.value, "DCM", "Center (LPS)"), sub, centre, MM),
        ("RP", codes.DCM.SourceOfMeasurement, sub, (n.slice_sop_instance_uid, "", "Image", "DICOM"), ""),
    ]
    if n.slice_instance_number is not None:
        out.append(("NM", INSTANCE_NUMBER, sub, str(n.slice_instance_number), ""))
    if n.slice_frame_number is not None:  # the slice is a frame of a multi-frame (Enhanced CT) instance
        out.append(("NM", codes.DCM.ReferencedFrames, sub, str(n.slice_frame_number), ""))
    return out


def _segment(name: str, fields: dict[int, Field]) -> str:
    """One segment from {field number: value}; every value is escaped (MSH-1/2 are the delimiters)."""
    values = [""] * (max(fields) + 1)
    for number, value in fields.items():
        values[number] = (COMPONENT.join(map(escape, value)).rstrip(COMPONENT) if isinstance(value, tuple)
                          else escape(value))
    if name == "MSH":  # MSH-1 is the field separator itself, so MSH-2 is the first field written
        return FIELD.join(["MSH", COMPONENT + REPETITION + ESCAPE + SUBCOMPONENT, *values[3:]])
    return FIELD.join([name, *values[1:]])


def _ce(code: Code) -> tuple[str, str, str]:
    """CE (coded element): identifier ^ text ^ coding system (HL7 table 0396: SCT, DCM, LN, UCUM, L)."""
    return (str(code.value), str(code.meaning), str(code.scheme_designator))


def _ts(digits: str, offset: str) -> str:
    """HL7 TS: YYYYMMDD[HHMM[SS]] with the +/-ZZZZ offset when it is known."""
    return digits + offset if digits else ""


def _patient_id(facts: ReportFacts) -> Field:
    """PID-3 (CX): ID ^^^ assigning authority ^ MR."""
    return (facts.patient.id, "", "", facts.patient.issuer, "MR") if facts.patient.id else ""


def _patient_name(facts: ReportFacts) -> Field:
    """PID-5 (XPN): family ^ given ^ middle ^ suffix ^ prefix (DICOM PN puts the prefix before the suffix)."""
    p = facts.patient
    return (p.family, p.given, p.middle, p.suffix, p.prefix) if any((p.family, p.given)) else ""

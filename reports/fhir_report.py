"""FHIR R4 transaction Bundle for one processed study: a DiagnosticReport with one Observation per nodule.

What is in it, and why:

* DiagnosticReport (code LOINC 24627-2 "Chest CT", as the SR's procedure reported; category RAD):
  status 'final', or 'cancelled' when the study could not be read (FHIR: "the report is not available
  because the procedure was not started or not completed"), with the reason as its conclusion.
  basedOn names the order by its Accession Number (identifier type ACSN), subject the Patient,
  imagingStudy the ImagingStudy, result the nodule Observations.
* Patient and ImagingStudy are only created when the server has none with the same identifier (the
  DICOM Patient ID; the Study Instance UID as urn:dicom:uid): they belong to the EHR and the PACS.
* One Observation per nodule, contained in the DiagnosticReport (code SCT Nodule, body site SCT Lung), with
  components diameter (UCUM mm),
  certainty of finding (DCM 111012, UCUM 1), the centre x/y/z in DICOM patient coordinates (LPS, mm),
  the source slice (SOP Instance UID), its Instance Number (and frame, multi-frame); device = the model.
* The model is a Device (identifier = the SR's device observer UID). R4 allows no Device as
  DiagnosticReport.performer, so it is the Observations' device, and the conclusion names it.
* A version a radiologist verified names them as the report's resultsInterpreter (a reference by display
  name: lungnode knows no Practitioner resource of theirs); a nodule they added has the radiologist as its
  performer instead of the model as its device, and no confidence.

No duplicates on a resend: Patient, ImagingStudy and Device carry deterministic identifiers and are sent
as conditional creates (ifNoneExist); the DiagnosticReport, one per study, is a conditional update: a
re-processed study (new version) updates the same report, whose history keeps the old one. The nodule
Observations are contained in the report, so its findings are replaced with it, and the transaction keeps
four entries whatever the number of nodules (servers cap transactions that need strict isolation: Medplum
at 8 entries).

The resources are checked with fhir.resources' R4B models (PyPI has no pydantic-2 release of the R4
models); every element used here is the same in R4 and R4B.
"""
from __future__ import annotations

import uuid
from urllib.parse import urlencode

from fhir.resources.R4B.bundle import Bundle
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from lungnode.reports.report_facts import NoduleFacts, ReportFacts
from lungnode.reports.sr import CHEST_CT, DETECTION_CONFIDENCE, device_observer_uid

DICOM_UID = "urn:dicom:uid"
SYSTEMS = {"LN": "http://loinc.org", "SCT": "http://snomed.info/sct", "UCUM": "http://unitsofmeasure.org",
           "DCM": "http://dicom.nema.org/resources/ontology/DCM"}
ACSN = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN",
                    "display": "Accession ID"}]}
MANUFACTURER = "lungnode"  # as in the DICOM results
_GENDER = {"M": "male", "F": "female", "O": "other"}


def build_bundle(facts: ReportFacts, patient_system: str) -> Bundle:
    """The transaction Bundle (validated); POST it to the FHIR base URL."""
    entries: list[dict] = []
    patient_ref = study_ref = None
    if facts.patient.id:  # without one there is no Patient to name, and ImagingStudy needs a subject
        patient_ref = _add(entries, _patient(facts, patient_system))
        study_ref = _add(entries, _imaging_study(facts, patient_ref))
    observations = []
    if facts.nodules:
        device_ref = _add(entries, _device(facts)) if any(n.score is not None for n in facts.nodules) else None
        observations = [_observation(facts, n, patient_ref, study_ref, device_ref) for n in facts.nodules]
    _add(entries, _diagnostic_report(facts, patient_ref, study_ref, observations), update=True)
    return Bundle.model_validate({"resourceType": "Bundle", "type": "transaction", "entry": entries})


def bundle_json(facts: ReportFacts, patient_system: str) -> str:
    """The Bundle as it is stored and sent (UTF-8 JSON)."""
    return build_bundle(facts, patient_system).model_dump_json(exclude_none=True, indent=2)


def _diagnostic_report(facts: ReportFacts, patient_ref: dict | None, study_ref: dict | None,
                       observations: list[dict]) -> dict:
    report = {
        "resourceType": "DiagnosticReport",
        "identifier": [_uid_identifier(_uid(facts.study_uid, "diagnostic-report"))],
        "status": "final" if facts.not_processed_reason is None else "cancelled",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
                                  "display": "Radiology"}]}],
        "code": _concept(CHEST_CT),
        "issued": facts.created.isoformat(),
        "conclusion": f"{facts.summary} Results version {facts.version}.",
    }
    if facts.verification is not None:
        report["resultsInterpreter"] = [{"display": facts.verifier}]
    if facts.accession:
        report["basedOn"] = [{"type": "ServiceRequest", "identifier": {"type": ACSN, "value": facts.accession}}]
    if patient_ref:
        report["subject"] = patient_ref
    if study_ref:
        report["imagingStudy"] = [study_ref]
    if effective := _effective(facts):
        report["effectiveDateTime"] = effective
    if observations:
        report["contained"] = observations
        report["result"] = [{"reference": f"#{o['id']}"} for o in observations]
    return report


def _observation(facts: ReportFacts, n: NoduleFacts, patient_ref: dict | None, study_ref: dict | None,
                 device_ref: dict | None) -> dict:
    components = [
        {"code": _concept(codes.SCT.Diameter), "valueQuantity": _quantity(round(n.diameter_mm, 1), "mm")},
        *([{"code": _concept(DETECTION_CONFIDENCE), "valueQuantity": _quantity(round(n.score, 3), "1")}]
          if n.score is not None else []),
        *({"code": {"text": f"Center {axis} (DICOM patient coordinates, LPS)"},
           "valueQuantity": _quantity(round(value, 1), "mm")} for axis, value in zip("xyz", n.center_mm)),
        {"code": _concept(codes.DCM.SourceOfMeasurement), "valueString": f"urn:oid:{n.slice_sop_instance_uid}"},
    ]
    if n.slice_instance_number is not None:
        components.append({"code": {"text": "Instance Number of the source slice"},
                           "valueInteger": n.slice_instance_number})
    if n.slice_frame_number is not None:
        components.append({"code": _concept(codes.DCM.ReferencedFrames), "valueInteger": n.slice_frame_number})
    observation = {
        "resourceType": "Observation",
        "id": f"n{n.number}",
        "identifier": [_uid_identifier(_uid(facts.study_uid, f"v{facts.version}", f"N{n.number}"))],
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "imaging", "display": "Imaging"}]}],
        "code": {**_concept(codes.SCT.Nodule), "text": f"Lung nodule N{n.number}"},
        "effectiveDateTime": _effective(facts) or facts.created.isoformat(),
        "issued": facts.created.isoformat(),
        "bodySite": _concept(codes.SCT.Lung),
        "component": components,
    }
    if n.score is None:  # added by the verifying radiologist
        observation["performer"] = [{"display": facts.verifier}]
    else:
        observation["device"] = device_ref
    if patient_ref:
        observation["subject"] = patient_ref
    if study_ref:
        observation["derivedFrom"] = [study_ref]
    return observation


def _patient(facts: ReportFacts, system: str) -> dict:
    p = facts.patient
    patient: dict = {"resourceType": "Patient", "identifier": [{"system": system, "value": p.id}],
                     "gender": _GENDER.get(p.sex, "unknown")}
    name = {"family": p.family, "given": [g for g in (p.given, p.middle) if g],
            "prefix": [p.prefix] if p.prefix else None, "suffix": [p.suffix] if p.suffix else None}
    if p.family or p.given:
        patient["name"] = [{k: v for k, v in name.items() if v}]
    if len(p.birth_date) == 8:
        patient["birthDate"] = f"{p.birth_date[:4]}-{p.birth_date[4:6]}-{p.birth_date[6:]}"
    return patient


def _imaging_study(facts: ReportFacts, patient_ref: dict) -> dict:
    study: dict = {"resourceType": "ImagingStudy", "identifier": [_uid_identifier(facts.study_uid)],
                   "status": "available", "subject": patient_ref}
    if facts.accession:
        study["identifier"].append({"type": ACSN, "value": facts.accession})
    if facts.series_uid:
        study["series"] = [{"uid": facts.series_uid, "modality": {"system": SYSTEMS["DCM"], "code": "CT"}}]
    return study


def _device(facts: ReportFacts) -> dict:
    return {"resourceType": "Device",
            "identifier": [_uid_identifier(device_observer_uid(facts.model, MANUFACTURER))],
            "manufacturer": MANUFACTURER,
            "deviceName": [{"name": facts.model.name, "type": "model-name"}],
            "version": [{"value": facts.model.version}],
            "type": {"text": "AI lung nodule detection software"}}


def _add(entries: list[dict], resource: dict, update: bool = False) -> dict:
    """Append a transaction entry keyed by the resource's first identifier: a conditional create, or a
    conditional update with ``update``. Returns a reference to it by its stable urn:uuid."""
    condition = _search(resource["identifier"][0])
    full_url = f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, resource['resourceType'] + '?' + condition)}"
    request = ({"method": "PUT", "url": f"{resource['resourceType']}?{condition}"} if update else
               {"method": "POST", "url": resource["resourceType"], "ifNoneExist": condition})
    entries.append({"fullUrl": full_url, "resource": resource, "request": request})
    return {"reference": full_url}


def _search(identifier: dict) -> str:
    return urlencode({"identifier": f"{identifier['system']}|{identifier['value']}"})


def _uid(*parts: str) -> str:
    """A DICOM-style UID that is the same every time for the same parts."""
    return generate_uid(entropy_srcs=["lungnode-fhir", *parts])


def _uid_identifier(uid: str) -> dict:
    return {"system": DICOM_UID, "value": f"urn:oid:{uid}"}


def _concept(code: Code) -> dict:
    return {"coding": [{"system": SYSTEMS[code.scheme_designator], "code": str(code.value),
                        "display": str(code.meaning)}]}


def _quantity(value: float, ucum: str) -> dict:
    return {"value": value, "unit": ucum, "system": SYSTEMS["UCUM"], "code": ucum}


def _effective(facts: ReportFacts) -> str | None:
    """The study's date/time as FHIR dateTime: with a time only when the time zone is known (FHIR rule)."""
    d = facts.study_date
    if len(d) != 8:
        return None
    date = f"{d[:4]}-{d[4:6]}-{d[6:]}"
    t, tz = facts.study_time.split(".")[0], facts.timezone_offset
    if len(t) == 6 and len(tz) == 5:
        return f"{date}T{t[:2]}:{t[2:4]}:{t[4:]}{tz[:3]}:{tz[3:]}"
    return date

"""The audit trail (IHE ATNA): who did what to which patient's study, when, from where.

Each event is a DICOM audit message (PS3.15 A.5, the RFC 3881-derived XML schema) written as one line to
an append-only local log, `data_dir/audit/audit-YYYY-MM-DD.log` (UTC day; opened O_APPEND, each line one
write), and, with `audit_syslog` set, also sent to the hospital's audit repository by syslog
(lungnode.audit_syslog). The local write never waits on the network.

Events and their DICOM codes (DCM unless said):

| what | EventID | EventTypeCode | action |
|---|---|---|---|
| login, failed login, logout (page) | 110114 User Authentication | 110122 Login / 110123 Logout | E |
| worklist read | 110112 Query | - | E |
| study JSON read (demographics, findings) | 110110 Patient Record | - | R |
| processed slices, viewer, key images read | 110103 DICOM Instances Accessed | - | R |
| re-run | 110103 DICOM Instances Accessed | RERUN (99LUNGNODE) | U |
| re-send | 110104 DICOM Instances Transferred | RESEND (99LUNGNODE) | R |
| feedback: verdict, added nodule, review complete (made / changed / withdrawn) | 110110 Patient Record | FEEDBACK (99LUNGNODE) | C / U / D |
| verified results version made from a completed review and queued to the destinations (or not, and why) | 110110 Patient Record | VERIFIED (99LUNGNODE) | C |
| user, password or API token created / changed | 110113 Security Alert | 110137 User Security Attributes Changed | E |
| node started / stopped | 110100 Application Activity | 110120 / 110121 Application Start / Stop | E |
| DICOM association that stored instances | 110104 DICOM Instances Transferred | TLS / PLAIN (99LUNGNODE) | C |
| DICOM association that stored none, or was rejected | 110114 User Authentication | 110122 Login, TLS / PLAIN | E |

An association that stored nothing (C-ECHO, or refused: unknown calling AE, TLS failure) is the calling
node authenticating itself, so it is recorded as a login of that AE, failed when refused."""
from __future__ import annotations

import base64
import logging
import os
import socket
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from lungnode.audit_syslog import SyslogSender, client_context, rfc5424
from lungnode.config import Settings
from lungnode.dicom_node.receiver import AssociationRecord

log = logging.getLogger(__name__)

# EventOutcomeIndicator
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = 0, 4, 8


@dataclass(frozen=True)
class Code:
    """A coded value as the DICOM audit schema writes it (csd-code, codeSystemName, originalText)."""

    code: str
    system: str
    text: str


APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
INSTANCES_ACCESSED = Code("110103", "DCM", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
PATIENT_RECORD = Code("110110", "DCM", "Patient Record")
QUERY = Code("110112", "DCM", "Query")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
USER_AUTHENTICATION = Code("110114", "DCM", "User Authentication")
APPLICATION_START = Code("110120", "DCM", "Application Start")
APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
LOGIN = Code("110122", "DCM", "Login")
LOGOUT = Code("110123", "DCM", "Logout")
USER_ATTRIBUTES_CHANGED = Code("110137", "DCM", "User Security Attributes Changed")
SOURCE_ROLE = Code("110153", "DCM", "Source Role ID")
DESTINATION_ROLE = Code("110152", "DCM", "Destination Role ID")
APPLICATION_ROLE = Code("110150", "DCM", "Application")
RERUN = Code("RERUN", "99LUNGNODE", "Re-run requested")
RESEND = Code("RESEND", "99LUNGNODE", "Re-send requested")
FEEDBACK = Code("FEEDBACK", "99LUNGNODE", "Radiologist feedback on the AI findings")
VERIFIED = Code("VERIFIED", "99LUNGNODE", "Verified results made from a radiologist's review")
TLS = Code("TLS", "99LUNGNODE", "DICOM TLS")
PLAIN = Code("PLAIN", "99LUNGNODE", "DICOM without TLS")
STUDY_UID_TYPE = Code("110180", "DCM", "Study Instance UID")
SOP_CLASS_UID_TYPE = Code("110181", "DCM", "SOP Class UID")
PATIENT_NUMBER_TYPE = Code("2", "RFC-3881", "Patient Number")
USER_IDENTIFIER_TYPE = Code("11", "RFC-3881", "User Identifier")
AUDIT_SOURCE_APPLICATION_SERVER = Code("4", "DCM", "Application Server")
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # what the worklist answers: a study-level query


@dataclass(frozen=True)
class Actor:
    """An ActiveParticipant: a user, a remote AE or this application."""

    user_id: str
    requestor: bool
    address: str | None = None  # NetworkAccessPointID
    address_is_ip: bool = True  # NetworkAccessPointTypeCode 2 (IP), else 1 (machine name)
    role: Code | None = None


@dataclass(frozen=True)
class Subject:
    """A ParticipantObjectIdentification: what the event was about."""

    object_id: str
    id_type: Code
    type_code: int  # 1 person, 2 system object
    role_code: int  # 1 patient, 3 report, 11 security user entity, 24 query
    query: str | None = None  # ParticipantObjectQuery (base64 in the message)
    details: tuple[tuple[str, str], ...] = ()  # ParticipantObjectDetail type/value pairs


def study_subjects(study_uid: str, patient_id: str | None) -> list[Subject]:
    """The study (Study Instance UID) and, when known, its patient (Patient ID)."""
    study = [Subject(study_uid, STUDY_UID_TYPE, 2, 3)]
    return study + ([Subject(patient_id, PATIENT_NUMBER_TYPE, 1, 1)] if patient_id else [])


@dataclass(frozen=True)
class AuditEvent:
    event_id: Code
    action: str  # EventActionCode: C, R, U, D, E
    actors: list[Actor]
    subjects: list[Subject] = field(default_factory=list)
    event_types: tuple[Code, ...] = ()
    outcome: int = SUCCESS
    outcome_description: str | None = None
    when: datetime = field(default_factory=lambda: datetime.now(timezone.utc))


def _code(parent: ET.Element, tag: str, code: Code) -> None:
    ET.SubElement(parent, tag, {"csd-code": code.code, "codeSystemName": code.system, "originalText": code.text})


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def audit_xml(event: AuditEvent, source_id: str) -> str:
    """The DICOM audit message (PS3.15 A.5.1) as one line of XML."""
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": event.action, "EventDateTime": event.when.isoformat(timespec="milliseconds"),
        "EventOutcomeIndicator": str(event.outcome)})
    _code(ident, "EventID", event.event_id)
    for t in event.event_types:
        _code(ident, "EventTypeCode", t)
    if event.outcome_description:
        ET.SubElement(ident, "EventOutcomeDescription").text = event.outcome_description
    for a in event.actors:
        attrs = {"UserID": a.user_id, "UserIsRequestor": str(a.requestor).lower()}
        if a.address:
            attrs |= {"NetworkAccessPointID": a.address, "NetworkAccessPointTypeCode": "2" if a.address_is_ip else "1"}
        participant = ET.SubElement(root, "ActiveParticipant", attrs)
        if a.role:
            _code(participant, "RoleIDCode", a.role)
    source = ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": source_id})
    _code(source, "AuditSourceTypeCode", AUDIT_SOURCE_APPLICATION_SERVER)
    for s in event.subjects:
        obj = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": s.object_id, "ParticipantObjectTypeCode": str(s.type_code),
            "ParticipantObjectTypeCodeRole": str(s.role_code)})
        _code(obj, "ParticipantObjectIDTypeCode", s.id_type)
        if s.query is not None:
            ET.SubElement(obj, "ParticipantObjectQuery").text = _b64(s.query)
        for kind, value in s.details:
            ET.SubElement(obj, "ParticipantObjectDetail", {"type": kind, "value": _b64(value)})
    return ET.tostring(root, encoding="unicode")  # no newlines: text and attribute values escape them


class AuditLog:
    """The append-only local log: one message per line, in a file per UTC day, each line one write."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._day = ""

    def path_for(self, when: datetime) -> Path:
        return self.directory / f"audit-{when.astimezone(timezone.utc):%Y-%m-%d}.log"

    def append(self, line: str, when: datetime) -> None:
        day = f"{when.astimezone(timezone.utc):%Y-%m-%d}"
        with self._lock:
            if day != self._day:
                self.close()
                self._fd = os.open(self.path_for(when), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                self._day = day
            os.write(self._fd, (line + "\n").encode())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class AuditTrail:
    """Records audit events: always to the local log, and to syslog when configured."""

    def __init__(self, directory: Path, source_id: str, syslog: SyslogSender | None = None) -> None:
        self.log = AuditLog(directory)
        self.source_id = source_id
        self.hostname = socket.gethostname()
        self._syslog = syslog

    @classmethod
    def from_settings(cls, settings: Settings) -> "AuditTrail":
        syslog = None
        if settings.audit_syslog:
            context = client_context(settings.audit_syslog_ca, settings.tls_cert, settings.tls_key) \
                if settings.audit_syslog_tls else None
            syslog = SyslogSender(settings.audit_syslog.host, settings.audit_syslog.port, context)
        return cls(settings.audit_dir, f"{settings.ae_title}@{socket.gethostname()}", syslog)

    def close(self) -> None:
        if self._syslog:
            self._syslog.close()
        self.log.close()

    def record(self, event: AuditEvent) -> None:
        message = audit_xml(event, self.source_id)
        self.log.append(message, event.when)
        if self._syslog:
            self._syslog.submit(rfc5424(message, self.hostname, event.when))

    def _application(self) -> Actor:
        return Actor(self.source_id, requestor=False, address=self.hostname, address_is_ip=False,
                     role=APPLICATION_ROLE)

    # --- the web side ----------------------------------------------------------------------------
    def login(self, user: str, ip: str, ok: bool, why: str = "wrong user name or password") -> None:
        self.record(AuditEvent(USER_AUTHENTICATION, "E", [Actor(user, True, ip), self._application()],
                               event_types=(LOGIN,), outcome=SUCCESS if ok else MINOR_FAILURE,
                               outcome_description=None if ok else why))

    def logout(self, user: str, ip: str) -> None:
        self.record(AuditEvent(USER_AUTHENTICATION, "E", [Actor(user, True, ip), self._application()],
                               event_types=(LOGOUT,)))

    def worklist_read(self, user: str, ip: str, query: str) -> None:
        self.record(AuditEvent(QUERY, "E", [Actor(user, True, ip), self._application()],
                               [Subject(STUDY_ROOT_FIND, SOP_CLASS_UID_TYPE, 2, 24, query=query)]))

    def study_read(self, event_id: Code, user: str, ip: str, study_uid: str, patient_id: str | None) -> None:
        """A study's record (PATIENT_RECORD) or images (INSTANCES_ACCESSED) read."""
        self.record(AuditEvent(event_id, "R", [Actor(user, True, ip), self._application()],
                               study_subjects(study_uid, patient_id)))

    def study_action(self, action: Code, user: str, ip: str, study_uid: str, patient_id: str | None,
                     refused: str | None) -> None:
        """A re-run (RERUN) or re-send (RESEND) asked for; `refused` says why it was not done."""
        event_id, code = (INSTANCES_ACCESSED, "U") if action == RERUN else (INSTANCES_TRANSFERRED, "R")
        self.record(AuditEvent(event_id, code, [Actor(user, True, ip), self._application()],
                               study_subjects(study_uid, patient_id), (action,),
                               MINOR_FAILURE if refused else SUCCESS, refused))

    def feedback(self, user: str, ip: str, study_uid: str, patient_id: str | None, action: str, what: str) -> None:
        """A radiologist's feedback written: ``action`` C (made), U (changed) or D (withdrawn); ``what`` says
        which, e.g. "v1 N2 rejected: vessel" (kept as a detail of the study's participant object)."""
        subjects = study_subjects(study_uid, patient_id)
        subjects[0] = Subject(study_uid, STUDY_UID_TYPE, 2, 3, details=(("feedback", what),))
        self.record(AuditEvent(PATIENT_RECORD, action, [Actor(user, True, ip), self._application()], subjects,
                               (FEEDBACK,)))

    def verified_results(self, user: str, study_uid: str, patient_id: str | None, what: str,
                         failed: str | None = None) -> None:
        """A verified results version made and queued for sending (``what``: which, from which review, to
        where), on behalf of the radiologist who completed the review; ``failed`` says why it was not."""
        subjects = study_subjects(study_uid, patient_id)
        subjects[0] = Subject(study_uid, STUDY_UID_TYPE, 2, 3, details=(("verified", what),))
        self.record(AuditEvent(PATIENT_RECORD, "C", [Actor(user, True), self._application()], subjects, (VERIFIED,),
                               MINOR_FAILURE if failed else SUCCESS, failed))

    def account_changed(self, actor: str, address: str | None, account: str, change: str) -> None:
        """A user, password or API token created or changed (`change` says which)."""
        self.record(AuditEvent(SECURITY_ALERT, "E", [Actor(actor, True, address, address_is_ip=False),
                                                      self._application()],
                               [Subject(account, USER_IDENTIFIER_TYPE, 1, 11, details=(("change", change),))],
                               (USER_ATTRIBUTES_CHANGED,)))

    def application(self, started: bool) -> None:
        self.record(AuditEvent(APPLICATION_ACTIVITY, "E", [self._application()],
                               event_types=(APPLICATION_START if started else APPLICATION_STOP,)))

    # --- the DICOM side --------------------------------------------------------------------------
    def dicom_association(self, record: AssociationRecord) -> None:
        """`association` for what the DICOM listener reports of one connection (its `on_association`)."""
        self.association(calling_ae=record.calling_ae or "(none)", called_ae=record.called_ae or "(none)",
                         peer_ip=record.peer_ip, tls=record.tls, instances_stored=record.instances_stored,
                         study_uids=list(record.study_uids),
                         outcome="success" if record.outcome == "released" else record.outcome)

    def association(self, *, calling_ae: str, called_ae: str, peer_ip: str, tls: bool, instances_stored: int,
                    study_uids: list[str], outcome: str) -> None:
        """One DICOM association, at its end (or at its rejection). `outcome` is "success" or the reason
        it failed or was refused. With instances stored: DICOM Instances Transferred, one participant
        object per study; else User Authentication / Login of the calling AE."""
        ok = outcome == "success"
        actors = [Actor(calling_ae, True, peer_ip, role=SOURCE_ROLE),
                  Actor(called_ae, False, self.hostname, address_is_ip=False, role=DESTINATION_ROLE)]
        transport = TLS if tls else PLAIN
        result = {"outcome": SUCCESS if ok else MINOR_FAILURE, "outcome_description": None if ok else outcome}
        if instances_stored:
            detail = (("InstancesStoredInAssociation", str(instances_stored)),)
            subjects = [Subject(uid, STUDY_UID_TYPE, 2, 3, details=detail) for uid in study_uids]
            self.record(AuditEvent(INSTANCES_TRANSFERRED, "C", actors, subjects, (transport,), **result))
        else:
            self.record(AuditEvent(USER_AUTHENTICATION, "E", actors, event_types=(LOGIN, transport), **result))

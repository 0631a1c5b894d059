"""The audit trail: DICOM audit messages (PS3.15 A.5) in the append-only local log and, when set, sent to a
syslog collector as RFC 5424 over TLS (RFC 5425 framing), without ever holding up the caller."""
from __future__ import annotations

import ssl
import xml.etree.ElementTree as ET

import pytest
import trustme

from lungnode.audit import AuditTrail
from lungnode.audit_syslog import SyslogSender, client_context
from lungnode.peers import free_port, wait_for
from tests.syslog_collector import Collector

STUDY_A, STUDY_B = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"


def local_records(trail: AuditTrail) -> list[ET.Element]:
    return [ET.fromstring(line) for path in sorted(trail.log.directory.glob("audit-*.log"))
            for line in path.read_text().splitlines()]


def event_id(record: ET.Element) -> str:
    return record.find("EventIdentification/EventID").get("csd-code")


def requestor(record: ET.Element) -> ET.Element:
    return record.find("ActiveParticipant[@UserIsRequestor='true']")


def studies(record: ET.Element) -> list[str]:
    return [o.get("ParticipantObjectID") for o in record.iter("ParticipantObjectIdentification")
            if o.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def collector_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


def test_an_association_that_stored_instances_is_recorded_as_instances_transferred(tmp_path):
    trail = AuditTrail(tmp_path, "LUNGNODE@test")
    trail.association(calling_ae="PACS", called_ae="LUNGNODE", peer_ip="10.1.2.3", tls=True, instances_stored=120,
                      study_uids=[STUDY_A, STUDY_B], outcome="success")
    trail.close()
    (record,) = local_records(trail)
    ident = record.find("EventIdentification")
    assert (event_id(record), ident.get("EventActionCode"), ident.get("EventOutcomeIndicator")) == ("110104", "C", "0")
    assert [c.get("csd-code") for c in ident.iter("EventTypeCode")] == ["TLS"]
    source = requestor(record)
    assert (source.get("UserID"), source.get("NetworkAccessPointID")) == ("PACS", "10.1.2.3")
    assert source.find("RoleIDCode").get("csd-code") == "110153"
    destination = record.find("ActiveParticipant[@UserIsRequestor='false']")
    assert (destination.get("UserID"), destination.find("RoleIDCode").get("csd-code")) == ("LUNGNODE", "110152")
    assert studies(record) == [STUDY_A, STUDY_B]
    assert record.find("AuditSourceIdentification").get("AuditSourceID") == "LUNGNODE@test"


def test_a_refused_association_is_a_failed_login_of_the_calling_ae(tmp_path):
    trail = AuditTrail(tmp_path, "LUNGNODE@test")
    trail.association(calling_ae="INTRUDER", called_ae="LUNGNODE", peer_ip="10.9.9.9", tls=False, instances_stored=0,
                      study_uids=[], outcome="calling AE title not allowed")
    trail.close()
    (record,) = local_records(trail)
    ident = record.find("EventIdentification")
    assert (event_id(record), ident.get("EventOutcomeIndicator")) == ("110114", "4")
    assert [c.get("csd-code") for c in ident.iter("EventTypeCode")] == ["110122", "PLAIN"]
    assert ident.find("EventOutcomeDescription").text == "calling AE title not allowed"
    assert (requestor(record).get("UserID"), requestor(record).get("NetworkAccessPointID")) == ("INTRUDER", "10.9.9.9")
    assert studies(record) == []


def test_the_local_log_is_appended_to_one_message_a_line_and_escapes_what_it_is_given(tmp_path):
    trail = AuditTrail(tmp_path, "LUNGNODE@test")
    trail.login("admin", "127.0.0.1", ok=True)
    (path,) = tmp_path.glob("audit-*.log")
    first = path.read_text()
    trail.login('<x a="1">\nnext line', "127.0.0.1", ok=False)  # a hostile user name stays one line, as data
    trail.close()
    text = path.read_text()
    assert text.startswith(first) and text.count("\n") == 2
    records = local_records(trail)
    assert requestor(records[1]).get("UserID") == '<x a="1">\nnext line'
    assert records[1].find("EventIdentification").get("EventOutcomeIndicator") == "4"
    assert path.stat().st_mode & 0o077 == 0


def test_audit_messages_reach_a_syslog_collector_over_tls_in_rfc5425_frames(tmp_path, ca):
    collector = Collector(collector_context(ca))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    sender = SyslogSender("127.0.0.1", collector.port, client_context(ca_file, None, None))
    trail = AuditTrail(tmp_path / "audit", "LUNGNODE@test", sender)
    try:
        trail.association(calling_ae="PACS", called_ae="LUNGNODE", peer_ip="10.1.2.3", tls=True, instances_stored=3,
                          study_uids=[STUDY_A], outcome="success")
        trail.login("dr.lan", "10.0.0.7", ok=True)
        wait_for(lambda: len(collector.messages()) == 2, 30, "two messages at the collector")
    finally:
        trail.close()
        collector.close()
    transferred, login = collector.messages()
    assert (transferred.priority, transferred.app, transferred.msgid) == (10 * 8 + 5, "lungnode", "IHE+RFC-3881")
    assert event_id(transferred.audit) == "110104" and studies(transferred.audit) == [STUDY_A]
    assert event_id(login.audit) == "110114" and requestor(login.audit).get("UserID") == "dr.lan"
    assert [ET.tostring(m.audit) for m in collector.messages()] == [ET.tostring(r) for r in local_records(trail)]


def test_a_collector_that_is_away_holds_up_nothing_and_gets_the_messages_when_back(tmp_path, ca):
    port = free_port()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    trail = AuditTrail(tmp_path / "audit", "LUNGNODE@test",
                       SyslogSender("127.0.0.1", port, client_context(ca_file, None, None), retry_max_seconds=1))
    trail.login("dr.lan", "10.0.0.7", ok=False)
    assert len(local_records(trail)) == 1  # written at once, whatever the network does
    collector = Collector(collector_context(ca), port=port)
    try:
        wait_for(lambda: len(collector.messages()) == 1, 60, "the queued message after the collector came up")
    finally:
        trail.close()
        collector.close()
    assert requestor(collector.messages()[0].audit).get("UserID") == "dr.lan"


def test_a_collector_with_a_certificate_from_another_ca_gets_nothing(tmp_path, ca):
    collector = Collector(collector_context(trustme.CA()))  # not the CA the node trusts
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    sender = SyslogSender("127.0.0.1", collector.port, client_context(ca_file, None, None), retry_max_seconds=1)
    trail = AuditTrail(tmp_path / "audit", "LUNGNODE@test", sender)
    trail.login("dr.lan", "10.0.0.7", ok=True)
    wait_for(lambda: collector.connections >= 2, 30, "a refused TLS handshake and a retry")
    trail.close()
    collector.close()
    assert collector.frames == [] and len(local_records(trail)) == 1

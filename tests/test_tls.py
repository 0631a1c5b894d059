"""DICOM TLS (BCP 195) with real peers, both ways: DCMTK's echoscu / storescu / storescp and Orthanc with
DICOM TLS enabled, against the node's TLS listener and its C-STORE sender."""
from __future__ import annotations

import logging
import shutil
import socket
import ssl
import subprocess
from io import BytesIO
from pathlib import Path

import pydicom
import pytest

from lungnode.config import DicomPeer, Settings
from lungnode.dicom_node.db import SENT, JobDB
from lungnode.dicom_node.receiver import AssociationRecord
from lungnode.dicom_node.scp import StorageSCP
from lungnode.dicom_node.storage import InstanceStore
from lungnode.dicom_node.tls import client_context
from lungnode.peers import PEER_ENV, OrthancServer, OrthancTls, free_port, wait_for
from lungnode.reports.send import SendError, send_files
from tests.conftest import need_tool
from tests.tls_certs import Certificates, KeyPair, make_certificates


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


def start_scp(folder: Path, certs: Certificates, client_certificates: bool,
              audit: list[AssociationRecord] | None = None) -> StorageSCP:
    settings = Settings(data_dir=folder / "var", dicom_host="127.0.0.1", dicom_port=free_port(),
                        dicom_tls_port=free_port(), tls_cert=certs.server.cert, tls_key=certs.server.key,
                        tls_ca=certs.ca if client_certificates else None,
                        allowed_callers=["PACS", "STORESCU", "ECHOSCU", "ORTHANC"], _env_file=None)
    settings.data_dir.mkdir(parents=True)
    scp = StorageSCP(settings, InstanceStore(settings.incoming_dir, settings.quarantine_dir), JobDB(settings.db_path),
                     on_association=None if audit is None else audit.append)
    scp.start()
    return scp


@pytest.fixture
def audit() -> list[AssociationRecord]:
    """What the listeners hand to the audit trail, one record per connection."""
    return []


@pytest.fixture
def tls_scp(tmp_path, certs, audit):
    """The node's listener, plain on dicom_port and TLS on dicom_tls_port, client certificates required."""
    scp = start_scp(tmp_path, certs, client_certificates=True, audit=audit)
    yield scp
    scp.stop()
    scp.db.close()


def dcmtk(tool: str, port: int, *options: str, files: list[Path] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([need_tool(tool), *options, "-aet", "PACS", "-aec", "LUNGNODE", "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, env=PEER_ENV, timeout=120)


def with_cert(pair: KeyPair, ca: Path) -> list[str]:
    """DCMTK's TLS options: our key and certificate, the CA we check the peer's certificate against."""
    return ["+tls", str(pair.key), str(pair.cert), "+cf", str(ca)]


def stored_uids(scp: StorageSCP) -> set[str]:
    scp.journal.flush()
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in scp.settings.incoming_dir.glob("*/*/*.dcm")}


def uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def tls_port(scp: StorageSCP) -> int:
    return scp.settings.dicom_tls_port


def wait_for_refusals(caplog, n: int) -> None:
    """The node logs a refused handshake on its own thread, maybe after the caller has given up."""
    wait_for(lambda: caplog.text.count("TLS handshake with 127.0.0.1 failed") == n, 10, f"{n} refusal(s) logged")


# --- receiving ---------------------------------------------------------------------------------------
def test_storescu_over_tls_with_the_sites_client_certificate_is_stored(tls_scp, certs, small_ct_series, caplog,
                                                                       audit):
    caplog.set_level(logging.INFO, logger="lungnode.dicom_node.receiver")
    done = dcmtk("storescu", tls_port(tls_scp), *with_cert(certs.client, certs.ca), files=small_ct_series)
    assert done.returncode == 0, done.stderr
    assert stored_uids(tls_scp) == uids(small_ct_series)
    assert "client certificate pacs.test" in caplog.text  # who it was
    wait_for(lambda: [(r.calling_ae, r.tls, r.instances_stored) for r in audit] == [
        ("PACS", True, len(small_ct_series))], 10, "the association's audit record")
    plain = dcmtk("echoscu", tls_scp.settings.dicom_port)  # the plain port serves alongside
    assert plain.returncode == 0, plain.stderr


def test_client_certificate_of_another_ca_is_refused_and_the_node_keeps_serving(tls_scp, certs, small_ct_series,
                                                                                caplog, audit):
    stranger = dcmtk("storescu", tls_port(tls_scp), *with_cert(certs.stranger, certs.ca), files=small_ct_series[:2])
    assert stranger.returncode != 0
    no_cert = dcmtk("echoscu", tls_port(tls_scp), "+tla", "+cf", str(certs.ca))  # TLS without a certificate
    assert no_cert.returncode != 0
    wait_for_refusals(caplog, 2)
    assert stored_uids(tls_scp) == set()
    wait_for(lambda: [(r.tls, r.accepted, r.outcome.split(":")[0]) for r in audit] == [
        (True, False, "TLS handshake failed")] * 2, 10, "an audit record for each refusal")
    ok = dcmtk("echoscu", tls_port(tls_scp), *with_cert(certs.client, certs.ca))
    assert ok.returncode == 0, ok.stderr


def test_without_a_ca_the_node_asks_no_client_certificate(tmp_path, certs):
    scp = start_scp(tmp_path, certs, client_certificates=False)
    try:
        anonymous = dcmtk("echoscu", tls_port(scp), "+tla", "+cf", str(certs.ca))
        assert anonymous.returncode == 0, anonymous.stderr
        wrong_server = dcmtk("echoscu", tls_port(scp), "+tla", "+cf", str(certs.other_ca))  # DCMTK checks us too
        assert wrong_server.returncode != 0
    finally:
        scp.stop()
        scp.db.close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1 is deprecated:DeprecationWarning")
def test_plain_dicom_and_tls_1_0_on_the_tls_port_are_refused_and_the_node_keeps_serving(tls_scp, certs, caplog):
    plain = dcmtk("echoscu", tls_port(tls_scp))
    assert plain.returncode != 0
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.0 at all
    with socket.create_connection(("127.0.0.1", tls_port(tls_scp)), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            old.wrap_socket(raw)
    wait_for_refusals(caplog, 2)
    assert "unsupported protocol" in caplog.text  # TLS 1.0 was offered, and refused by the node
    ok = dcmtk("echoscu", tls_port(tls_scp), *with_cert(certs.client, certs.ca))
    assert ok.returncode == 0, ok.stderr


def test_a_silent_caller_on_the_tls_port_blocks_no_one_and_is_closed_at_the_deadline(tmp_path, certs):
    scp = start_scp(tmp_path, certs, client_certificates=True)  # handshake deadline: the 10 s request timeout
    try:
        with socket.create_connection(("127.0.0.1", tls_port(scp)), timeout=30) as silent:  # says nothing
            ok = dcmtk("echoscu", tls_port(scp), *with_cert(certs.client, certs.ca))
            assert ok.returncode == 0, ok.stderr
            silent.setblocking(False)
            with pytest.raises(BlockingIOError):  # still waiting for its handshake: served meanwhile, not after
                silent.recv(16)
            silent.setblocking(True)
            assert silent.recv(16) == b""  # closed by the node when its handshake deadline passed
    finally:
        scp.stop()
        scp.db.close()


# --- sending -------------------------------------------------------------------------------------------
@pytest.fixture
def tls_storescp(tmp_path, certs):
    """DCMTK storescp with TLS, requiring a client certificate issued by the site's CA."""
    port, out = free_port(), tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen([need_tool("storescp"), "-od", str(out), "-aet", "STORESCP",
                             "+tls", str(certs.server.key), str(certs.server.cert), "+cf", str(certs.ca), str(port)],
                            env=PEER_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: subprocess.run(["echoscu", *with_cert(certs.client, certs.ca), "-aec", "STORESCP",
                                         "127.0.0.1", str(port)], env=PEER_ENV, capture_output=True).returncode == 0,
                 10, "storescp with TLS")
        yield DicomPeer(ae_title="STORESCP", host="127.0.0.1", port=port), out
    finally:
        proc.terminate()
        proc.wait(10)


def test_results_reach_storescp_over_tls(tls_storescp, certs, small_ct_series):
    peer, folder = tls_storescp
    tls = client_context(certs.client.cert, certs.client.key, certs.ca)
    assert send_files(peer, small_ct_series, "LUNGNODE", timeout=30, tls=tls) == len(small_ct_series)
    assert uids(sorted(folder.iterdir())) == uids(small_ct_series)


def test_a_pacs_whose_certificate_the_site_ca_did_not_issue_gets_nothing(tls_storescp, certs, small_ct_series):
    peer, folder = tls_storescp
    tls = client_context(certs.client.cert, certs.client.key, certs.other_ca)
    with pytest.raises(SendError, match="certificate verify failed"):
        send_files(peer, small_ct_series[:1], "LUNGNODE", timeout=30, tls=tls)
    assert list(folder.iterdir()) == []


# --- Orthanc with DICOM TLS, both ways --------------------------------------------------------------
@pytest.fixture
def orthanc_tls(certs) -> OrthancTls:
    need_tool("Orthanc")
    return OrthancTls(cert=certs.server.cert, key=certs.server.key, trusted=certs.ca)


def test_orthanc_sends_a_study_to_the_node_over_tls(tmp_path, tls_scp, orthanc_tls, small_ct_series, caplog):
    caplog.set_level(logging.INFO, logger="lungnode.dicom_node.receiver")
    modalities = {"lungnode": ("LUNGNODE", "127.0.0.1", tls_port(tls_scp))}
    with OrthancServer(tmp_path / "orthanc", modalities=modalities, tls=orthanc_tls) as orthanc:
        (study,) = orthanc.upload(small_ct_series)
        orthanc.send_to_modality("lungnode", study)  # what the PACS's routing rule does, over TLS
    assert stored_uids(tls_scp) == uids(small_ct_series)
    assert "client certificate 127.0.0.1" in caplog.text  # Orthanc showed its certificate


def test_results_reach_orthanc_over_tls(tmp_path, orthanc_tls, certs, small_ct_series):
    results = small_ct_series[:5]  # any DICOM objects stand for the results here
    with OrthancServer(tmp_path / "orthanc", tls=orthanc_tls) as orthanc:
        peer = DicomPeer(ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port)
        tls = client_context(certs.client.cert, certs.client.key, certs.ca)
        assert send_files(peer, results, "LUNGNODE", timeout=30, tls=tls) == len(results)
        (series,) = orthanc.series_of_study(str(pydicom.dcmread(results[0], stop_before_pixels=True).StudyInstanceUID))
        assert {str(pydicom.dcmread(BytesIO(f), stop_before_pixels=True).SOPInstanceUID)
                for f in orthanc.instance_files(series)} == uids(results)


def test_the_node_delivers_its_results_over_tls_as_its_settings_say(tmp_path, tls_storescp, certs, small_ct_series):
    from lungnode.node import Node

    peer, folder = tls_storescp
    settings = Settings(data_dir=tmp_path / "var", pacs=str(peer), pacs_tls=True, tls_cert=certs.client.cert,
                        tls_key=certs.client.key, tls_ca=certs.ca, _env_file=None)
    results = tmp_path / "results"
    results.mkdir()
    for p in small_ct_series:
        shutil.copy(p, results / p.name)
    node = Node(settings)
    try:
        node.db.add_delivery("1.2.3", 1, str(settings.pacs), results)
        node._deliver(node.db.deliveries("1.2.3")[0])
        (delivery,) = node.db.deliveries("1.2.3")
    finally:
        node.db.close()
    assert delivery.state == SENT, delivery.last_error
    assert uids(sorted(folder.iterdir())) == uids(small_ct_series)

"""Sending result objects to a real DICOM peer (DCMTK storescp) with `send_files`."""
from __future__ import annotations

import shutil
import subprocess

import pydicom
import pytest
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import CTImageStorage

from lungnode.config import DicomPeer
from lungnode.dicom_node.db import PENDING, SENT
from lungnode.peers import PEER_ENV, free_port, wait_for
from lungnode.reports.send import SendError, send_files
from tests.conftest import need_tool


@pytest.fixture
def storescp(tmp_path):
    """DCMTK's storescp on a free loopback port, writing what it receives to a folder."""
    need_tool("storescp")
    port, out = free_port(), tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen(["storescp", "-od", str(out), "-aet", "STORESCP", str(port)], env=PEER_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: subprocess.run(["echoscu", "-aec", "STORESCP", "127.0.0.1", str(port)], env=PEER_ENV,
                                        capture_output=True).returncode == 0, 10, "storescp")
        yield DicomPeer(ae_title="STORESCP", host="127.0.0.1", port=port), out
    finally:
        proc.terminate()
        proc.wait(10)


def received_uids(folder) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in folder.iterdir()}


def test_every_file_arrives_each_acknowledged_once(small_ct_series, storescp):
    """Each response is read by the call that sent its request: none can be taken for another (pynetdicom
    3.0's reactor could, on a busy machine, and the send then waited out the DIMSE timeout). Run it under
    load to see it hold."""
    peer, folder = storescp
    acknowledged: list[str] = []
    assert send_files(peer, small_ct_series, "LUNGNODE", timeout=30, on_stored=acknowledged.append) == len(
        small_ct_series)
    assert sorted(acknowledged) == sorted(uids(small_ct_series))
    assert received_uids(folder) == set(uids(small_ct_series))


def uids(paths) -> list[str]:
    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]


class DroppingPacs:
    """A pynetdicom storage SCP whose first association aborts after acknowledging `accept` instances:
    the next request is received but never answered."""

    def __init__(self, accept: int) -> None:
        self.accept = accept
        self.stored: list[str] = []  # every instance it acknowledged, in order, repeats included
        self.ae = AE(ae_title="PACS")
        self.ae.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
        self.port = free_port()
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event) -> int:
        if self.accept == 0:
            self.accept = -1  # only the first association is cut off
            event.assoc.abort(block=False)
            return 0x0000  # never sent: the A-ABORT goes first
        self.accept -= 1
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000


def test_an_interrupted_delivery_resumes_without_resending_what_the_pacs_acknowledged(small_ct_series):
    pacs = DroppingPacs(accept=5)
    peer = DicomPeer(ae_title="PACS", host="127.0.0.1", port=pacs.port)
    acknowledged: set[str] = set()
    try:
        with pytest.raises(SendError, match="A-ABORT"):
            send_files(peer, small_ct_series, "LUNGNODE", timeout=30, on_stored=acknowledged.add)
        assert acknowledged == set(pacs.stored) and len(pacs.stored) == 5
        sent = send_files(peer, small_ct_series, "LUNGNODE", timeout=30, skip=acknowledged, on_stored=acknowledged.add)
    finally:
        pacs.server.shutdown()
    assert sent == len(small_ct_series) - 5
    assert sorted(pacs.stored) == sorted(uids(small_ct_series))  # each once: none of the first five again
    assert send_files(peer, small_ct_series, "LUNGNODE", skip=acknowledged) == 0  # all done: not even associates


def test_a_peer_that_is_down_is_a_send_error_naming_it(small_ct_series):
    peer = DicomPeer(ae_title="PACS", host="127.0.0.1", port=free_port())  # nothing listens there
    with pytest.raises(SendError, match=f"cannot associate with .*{peer.port}"):
        send_files(peer, small_ct_series[:1], "LUNGNODE", timeout=5)


def test_the_node_records_each_acknowledgement_so_a_retry_after_a_restart_resumes(tmp_path, small_ct_series):
    from lungnode.config import Settings
    from lungnode.node import Node

    results = tmp_path / "results"
    results.mkdir()
    for p in small_ct_series:
        shutil.copy(p, results / p.name)
    pacs = DroppingPacs(accept=7)
    settings = Settings(data_dir=tmp_path / "var", pacs=f"PACS@127.0.0.1:{pacs.port}", _env_file=None)
    try:
        node = Node(settings)
        node.db.add_delivery("1.2.3", 1, str(settings.pacs), results)
        node._deliver(node.db.deliveries("1.2.3")[0])  # cut off after 7
        node.db.close()
        node = Node(settings)  # restarted
        (cut_off,) = node.db.deliveries("1.2.3")
        assert cut_off.state == PENDING and "A-ABORT" in cut_off.last_error
        node._deliver(cut_off)
        (delivered,) = node.db.deliveries("1.2.3")
        node.db.close()
    finally:
        pacs.server.shutdown()
    assert delivered.state == SENT
    assert sorted(pacs.stored) == sorted(uids(small_ct_series))  # each once

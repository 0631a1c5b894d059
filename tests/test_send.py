"""Sending result objects to a real DICOM peer (DCMTK storescp) with `send_files`."""
from __future__ import annotations

import subprocess
import threading
import time
import types

import pydicom
import pytest
from pynetdicom import association, dimse

from lungnode.config import DicomPeer
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


class _LateWakingEvent(threading.Event):
    """An Event whose waiters resume 20 ms after it is set, as a reactor thread does on a busy machine."""

    def wait(self, timeout=None):
        woken = super().wait(timeout)
        time.sleep(0.02)
        return woken


def _slow_to_collect(get_msg):
    """The sending thread, descheduled after its request went out, looks for the response 40 ms late."""

    def get(self, block=False):
        if block:
            time.sleep(0.04)
        return get_msg(self, block)

    return get


def test_every_file_arrives_even_when_the_reactor_wakes_late(small_ct_series, storescp, monkeypatch):
    """pynetdicom's reactor can wake from one C-STORE's pause after the next request went out and take
    its response as a request; the send then waited out the DIMSE timeout (seen in CI). Made certain
    here by delaying every wake of the reactor and every collection of a response: all 48 images must
    still arrive."""
    peer, folder = storescp
    late = types.SimpleNamespace(**{**vars(threading), "Event": _LateWakingEvent})
    monkeypatch.setattr(association, "threading", late)
    monkeypatch.setattr(dimse.DIMSEServiceProvider, "get_msg", _slow_to_collect(dimse.DIMSEServiceProvider.get_msg))
    assert send_files(peer, small_ct_series, "LUNGNODE", timeout=5) == len(small_ct_series)
    assert received_uids(folder) == {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                                     for p in small_ct_series}


def test_a_peer_that_is_down_is_a_send_error_naming_it(small_ct_series):
    peer = DicomPeer(ae_title="PACS", host="127.0.0.1", port=free_port())  # nothing listens there
    with pytest.raises(SendError, match=f"cannot associate with .*{peer.port}"):
        send_files(peer, small_ct_series[:1], "LUNGNODE", timeout=5)

"""Deliver result objects to the PACS by C-STORE. Failures raise `SendError`; the caller keeps the
delivery queued and retries with backoff, so nothing is lost while the PACS is down."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pydicom
import requests
from pynetdicom import AE

from lungnode.config import DicomPeer

log = logging.getLogger(__name__)


class SendError(RuntimeError):
    pass


def _await_reactor_resumed(assoc, limit_s: float = 1.0) -> None:
    """Wait until the association's reactor thread has woken from the pause of the last C-STORE.

    pynetdicom 3.0 pauses its reactor for each request and checks only that it *is* paused: sent
    straight after the previous one, the next request can go out while the reactor still sleeps from
    the last pause; it then wakes, takes that request's response off the queue as if it were a new
    request ("Received unexpected C-STORE service message") and the send waits out the DIMSE timeout.
    Seen in CI on a busy 2-core machine (pydicom/pynetdicom#875 is the same race with C-FIND)."""
    deadline = time.monotonic() + limit_s
    while getattr(assoc, "_is_paused", False) and assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.0001)


def send_files(peer: DicomPeer, paths: list[Path], calling_aet: str, timeout: float = 30.0) -> int:
    """C-STORE every file over one association; all must succeed. Returns the number sent."""
    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class, ts in sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}):
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        raise SendError(f"cannot associate with {peer}: association rejected, aborted or never connected")
    try:
        for path, ds in zip(paths, datasets):
            _await_reactor_resumed(assoc)
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None:
                raise SendError(f"{peer} did not answer the C-STORE of {path.name} (connection lost or timed out)")
            if code not in (0x0000, 0xB000, 0xB006, 0xB007):
                raise SendError(f"{peer} refused {path.name} with status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return len(paths)


def delete_series_from_orthanc(orthanc_url: str, series_uids: list[str], timeout: float = 10.0) -> int:
    """Remove superseded result series from Orthanc (a PACS that allows it), so a re-processed study
    shows one set of results, not two."""
    removed = 0
    for uid in series_uids:
        r = requests.post(f"{orthanc_url.rstrip('/')}/tools/lookup", data=uid, timeout=timeout)
        r.raise_for_status()
        for hit in r.json():
            if hit.get("Type") == "Series":
                requests.delete(f"{orthanc_url.rstrip('/')}/series/{hit['ID']}", timeout=timeout).raise_for_status()
                removed += 1
    return removed

"""Deliver result objects to the PACS by C-STORE (`dicom_node.requestor`), over DICOM TLS when asked.
Failures raise `SendError`; the caller keeps the delivery queued and retries with backoff, so nothing is
lost while the PACS is down, and files the PACS acknowledged before are not sent again."""
from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Collection
from pathlib import Path

import pydicom
import requests
from pynetdicom.dsutils import encode

from lungnode.config import DicomPeer
from lungnode.dicom_node.receiver import SUCCESS_STATUSES
from lungnode.dicom_node.requestor import AssociationFailed, StoreAssociation

log = logging.getLogger(__name__)


class SendError(RuntimeError):
    pass


def send_files(peer: DicomPeer, paths: list[Path], calling_aet: str, timeout: float = 30.0,
               tls: ssl.SSLContext | None = None, skip: Collection[str] = (),
               on_stored: Callable[[str], None] | None = None) -> int:
    """C-STORE every file over one association (over TLS with `tls`), except those whose SOP Instance UID
    is in `skip` (acknowledged by the peer before); all must succeed. `on_stored` is called with each SOP
    Instance UID as soon as the peer acknowledges it, so a delivery cut off mid-batch resumes where it
    stopped. Returns the number sent."""
    datasets = [(path, ds) for path in paths if str((ds := pydicom.dcmread(path)).SOPInstanceUID) not in skip]
    if not datasets:
        return 0
    syntaxes = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in datasets})
    try:
        assoc = StoreAssociation.open(peer.host, peer.port, calling_aet, peer.ae_title, syntaxes, timeout, tls)
    except (AssociationFailed, OSError) as exc:
        raise SendError(f"cannot associate with {peer}: {exc or type(exc).__name__}") from exc
    try:
        with assoc:
            for path, ds in datasets:
                syntax = ds.file_meta.TransferSyntaxUID
                data_set = encode(ds, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
                response = assoc.store(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(syntax), data_set)
                if response.status not in SUCCESS_STATUSES:
                    raise SendError(f"{peer} refused {path.name} with status 0x{response.status:04X}"
                                    + (f": {response.comment}" if response.comment else ""))
                if on_stored is not None:
                    on_stored(str(ds.SOPInstanceUID))
    except (AssociationFailed, OSError) as exc:
        raise SendError(f"sending to {peer} failed (connection lost, timed out or refused): "
                        f"{exc or type(exc).__name__}") from exc
    return len(datasets)


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

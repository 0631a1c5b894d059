"""The DICOM listener (SCP): C-ECHO and C-STORE of CT images, with the caller allow-list.

Every instance is written durably and indexed before Success goes back; a file we cannot parse gets a
failure status and is kept in quarantine; a full disk answers "out of resources" so the PACS retries.
"""
from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    Verification,
)

from lungnode.config import Settings
from lungnode.dicom_node.db import InstanceRecord, JobDB
from lungnode.dicom_node.journal import IngestJournal
from lungnode.dicom_node.storage import InstanceStore

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless,
]
STORAGE_CLASSES = [CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage]

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class StoreOutcome:
    status: int
    message: str = ""


class StorageSCP:
    """Accepts CT instances from the PACS and hands them to durable storage and the job index."""

    def __init__(self, settings: Settings, store: InstanceStore, db: JobDB) -> None:
        self.settings = settings
        self.store = store
        self.db = db
        self._server = None
        self.journal = IngestJournal(settings.data_dir / "journal", self.file_instance)
        self.ae = AE(ae_title=settings.ae_title)
        self.ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs from the sender
        if settings.allowed_callers:
            self.ae.require_calling_aet = list(settings.allowed_callers)
        self.ae.add_supported_context(Verification)
        for sop_class in STORAGE_CLASSES:
            self.ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)

    def start(self) -> None:
        self.journal.replay()
        self.journal.start()
        handlers = [(evt.EVT_C_ECHO, lambda event: SUCCESS), (evt.EVT_C_STORE, self._on_store)]
        self._server = self.ae.start_server(
            (self.settings.dicom_host, self.settings.dicom_port), block=False, evt_handlers=handlers)
        log.info("DICOM SCP %s listening on %s:%d", self.settings.ae_title, self.settings.dicom_host,
                 self.settings.dicom_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.journal.stop()

    def _on_store(self, event: evt.Event) -> tuple[int, object] | int:
        caller = event.assoc.requestor.ae_title
        outcome = self.accept(event.encoded_dataset(), caller, event.request.AffectedSOPInstanceUID)
        if outcome.status != SUCCESS:
            log.warning("C-STORE from %s refused (0x%04X): %s", caller, outcome.status, outcome.message)
        return outcome.status

    def accept(self, data: bytes, caller: str, affected_sop_uid: str | None) -> StoreOutcome:
        """Check the header, journal the bytes as sent; they are filed and indexed in the background."""
        try:
            ds = dcmread(BytesIO(data), defer_size=1024)  # header parsed, pixels skipped
            missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if not ds.get(k)]
        except (InvalidDicomError, AttributeError, KeyError, ValueError, EOFError, OSError, TypeError) as exc:
            return self._reject(data, caller, CANNOT_UNDERSTAND, f"cannot parse the data set: {exc}")
        if missing:
            return self._reject(data, caller, CANNOT_UNDERSTAND, f"cannot parse the data set: no {', '.join(missing)}")
        sop_uid = str(ds.SOPInstanceUID)
        if affected_sop_uid and sop_uid != str(affected_sop_uid):
            return self._reject(data, caller, DATASET_MISMATCH,
                                f"SOPInstanceUID {sop_uid} differs from the request's {affected_sop_uid}")
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            return self._reject(data, caller, DATASET_MISMATCH, "the image has no pixel data")
        try:
            self.journal.append(data, caller)
        except OSError as exc:
            kind = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "cannot write"
            return StoreOutcome(OUT_OF_RESOURCES, f"{kind}: {exc}")
        return StoreOutcome(SUCCESS)

    def file_instance(self, data: bytes, caller: str) -> None:
        """Write one journalled instance to its own file (durably) and index it."""
        ds = dcmread(BytesIO(data), defer_size=1024)
        stored = self.store.store(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), data)
        self.db.record_instance(InstanceRecord.from_header(ds, stored.path, stored.digest, stored.size, caller))

    def _reject(self, data: bytes, caller: str, status: int, reason: str) -> StoreOutcome:
        try:
            kept = self.store.keep_rejected(data, caller, reason)
            reason = f"{reason} (kept as {kept})"
        except OSError as exc:
            reason = f"{reason} (could not keep it: {exc})"
        return StoreOutcome(status, reason)

"""The DICOM listener (SCP): C-ECHO and C-STORE of CT images, with the caller allow-list.

Every instance is journalled durably and indexed before Success goes back, then filed; a file we cannot
parse gets a failure status (with the reason as Error Comment) and is kept in quarantine; a full disk
answers "out of resources" so the PACS retries. The association layer is `receiver.Acceptor`: one on
`dicom_port`, and one for DICOM TLS on `dicom_tls_port` when that is set.
"""
from __future__ import annotations

import errno
import logging
import sqlite3
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
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    Verification,
)

from lungnode.config import Settings
from lungnode.dicom_node.db import InstanceRecord, JobDB
from lungnode.dicom_node.journal import IngestJournal
from lungnode.dicom_node.receiver import Acceptor, AcceptorPolicy, StoreRequest, StoreStatus
from lungnode.dicom_node.storage import InstanceStore, digest, write_atomically
from lungnode.dicom_node.tls import server_context

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


class StorageSCP:
    """Accepts CT instances from the PACS and hands them to durable storage and the job index."""

    def __init__(self, settings: Settings, store: InstanceStore, db: JobDB) -> None:
        self.settings = settings
        self.store = store
        self.db = db
        self._servers: list[Acceptor] = []
        self.journal = IngestJournal(settings.data_dir / "journal", self.file_instance, sync=store.sync)
        contexts = [build_context(Verification)]
        contexts += [build_context(sop_class, TRANSFER_SYNTAXES) for sop_class in STORAGE_CLASSES]
        self.policy = AcceptorPolicy(contexts=contexts,
                                     allowed_callers=frozenset(settings.allowed_callers),
                                     max_associations=settings.max_associations,
                                     network_timeout=settings.dicom_timeout_seconds)

    def start(self) -> None:
        self.journal.replay()
        self.journal.start()
        s = self.settings
        listeners = [(s.dicom_port, None)]
        if s.dicom_tls_port is not None:
            listeners.append((s.dicom_tls_port, server_context(s.tls_cert, s.tls_key, s.tls_ca)))
        for port, context in listeners:
            server = Acceptor((s.dicom_host, port), self.policy, self._on_store, context)
            server.start()
            self._servers.append(server)
            tls = f" (DICOM TLS, client certificates {'required' if s.tls_ca else 'not asked for'})" if context else ""
            log.info("DICOM SCP %s listening on %s:%d%s", s.ae_title, s.dicom_host, port, tls)

    def stop(self) -> None:
        while self._servers:
            self._servers.pop().stop()
        self.journal.stop()

    def _on_store(self, request: StoreRequest) -> StoreStatus:
        outcome = self.accept(request.file_bytes, request.calling_ae, request.sop_instance_uid)
        if outcome.status != SUCCESS:
            log.warning("C-STORE from %s refused (0x%04X): %s", request.calling_ae, outcome.status, outcome.comment)
        return outcome

    def accept(self, data: bytes, caller: str, affected_sop_uid: str | None) -> StoreStatus:
        """Journal the bytes as sent (flushed while the header is checked) and index the instance; it
        is filed in the background."""
        try:
            record = self.journal.append(data, caller, check=lambda: self._check(data, caller, affected_sop_uid))
        except Refused as refused:
            return self._reject(data, caller, refused.status, refused.reason)
        except OSError as exc:
            kind = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "cannot write"
            return StoreStatus(OUT_OF_RESOURCES, f"{kind}: {exc}")
        try:
            self.db.record_instance(record)
        except sqlite3.Error as exc:  # journalled: it is filed and indexed in the background all the same
            log.error("cannot index %s now (%s); the journal files and indexes it later", record.sop_uid, exc)
        return StoreStatus(SUCCESS)

    def _check(self, data: bytes, caller: str, affected_sop_uid: str | None) -> tuple[str, InstanceRecord]:
        """The instance's header, read and checked: (its study, its index record), or Refused."""
        try:
            ds = dcmread(BytesIO(data), defer_size=1024)  # header parsed, pixels skipped
            missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if not ds.get(k)]
        except (InvalidDicomError, AttributeError, KeyError, ValueError, EOFError, OSError, TypeError) as exc:
            raise Refused(CANNOT_UNDERSTAND, f"cannot parse the data set: {exc}") from exc
        if missing:
            raise Refused(CANNOT_UNDERSTAND, f"cannot parse the data set: no {', '.join(missing)}")
        sop_uid = str(ds.SOPInstanceUID)
        if affected_sop_uid and sop_uid != str(affected_sop_uid):
            raise Refused(DATASET_MISMATCH, f"SOPInstanceUID {sop_uid} differs from the request's {affected_sop_uid}")
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise Refused(DATASET_MISMATCH, "the image has no pixel data")
        path = self.store.path_for(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), sop_uid)
        record = InstanceRecord.from_header(ds, path, digest(data), len(data), caller)
        return record.study_uid, record

    def file_instance(self, data: bytes, caller: str, record: InstanceRecord | None) -> None:
        """Write one journalled instance to its own file (the journal flushes the files in batches) and
        make sure it is indexed: `accept` indexed it already (an identical record changes nothing) unless
        the index failed then. After a restart (no record) its header is checked again: a record whose
        instance was refused but whose void mark the crash lost is kept aside again, not filed."""
        if record is None:
            try:
                _, record = self._check(data, caller, None)
            except Refused as refused:
                self._reject(data, caller, refused.status, refused.reason)
                return
        write_atomically(record.path, data, durable=False)
        self.db.record_instance(record)

    def _reject(self, data: bytes, caller: str, status: int, reason: str) -> StoreStatus:
        try:
            kept = self.store.keep_rejected(data, caller, reason)
            reason = f"{reason} (kept as {kept})"
        except OSError as exc:
            reason = f"{reason} (could not keep it: {exc})"
        return StoreStatus(status, reason)


class Refused(Exception):
    """An instance this node does not accept: the C-STORE status and the reason sent as Error Comment."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason

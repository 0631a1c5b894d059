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
from lungnode.dicom_node.instance_check import Refused, check_instance
from lungnode.dicom_node.journal import IngestJournal
from lungnode.dicom_node.receiver import (
    Acceptor,
    AcceptorPolicy,
    AssociationHandler,
    StoreRequest,
    StoreStatus,
)
from lungnode.dicom_node.storage import InstanceStore, write_atomically
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


class StorageSCP:
    """Accepts CT instances from the PACS and hands them to durable storage and the job index."""

    def __init__(self, settings: Settings, store: InstanceStore, db: JobDB,
                 on_association: AssociationHandler | None = None) -> None:
        """``on_association`` hears how each connection went (the audit trail)."""
        self.settings = settings
        self.on_association = on_association
        self.store = store
        self.db = db
        self._servers: list[Acceptor] = []
        self.journal = IngestJournal(settings.data_dir / "journal", self.file_instance, sync=store.sync,
                                     retryable=(OSError, sqlite3.OperationalError))  # disk full, for both
        contexts = [build_context(Verification)]
        contexts += [build_context(sop_class, TRANSFER_SYNTAXES) for sop_class in STORAGE_CLASSES]
        self.policy = AcceptorPolicy(contexts=contexts,
                                     called_ae_titles=frozenset(settings.answered_ae_titles),
                                     allowed_callers=frozenset(settings.allowed_callers),
                                     max_associations=settings.max_associations,
                                     max_connections=settings.max_connections,
                                     max_connections_per_host=max(settings.max_associations + 8,
                                                                  settings.max_connections // 2),
                                     network_timeout=settings.dicom_timeout_seconds,
                                     message_timeout=settings.dicom_message_timeout_seconds,
                                     association_timeout=settings.dicom_association_timeout_seconds)

    def start(self) -> None:
        self.journal.replay()
        self.journal.start()
        s = self.settings
        listeners = [(s.dicom_port, None)]
        if s.dicom_tls_port is not None:
            listeners.append((s.dicom_tls_port, server_context(s.tls_cert, s.tls_key, s.tls_ca)))
        for port, context in listeners:
            server = Acceptor((s.dicom_host, port), self.policy, self._on_store, self.on_association, context)
            server.start()
            self._servers.append(server)
            tls = f" (DICOM TLS, client certificates {'required' if s.tls_ca else 'not asked for'})" if context else ""
            log.info("DICOM SCP %s listening on %s:%d%s", s.ae_title, s.dicom_host, port, tls)

    def stop(self) -> None:
        while self._servers:
            self._servers.pop().stop()
        self.journal.stop()

    def _on_store(self, request: StoreRequest) -> StoreStatus:
        return self.accept(request.file_bytes, request.calling_ae, request.sop_instance_uid, request.sop_class_uid)

    def accept(self, data: bytes, caller: str, affected_sop_uid: str | None,
               affected_sop_class: str | None = None) -> StoreStatus:
        """Journal the bytes as sent (flushed while the header is checked) and index the instance; it
        is filed in the background."""
        try:
            record = self.journal.append(data, caller, check=lambda: self._check(data, caller, affected_sop_uid,
                                                                                affected_sop_class))
        except Refused as refused:
            return self._reject(data, caller, refused.status, refused.reason)
        except OSError as exc:
            kind = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "cannot write"
            log.error("C-STORE from %s answered out of resources: %s", caller, exc)
            return StoreStatus(OUT_OF_RESOURCES, f"{kind} on the receiving node ({exc.strerror}), try later")
        try:
            self.db.record_instance(record)
        except sqlite3.Error as exc:  # journalled: it is filed and indexed in the background all the same
            log.error("cannot index %s now (%s); the journal files and indexes it later", record.sop_uid, exc)
        return StoreStatus(SUCCESS, study_uid=record.study_uid)

    def _check(self, data: bytes, caller: str, affected_sop_uid: str | None,
               affected_sop_class: str | None = None) -> tuple[str, InstanceRecord]:
        record = check_instance(data, self.store, caller, affected_sop_uid, affected_sop_class)
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
        """Keep the refused file in quarantine for the admin; the sender hears only the reason."""
        try:
            kept = self.store.keep_rejected(data, caller, reason)
            log.warning("instance from %s refused (0x%04X), kept as %s: %s", caller, status, kept.name, reason)
        except OSError as exc:
            log.error("instance from %s refused (0x%04X), could not be kept (%s): %s", caller, status, exc, reason)
        return StoreStatus(status, reason)

"""Read access to patient data, for the audit trail: a study's record or images read, the worklist read.

The page polls the study every few seconds and fetches the series slice by slice, so one look at a
study is hundreds of requests: each kind of read is recorded once per user, address and study in
`REPEAT_SECONDS`, and again when the same user reads it after that."""
from __future__ import annotations

import threading
import time

from fastapi import Request

from lungnode.audit import INSTANCES_ACCESSED, PATIENT_RECORD, AuditTrail, Code
from lungnode.dicom_node.db import Study
from lungnode.web.security import client_ip, principal

REPEAT_SECONDS = 600.0


class AccessAudit:
    def __init__(self, audit: AuditTrail) -> None:
        self.audit = audit
        self._last: dict[tuple[str, str, str, str], float] = {}
        self._lock = threading.Lock()

    def _first_in_window(self, key: tuple[str, str, str, str]) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -REPEAT_SECONDS) < REPEAT_SECONDS:
                return False
            self._last = {k: t for k, t in self._last.items() if now - t < REPEAT_SECONDS}
            self._last[key] = now
            return True

    def _read(self, request: Request, event_id: Code, study: Study) -> None:
        user, ip = principal(request).name, client_ip(request)
        if self._first_in_window((user, ip, event_id.code, study.study_uid)):
            self.audit.study_read(event_id, user, ip, study.study_uid, study.patient_id or None)

    def record_read(self, request: Request, study: Study) -> None:
        """The study's demographics and findings (the study JSON)."""
        self._read(request, PATIENT_RECORD, study)

    def images_read(self, request: Request, study: Study) -> None:
        """Its images: the viewer's series, a slice, a key image."""
        self._read(request, INSTANCES_ACCESSED, study)

    def worklist_read(self, request: Request) -> None:
        user, ip = principal(request).name, client_ip(request)
        if self._first_in_window((user, ip, "worklist", "")):
            query = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            self.audit.worklist_read(user, ip, query)

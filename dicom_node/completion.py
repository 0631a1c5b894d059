"""Study completion: DICOM has no "end of study" message, so a study is taken as complete once no
instance of it has arrived for `stable_seconds`."""
from __future__ import annotations

import logging
import threading

from lungnode.dicom_node.db import JobDB

log = logging.getLogger(__name__)


class CompletionMonitor(threading.Thread):
    def __init__(self, db: JobDB, stable_seconds: float, poll_seconds: float, stop: threading.Event) -> None:
        super().__init__(name="completion", daemon=True)
        self.db, self.stable_seconds, self.poll_seconds, self.stop_event = db, stable_seconds, poll_seconds, stop
        self.wake = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            for uid in self.db.queue_stable_studies(self.stable_seconds):
                log.info("study %s complete (quiet for %.0f s): queued", uid, self.stable_seconds)
                self.wake.set()
            self.stop_event.wait(min(self.poll_seconds, max(self.stable_seconds / 4, 0.05)))

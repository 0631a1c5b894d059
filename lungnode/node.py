"""The running node: DICOM listener, study completion, the processing worker and the delivery queue,
each a thread around the one job database.

Results go to every configured destination, each its own row in the outbox: the PACS (DICOM
C-STORE), the RIS by HL7 ORU over MLLP, and a FHIR server; one that is down does not hold up the others.

With `send_verified_results`, a radiologist's completed review is queued as a verified version
(`request_verified`); the worker makes it between studies, the same way as the model's results, and it
is delivered like them."""
from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom

from lungnode.config import Settings
from lungnode.dicom_node.completion import CompletionMonitor
from lungnode.dicom_node.db import DICOM, DONE, FHIR, HL7, NOT_PROCESSED, Delivery, JobDB, Study, VerificationJob
from lungnode.dicom_node.feedback import FeedbackStore, ReviewCompletion
from lungnode.dicom_node.receiver import AssociationHandler
from lungnode.dicom_node.reconcile import reconcile
from lungnode.dicom_node.retention import purge_expired
from lungnode.dicom_node.scp import StorageSCP
from lungnode.dicom_node.storage import InstanceStore
from lungnode.dicom_node.tls import client_context
from lungnode.inference.detector import Detector
from lungnode.inference.series_selection import SelectionRules
from lungnode.models.registry import load_model
from lungnode.pipeline import FHIR_FILE, ORU_FILE, load_result, process_study, results_dir_for, verify_study
from lungnode.reports.fhir_send import post_bundle
from lungnode.reports.hl7_oru import MessageParties
from lungnode.reports.mllp_send import send_hl7
from lungnode.reports.send import SendError, delete_series_from_orthanc, send_files

log = logging.getLogger(__name__)
_PAYLOAD = {HL7: ORU_FILE, FHIR: FHIR_FILE}  # the file each RIS delivery sends
RETENTION_PERIOD_SECONDS = 3600.0
# Told when a verified version was made and queued (or could not be): the radiologist, the study, what.
VerifiedHandler = Callable[[str, str, str | None, str, str | None], None]


def result_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.dcm"))


@dataclass(frozen=True)
class Destination:
    """A configured place results go to: its kind and the name the outbox (and the web page) shows."""

    kind: str
    name: str


def destinations(s: Settings) -> list[Destination]:
    out = [Destination(DICOM, str(s.pacs))] if s.pacs else []
    out += [Destination(HL7, f"HL7 {s.ris_hl7}")] if s.ris_hl7 else []
    out += [Destination(FHIR, f"FHIR {s.fhir_url}")] if s.fhir_url else []
    return out


def _parties(s: Settings) -> MessageParties:
    return MessageParties(s.hl7_sending_application, s.hl7_sending_facility, s.hl7_receiving_application,
                          s.hl7_receiving_facility)


class Node:
    def __init__(self, settings: Settings, on_association: AssociationHandler | None = None,
                 on_verified: VerifiedHandler | None = None) -> None:
        """``on_association`` hears how each DICOM connection went, ``on_verified`` each verified version
        made (user, study UID, patient ID, what, why it failed or None): the audit trail."""
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = JobDB(settings.db_path)
        self.feedback = FeedbackStore(settings.feedback_path)
        self.store = InstanceStore(settings.incoming_dir, settings.quarantine_dir)
        self.scp = StorageSCP(settings, self.store, self.db, on_association)
        self._stop = threading.Event()
        self.completion = CompletionMonitor(self.db, settings.stable_seconds, settings.poll_seconds, self._stop)
        self._threads: list[threading.Thread] = []
        self.detector: Detector | None = None
        self.destinations = destinations(settings)
        self.on_verified = on_verified

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        reconcile(self.db, self.settings.incoming_dir)
        recovered = self.db.recover_after_restart()
        if recovered:
            log.warning("%d study(ies) were being processed at the last stop: queued again", recovered)
        self.detector = Detector(load_model(self.settings.model), backend=self.settings.backend,
                                 threads=self.settings.threads, provider=self.settings.onnx_provider,
                                 precision=self.settings.onnx_precision, device=self.settings.torch_device)
        self.scp.start()
        self._threads = [self.completion,
                         threading.Thread(target=self._work_loop, name="worker", daemon=True),
                         threading.Thread(target=self._send_loop, name="sender", daemon=True),
                         threading.Thread(target=self._retention_loop, name="retention", daemon=True)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        self.completion.wake.set()
        self.scp.stop()
        for t in self._threads:
            t.join(timeout=60)
        self.db.close()
        self.feedback.close()

    # --- processing ------------------------------------------------------------------------------
    def _work_loop(self) -> None:
        while not self._stop.is_set():
            study = self.db.claim_next()
            if study is None:
                job = self.db.next_verification()
                if job is not None:
                    self._verify(job)
                    continue
                self.completion.wake.wait(self.settings.poll_seconds)
                self.completion.wake.clear()
                continue
            try:
                self._process(study.study_uid, study.version + 1)
            except Exception as exc:  # one bad study must not stop the node
                log.exception("processing study %s failed", study.study_uid)
                self.db.fail(study.study_uid, f"{type(exc).__name__}: {exc}")

    def _process(self, study_uid: str, version: int) -> None:
        s = self.settings
        rules = SelectionRules(s.min_slices, s.max_slice_spacing_mm, s.max_pixel_spacing_mm)
        self.scp.journal.wait_filed(study_uid)  # indexed on receipt, filed just after
        outcome = process_study(study_uid, self.db.instance_paths(study_uid), version, self.detector, rules,
                                s.results_dir, parties=_parties(s), fhir_patient_system=s.fhir_patient_system)
        r = outcome.result
        state = NOT_PROCESSED if r.not_processed_reason else DONE
        done = self.db.finish(study_uid, state, reason=r.not_processed_reason, series_uid=r.series_instance_uid,
                              model=f"{r.model.name} {r.model.version}", findings=len(r.detections),
                              seconds=r.seconds)
        if done is None:
            log.info("study %s received more images while processing: results v%d dropped, will re-run",
                     study_uid, version)
            return
        self._queue(study_uid, version, outcome.results_dir)

    def _verify(self, job: VerificationJob) -> None:
        """Make the verified version a completed review asked for, queue it, and tell ``on_verified``;
        drop it (told, with why) when the review or the study changed meanwhile or it cannot be made."""
        s = self.settings
        study = self.db.study(job.study_uid)
        review = self.feedback.review(job.study_uid, job.reviewed_version)
        what = f"verified version from the review of v{job.reviewed_version}"
        if review.completion is None or review.completion.completed_at != job.completed_at:
            self.db.drop_verification(job.id, "the review was reopened or completed again")
            return
        try:
            reviewed = load_result(results_dir_for(s.results_dir, job.study_uid, job.reviewed_version))
            if study is None or reviewed is None or reviewed.series_instance_uid is None:
                raise ValueError(f"results version {job.reviewed_version} has no processed series")
            version = study.version + 1
            outcome = verify_study(
                reviewed, review, self.db.instance_paths(job.study_uid, reviewed.series_instance_uid), version,
                observer_name=job.user, default_organization=s.hl7_sending_facility, results_root=s.results_dir,
                parties=_parties(s), fhir_patient_system=s.fhir_patient_system)
        except Exception as exc:  # one bad verification must not stop the worker
            log.exception("study %s: the %s could not be made", job.study_uid, what)
            self.db.drop_verification(job.id, f"{type(exc).__name__}: {exc}")
            self._told(job, study, what, f"not made: {exc}")
            return
        if not self.db.finish_verification(job.id, version, len(outcome.result.detections)):
            shutil.rmtree(outcome.results_dir, ignore_errors=True)
            self._told(job, study, what, "not made: the study has newer images or results than the review")
            return
        queued = self._queue(job.study_uid, version, outcome.results_dir)
        to = ", ".join(d.name for d in self.destinations) if queued else "nowhere (no destination configured)"
        self._told(job, study, f"v{version}: {what}, {len(outcome.result.detections)} nodule(s), queued for {to}",
                   None)

    def _told(self, job: VerificationJob, study: Study | None, what: str, failed: str | None) -> None:
        if self.on_verified is not None:
            patient_id = (study.patient_id or None) if study else None
            self.on_verified(job.user, job.study_uid, patient_id, what, failed)

    def request_verified(self, completion: ReviewCompletion) -> bool:
        """Queue a verified version for a completed review; False (nothing queued) with the setting off."""
        if not self.settings.send_verified_results:
            return False
        self.db.request_verification(completion.study_uid, completion.version, completion.completed_by,
                                     completion.completed_at)
        self.completion.wake.set()
        return True

    def _queue(self, study_uid: str, version: int, path: Path) -> int:
        """One delivery per configured destination. Results made before RIS delivery existed have no
        oru.hl7 / fhir.json: those go to the PACS only. Returns the number queued."""
        queued = [d for d in self.destinations if d.kind == DICOM or (path / _PAYLOAD[d.kind]).exists()]
        for d in queued:
            self.db.add_delivery(study_uid, version, d.name, path, d.kind)
        return len(queued)

    # --- delivery --------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while not self._stop.is_set():
            for delivery in self.db.due_deliveries():
                if self._stop.is_set():
                    break
                self._deliver(delivery)
            self._stop.wait(self.settings.poll_seconds)

    def _deliver(self, d: Delivery) -> None:
        s = self.settings
        if Destination(d.kind, d.destination) not in self.destinations:
            return  # destination no longer configured: keep it queued, untouched
        try:
            what = self._send(d)
        except (SendError, OSError, ValueError) as exc:
            delay = min(s.send_retry_first_seconds * 2 ** d.attempts, s.send_retry_max_seconds)
            self.db.delivery_failed(d.id, str(exc), time.time() + delay)
            log.warning("delivery of study %s v%d to %s failed (attempt %d), retry in %.0f s: %s",
                        d.study_uid, d.version, d.destination, d.attempts + 1, delay, exc)
            return
        self.db.delivery_sent(d.id)
        log.info("study %s v%d: %s delivered to %s", d.study_uid, d.version, what, d.destination)
        if d.kind == DICOM and s.orthanc_url:
            self._remove_superseded(d)

    def _send(self, d: Delivery) -> str:
        """Send one delivery by its kind, exactly the files made when the study was processed; raises on
        failure. Returns what was delivered, for the log."""
        s = self.settings
        if d.kind == HL7:
            send_hl7(s.ris_hl7, (d.path / ORU_FILE).read_bytes().decode("utf-8"), s.ris_timeout_seconds)
            return "HL7 ORU^R01 (acknowledged)"
        if d.kind == FHIR:
            post_bundle(s.fhir_url, (d.path / FHIR_FILE).read_bytes(), s.ris_timeout_seconds)
            return "FHIR transaction"
        tls = client_context(s.tls_cert, s.tls_key, s.tls_ca) if s.pacs_tls else None
        before = self.db.delivered_instances(d.id)  # acknowledged by the PACS in an attempt cut off mid-batch
        sent = send_files(s.pacs, result_files(d.path), s.ae_title, tls=tls, skip=before,
                          on_stored=lambda sop_uid: self.db.instance_delivered(d.id, sop_uid))
        return f"{sent} result object(s)" + (f", {len(before)} acknowledged before" if before else "")

    def _remove_superseded(self, d: Delivery) -> None:
        old_series = set()
        for old in self.db.previous_sent(d.study_uid, d.destination, d.version):
            for f in result_files(old.path):
                old_series.add(str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID))
        if old_series:
            try:
                n = delete_series_from_orthanc(self.settings.orthanc_url, sorted(old_series))
                log.info("study %s: removed %d superseded result series from Orthanc", d.study_uid, n)
            except Exception as exc:  # best effort: the new version is already there
                log.warning("could not remove superseded results from Orthanc: %s", exc)

    # --- retention -------------------------------------------------------------------------------
    def _retention_loop(self) -> None:
        days = self.settings.retain_images_days
        while days > 0 and not self._stop.is_set():
            try:
                purge_expired(self.db, self.store, days)
            except Exception:  # never stops the node; tried again in an hour
                log.exception("retention: purge failed")
            self._stop.wait(RETENTION_PERIOD_SECONDS)

    # --- actions from the API ---------------------------------------------------------------------
    def rerun(self, study_uid: str) -> bool:
        ok = self.db.requeue(study_uid)
        self.completion.wake.set()
        return ok

    def resend(self, study_uid: str) -> bool:
        """Queue the latest results again for every configured destination."""
        study = self.db.study(study_uid)
        if study is None or study.version == 0:
            return False
        return self._queue(study_uid, study.version,
                           results_dir_for(self.settings.results_dir, study_uid, study.version)) > 0

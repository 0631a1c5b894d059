"""REST API of a running node (studies, their state and findings, images, re-run and re-send), the
reading-room page and /metrics, all on the one HTTP port, behind lungnode.web.security: every route
but /health, /metrics and the login page needs a login or an API token; re-run and re-send need the
admin role, feedback on the findings (lungnode.web.feedback) the radiologist or admin role. Reads of patient data and every action go to the audit trail."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from lungnode import __version__
from lungnode.accounts import Accounts, Principal
from lungnode.audit import RERUN, RESEND, AuditTrail, Code
from lungnode.dicom_node.db import PENDING, Delivery, Study, VerificationJob
from lungnode.dicom_node.feedback import ReviewCounts
from lungnode.inference.types import DetectionResult
from lungnode.metrics import job_metrics
from lungnode.node import Node
from lungnode.pipeline import load_result, load_verification
from lungnode.web.images import NoduleMark, SeriesView, SeriesViews, build_view, key_image_png
from lungnode.web.access import AccessAudit
from lungnode.web.feedback import add_feedback_routes
from lungnode.web.login import add_login
from lungnode.web.oidc import OidcClient, add_oidc
from lungnode.web.pages import add_pages, renderer
from lungnode.web.results import key_image_files, version_dir
from lungnode.web.security import client_ip, install_security, require_admin

PNG = {200: {"content": {"image/png": {}}, "description": "PNG image"}}


class Health(BaseModel):
    status: str
    version: str
    ae_title: str
    dicom_port: int
    model: str | None
    pending_deliveries: int


@dataclass(frozen=True)
class VerifiedBy:
    """The study's latest results are a verified version: made from the review of `reviewed_version`,
    completed by `user` at `completed_at`."""

    version: int
    reviewed_version: int
    user: str
    completed_at: float


@dataclass(frozen=True)
class StudySummary(Study):
    """A study as the worklist shows it: the job state, how many result deliveries still wait, the
    radiologist's review of its latest results (None: not reviewed; for a verified latest version, the
    review it came from) and, when the latest version is a verified one, who verified it."""

    pending_deliveries: int
    review: ReviewCounts | None
    verified: VerifiedBy | None


class DeliveryOut(BaseModel):
    """One queued or finished delivery of a results version to one destination."""

    id: int
    version: int
    destination: str
    kind: str | None  # 'dicom' | 'hl7' | 'fhir' where the node records it
    state: str
    attempts: int
    next_attempt: float
    last_error: str | None


class KeyImage(BaseModel):
    number: int
    url: str
    thumbnail_url: str


@dataclass(frozen=True)
class StudyDetail(StudySummary):
    """A study with the results the page shows (result.json of `shown_version`), key images and deliveries.
    `shown_version` is the latest version, except while the review a verified latest version came from is
    reopened: then the reviewed version, whose findings the verdicts are about. `added_by_radiologist`: the
    numbers of the shown findings a radiologist added (a verified version)."""

    shown_version: int
    result: DetectionResult | None
    added_by_radiologist: list[int]
    deliveries: list[DeliveryOut]
    key_images: list[KeyImage]


class Viewer(BaseModel):
    """The processed series as the slice viewer needs it; slices are fetched as PNG one by one."""

    version: int
    series_uid: str
    slices: int
    rows: int
    columns: int
    spacing_mm: tuple[float, float, float]
    nodules: list[NoduleMark]


class Queued(BaseModel):
    queued: bool


def delivery_out(d: Delivery) -> DeliveryOut:
    return DeliveryOut(id=d.id, version=d.version, destination=d.destination, kind=getattr(d, "kind", None),
                       state=d.state, attempts=d.attempts, next_attempt=d.next_attempt, last_error=d.last_error)


def create_app(node: Node, accounts: Accounts, audit: AuditTrail) -> FastAPI:
    app = FastAPI(title="lungnode", version=__version__,
                  description="AI lung-nodule detection beside the PACS: studies received, results sent. "
                              "The reading-room page is at /, Prometheus metrics at /metrics. Every /api/ "
                              "route needs a login session or an API token (`Authorization: Bearer lnt_...`, "
                              "made by `lungnode users token`).")
    views = SeriesViews()
    registry = job_metrics(node.settings.db_path)
    results_root = node.settings.results_dir
    access = AccessAudit(audit)

    def study_or_404(study_uid: str) -> Study:
        s = node.db.study(study_uid)
        if s is None:
            raise HTTPException(404, f"no study {study_uid}")
        return s

    def verified_by(job: VerificationJob | None) -> VerifiedBy | None:
        return VerifiedBy(job.version, job.reviewed_version, job.user, job.completed_at) if job else None

    def summary(s: Study, pending: int, review: ReviewCounts | None, verified: VerificationJob | None) -> dict:
        return {**asdict(s), "pending_deliveries": pending, "review": review, "verified": verified_by(verified)}

    def result_of(s: Study, version: int) -> DetectionResult | None:
        return load_result(version_dir(results_root, s.study_uid, version))

    def shown_version(s: Study) -> int:
        reviewed = node.db.reviewable_version(s)
        if reviewed != s.version and node.feedback.review(s.study_uid, reviewed).completion is None:
            return reviewed  # the review a verified version came from is reopened: its findings
        return s.version

    def series_view(study_uid: str) -> SeriesView:
        s = study_or_404(study_uid)
        version = shown_version(s)

        def load() -> SeriesView:  # only when the view is not cached
            result = load_result(version_dir(results_root, study_uid, version))
            if result is None or result.series_instance_uid is None or result.not_processed_reason:
                raise HTTPException(404, "no processed series for this study")
            paths = node.db.instance_paths(study_uid, result.series_instance_uid)
            try:
                return build_view(paths, result.series_instance_uid, result.detections)
            except FileNotFoundError as exc:  # the message would name a server path: not shown
                raise HTTPException(404, "the processed series' images are no longer on the node") from exc

        return views.get(study_uid, version, load)

    @app.get("/health", summary="Liveness, identity and the delivery backlog", response_model=Health)
    def health() -> dict:
        return {"status": "ok", "version": __version__, "ae_title": node.settings.ae_title,
                "dicom_port": node.settings.dicom_port, "model": node.detector.spec.info.name
                if node.detector else None, "pending_deliveries": node.db.pending_count()}

    @app.get("/api/studies", summary="Every study the node has seen, newest first",
             response_model=list[StudySummary])
    def studies(request: Request) -> list[dict]:
        access.worklist_read(request)
        pending = node.db.pending_by_study()
        listed = node.db.studies()
        verified = node.db.current_verifications()
        reviews = node.feedback.counts({s.study_uid: verified[s.study_uid].reviewed_version if s.study_uid in verified
                                        else s.version for s in listed})
        return [summary(s, pending.get(s.study_uid, 0), reviews.get(s.study_uid), verified.get(s.study_uid))
                for s in listed]

    @app.get("/api/studies/{study_uid}", summary="One study: state, latest results, key images, deliveries",
             response_model=StudyDetail)
    def study(study_uid: str, request: Request) -> dict:
        s = study_or_404(study_uid)
        access.record_read(request, s)
        deliveries = node.db.deliveries(study_uid)
        shown = shown_version(s)
        directory = version_dir(results_root, study_uid, shown)
        base = f"/api/studies/{study_uid}/key-images"
        review = node.feedback.counts({study_uid: node.db.reviewable_version(s)}).get(study_uid)
        verification = load_verification(directory)
        return {**summary(s, sum(d.state == PENDING for d in deliveries), review,
                          node.db.verified_version(study_uid, s.version)),
                "shown_version": shown, "result": load_result(directory),
                "added_by_radiologist": verification.added if verification else [],
                "deliveries": [delivery_out(d) for d in deliveries],
                "key_images": [KeyImage(number=n, url=f"{base}/{n}", thumbnail_url=f"{base}/{n}?size=256")
                               for n in sorted(key_image_files(directory))]}

    @app.get("/api/studies/{study_uid}/key-images/{number}", summary="Key image of nodule N<number> as PNG",
             response_class=Response, responses=PNG)
    def key_image(study_uid: str, number: int, request: Request,
                  size: int | None = Query(None, ge=32, le=2048)) -> Response:
        s = study_or_404(study_uid)
        path = key_image_files(version_dir(results_root, study_uid, shown_version(s))).get(number)
        if path is None:
            raise HTTPException(404, f"no key image N{number} in the latest results")
        access.images_read(request, s)
        return Response(key_image_png(path, size), media_type="image/png")

    @app.get("/api/studies/{study_uid}/viewer", summary="The processed series and nodule boxes for the viewer",
             response_model=Viewer)
    def viewer(study_uid: str, request: Request) -> dict:
        view = series_view(study_uid)
        access.images_read(request, node.db.study(study_uid))
        k, rows, columns = view.grey.shape
        return {"version": shown_version(node.db.study(study_uid)), "series_uid": view.series_uid, "slices": k,
                "rows": rows, "columns": columns, "spacing_mm": view.spacing_mm, "nodules": view.nodules}

    @app.get("/api/studies/{study_uid}/slices/{k}", summary="Slice k (0-based) of the processed series, "
             "lung window, as PNG", response_class=Response, responses=PNG)
    def slice_png(study_uid: str, k: int, request: Request) -> Response:
        view = series_view(study_uid)
        if not 0 <= k < view.grey.shape[0]:
            raise HTTPException(404, f"slice {k} is outside 0..{view.grey.shape[0] - 1}")
        access.images_read(request, node.db.study(study_uid))
        return Response(view.slice_png(k), media_type="image/png", headers={"Cache-Control": "private, max-age=60"})

    def act(request: Request, who: Principal, action: Code, study_uid: str, done: bool, refusal: str) -> dict:
        """Audit an admin's re-run / re-send (done or refused), then answer."""
        s = node.db.study(study_uid)
        audit.study_action(action, who.name, client_ip(request), study_uid, s.patient_id if s else None,
                           None if done else refusal)
        if not done:
            raise HTTPException(409, refusal)
        return {"queued": True}

    @app.post("/api/studies/{study_uid}/rerun", summary="Process the study again (new results replace the old); "
              "admin role", response_model=Queued,
              responses={409: {"description": "unknown study, or being processed now"},
                         403: {"description": "not admin"}})
    def rerun(study_uid: str, request: Request, who: Principal = Depends(require_admin)) -> dict:
        return act(request, who, RERUN, study_uid, node.rerun(study_uid),
                   "unknown study, or it is being processed right now")

    @app.post("/api/studies/{study_uid}/resend", summary="Send the latest results to every destination again; "
              "admin role", response_model=Queued,
              responses={409: {"description": "no results yet, or no destination configured"},
                         403: {"description": "not admin"}})
    def resend(study_uid: str, request: Request, who: Principal = Depends(require_admin)) -> dict:
        return act(request, who, RESEND, study_uid, node.resend(study_uid),
                   "no results to send, or no destination configured "
                   "(LUNGNODE_PACS, LUNGNODE_RIS_HL7, LUNGNODE_FHIR_URL)")

    @app.get("/metrics", summary="Prometheus metrics, read from the job database at each scrape",
             response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    add_feedback_routes(app, store=node.feedback, audit=audit, study_or_404=study_or_404,
                        reviewable=node.db.reviewable_version, result_of=result_of, series_view=series_view,
                        on_read=access.record_read, request_verified=node.request_verified,
                        send_verified=node.settings.send_verified_results,
                        last_verification=node.db.last_verification)

    render = renderer(node)
    add_pages(app, node, render)
    oidc = OidcClient.from_settings(node.settings)
    add_login(app, accounts, audit, render, node.settings.session_minutes, oidc=oidc is not None)
    if oidc is not None:
        add_oidc(app, oidc, accounts, audit, node.settings.session_minutes)
    install_security(app, accounts, node.settings.allowed_hosts)
    return app

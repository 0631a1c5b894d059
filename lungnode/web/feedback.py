"""The radiologist's feedback on the findings, on the API: read by any logged-in user, written by a
radiologist or an admin (CSRF-checked like every POST, see security.py), each write audited.

A write names the results version it was made on; when the study has a newer version by then, it is
refused (409) rather than pinned on findings the radiologist did not see. The version reviewed is the
study's latest, or, when the latest is a verified version made from a review, the version reviewed
there: that review stays open to a reopen, and completing it again makes another verified version.

With the node's `send_verified_results` on, "review complete" queues a verified version (see node.py);
the answer says whether it will be sent and how far it got."""
from __future__ import annotations

from typing import Callable

from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel, Field

from lungnode.accounts import Principal
from lungnode.audit import AuditTrail
from lungnode.dicom_node.db import Study, VerificationJob
from lungnode.dicom_node.feedback import (
    MAX_TEXT, AddedNodule, Click, FeedbackError, FeedbackStore, FindingVerdict, Reason, ReviewCompletion, ReviewCounts,
    Verdict)
from lungnode.inference.types import DetectionResult
from lungnode.web.images import SeriesView
from lungnode.web.security import client_ip, principal, require_reviewer

PREFIX = "/api/studies/{study_uid}/feedback"
REFUSALS = {403: {"description": "a viewer (feedback needs the radiologist or admin role)"},
            409: {"description": "the study has newer results, or the review is not ready to complete"},
            422: {"description": "a reason missing or not in the list, a finding that does not exist"}}


class VerdictIn(BaseModel):
    version: int = Field(ge=1, description="the results version the finding belongs to")
    verdict: Verdict
    reason: Reason | None = Field(None, description="why a rejected finding is not a nodule")
    reason_text: str | None = Field(None, max_length=MAX_TEXT, description="needed with reason 'other'")


class AddedIn(BaseModel):
    """A missed nodule clicked on slice `slice` of the processed series (as /viewer and /slices number them),
    at image pixel (column_px, row_px); pixel (i, j) covers [i, i+1) x [j, j+1)."""

    version: int = Field(ge=1)
    slice: int = Field(ge=0)
    column_px: float = Field(ge=0, allow_inf_nan=False)
    row_px: float = Field(ge=0, allow_inf_nan=False)
    diameter_mm: float = Field(6.0, gt=0, le=100, allow_inf_nan=False)


class VersionIn(BaseModel):
    version: int = Field(ge=1)


class FeedbackOut(BaseModel):
    study_uid: str
    version: int
    findings: int  # how many findings the version has (each needs a verdict before completion)
    verdicts: list[FindingVerdict]
    added: list[AddedNodule]
    completion: ReviewCompletion | None
    counts: ReviewCounts
    can_write: bool
    latest_version: int  # the study's latest results version (the reviewed one, or one verified from it)
    send_verified: bool  # completing the review sends a verified version (LUNGNODE_SEND_VERIFIED_RESULTS)
    verification: VerificationJob | None  # the last verified version asked for from this review, if any


def add_feedback_routes(app: FastAPI, *, store: FeedbackStore, audit: AuditTrail, study_or_404: Callable[[str], Study],
                        reviewable: Callable[[Study], int], result_of: Callable[[Study, int], DetectionResult | None],
                        series_view: Callable[[str], SeriesView], on_read: Callable[[Request, Study], None],
                        request_verified: Callable[[ReviewCompletion], bool], send_verified: bool,
                        last_verification: Callable[[str, int], VerificationJob | None]) -> None:
    """``on_read`` audits a read of the study's record (the review names who judged what);
    ``request_verified`` queues a verified version for a completed review (False: not sent)."""

    def current(study_uid: str, version: int) -> tuple[Study, int, DetectionResult]:
        """The study, the version under review and its results, when `version` is still that one."""
        s = study_or_404(study_uid)
        reviewed = reviewable(s)
        if version != reviewed:
            raise HTTPException(409, f"the study's results under review are now version {reviewed}, not {version}: "
                                     "reload the page and review the new findings")
        result = result_of(s, reviewed)
        if result is None or result.not_processed_reason or result.series_instance_uid is None:
            raise HTTPException(409, "this version has no processed series to review")
        return s, reviewed, result

    def audited(request: Request, who: Principal, s: Study, action: str, what: str) -> None:
        audit.feedback(who.name, client_ip(request), s.study_uid, s.patient_id or None, action, what)

    def answer(s: Study, who: Principal) -> FeedbackOut:
        version = reviewable(s)
        result = result_of(s, version)
        review = store.review(s.study_uid, version)
        return FeedbackOut(
            study_uid=s.study_uid, version=version, findings=len(result.detections) if result else 0,
            verdicts=review.verdicts, added=review.added,
            completion=review.completion, can_write=who.can_review,
            counts=ReviewCounts(version, review.confirmed, review.rejected, len(review.added),
                                review.completion is not None),
            latest_version=s.version, send_verified=send_verified,
            verification=last_verification(s.study_uid, version))

    @app.get(PREFIX, summary="The feedback recorded on the study's latest results", response_model=FeedbackOut)
    def read(study_uid: str, request: Request) -> FeedbackOut:
        s = study_or_404(study_uid)
        on_read(request, s)
        return answer(s, principal(request))

    @app.put(PREFIX + "/findings/{number}", summary="Confirm finding N<number>, or reject it with a reason; "
                "radiologist or admin", response_model=FeedbackOut, responses=REFUSALS)
    def judge(study_uid: str, number: int, body: VerdictIn, request: Request,
              who: Principal = Depends(require_reviewer)) -> FeedbackOut:
        s, version, result = current(study_uid, body.version)
        if not 1 <= number <= len(result.detections):
            raise HTTPException(422, f"version {version} has findings N1..N{len(result.detections)}, no N{number}")
        d = result.detections[number - 1]
        before = {v.finding for v in store.review(study_uid, version).verdicts}
        try:
            v = store.set_verdict(FindingVerdict(study_uid, version, number, body.verdict, body.reason,
                                                 body.reason_text, d.box_mm, d.diameter_mm, d.score, who.name,
                                                 at=0.0))
        except FeedbackError as exc:
            raise HTTPException(422, str(exc)) from exc
        why = f": {v.reason}" + (f" ({v.reason_text})" if v.reason_text else "") if v.reason else ""
        audited(request, who, s, "U" if number in before else "C", f"v{version} N{number} {v.verdict}{why}")
        return answer(s, who)

    @app.delete(PREFIX + "/findings/{number}", summary="Withdraw the verdict on N<number>; radiologist or admin",
                   response_model=FeedbackOut, responses=REFUSALS)
    def withdraw(study_uid: str, number: int, version: int, request: Request,
                 who: Principal = Depends(require_reviewer)) -> FeedbackOut:
        s, version, _ = current(study_uid, version)
        if not store.withdraw_verdict(study_uid, version, number):
            raise HTTPException(404, f"N{number} has no verdict to withdraw")
        audited(request, who, s, "D", f"v{version} N{number} verdict withdrawn")
        return answer(s, who)

    @app.post(PREFIX + "/added", summary="Add a nodule the model missed, clicked on a slice; radiologist or admin",
                 response_model=FeedbackOut, responses=REFUSALS)
    def add(study_uid: str, body: AddedIn, request: Request, who: Principal = Depends(require_reviewer)) -> FeedbackOut:
        s, version, _ = current(study_uid, body.version)
        view = series_view(study_uid)
        k, rows, columns = view.grey.shape
        if body.slice >= k or body.column_px > columns or body.row_px > rows:
            raise HTTPException(422, f"the click is outside the series ({k} slices of {columns} x {rows} pixels)")
        centre = view.world_mm(body.slice, body.column_px, body.row_px)
        a = store.add_nodule(study_uid, version, centre, body.diameter_mm, view.slice_uids[body.slice],
                             Click(body.slice, body.column_px, body.row_px), who.name)
        audited(request, who, s, "C", f"v{version} added nodule A{a.id} at "
                f"({centre[0]:.1f}, {centre[1]:.1f}, {centre[2]:.1f}) mm, {a.diameter_mm:.1f} mm")
        return answer(s, who)

    @app.delete(PREFIX + "/added/{number}", summary="Remove added nodule A<number>; radiologist or admin",
                   response_model=FeedbackOut, responses=REFUSALS)
    def remove(study_uid: str, number: int, version: int, request: Request,
               who: Principal = Depends(require_reviewer)) -> FeedbackOut:
        s, version, _ = current(study_uid, version)
        if not store.remove_nodule(study_uid, version, number):
            raise HTTPException(404, f"no added nodule A{number} on version {version}")
        audited(request, who, s, "D", f"v{version} added nodule A{number} removed")
        return answer(s, who)

    @app.post(PREFIX + "/complete", summary="Mark the review complete (every finding has a verdict); "
                 "radiologist or admin", response_model=FeedbackOut, responses=REFUSALS)
    def complete(study_uid: str, body: VersionIn, request: Request,
                 who: Principal = Depends(require_reviewer)) -> FeedbackOut:
        s, version, result = current(study_uid, body.version)
        try:
            done = store.complete(study_uid, version, result.series_instance_uid, len(result.detections), who.name)
        except FeedbackError as exc:
            raise HTTPException(409, str(exc)) from exc
        queued = request_verified(done)
        audited(request, who, s, "C", f"v{version} review complete" + ("; verified version queued" if queued else ""))
        return answer(s, who)

    @app.delete(PREFIX + "/complete", summary="Reopen a completed review; radiologist or admin",
                   response_model=FeedbackOut, responses=REFUSALS)
    def reopen(study_uid: str, version: int, request: Request,
               who: Principal = Depends(require_reviewer)) -> FeedbackOut:
        s, version, _ = current(study_uid, version)
        if store.reopen(study_uid, version):
            audited(request, who, s, "D", f"v{version} review reopened")
        return answer(s, who)



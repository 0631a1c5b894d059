"""The report stage's one entry point: a DetectionResult -> DICOM objects for the same study.

Each run gets new series (SR, key images, presentation state, segmentation, key object selection)
whose number and description carry ``version``, so a PACS lists the newest results of a re-processed
study last and labelled as such. The presentation state, the segmentation and the KOS exist only when
something was found (a KOS must flag at least one object, and flagging a study without findings would
mislead; see kos.py); the segmentation also not for multi-frame sources (see seg.py). A version a
radiologist verified goes through the same builders with its `Verification` (verification.py).
"""
from __future__ import annotations

from datetime import datetime

import pydicom

from lungnode.inference.types import DetectionResult, Volume
from lungnode.reports.gsps import build_gsps
from lungnode.reports.key_images import build_key_image
from lungnode.reports.kos import build_kos
from lungnode.reports.result_series import ResultSeries, new_series
from lungnode.reports.seg import build_seg
from lungnode.reports.source_refs import findings_of
from lungnode.reports.sr import build_sr
from lungnode.reports.verification import Verification

def build_results(
    result: DetectionResult,
    volume: Volume | None,
    source: pydicom.Dataset,
    *,
    version: int = 1,
    manufacturer: str = "lungnode",
    institution: str | None = None,
    verification: Verification | None = None,
) -> list[pydicom.Dataset]:
    """The SR first, then one key image per detection (in detection order), then the presentation state,
    the segmentation and the key object selection (only with detections), all in ``source``'s study.

    ``source`` is a header of the processed series (any instance of the study when nothing was
    processed); ``volume`` is None only when ``result.not_processed_reason`` is set.
    """
    if version < 1:
        raise ValueError(f"version must be >= 1, got {version}")
    if result.study_instance_uid != source.StudyInstanceUID:
        raise ValueError(
            f"result is for study {result.study_instance_uid} but source is from {source.StudyInstanceUID}"
        )
    if result.not_processed_reason is None and result.detections and volume is None:
        raise ValueError("a result with detections needs its volume")
    if volume is not None and volume.study_instance_uid != source.StudyInstanceUID:
        raise ValueError("volume and source belong to different studies")

    has_findings = result.not_processed_reason is None and bool(result.detections) and volume is not None
    added = verification.added if verification else frozenset()
    findings = findings_of(volume, result.detections, added) if has_findings else []
    def series(kind: str) -> ResultSeries:
        return new_series(kind, version, manufacturer, institution, verified=verification is not None)

    sr = build_sr(result, volume, source, findings, series=series("sr"), verification=verification)
    if not has_findings:
        return _dated([sr])
    key_series = series("key images")  # one series for all of them
    key_images = [build_key_image(volume, finding, source, series=key_series, model=result.model)
                  for finding in findings]
    overlay = (findings, volume, source, result.model)
    gsps = build_gsps(*overlay, series=series("gsps"), verification=verification)
    seg = build_seg(*overlay, series=series("seg"), verification=verification)
    kos = build_kos(*overlay, sr=sr, gsps=gsps, seg=seg, key_images=key_images, series=series("kos"),
                    verification=verification)
    return _dated([sr, *key_images, gsps, *([seg] if seg is not None else []), kos])


def _dated(outputs: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Series date/time = when the results were made, so PACS browsers that group series by date show
    the AI series under a real day instead of an unknown date."""
    now = datetime.now()
    for ds in outputs:
        ds.SeriesDate = now.strftime("%Y%m%d")
        ds.SeriesTime = now.strftime("%H%M%S")
    return outputs

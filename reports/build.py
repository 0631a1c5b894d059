"""The report stage's one entry point: a DetectionResult -> DICOM objects for the same study.

Each run gets new series (an SR series and a key-image series) whose number and description carry
``version``, so a PACS lists the newest results of a re-processed study last and labelled as such.
"""
from __future__ import annotations

import highdicom as hd
import pydicom

from lungnode.inference.types import DetectionResult, Volume
from lungnode.reports.key_images import build_key_image
from lungnode.reports.sr import build_sr

SERIES_NUMBER_BASE = 9000  # high, so AI series sort after the acquired ones


def sr_series_number(version: int) -> int:
    return SERIES_NUMBER_BASE + 10 * version


def key_image_series_number(version: int) -> int:
    return SERIES_NUMBER_BASE + 10 * version + 1


def build_results(
    result: DetectionResult,
    volume: Volume | None,
    source: pydicom.Dataset,
    *,
    version: int = 1,
    manufacturer: str = "lungnode",
    institution: str | None = None,
) -> list[pydicom.Dataset]:
    """The SR first, then one key image per detection (in detection order), all in ``source``'s study.

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

    sr = build_sr(
        result,
        volume,
        source,
        series_instance_uid=hd.UID(),
        series_number=sr_series_number(version),
        series_description=f"lungnode AI nodules v{version}",
        manufacturer=manufacturer,
        institution=institution,
    )
    outputs: list[pydicom.Dataset] = [sr]
    if result.not_processed_reason is not None or not result.detections or volume is None:
        return outputs
    key_series_uid = hd.UID()
    for number, detection in enumerate(result.detections, start=1):
        outputs.append(
            build_key_image(
                volume,
                detection,
                number,
                source,
                series_instance_uid=key_series_uid,
                series_number=key_image_series_number(version),
                series_description=f"lungnode AI key images v{version}",
                manufacturer=manufacturer,
                model_name=result.model.name,
                software_version=result.model.version,
                institution=institution,
            )
        )
    return outputs

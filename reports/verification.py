"""A radiologist's verification of a results version, as the report builders write it.

A verified version holds the findings of the reviewed version the radiologist confirmed (same geometry,
the model's score kept) followed by the nodules they added (numbered after them). The builders mark the
added ones as the radiologist's, never the model's: no algorithm, no detection confidence (see sr.py,
seg.py, key_images.py); the SR is VERIFIED with the radiologist as verifying observer.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from lungnode.inference.types import Detection

# Detection.score of an added nodule in result.json: the radiologist's certainty. The builders, the RIS
# reports and the page show no score for it (Verification.added says which ones).
ADDED_SCORE = 1.0


@dataclass(frozen=True)
class Verification:
    observer_name: str  # DICOM PN of the radiologist, e.g. "Nguyen^Lan"
    organization: str  # Verifying Organization
    at: datetime  # when they completed the review (timezone-aware)
    reviewed_version: int  # the results version they reviewed
    added: frozenset[int]  # numbers (N1 = 1) of the findings they added; the others are the model's, confirmed

    def is_added(self, number: int) -> bool:
        return number in self.added


def verified_detections(
    reviewed: list[Detection], confirmed: Iterable[int], added: Iterable[tuple[tuple[float, float, float], float]]
) -> tuple[list[Detection], frozenset[int]]:
    """The verified version's detections: the confirmed ones of ``reviewed`` (by number, N1 = 1, in
    order), then one per added nodule (centre in LPS mm, diameter): a box of its diameter around its
    centre, as the detector's boxes are. Returns them and the numbers of the added ones."""
    kept = [reviewed[n - 1] for n in sorted(set(confirmed))]
    extra = [Detection(center_mm=tuple(centre), diameter_mm=diameter, score=ADDED_SCORE,
                       box_mm=(*(c - diameter / 2 for c in centre), *(c + diameter / 2 for c in centre)))
             for centre, diameter in added]
    return kept + extra, frozenset(range(len(kept) + 1, len(kept) + len(extra) + 1))

"""The registry folder's ``registry.json``: the default model, the registered reference set that
promotions are decided on, and the history of promotions, reference sets and rollbacks.

Promotion records from before the reference set was introduced have no ``reference_digest``: they were
decided on whatever set the engineer gave, and cannot be compared with later ones.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Discriminator, Tag

REGISTRY_FILE = "registry.json"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class DigestPart(BaseModel):
    """One thing that defines the reference scans (the generator, the seeds, a datalist, an image), and
    its sha256: kept so that a changed set can say which part changed."""

    name: str
    sha256: str


class ReferenceSet(BaseModel):
    """THE evaluation set promotions are decided on (`lungnode train reference`)."""

    description: str
    arguments: list[str]  # `lungnode train reference` arguments that rebuild it (paths absolute)
    generator_version: int  # training/synth.GENERATOR_VERSION when it was registered
    digest: str  # sha256 over the parts
    parts: list[DigestPart]
    registered_at: str


class PromotionRecord(BaseModel):
    event: Literal["promotion"] = "promotion"
    candidate: str
    current: str
    candidate_cpm: float
    current_cpm: float
    eval_set: str
    accepted: bool
    at: str
    reference_digest: str | None = None  # None: decided before a reference set was registered
    difference_ci: tuple[float, float] | None = None  # paired bootstrap of candidate - current CPM
    resamples: int | None = None


class ReferenceRecord(BaseModel):
    event: Literal["reference"] = "reference"
    description: str
    digest: str
    replaced_digest: str | None = None
    reason: str | None = None
    at: str


class OperatingPointRecord(BaseModel):
    """The default's networks at another score threshold, chosen on named real scans for a false-mark
    budget: the ranking (so the CPM) is the same, so no reference-set comparison can judge it."""

    event: Literal["operating-point"] = "operating-point"
    candidate: str
    current: str
    threshold: float
    current_threshold: float
    tune_scans: list[str]  # the real series it was chosen on
    figures: dict[str, float | int | str]  # the candidate card's figures there, at its threshold
    at: str


class RollbackRecord(BaseModel):
    event: Literal["rollback"] = "rollback"
    previous: str  # the default until then
    default: str  # the default since
    reason: str
    at: str


def _event(entry: Any) -> str:
    """Records written before the field existed are promotions."""
    return entry.get("event", "promotion") if isinstance(entry, dict) else entry.event


HistoryEntry = Annotated[
    Union[Annotated[PromotionRecord, Tag("promotion")], Annotated[ReferenceRecord, Tag("reference")],
          Annotated[OperatingPointRecord, Tag("operating-point")], Annotated[RollbackRecord, Tag("rollback")]],
    Discriminator(_event),
]


class Registry(BaseModel):
    default: str
    reference_set: ReferenceSet | None = None
    history: list[HistoryEntry] = []

    @classmethod
    def load(cls, models_dir: Path, default: str) -> Registry:
        """The folder's registry; a fresh one with ``default`` when it has none."""
        path = Path(models_dir) / REGISTRY_FILE
        return cls.model_validate_json(path.read_text()) if path.is_file() else cls(default=default)

    def save(self, models_dir: Path) -> None:
        (Path(models_dir) / REGISTRY_FILE).write_text(self.model_dump_json(indent=2) + "\n")

    def comparable(self, entry: PromotionRecord) -> bool:
        """Decided on the reference set registered now."""
        return self.reference_set is not None and entry.reference_digest == self.reference_set.digest

    def previous_default(self) -> str | None:
        """The model the current default was promoted over (the latest accepted promotion to it). A
        rollback is no link of its own: rolling back twice goes two promotions back."""
        for entry in reversed(self.history):
            accepted = isinstance(entry, OperatingPointRecord) or (isinstance(entry, PromotionRecord) and entry.accepted)
            if accepted and entry.candidate == self.default and entry.current != self.default:
                return entry.current
        return None

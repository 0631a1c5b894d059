"""The new series each kind of result goes into: its UID, a number and description that carry the
results' version, and who made it (the attributes every result builder writes alike)."""
from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd

from lungnode.inference.types import ModelInfo

SERIES_NUMBER_BASE = 9000  # high, so AI series sort after the acquired ones
# Each result kind's series: number = SERIES_NUMBER_BASE + 10 * version + offset, and its description.
SERIES = {"sr": (0, "nodules"), "key images": (1, "key images"), "gsps": (2, "nodule marks"),
          "kos": (3, "key objects"), "seg": (4, "nodule masks")}


@dataclass(frozen=True)
class ResultSeries:
    instance_uid: str
    number: int
    description: str
    manufacturer: str
    institution: str | None

    def attributes(self, model: ModelInfo, instance_number: int = 1) -> dict:
        """The keyword arguments every highdicom constructor takes alike, for a new instance of this
        series made by ``model``."""
        return {"series_instance_uid": self.instance_uid, "series_number": self.number,
                "series_description": self.description, "sop_instance_uid": hd.UID(),
                "instance_number": instance_number, "manufacturer": self.manufacturer,
                "manufacturer_model_name": model.name, "software_versions": model.version,
                "institution_name": self.institution}


def new_series(kind: str, version: int, manufacturer: str, institution: str | None,
               verified: bool = False) -> ResultSeries:
    """A new series of ``kind`` for results ``version`` ("lungnode AI nodules v1", or for a version a
    radiologist verified "lungnode verified nodules v2")."""
    offset, label = SERIES[kind]
    return ResultSeries(instance_uid=hd.UID(), number=SERIES_NUMBER_BASE + 10 * version + offset,
                        description=f"lungnode {'verified' if verified else 'AI'} {label} v{version}",
                        manufacturer=manufacturer,
                        institution=institution)

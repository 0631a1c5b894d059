"""One received instance read and checked before Success goes back: it parses, its identifying UIDs
are UIDs (they name its file), it is the instance and SOP class the request announced, and its image
can be read (`image_check`). Anything else is `Refused`, with the C-STORE status and the reason the
sender sees as Error Comment."""
from __future__ import annotations

from io import BytesIO

from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian

from lungnode.dicom_node.db import InstanceRecord
from lungnode.dicom_node.image_check import ImageProblem, check_image
from lungnode.dicom_node.storage import InstanceStore, digest

DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000


class Refused(Exception):
    """An instance this node does not accept: the C-STORE status and the reason sent as Error Comment."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def check_instance(data: bytes, store: InstanceStore, caller: str, affected_sop_uid: str | None = None,
                   affected_sop_class: str | None = None) -> InstanceRecord:
    """The index record of a received Part 10 file (``data``), or Refused."""
    try:
        ds = dcmread(BytesIO(data), defer_size=1024)  # header parsed, pixels skipped
        missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if not ds.get(k)]
        sop_class = str(ds.get("SOPClassUID", ""))  # every element read here converts (a bad VR raises) here
    except Exception as exc:  # pydicom raises many kinds on hostile bytes; each is a refusal
        raise Refused(CANNOT_UNDERSTAND, f"cannot parse the data set: {type(exc).__name__}: {exc}") from exc
    if missing:
        raise Refused(CANNOT_UNDERSTAND, f"cannot parse the data set: no {', '.join(missing)}")
    try:
        path = store.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    except ValueError as exc:  # InvalidUID, or (never expected) a path outside the store
        raise Refused(CANNOT_UNDERSTAND, str(exc)) from exc
    sop_uid = str(ds.SOPInstanceUID).rstrip("\0 ")
    if affected_sop_uid and sop_uid != str(affected_sop_uid):
        raise Refused(DATASET_MISMATCH, f"SOPInstanceUID {sop_uid} differs from the request's {affected_sop_uid}")
    if affected_sop_class and sop_class != affected_sop_class:
        raise Refused(DATASET_MISMATCH, f"SOPClassUID {sop_class} differs from the request's {affected_sop_class}")
    try:
        check_image(ds, len(data), deflated=ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian)
        return InstanceRecord.from_header(ds, path, digest(data), len(data), caller)
    except ImageProblem as exc:
        raise Refused(DATASET_MISMATCH, str(exc)) from exc
    except Exception as exc:  # a value pydicom cannot convert (Rows 'x', a bad date ...)
        raise Refused(CANNOT_UNDERSTAND, f"cannot read the data set: {type(exc).__name__}: {exc}") from exc

"""An image's attributes and pixel data checked before the sender is told Success.

The receiver reads only the header (`dcmread(..., defer_size=...)`): pixel data cut in half, Rows 0 or
Bits Allocated 7 would otherwise be acknowledged and fail only when the study is read, long after the
sender could have sent the slice again. The rules are PS3.3 C.7.6.3 (Image Pixel module) and PS3.5
8.1.1 / A.4 (native and encapsulated pixel data); CT needs nothing beyond them.
"""
from __future__ import annotations

import struct

from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import UID

MAX_MATRIX = 8192  # rows or columns: no CT (or any radiology) image comes near it
MAX_FRAMES = 10_000
PIXEL_DATA, FLOAT_PIXEL_DATA, DOUBLE_PIXEL_DATA = Tag(0x7FE0, 0x0010), Tag(0x7FE0, 0x0008), Tag(0x7FE0, 0x0009)


class ImageProblem(ValueError):
    """Why an image cannot be read, in words for the sender's Error Comment."""


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        if default is None:
            raise ImageProblem(f"no {keyword}")
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ImageProblem(f"{keyword} {value!r} is not a number") from exc


def _value_length(ds: Dataset, tag: Tag, file_size: int) -> int | None:
    """The length of the element's value, checked to lie within the received bytes; None when the
    length is undefined (encapsulated)."""
    raw = ds._dict[tag]
    if isinstance(raw, RawDataElement):
        if raw.length == 0xFFFFFFFF:
            return None
        if raw.value is None and raw.value_tell is not None and raw.value_tell + raw.length > file_size:
            raise ImageProblem(f"pixel data cut short: {file_size - raw.value_tell} of {raw.length} bytes")
        return raw.length
    value = ds[tag].value
    return None if value is None else len(value)


def check_image(ds: Dataset, file_size: int, deflated: bool = False) -> None:
    """ImageProblem when the image attributes are impossible or the pixel data does not have the length
    they imply. ``ds`` may have its pixel data deferred (read with ``defer_size``) from a file of
    ``file_size`` bytes; ``deflated``: the data set was inflated, so offsets are not file offsets."""
    present = [t for t in (PIXEL_DATA, FLOAT_PIXEL_DATA, DOUBLE_PIXEL_DATA) if t in ds._dict]
    if not present:
        raise ImageProblem("the image has no pixel data")
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    for name, n in (("Rows", rows), ("Columns", columns)):
        if not 1 <= n <= MAX_MATRIX:
            raise ImageProblem(f"{name} {n} is outside 1..{MAX_MATRIX}")
    frames = _int(ds, "NumberOfFrames", 1)
    if not 1 <= frames <= MAX_FRAMES:
        raise ImageProblem(f"NumberOfFrames {frames} is outside 1..{MAX_FRAMES}")
    samples = _int(ds, "SamplesPerPixel")
    if samples not in (1, 3):
        raise ImageProblem(f"SamplesPerPixel {samples} is not 1 or 3")
    tag = present[0]
    if tag == PIXEL_DATA:
        bits = _int(ds, "BitsAllocated")
        if bits != 1 and (bits % 8 or not 8 <= bits <= 64):
            raise ImageProblem(f"BitsAllocated {bits} is not 1 or a multiple of 8 up to 64")
        stored, high = _int(ds, "BitsStored"), _int(ds, "HighBit")
        if not 1 <= stored <= bits or not stored - 1 <= high < bits:
            raise ImageProblem(f"BitsStored {stored} / HighBit {high} do not fit BitsAllocated {bits}")
        if _int(ds, "PixelRepresentation") not in (0, 1):
            raise ImageProblem(f"PixelRepresentation {ds.PixelRepresentation} is not 0 or 1")
        if not str(ds.get("PhotometricInterpretation", "")).strip():
            raise ImageProblem("no PhotometricInterpretation")
    else:
        bits = 32 if tag == FLOAT_PIXEL_DATA else 64

    length = _value_length(ds, tag, file_size) if not deflated else len(ds[tag].value)
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", ""))) if hasattr(ds, "file_meta") else None
    if length is None or (syntax is not None and syntax.is_encapsulated):
        _check_fragments(ds[tag].value, frames)
        return
    expected = (rows * columns * samples * frames * bits + 7) // 8
    if length not in (expected, expected + 1):  # +1: the pad byte of an odd length
        raise ImageProblem(f"pixel data is {length} bytes; {rows}x{columns}x{samples}x{frames} at {bits} bits "
                           f"is {expected}")


_ITEM = struct.Struct("<HHI")


def _check_fragments(value: bytes | None, frames: int) -> None:
    """Encapsulated pixel data (PS3.5 A.4): a Basic Offset Table item, then at least one fragment per
    frame, each item whole, up to the sequence delimiter or the end of the value."""
    if not value:
        raise ImageProblem("encapsulated pixel data is empty")
    pos, items = 0, 0
    while pos + _ITEM.size <= len(value):
        group, element, length = _ITEM.unpack_from(value, pos)
        if (group, element) == (0xFFFE, 0xE0DD):
            break
        if (group, element) != (0xFFFE, 0xE000):
            raise ImageProblem(f"encapsulated pixel data: ({group:04X},{element:04X}) where an item belongs")
        pos += _ITEM.size + length
        if length == 0xFFFFFFFF or pos > len(value):
            raise ImageProblem(f"encapsulated pixel data: item {items} of {length} bytes runs past the end")
        items += 1
    else:
        if pos != len(value):
            raise ImageProblem("encapsulated pixel data ends inside an item header")
    fragments = items - 1  # the first item is the Basic Offset Table
    if fragments < frames:
        raise ImageProblem(f"encapsulated pixel data has {fragments} fragment(s) for {frames} frame(s)")

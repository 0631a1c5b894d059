"""Secondary-capture key images: the axial slice through each nodule with its box and score burned in.

A radiologist scrolling the study in any PACS viewer sees where the AI looked without an SR-aware
viewer; the pixels are RGB so the annotation colour cannot be mistaken for anatomy.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from lungnode.inference.types import Detection, ModelInfo, SliceRef, Volume
from lungnode.reports.result_series import ResultSeries

if TYPE_CHECKING:  # source_refs imports this module
    from lungnode.reports.source_refs import Finding

LUNG_WINDOW_HU = (-1350.0, 150.0)
BOX_RGB = (255, 40, 40)
FOOTER_RGB = (255, 220, 0)
FOOTER = "lungnode AI \u2014 not for diagnosis without radiologist review"
MIN_SIDE_PX = 512  # small volumes are enlarged so the label stays legible
MIN_BOX_PX = 24  # tiny nodules still get a box that can be seen
_EM_DASH = "\u2014"  # the font bundled with Pillow has no dash glyphs, so it is drawn as a line
_LPS_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))


def centre_slice_index(volume: Volume, center_mm: tuple[float, float, float]) -> int:
    """Index k of the volume plane (and of ``volume.slices``) nearest to a world point."""
    k = float(volume.world_to_index(np.asarray(center_mm))[2])
    return int(np.clip(round(k), 0, volume.hu.shape[0] - 1))


def label_text(number: int, detection: Detection, added: bool = False) -> str:
    """The on-image label: "N1 8.4 mm 0.91" (number as in the SR tracking identifier, diameter, score);
    a nodule the radiologist added has no model score: "N3 7.5 mm radiologist"."""
    return f"N{number} {detection.diameter_mm:.1f} mm " + ("radiologist" if added else f"{detection.score:.2f}")


def box_pixels(volume: Volume, detection: Detection) -> tuple[float, float, float, float]:
    """The detection box as continuous (i_min, j_min, i_max, j_max) voxel indices of its axial plane."""
    x0, y0, z0, x1, y1, z1 = detection.box_mm
    corners = np.array([[x, y, z] for x in (x0, x1) for y in (y0, y1) for z in (z0, z1)])
    ijk = volume.world_to_index(corners)
    return float(ijk[:, 0].min()), float(ijk[:, 1].min()), float(ijk[:, 0].max()), float(ijk[:, 1].max())


def render(volume: Volume, detection: Detection, label: str) -> np.ndarray:
    """RGB uint8 image (rows, cols, 3) of the centre slice in lung window with box, label and footer."""
    plane = volume.hu[centre_slice_index(volume, detection.center_mm)].astype(np.float64)
    lo, hi = LUNG_WINDOW_HU
    grey = np.round(np.clip((plane - lo) / (hi - lo), 0.0, 1.0) * 255).astype(np.uint8)
    scale = max(1, math.ceil(MIN_SIDE_PX / max(grey.shape)))
    grey = np.kron(grey, np.ones((scale, scale), dtype=np.uint8))
    image = Image.fromarray(np.stack([grey] * 3, axis=-1), mode="RGB")
    draw = ImageDraw.Draw(image)
    side = max(image.size)
    width = max(2, side // 256)

    # Voxel index v is the centre of a pixel spanning [v - 0.5, v + 0.5]. The outline runs `gap` pixels
    # outside the box, which is never drawn smaller than MIN_BOX_PX, so it cannot hide a small nodule.
    i0, j0, i1, j1 = ((v + 0.5) * scale for v in box_pixels(volume, detection))
    gap = width
    half_i = max((i1 - i0) / 2, MIN_BOX_PX / 2) + gap + width
    half_j = max((j1 - j0) / 2, MIN_BOX_PX / 2) + gap + width
    ci, cj = (i0 + i1) / 2, (j0 + j1) / 2
    box = (round(ci - half_i), round(cj - half_j), round(ci + half_i) - 1, round(cj + half_j) - 1)
    draw.rectangle(box, outline=BOX_RGB, width=width)

    font = ImageFont.load_default(size=max(10, side // 28))
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    pad = width
    y = box[1] - (bottom - top) - 3 * pad
    if y < 0:
        y = box[3] + 3 * pad
    x = min(max(box[0], pad), image.width - (right - left) - pad)
    draw.rectangle((x - pad, y - pad, x + right - left + pad, y + bottom - top + pad), fill=(0, 0, 0))
    draw.text((x - left, y - top), label, font=font, fill=BOX_RGB)

    _draw_footer(draw, image.size, ImageFont.load_default(size=max(8, side // 40)))
    return np.asarray(image)


def _draw_footer(draw: ImageDraw.ImageDraw, size: tuple[int, int], font: ImageFont.FreeTypeFont) -> None:
    """Bottom-left disclaimer on black; the em dash is drawn as a line because the font lacks it."""
    before, after = FOOTER.split(_EM_DASH)
    dash = draw.textlength("M", font=font)
    _, top, _, bottom = draw.textbbox((0, 0), before + after, font=font)
    height = bottom - top
    x, y = 4, size[1] - height - 6
    total = draw.textlength(before, font=font) + dash + draw.textlength(after, font=font)
    draw.rectangle((x - 2, y - 2, x + total + 2, y + height + 2), fill=(0, 0, 0))
    draw.text((x, y - top), before, font=font, fill=FOOTER_RGB)
    x += draw.textlength(before, font=font)
    mid = y + height // 2
    draw.line((x + 1, mid, x + dash - 1, mid), fill=FOOTER_RGB, width=max(1, height // 8))
    draw.text((x + dash, y - top), after, font=font, fill=FOOTER_RGB)


def patient_orientation(volume: Volume) -> tuple[str, str]:
    """DICOM PatientOrientation (row direction, column direction) letters of an axial plane."""
    letters = []
    for axis in (0, 1):
        d = volume.direction[:, axis]
        dominant = int(np.argmax(np.abs(d)))
        letters.append(_LPS_LETTERS[dominant][int(d[dominant] > 0)])
    return letters[0], letters[1]


def _reference(ref: SliceRef) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ref.sop_class_uid
    item.ReferencedSOPInstanceUID = ref.sop_instance_uid
    return item


def build_key_image(
    volume: Volume,
    finding: Finding,
    source: Dataset,
    *,
    series: ResultSeries,
    model: ModelInfo,
) -> hd.sc.SCImage:
    """One SC image in the source study that references the CT slice it shows."""
    detection, number = finding.detection, finding.number
    ref = finding.slice
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=render(volume, detection, finding.label),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        patient_orientation=patient_orientation(volume),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        **series.attributes(model, instance_number=number),
    )
    image.SourceImageSequence = [_reference(ref)]
    image.ReferencedImageSequence = [_reference(ref)]
    image.DerivationDescription = (
        f"Axial CT slice through nodule N{number} centre, lung window "
        f"{LUNG_WINDOW_HU[0]:.0f}..{LUNG_WINDOW_HU[1]:.0f} HU, "
        + ("box of the nodule the radiologist added burned in" if finding.added else
           "detection box and score burned in")
    )
    image.BurnedInAnnotation = "YES"
    # Type 2C for a paired organ; the lung side is not judged here, so it is copied or left empty.
    image.Laterality = source.get("Laterality", "")
    image.ImageComments = finding.label + (" (diameter; added by the radiologist)" if finding.added else
                                           " (diameter, detection confidence)")
    return image

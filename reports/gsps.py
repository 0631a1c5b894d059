"""Grayscale Softcopy Presentation State: the AI's nodule marks drawn over the original CT slices.

Unlike the key images nothing is burned in: any PACS viewer shows the source series with a circle and
a label ("N1 8.4 mm 0.91") on the slice through each nodule centre, in one graphic layer the
radiologist can switch off. The state references every image of the series, so scrolling it keeps
the same display, and it uses the series' own window (else a lung window) so that applying it does
not change what the radiologist is used to seeing.
"""
from __future__ import annotations

import highdicom as hd
from pydicom import Dataset
from pydicom.multival import MultiValue

from lungnode.inference.types import ModelInfo, Volume
from lungnode.reports.result_series import ResultSeries
from lungnode.reports.source_refs import Finding, series_headers, slice_header
from lungnode.reports.verification import Verification

LAYER = "LUNGNODE_AI"  # also the state's Content Label, which viewers list it by
VERIFIED_LAYER = "LUNGNODE_REVIEW"  # the same for a version a radiologist verified (at most 16 characters)
LAYER_RGB = (255, 40, 40)  # as the key images' boxes
LUNG_WINDOW = (-600.0, 1500.0)  # centre, width (HU)


def build_gsps(
    findings: list[Finding],
    volume: Volume,
    source: Dataset,
    model: ModelInfo,
    *,
    series: ResultSeries,
    verification: Verification | None = None,
) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """One presentation state over the whole source series with one circle + label per finding."""
    if not findings:
        raise ValueError("a presentation state needs at least one finding to mark")
    rows, columns = int(source.Rows), int(source.Columns)
    name = VERIFIED_LAYER if verification else LAYER
    about = (f"{len(findings)} nodule(s) verified by a radiologist" if verification else
             f"{len(findings)} AI nodule candidate(s), not reviewed")
    layer = hd.pr.GraphicLayer(
        layer_name=name, order=1,
        description=f"nodules verified on review of results v{verification.reviewed_version}" if verification
        else f"{model.name} {model.version} nodule candidates",
        display_color=hd.color.CIELabColor.from_rgb(*LAYER_RGB),
    )
    annotations = [_annotation(f, volume, source, layer, rows, columns) for f in findings]
    state = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=series_headers(volume, source),
        device_serial_number=model.sha256[:16],  # the weights' hash: the same number is the same model
        content_label=name,
        content_description=about,
        graphic_annotations=annotations,
        graphic_layers=[layer],
        modality_lut_transformation=_modality_lut(source),
        voi_lut_transformations=[_window(source)],
        **series.attributes(model),
    )
    # General Series Type 2C for a paired organ: the lung side is not judged here (as in key_images).
    state.Laterality = source.get("Laterality", "")
    return state


def _annotation(finding: Finding, volume: Volume, source: Dataset, layer: hd.pr.GraphicLayer,
                rows: int, columns: int) -> hd.pr.GraphicAnnotation:
    """The circle and its label on the slice through the finding's centre."""
    tracking = {"tracking_id": finding.tracking_id, "tracking_uid": finding.tracking_uid}
    circle = hd.pr.GraphicObject(
        graphic_type=hd.pr.GraphicTypeValues.CIRCLE,
        graphic_data=finding.circle(columns),
        units=hd.pr.AnnotationUnitsValues.PIXEL,
        **tracking,
    )
    label = hd.pr.TextObject(
        text_value=finding.label,
        units=hd.pr.AnnotationUnitsValues.PIXEL,
        bounding_box=_label_box(finding, rows, columns),
        text_justification=hd.pr.TextJustificationValues.LEFT,
        **tracking,
    )
    return hd.pr.GraphicAnnotation(
        referenced_images=[slice_header(volume, finding.slice, source)],
        graphic_layer=layer,
        referenced_frame_number=finding.slice.frame_number,
        graphic_objects=[circle],
        text_objects=[label],
    )


def _label_box(finding: Finding, rows: int, columns: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) just above the circle, or below it at the top edge, kept in the image.
    The viewer picks the font; the box is sized for about 8 x 14 pixels a character on a 512 matrix."""
    width = min(len(finding.label) * columns / 64, float(columns))
    height = rows / 36
    c, r = finding.centre_px
    gap = 2.0
    top = r - finding.radius_px - gap - height
    if top < 0:
        top = min(r + finding.radius_px + gap, rows - height)
    left = min(max(c - width / 2, 0.0), columns - width)
    return left, top, left + width, top + height


def _holder(source: Dataset, keyword: str, functional_group: str) -> Dataset | None:
    """The dataset that carries ``keyword``: the image itself or, for Enhanced CT, its shared (else first
    per-frame) functional group."""
    if keyword in source:
        return source
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for item in source.get(groups, [])[:1]:
            for inner in item.get(functional_group, [])[:1]:
                if keyword in inner:
                    return inner
    return None


def _modality_lut(source: Dataset) -> hd.ModalityLUTTransformation:
    """The series' rescale to HU (identity when it has none), given explicitly so the state applies the
    same stored-value -> HU mapping as the images."""
    held = _holder(source, "RescaleIntercept", "PixelValueTransformationSequence")
    if held is None:
        return hd.ModalityLUTTransformation(rescale_intercept=0.0, rescale_slope=1.0, rescale_type="US")
    return hd.ModalityLUTTransformation(
        rescale_intercept=float(held.RescaleIntercept),
        rescale_slope=float(held.get("RescaleSlope", 1)),
        rescale_type=held.get("RescaleType") or ("HU" if source.get("Modality") == "CT" else "US"),
    )


def _window(source: Dataset) -> hd.pr.SoftcopyVOILUTTransformation:
    """The series' own window(s) with their explanations, else a lung window."""
    held = _holder(source, "WindowCenter", "FrameVOILUTSequence")
    if held is None or "WindowWidth" not in held:
        centre, width = LUNG_WINDOW
        return hd.pr.SoftcopyVOILUTTransformation(window_center=centre, window_width=width,
                                                  window_explanation="LUNG")
    centres, widths = _values(held.WindowCenter), _values(held.WindowWidth)
    n = min(len(centres), len(widths))
    explanations = _values(held.get("WindowCenterWidthExplanation", []))
    return hd.pr.SoftcopyVOILUTTransformation(
        window_center=[float(v) for v in centres[:n]],
        window_width=[float(v) for v in widths[:n]],
        window_explanation=[str(e) for e in explanations[:n]] if len(explanations) >= n else None,
    )


def _values(value) -> list:
    """A possibly multi-valued attribute as a list."""
    return list(value) if isinstance(value, MultiValue | list) else [value]

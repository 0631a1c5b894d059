"""The human-readable model card (NAME.md) beside the JSON one: generated from the JSON card, with any
sections written by hand after the generated part kept when it is regenerated."""
from __future__ import annotations

from pathlib import Path

from lungnode.models.registry import ModelCard


def card_markdown(card: ModelCard) -> str:
    inf = card.inference
    metrics = "\n".join(f"| {k} | {v} |" for k, v in card.metrics.items()) or "| (not evaluated) | |"
    return f"""# {card.name} (version {card.version})

{card.description}. **Not a medical device.**

- Created: {card.created}
- Network: MONAI RetinaNet, small 3D ResNet + FPN backbone, {card.parameters:,} parameters; ONNX opset {card.onnx_opset}
  (`{card.onnx_file}`, sha256 `{card.onnx_sha256}`), PyTorch state dict `{card.state_dict_file}`
- Input: body crop resampled to {inf.spacing_mm} mm (i, j, k), HU clipped to {inf.window_hu} and scaled to 0..1
- {_network_calls(inf)}; training patches {inf.patch_size}
- Anchors (voxels, i j k): {card.anchor_shapes_voxels}
- Output: boxes with score >= {inf.score_threshold}, NMS IoU {inf.nms_threshold}, at most {inf.detections_per_image}
- Test-time augmentation: {f"{len(inf.tta_flips)} views, mirrored along model axes {[list(f) for f in inf.tta_flips]}, scores fused (inference/tta.py)" if inf.tta_flips else "none"}
- Training: `{card.training.command}`; {card.training.iterations} iterations in {card.training.seconds / 60:.0f} min on {card.training.device}
- Data: {card.data.train_phantoms} training phantoms (seeds {card.data.train_seeds}); {card.data.description}
- Real scans used in training (scores on them are training-set scores): {", ".join(card.data.train_scans) or "none"}
- Real scans the operating point was chosen on: {", ".join(card.data.tune_scans) or "none"}
- Export check: ONNX Runtime vs PyTorch max abs difference {card.export_max_abs_diff:.1e}
{second_stage(card)}{int8_network(card)}
## Held-out phantoms (seeds {card.data.eval_seeds})

A nodule is found when a detection's centre lies within its radius; detections elsewhere are false positives.

| metric | value |
|---|---|
{metrics}

{LIMITS}"""


def second_stage(card: ModelCard) -> str:
    st = card.second_stage
    if st is None:
        return ""
    return (f"- Second stage (false-positive reduction, inference/rescoring.py): a 3D CNN candidate classifier, "
            f"{st.parameters:,} parameters, channels {st.channels}, on a {list(st.patch_size)}-voxel patch centred on "
            f"each candidate the detector scores >= {st.min_detector_score} (`{st.onnx_file}`, sha256 `{st.onnx_sha256}`, "
            f"PyTorch state dict `{st.state_dict_file}`); {_recentre(st.recentre_mm)}{_views(st.views)}"
            f"reported score = detector^{1 - st.weight:g} x classifier^{st.weight:g}\n"
            f"- Second-stage training: `{st.training.command}` on {st.data}; {st.training.iterations} iterations in "
            f"{st.training.seconds / 60:.0f} min on {st.training.device}; {_pairs(st.metrics)}\n")


def _recentre(recentre_mm: float) -> str:
    return "" if recentre_mm <= 0 else (f"its centre head moves each candidate (at most {recentre_mm:g} mm) onto the "
                                        "nodule centre it finds, where the patch is read again; ")


def _views(views: int) -> str:
    return "" if views == 1 else f"classifier = mean logit over {views} mirrored/turned copies of the patch; "


def int8_network(card: ModelCard) -> str:
    q = card.int8
    return "" if q is None else (
        f"- 8-bit network (`lungnode train quantize`; OpenVINO runs it with onnx_precision int8): "
        f"`{q.onnx_file}`, sha256 `{q.onnx_sha256}`; calibrated on {q.calibration}; check against float32: {_pairs(q.check)}\n")


def _pairs(figures: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in figures.items())


LIMITS = """## Limits

Synthetic phantoms are far simpler than patient CT: figures here say the pipeline works, not how it
performs clinically.
"""


def rewrite_card_markdown(card_path: Path) -> None:
    """Regenerate NAME.md from the JSON card (after its metrics changed), keeping the sections written by
    hand after the generated part."""
    md = card_path.with_suffix(".md")
    old = md.read_text() if md.is_file() else ""
    notes = old[old.index(LIMITS) + len(LIMITS):] if LIMITS in old else ""
    md.write_text(card_markdown(ModelCard.model_validate_json(card_path.read_text())) + notes)


def _network_calls(inf) -> str:
    windows = f"sliding window {inf.roi_size} voxels, overlap {inf.overlap}"
    if inf.whole_image_max_voxels <= 0:
        return windows[0].upper() + windows[1:]
    return (f"The lung crop through the network whole when it has at most {inf.whole_image_max_voxels:,} voxels "
            f"({inf.sw_batch_size} view(s) a call), else {windows}")

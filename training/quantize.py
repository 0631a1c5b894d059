"""`lungnode train quantize`: an 8-bit copy of a model's detector network, for CPUs without native bfloat16.

On such CPUs OpenVINO runs the network in float32. Whether 8-bit convolutions pay depends on the
processor (on the AVX2-only EPYC v11's copy was made on, without VNNI, they did not; on a Xeon with
VNNI and AMX the network ran 2.3x faster than in float32), so the node runs the copy only when asked
(``onnx_precision: int8``) and `make bench` shows both. The copy is ONNX Runtime's static QDQ
quantisation of the convolutions (weights signed and per channel, activations unsigned), with
activation ranges measured on crops of training phantoms' lung crops, prepared as the node prepares
a study. Quantisation moves the scores, so the copy is checked before it is kept: the float32 and
8-bit networks are run on the same check phantoms, and a copy whose CPM falls more than
``--max-cpm-drop`` below float32's, or that finds fewer nodules at the card's threshold, is refused
(no file written, card unchanged). A kept copy goes beside the model as NAME-int8.onnx and into its
card.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lungnode.inference.detector import Detector
from lungnode.inference.onnx_runtime import openvino_available
from lungnode.models.registry import Int8Network, ModelCard, load_model, sha256_file
from lungnode.training.card_markdown import rewrite_card_markdown
from lungnode.training.eval_run import evaluate
from lungnode.training.eval_sets import EvalScan, phantom_scans

CROP = (128, 128, 96)  # calibration crop, model voxels: many small crops see more scans than a few whole ones
RANDOM_CROPS = 2  # per calibration scan, besides one on each nodule


def calibration_crops(detector: Detector, scans: list[EvalScan], seed: int = 0) -> list[np.ndarray]:
    """Network inputs (1, 1, I, J, K) cut from the prepared lung crops: one around each nodule, so its
    strongest responses set the ranges, and ``RANDOM_CROPS`` anywhere."""
    rng = np.random.default_rng(seed)
    crops = []
    for scan in tqdm(scans, desc="calibration images", unit="scan", dynamic_ncols=True):
        loaded = scan.load()
        _, prepared = detector.prepare(loaded.volume)
        image = prepared.image.numpy()
        shape = np.array(image.shape)
        size = np.minimum(CROP, shape)
        centres = [prepared.to_model_index(loaded.volume.world_to_index(a.center_mm)) for a in loaded.annotations]
        centres += [rng.uniform(0, shape) for _ in range(RANDOM_CROPS)]
        for c in centres:
            start = np.clip(np.round(np.asarray(c) - size / 2).astype(int), 0, shape - size)
            sl = tuple(slice(int(a), int(a + n)) for a, n in zip(start, size))
            crops.append(np.ascontiguousarray(image[sl], dtype=np.float32)[None, None])
    return crops


def quantize_network(onnx_path: Path, out: Path, crops: list[np.ndarray]) -> None:
    """Static QDQ quantisation of the convolutions, ranges from ``crops`` (min/max over all of them)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Crops(CalibrationDataReader):
        def __init__(self) -> None:
            self.left = iter(tqdm(crops, desc="calibrate", unit="crop", dynamic_ncols=True))

        def get_next(self) -> dict | None:
            x = next(self.left, None)
            return None if x is None else {"image": x}

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), Crops(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"])


def compare(f32, int8, threshold: float, max_cpm_drop: float) -> tuple[dict[str, float | int | str], str | None]:
    """The check's figures (two EvalOutcomes on the same scans) and why the 8-bit copy is refused, or None."""
    a, b = f32.at_threshold(threshold), int8.at_threshold(threshold)
    check: dict[str, float | int | str] = {
        "scans": a["eval_scans"], "nodules": a["eval_nodules"],
        "cpm_f32": round(f32.froc.cpm, 4), "cpm_int8": round(int8.froc.cpm, 4),
        "found_f32": round(a["sensitivity"] * a["eval_nodules"]), "found_int8": round(b["sensitivity"] * b["eval_nodules"]),
        "fp_per_scan_f32": a["false_positives_per_scan"], "fp_per_scan_int8": b["false_positives_per_scan"],
        "seconds_per_scan_f32": a["seconds_per_scan"], "seconds_per_scan_int8": b["seconds_per_scan"],
        "max_cpm_drop": max_cpm_drop,
    }
    if check["cpm_int8"] < check["cpm_f32"] - max_cpm_drop:
        return check, (f"its CPM {check['cpm_int8']} is more than {max_cpm_drop} below float32's {check['cpm_f32']}")
    if check["found_int8"] < check["found_f32"]:
        return check, (f"it finds {check['found_int8']} nodules at the card's threshold {threshold}, float32 "
                       f"{check['found_f32']}")
    return check, None


def quantize(model: str, calibration_seeds: tuple[int, int], check_seeds: tuple[int, int], max_cpm_drop: float) -> ModelCard:
    spec = load_model(model)
    card_path = spec.onnx_path.with_suffix(".json")
    card = ModelCard.model_validate_json(card_path.read_text())
    checked = set(range(check_seeds[0], check_seeds[1] + 1))
    if checked & set(range(calibration_seeds[0], calibration_seeds[1] + 1)):
        raise SystemExit("the calibration and check phantoms overlap: give seed ranges apart")
    train = card.data.train_seeds
    if len(train) == 2 and checked & set(range(train[0], train[1] + 1)):
        raise SystemExit(f"the check phantoms {check_seeds[0]}-{check_seeds[1]} are among {spec.info.name}'s training seeds")
    if not openvino_available():
        raise SystemExit("8-bit networks run on OpenVINO only and this onnxruntime has none: install "
                         "onnxruntime-openvino (x86-64 Linux; `make install` does) and run this again")
    f32 = Detector(spec, provider="openvino", precision="f32")
    crops = calibration_crops(f32, phantom_scans(*calibration_seeds))
    out = spec.onnx_path.with_name(spec.onnx_path.stem + "-int8.onnx")
    candidate = out.with_suffix(".candidate.onnx")  # a model's earlier 8-bit copy stays until this one passes
    trial = card_path.with_name(card_path.stem + ".int8-check.json")  # beside the card: its files resolve
    refused: str | None = "the check did not finish"
    try:
        quantize_network(spec.onnx_path, candidate, crops)
        print(f"quantised {spec.onnx_path.name}: {spec.onnx_path.stat().st_size / 1e6:.1f} MB -> "
              f"{candidate.stat().st_size / 1e6:.1f} MB ({len(crops)} calibration crops of up to {CROP} voxels)")
        entry = Int8Network(onnx_file=candidate.name, onnx_sha256=sha256_file(candidate), check={},
                            calibration=f"{len(crops)} crops of up to {list(CROP)} voxels (one on each nodule, "
                            f"{RANDOM_CROPS} anywhere) of the prepared lung crops of phantoms "
                            f"{calibration_seeds[0]}-{calibration_seeds[1]}")
        trial.write_text(card.model_copy(update={"int8": entry}).model_dump_json(indent=2))
        int8 = Detector(load_model(str(trial)), provider="openvino", precision="int8")
        scans = phantom_scans(*check_seeds)
        print(f"check on phantoms {check_seeds[0]}-{check_seeds[1]}: float32, then 8-bit")
        check, refused = compare(evaluate(f32, scans, bootstraps=0), evaluate(int8, scans, bootstraps=0),
                                 card.inference.score_threshold, max_cpm_drop)
        print(" | ".join(f"{k} {v}" for k, v in check.items()))
        if not refused:
            candidate.replace(out)
    finally:
        trial.unlink(missing_ok=True)
        candidate.unlink(missing_ok=True)
    if refused:
        raise SystemExit(f"8-bit network refused: {refused}; {card_path} is unchanged")
    entry.onnx_file, entry.check = out.name, {"phantoms": f"{check_seeds[0]}-{check_seeds[1]}", **check}
    card.int8 = entry
    card_path.write_text(card.model_dump_json(indent=2))
    rewrite_card_markdown(card_path)
    print(f"wrote {out} and its entry in {card_path}")
    return card


def _run(args: argparse.Namespace) -> int:
    quantize(args.model, tuple(args.calibration_seeds), tuple(args.check_seeds), args.max_cpm_drop)
    return 0


def add_command(tsub: argparse._SubParsersAction) -> None:
    p = tsub.add_parser("quantize", help="an 8-bit copy of a model's network for CPUs without bfloat16, checked "
                                         "against float32 before it is kept")
    p.add_argument("--model", default="default", help="model name in models/ or a card path")
    p.add_argument("--calibration-seeds", type=int, nargs=2, default=(1000, 1015), metavar=("FIRST", "LAST"),
                   help="phantoms whose lung crops measure the activation ranges (training seeds)")
    p.add_argument("--check-seeds", type=int, nargs=2, default=(900040, 900059), metavar=("FIRST", "LAST"),
                   help="phantoms both networks are run on (default: the tuning set, not the held-out ones)")
    p.add_argument("--max-cpm-drop", type=float, default=0.02,
                   help="refuse the copy when its CPM there is lower than float32's by more than this")
    p.set_defaults(func=_run)

"""`lungnode train export`: trained checkpoint -> ONNX network + state dict + model card (JSON, MD).

The ONNX graph is the network only (input ``image`` (B, 1, I, J, K) with dynamic axes; outputs
``cls_<level>`` and ``box_<level>``); anchors, decoding and NMS stay in MONAI's RetinaNetDetector
at inference. The export is checked against PyTorch on an input of another size than traced, and
the exported model is evaluated on held-out phantoms whose figures go into the card.
"""
from __future__ import annotations

import argparse
import logging
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from lungnode.inference.tta import FLIPS_LR_AP
from lungnode.models.registry import DataInfo, ModelCard, TrainingInfo, load_model, sha256_file
from lungnode.models.retinanet import NetConfig, build_network, count_parameters
from lungnode.training.card_markdown import card_markdown
from lungnode.training.fit import TrainConfig
from lungnode.training.synth import GENERATOR_VERSION

log = logging.getLogger(__name__)
OPSET = 17
MAX_ABS_DIFF = 1e-3
# Candidate score thresholds; the top is fine-grained because a flip-TTA model's scores crowd near 1.
SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99)


def export_onnx(net: torch.nn.Module, path: Path, example_size: tuple[int, int, int], levels: int) -> None:
    names = [f"cls_{i}" for i in range(levels)] + [f"box_{i}" for i in range(levels)]
    dynamic = {"image": {0: "batch", 2: "i", 3: "j", 4: "k"}}
    dynamic.update({n: {0: "batch", 2: f"{n}_i", 3: f"{n}_j", 4: f"{n}_k"} for n in names})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about MONAI's NaN checks in the heads
        torch.onnx.export(
            net,
            (torch.rand(1, 1, *example_size),),
            str(path),
            input_names=["image"],
            output_names=names,
            opset_version=OPSET,
            dynamic_axes=dynamic,
            dynamo=False,
        )


def max_abs_diff(net: torch.nn.Module, onnx_path: Path, size: tuple[int, int, int], seed: int = 0) -> float:
    """Largest |ORT - PyTorch| over all outputs for a random input of ``size``."""
    import onnxruntime as ort

    x = torch.rand(1, 1, *size, generator=torch.Generator().manual_seed(seed))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ort_out = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        torch_out = net(x)
    return max(float(np.abs(a - b.numpy()).max()) for a, b in zip(ort_out, torch_out))


def anchor_shapes(cfg: NetConfig) -> list[list[float]]:
    return [[float(s * v) for v in shape] for s in cfg.feature_map_scales for shape in cfg.base_anchor_shapes]


def sweep_threshold(result, max_fp_per_scan: float | None, default: float) -> float:
    """Print the operating points of ``SWEEP`` on an evaluation (EvalOutcome) and choose one: the
    highest sensitivity with at most ``max_fp_per_scan`` false positives a scan, and of the thresholds
    giving it the highest (fewest false positives for no nodule less); ``default`` when no budget is
    asked for, the top of the sweep when none fits it."""
    points = {t: result.at_threshold(t) for t in SWEEP}
    for t, m in points.items():
        print(f"score >= {t:.2f}: sensitivity {m['sensitivity']}, >= 6 mm {m['sensitivity_ge6mm']}, "
              f"FP/scan {m['false_positives_per_scan']}")
    if max_fp_per_scan is None:
        return default
    ok = [t for t, m in points.items() if m["false_positives_per_scan"] <= max_fp_per_scan]
    best = max((points[t]["sensitivity"] for t in ok), default=None)
    threshold = max(t for t in ok if points[t]["sensitivity"] == best) if ok else max(SWEEP)
    print(f"score threshold {threshold} (at most {max_fp_per_scan} FP/scan)")
    return threshold


def set_operating_point(card: ModelCard, result, max_fp_per_scan: float | None, card_path: Path) -> None:
    """Choose the card's threshold on an evaluation (EvalOutcome), put its figures into the card and
    write NAME.json and NAME.md."""
    card.inference.score_threshold = sweep_threshold(result, max_fp_per_scan, card.inference.score_threshold)
    card.metrics = result.at_threshold(card.inference.score_threshold)
    card_path.write_text(card.model_dump_json(indent=2))
    card_path.with_suffix(".md").write_text(card_markdown(card))


def export_network(ckpt: dict, cfg: TrainConfig, out: Path) -> tuple[NetConfig, torch.nn.Module, float]:
    """A `train fit` checkpoint's network -> out.onnx and out.pt; the ONNX is checked against PyTorch
    on an input of another size than traced. Returns (network config, network, max abs difference)."""
    net_cfg = NetConfig.from_dict(ckpt["net_config"])
    net = build_network(net_cfg, use_list_output=True)
    net.load_state_dict(ckpt["network"])
    net.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx_path = out.with_suffix(".onnx")
    export_onnx(net, onnx_path, cfg.inference.patch_size, levels=len(net_cfg.returned_stages))
    check_size = tuple(int(s) + 8 * (d + 1) for d, s in enumerate(cfg.inference.patch_size))
    diff = max_abs_diff(net, onnx_path, check_size)
    print(f"ONNX vs PyTorch on a {check_size} input: max abs diff {diff:.2e}")
    if diff >= MAX_ABS_DIFF:
        raise RuntimeError(f"exported ONNX differs from PyTorch by {diff} (limit {MAX_ABS_DIFF})")
    torch.save(net.state_dict(), out.with_suffix(".pt"))
    return net_cfg, net, diff


def training_info(ckpt: dict, cfg: TrainConfig, checkpoint: Path) -> TrainingInfo:
    """How the checkpoint was trained: its run's command, config, iterations, time and device."""
    command_file = Path(checkpoint).parent / "command.txt"
    return TrainingInfo(
        command=command_file.read_text().strip() if command_file.is_file() else "",
        config=ckpt["config"],
        iterations=int(ckpt["iteration"]),
        seconds=round(float(ckpt["seconds"]), 1),
        device="cuda" if torch.cuda.is_available() else f"cpu ({cfg.threads} threads)",
    )


def check_apart(eval_seeds: tuple[int, int], cfg: TrainConfig) -> None:
    """Refuse evaluation (or tuning) phantoms that the checkpoint trained on."""
    overlap = set(range(eval_seeds[0], eval_seeds[1] + 1)) & set(cfg.seeds())
    if overlap:
        raise ValueError(f"evaluation seeds overlap the training seeds: {sorted(overlap)[:5]}...")


def data_info(cfg: TrainConfig, eval_seeds: tuple[int, int] | None) -> DataInfo:
    """What the checkpoint was trained on (phantom population, real scans) and evaluated on."""
    ph = cfg.phantoms
    focus = (f"; {ph.focus_fraction:.0%} of them instead {ph.focus_n_nodules[0]}-{ph.focus_n_nodules[1]} nodules of "
             f"{ph.focus_diameter_range_mm[0]}-{ph.focus_diameter_range_mm[1]} mm, {'/'.join(ph.focus_attachments)} only"
             if ph.focus_fraction > 0 else "")
    if ph.nodule_shapes and ph.real_shape_fraction > 0:
        digest = sha256_file(Path(ph.nodule_shapes))[:16] if Path(ph.nodule_shapes).is_file() else "missing"
        focus += (f"; {ph.real_shape_fraction:.0%} of the nodules drawn with real outlines of LIDC-IDRI readers "
                  f"(`train shapes`, training split of patients, LIDC-IDRI-0001/0002 left out; {ph.nodule_shapes}, "
                  f"sha256 {digest}...)")
    return DataInfo(
        description="synthetic chest CT phantoms from lungnode.training.synth.make_phantom "
        f"(generator {GENERATOR_VERSION}); training: "
        f"{ph.model_spacing_fraction:.0%} made at the model spacing, the rest at in-plane "
        f"{ph.native_inplane_mm} mm / slice {ph.native_slice_mm} mm and resampled, "
        f"field of view {ph.field_of_view_mm} mm, {ph.n_nodules[0]}-{ph.n_nodules[1]} "
        f"nodules of {ph.diameter_range_mm[0]}-{ph.diameter_range_mm[1]} mm{focus}; "
        "evaluation: make_phantom's defaults (0.7 x 0.7 x 2.5 mm, 512 x 512, 1-4 nodules of 4-25 mm)",
        train_phantoms=len(cfg.seeds()),
        train_seeds=list(cfg.train_seeds or []),
        eval_phantoms=0 if eval_seeds is None else eval_seeds[1] - eval_seeds[0] + 1,
        eval_seeds=[] if eval_seeds is None else list(eval_seeds),
        train_scans=cfg.real_scans(),
    )


def export(
    checkpoint: Path,
    out: Path,
    version: str,
    eval_seeds: tuple[int, int] | None,
    score_threshold: float | None = None,
    max_fp_per_scan: float | None = None,
    flip_tta: bool = False,
) -> ModelCard:
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = TrainConfig.model_validate(ckpt["config"])
    if score_threshold is not None:
        cfg.inference.score_threshold = score_threshold
    if flip_tta:
        cfg.inference.tta_flips = FLIPS_LR_AP
    net_cfg, net, diff = export_network(ckpt, cfg, out)
    name = out.name
    onnx_path, pt_path = out.with_suffix(".onnx"), out.with_suffix(".pt")
    card = ModelCard(
        name=name,
        version=version,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        description="3D RetinaNet (MONAI) lung nodule detector trained on synthetic chest CT phantoms"
        + (f" and {len(cfg.datalists)} datalist(s) of real scans" if cfg.datalists else " only"),
        onnx_file=onnx_path.name,
        onnx_sha256=sha256_file(onnx_path),
        onnx_opset=OPSET,
        state_dict_file=pt_path.name,
        state_dict_sha256=sha256_file(pt_path),
        parameters=count_parameters(net),
        network=net_cfg.to_dict(),
        anchor_shapes_voxels=anchor_shapes(net_cfg),
        inference=cfg.inference,
        training=training_info(ckpt, cfg, checkpoint),
        data=data_info(cfg, eval_seeds),
        metrics={},
        export_max_abs_diff=diff,
    )
    card_path = out.with_suffix(".json")
    card_path.write_text(card.model_dump_json(indent=2))
    if eval_seeds is not None:
        from lungnode.inference.detector import Detector
        from lungnode.training.eval_run import evaluate
        from lungnode.training.eval_sets import phantom_scans

        check_apart(eval_seeds, cfg)
        # Every candidate down to the evaluation floor is kept, so one pass gives the whole sweep.
        result = evaluate(Detector(load_model(str(card_path))), phantom_scans(*eval_seeds), bootstraps=0)
        set_operating_point(card, result, max_fp_per_scan, card_path)
    else:
        out.with_suffix(".md").write_text(card_markdown(card))
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB), {pt_path}, {card_path}, {out.with_suffix('.md')}")
    print("metrics:", card.metrics)
    return card


def _run(args: argparse.Namespace) -> int:
    export(args.checkpoint, args.out, args.version, None if args.no_eval else tuple(args.eval_seeds), args.score_threshold,
           args.max_fp_per_scan, args.flip_tta)
    return 0


def add_command(tsub: argparse._SubParsersAction) -> None:
    p = tsub.add_parser("export", help="export a trained checkpoint to ONNX + model card")
    p.add_argument("--checkpoint", type=Path, required=True, help="runs/NAME/checkpoint.pt")
    p.add_argument("--out", type=Path, required=True, help="models/NAME (writes NAME.onnx, .pt, .json, .md)")
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--eval-seeds", type=int, nargs=2, default=(900000, 900019), metavar=("FIRST", "LAST"),
                   help="held-out phantom seeds evaluated into the card (inclusive)")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    p.add_argument("--flip-tta", action="store_true",
                   help="the card asks for flip test-time augmentation (4 views: fewer false positives, 4x the time)")
    p.add_argument("--score-threshold", type=float, help="override the training config's score threshold")
    p.add_argument("--max-fp-per-scan", type=float,
                   help="score threshold: the best sensitivity with at most this many held-out FP/scan, fewest FP for it")
    p.set_defaults(func=_run)

"""`lungnode train retune`: a shipped model with other inference settings, or with its detector
fine-tuned, becomes a new model, its operating point chosen again.

The networks are the same files (copied under the new name; git stores identical files once) and only
how they are run changes (the whole lung crop in one network call instead of sliding windows, say); or
the first stage is a `train fit` checkpoint fine-tuned from the model's own detector (``--detector``),
exported and checked as `train export` does, while the second stage stays: a fine-tuned detector
proposes the same kind of candidates, so the classifier that learned them still applies (a detector
trained any other way needs its own mined candidates and rescorer). Either moves the scores, so the
second stage's fusion weight and the score threshold are chosen again on the tuning phantoms, by the
rules `train attach-rescorer` and `train export` use. ``--first-stage-only`` leaves the second stage
out: the detector alone, run as the model runs it, whose candidates `train candidates` mines for a
second stage of its own. With nothing else changed, ``--max-fp-per-scan`` alone chooses the operating
point again for another false-positive budget. Then `train eval --update-card` on held-out sets and
`train promote`, as for any new model.
"""
from __future__ import annotations

import argparse
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import torch

from lungnode.inference.detector import Detector
from lungnode.inference.rescoring import VIEWS, check_views
from lungnode.inference.tta import mirror_views
from lungnode.models.registry import ModelSpec, load_model, sha256_file
from lungnode.models.retinanet import NetConfig
from lungnode.training.eval_run import evaluate
from lungnode.training.eval_sets import datalist_scans, outline_note, phantom_scans, shape_settings
from lungnode.training.export import check_apart, data_info, export_network, set_operating_point, training_info
from lungnode.training.fit import TrainConfig
from lungnode.training.rescorer_attach import WEIGHTS, choose_weight
from lungnode.training.synth import add_shape_arguments

# What must not change between a model and a detector fine-tuned for it (the prepared image and the
# network's outputs mean the same).
_PREPROCESSING = ("spacing_mm", "window_hu", "patch_size", "body_threshold_hu", "body_margin_mm")


def check_fine_tuned(source: ModelSpec, cfg: TrainConfig, ckpt: dict, checkpoint: Path,
                     eval_seeds: tuple[int, int]) -> None:
    """Refuse a checkpoint that was not fine-tuned from ``source``'s own detector with its network
    and preprocessing, or that trained on the tuning seeds."""
    init = cfg.init_weights
    if init is None or not Path(init).is_file() or sha256_file(Path(init)) != source.card.state_dict_sha256:
        raise ValueError(f"{checkpoint} was not fine-tuned from {source.info.name}'s detector (its init_weights "
                         f"{init} is not {source.card.state_dict_file}): the second stage learned that detector's "
                         "candidates; mine the new detector's (train candidates) and fit a rescorer for it")
    if NetConfig.from_dict(ckpt["net_config"]) != NetConfig.from_dict(source.card.network):
        raise ValueError(f"{checkpoint}'s network differs from {source.info.name}'s")
    ours, theirs = cfg.inference.model_dump(), source.card.inference.model_dump()
    changed = [k for k in _PREPROCESSING if ours[k] != theirs[k]]
    if changed:
        raise ValueError(f"{checkpoint} prepares images differently from {source.info.name}: {', '.join(changed)}")
    check_apart(eval_seeds, cfg)


def retune(model: str, out: Path, version: str, inference: dict, eval_seeds: tuple[int, int],
           max_fp_per_scan: float | None, detector_checkpoint: Path | None = None, tuning=None,
           first_stage_only: bool = False, second_stage_views: int | None = None,
           tune_datalist: Path | None = None, tune_section: str = "training") -> Path:
    """``tuning``: PhantomSettings of the tuning phantoms (real outlines), None for the generator's own;
    ``tune_datalist``: real scans (e.g. a site's reviewed studies) that choose the operating point instead
    of the phantoms, the fusion weight then kept: real scans are few, and choose one thing."""
    source = load_model(model)
    if second_stage_views is not None and (first_stage_only or source.card.second_stage is None):
        raise ValueError(f"--second-stage-views needs a second stage, and {source.info.name} would have none")
    unknown = set(inference) - set(type(source.card.inference).model_fields)
    if unknown:
        raise ValueError(f"unknown inference setting(s): {', '.join(sorted(unknown))}")
    out.parent.mkdir(parents=True, exist_ok=True)
    name = out.name
    files = {} if first_stage_only else {source.second_stage_path: out.with_name(name + "-rescorer.onnx"),
                                         source.second_stage_state_dict_path: out.with_name(name + "-rescorer.pt")}
    update = {"name": name, "version": version, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "onnx_file": out.with_suffix(".onnx").name, "metrics": {},
              "int8": None}  # a new model: its 8-bit copy is made and checked anew (train quantize)
    changes = [f"{len(v)} mirrored views" if k == "tta_flips" else f"{k} {v}" for k, v in inference.items()]
    if detector_checkpoint is None:
        files.update({source.onnx_path: out.with_suffix(".onnx"), source.state_dict_path: out.with_suffix(".pt")})
        update["state_dict_file"] = out.with_suffix(".pt").name if source.state_dict_path else None
    else:
        ckpt = torch.load(detector_checkpoint, map_location="cpu", weights_only=False)
        cfg = TrainConfig.model_validate(ckpt["config"])
        check_fine_tuned(source, cfg, ckpt, detector_checkpoint, eval_seeds)
        _, _, diff = export_network(ckpt, cfg, out)
        update.update({
            "onnx_sha256": sha256_file(out.with_suffix(".onnx")), "state_dict_file": out.with_suffix(".pt").name,
            "state_dict_sha256": sha256_file(out.with_suffix(".pt")), "export_max_abs_diff": diff,
            "training": training_info(ckpt, cfg, detector_checkpoint), "data": data_info(cfg, eval_seeds),
        })
        changes.insert(0, f"its detector fine-tuned ({int(ckpt['iteration'])} iterations)")
    if first_stage_only:
        update["second_stage"] = None
        changes.append("the first stage alone")
    if second_stage_views is not None:
        changes.append(f"its second stage reading {second_stage_views} views of each patch")
    for src, dst in files.items():
        if src is not None:
            shutil.copy2(src, dst)
    update["description"] = (source.card.description + f"; {source.info.name} with {', '.join(changes)}"
                             + outline_note(tuning))
    update["inference"] = type(source.card.inference).model_validate({**source.card.inference.model_dump(), **inference})
    card = source.card.model_copy(deep=True, update=update)
    if card.second_stage is not None:
        if second_stage_views is not None:
            check_views(second_stage_views, card.second_stage.patch_size)
            card.second_stage.views = second_stage_views
        card.second_stage.onnx_file = files[source.second_stage_path].name
        if source.second_stage_state_dict_path is not None:
            card.second_stage.state_dict_file = files[source.second_stage_state_dict_path].name
    card_path = out.with_suffix(".json")
    card_path.write_text(card.model_dump_json(indent=2))
    detector = Detector(load_model(str(card_path)))
    scans = datalist_scans(tune_datalist, tune_section) if tune_datalist else phantom_scans(*eval_seeds, tuning)
    where = (f"{len(scans)} real scans of {tune_datalist} [{tune_section}]" if tune_datalist
             else f"phantoms {eval_seeds[0]}-{eval_seeds[1]}")
    if detector.rescorer is not None:
        weights = (card.second_stage.weight,) if tune_datalist else WEIGHTS
        weight, outcome, cpms = choose_weight(detector, detector.rescorer, scans, card.inference.score_threshold, weights)
        print(f"fusion weight {weight} (CPM {cpms[weight]:.4f} on {where})")
        card.second_stage.weight = weight
        card.second_stage.metrics.update({f"weight_selection_cpm_w{w:g}": round(c, 4) for w, c in cpms.items()})
    else:
        outcome = evaluate(detector, scans, bootstraps=0)
    if tune_datalist:
        items = json.loads(Path(tune_datalist).read_text())[tune_section]  # an inserted copy names its source series
        card.data.tune_scans = sorted({i.get("source_series") or i.get("series_uid") or i["image"] for i in items})
        card.description += f"; operating point chosen on {where}"
    else:
        card.data.eval_seeds, card.data.eval_phantoms = list(eval_seeds), eval_seeds[1] - eval_seeds[0] + 1
    set_operating_point(card, outcome, max_fp_per_scan, card_path)
    print(f"wrote {card_path}, {card_path.with_suffix('.md')} and the network files beside them")
    return card_path


def _run(args: argparse.Namespace) -> int:
    inference = {k: getattr(args, k) for k in ("whole_image_max_voxels", "sw_batch_size", "detections_per_image")
                 if getattr(args, k) is not None}
    if args.tta_axes is not None:
        inference["tta_flips"] = mirror_views(int(a) for a in args.tta_axes)
    if (not inference and args.detector is None and not args.first_stage_only and args.max_fp_per_scan is None
            and args.second_stage_views is None):
        raise SystemExit("nothing to change: give --detector, --first-stage-only, --max-fp-per-scan (another "
                         "false-positive budget), --whole-image-max-voxels, --sw-batch-size, --detections-per-image, "
                         "--tta-axes and/or --second-stage-views")
    try:
        retune(args.model, args.out, args.version, inference, tuple(args.eval_seeds), args.max_fp_per_scan,
               args.detector, shape_settings(args), args.first_stage_only, args.second_stage_views,
               args.tune_datalist, args.tune_section)
    except ValueError as e:
        raise SystemExit(f"train retune: {e}") from e
    return 0


def add_command(tsub: argparse._SubParsersAction) -> None:
    p = tsub.add_parser("retune", help="a model with other inference settings or a fine-tuned detector -> a new model, "
                                               "operating point chosen again")
    p.add_argument("--model", default="default", help="the model whose networks are reused")
    p.add_argument("--out", type=Path, required=True, help="models/NAME (writes NAME.json, .md and the network files)")
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--detector", type=Path, metavar="CHECKPOINT",
                   help="runs/NAME/checkpoint.pt of `train fit` fine-tuned from the model's detector (init_weights): "
                        "the new first stage")
    p.add_argument("--first-stage-only", action="store_true",
                   help="leave the second stage out: the detector alone, whose candidates `train candidates` mines")
    p.add_argument("--whole-image-max-voxels", type=int,
                   help="lung crops of at most this many model voxels go through the network whole (0: sliding windows)")
    p.add_argument("--sw-batch-size", type=int, help="windows (or, whole, mirrored views) per network call")
    p.add_argument("--detections-per-image", type=int,
                   help="candidates the network keeps per view before the views are fused and rescored")
    p.add_argument("--tta-axes", choices=("", "0", "1", "2", "01", "02", "12", "012"), metavar="AXES",
                   help="test-time mirror views: every combination of mirrors along these model axes (0 left-right, "
                        "1 front-back, 2 head-foot; '01' is the four views models ship with, '012' eight, '' one)")
    p.add_argument("--second-stage-views", type=int, choices=VIEWS,
                   help="copies of each candidate's patch the second stage reads, its logits averaged: 1 as cut, "
                        "8 mirrored along every axis, 16 also turned in-plane")
    p.add_argument("--eval-seeds", type=int, nargs=2, default=(900040, 900049), metavar=("FIRST", "LAST"),
                   help="tuning phantoms that choose the fusion weight and threshold (inclusive)")
    p.add_argument("--max-fp-per-scan", type=float,
                   help="score threshold: the best sensitivity with at most this many FP/scan there, fewest FP for it")
    p.add_argument("--tune-datalist", type=Path, metavar="DATALIST",
                   help="choose the operating point on these real scans (the fusion weight kept) instead of the "
                        "--eval-seeds phantoms; the card names them")
    p.add_argument("--tune-section", default="training", help="the --tune-datalist section (default: training)")
    add_shape_arguments(p)  # tuning phantoms with the training patients' real outlines
    p.set_defaults(func=_run)

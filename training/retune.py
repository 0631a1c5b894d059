"""`lungnode train retune`: a shipped model with other inference settings becomes a new model, its
operating point chosen again.

The networks are the same files (copied under the new name; git stores identical files once); only
how they are run changes (the whole lung crop in one network call instead of sliding windows, say).
That moves the scores a little, so the second stage's fusion weight and the score threshold are chosen
again on the tuning phantoms, by the rules `train attach-rescorer` and `train export` use. Then
`train eval --update-card` on held-out sets and `train promote`, as for any new model.
"""
from __future__ import annotations

import argparse
import shutil
from datetime import datetime, timezone
from pathlib import Path

from lungnode.inference.detector import Detector
from lungnode.models.registry import load_model
from lungnode.training.eval_run import evaluate
from lungnode.training.eval_sets import phantom_scans
from lungnode.training.export import set_operating_point
from lungnode.training.rescorer_attach import choose_weight


def retune(model: str, out: Path, version: str, inference: dict, eval_seeds: tuple[int, int],
           max_fp_per_scan: float | None) -> Path:
    source = load_model(model)
    unknown = set(inference) - set(type(source.card.inference).model_fields)
    if unknown:
        raise ValueError(f"unknown inference setting(s): {', '.join(sorted(unknown))}")
    out.parent.mkdir(parents=True, exist_ok=True)
    name = out.name
    files = {source.onnx_path: out.with_suffix(".onnx"), source.state_dict_path: out.with_suffix(".pt"),
             source.second_stage_path: out.with_name(name + "-rescorer.onnx"),
             source.second_stage_state_dict_path: out.with_name(name + "-rescorer.pt")}
    for src, dst in files.items():
        if src is not None:
            shutil.copy2(src, dst)
    changes = ", ".join(f"{k} {v}" for k, v in inference.items())
    card = source.card.model_copy(deep=True, update={
        "name": name, "version": version, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "description": source.card.description + f"; {source.info.name}'s networks run with {changes}",
        "onnx_file": files[source.onnx_path].name,
        "state_dict_file": files[source.state_dict_path].name if source.state_dict_path else None,
        "inference": type(source.card.inference).model_validate({**source.card.inference.model_dump(), **inference}),
        "metrics": {},
    })
    if card.second_stage is not None:
        card.second_stage.onnx_file = files[source.second_stage_path].name
        if source.second_stage_state_dict_path is not None:
            card.second_stage.state_dict_file = files[source.second_stage_state_dict_path].name
    card_path = out.with_suffix(".json")
    card_path.write_text(card.model_dump_json(indent=2))
    detector = Detector(load_model(str(card_path)))
    scans = phantom_scans(*eval_seeds)
    if detector.rescorer is not None:
        weight, outcome, cpms = choose_weight(detector, detector.rescorer, scans, card.inference.score_threshold)
        print(f"fusion weight {weight} (CPM {cpms[weight]:.4f} on phantoms {eval_seeds[0]}-{eval_seeds[1]})")
        card.second_stage.weight = weight
        card.second_stage.metrics.update({f"weight_selection_cpm_w{w:g}": round(c, 4) for w, c in cpms.items()})
    else:
        outcome = evaluate(detector, scans, bootstraps=0)
    card.data.eval_seeds, card.data.eval_phantoms = list(eval_seeds), eval_seeds[1] - eval_seeds[0] + 1
    set_operating_point(card, outcome, max_fp_per_scan, card_path)
    print(f"wrote {card_path}, {card_path.with_suffix('.md')} and the network files beside them")
    return card_path


def _run(args: argparse.Namespace) -> int:
    inference = {}
    if args.whole_image_max_voxels is not None:
        inference["whole_image_max_voxels"] = args.whole_image_max_voxels
    if args.sw_batch_size is not None:
        inference["sw_batch_size"] = args.sw_batch_size
    if not inference:
        raise SystemExit("nothing to change: give --whole-image-max-voxels and/or --sw-batch-size")
    retune(args.model, args.out, args.version, inference, tuple(args.eval_seeds), args.max_fp_per_scan)
    return 0


def add_command(tsub: argparse._SubParsersAction) -> None:
    p = tsub.add_parser("retune", help="a model with other inference settings -> a new model, operating point chosen again")
    p.add_argument("--model", default="default", help="the model whose networks are reused")
    p.add_argument("--out", type=Path, required=True, help="models/NAME (writes NAME.json, .md and the network files)")
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--whole-image-max-voxels", type=int,
                   help="lung crops of at most this many model voxels go through the network whole (0: sliding windows)")
    p.add_argument("--sw-batch-size", type=int, help="windows (or, whole, mirrored views) per network call")
    p.add_argument("--eval-seeds", type=int, nargs=2, default=(900040, 900049), metavar=("FIRST", "LAST"),
                   help="tuning phantoms that choose the fusion weight and threshold (inclusive)")
    p.add_argument("--max-fp-per-scan", type=float,
                   help="score threshold: the best sensitivity with at most this many FP/scan there, fewest FP for it")
    p.set_defaults(func=_run)

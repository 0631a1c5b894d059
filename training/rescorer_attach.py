"""`lungnode train attach-rescorer`: a first-stage model + a trained second-stage classifier -> a new
model in the registry whose card runs both.

The classifier is exported to ONNX (checked against PyTorch); the detector's files are copied under
the new name (git stores identical files once). On the held-out evaluation seeds the detector runs
once, every candidate gets the classifier's probability, and the fusion weight (detector^(1 - w) *
classifier^w) is the one with the best CPM there; the score threshold is then chosen as
`lungnode train export` does (best sensitivity within ``--max-fp-per-scan``). Keep those seeds apart
from the ones the final figures are reported on (`lungnode train eval --update-card`).
"""
from __future__ import annotations

import argparse
import shutil
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lungnode.inference.detector import Detector, ranked, rescored
from lungnode.inference.rescoring import VIEWS, Rescorer, check_views
from lungnode.models.candidate_classifier import CandidateClassifier, centre_head_cells
from lungnode.models.registry import SecondStage, TrainingInfo, load_model, sha256_file
from lungnode.training.eval_run import EVAL_SCORE_FLOOR, EvalOutcome, ScanResult
from lungnode.training.eval_sets import EvalScan, datalist_scans, outline_note, phantom_scans, shape_settings
from lungnode.training.export import MAX_ABS_DIFF, OPSET, set_operating_point
from lungnode.training.froc import candidates_from_detections, evaluate_froc
from lungnode.training.synth import GENERATOR_VERSION, add_shape_arguments

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
RECENTRE_MM = 6.0  # the detector's boxes for 4-6 mm nodules were seen 2.6-4.5 mm off their centres


def export_classifier(net: CandidateClassifier, path: Path, patch_size) -> float:
    """ONNX file with a dynamic batch (outputs: logit, and centre with a centre head); returns the
    largest |ORT - PyTorch| over the outputs on a batch of 3."""
    import onnxruntime as ort

    net.eval()
    outputs = ["logit"] if net.centre is None else ["logit", "centre"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.rand(2, 1, *patch_size),), str(path), input_names=["patch"],
                          output_names=outputs, opset_version=OPSET,
                          dynamic_axes={"patch": {0: "batch"}, **{o: {0: "batch"} for o in outputs}}, dynamo=False)
    x = torch.rand(3, 1, *patch_size, generator=torch.Generator().manual_seed(0))
    ort_out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"patch": x.numpy()})
    with torch.no_grad():
        torch_out = net(x)
    torch_out = torch_out if isinstance(torch_out, tuple) else (torch_out,)
    return max(float(np.abs(o - t.numpy()).max()) for o, t in zip(ort_out, torch_out))


def choose_weight(detector: Detector, rescorer: Rescorer, scans: list[EvalScan], threshold: float,
                  weights: tuple[float, ...] = WEIGHTS):
    """(best of ``weights``, its EvalOutcome, CPM per weight) on ``scans``; one detector pass per scan."""
    per_scan = []
    for scan in tqdm(scans, desc="rescore", unit="scan", dynamic_ncols=True):
        loaded = scan.load()
        started = time.perf_counter()
        found = detector.candidates(loaded.volume, EVAL_SCORE_FLOOR)
        verdict = rescorer.rescore(found.prepared.image.numpy(), found.boxes)
        per_scan.append((scan, loaded, found, verdict, time.perf_counter() - started))
    cpms, outcomes = {}, {}
    for w in weights:
        results = []
        for scan, loaded, found, verdict, seconds in per_scan:
            # w = 0 is the detector alone, as `train eval` scores it: every candidate down to the floor
            dets = ranked(rescored(found, verdict, loaded.volume, rescorer.stage.min_detector_score, w) if w > 0
                          else found.detections, 0.0)
            results.append(ScanResult(scan.name, candidates_from_detections(scan.series_uid, dets),
                                      list(loaded.annotations), list(loaded.excluded), seconds))
        froc = evaluate_froc([c for r in results for c in r.candidates], [a for r in results for a in r.nodules],
                             [a for r in results for a in r.excluded], [s.series_uid for s in scans], bootstraps=0)
        cpms[w], outcomes[w] = froc.cpm, EvalOutcome(froc, results, threshold)
        print(f"weight {w:.2f}: CPM {froc.cpm:.4f}")
    best = max(weights, key=lambda w: (round(cpms[w], 9), -w))
    return best, outcomes[best], cpms


def tuning_scans(ckpt: dict, eval_seeds: tuple[int, int], tuning, tune_datalist: Path | None,
                 tune_section: str) -> tuple[list[EvalScan], str]:
    """The scans that choose the fusion weight and the threshold, and their description: real scans of a
    datalist (a site's reviewed studies) or held-out phantoms; never scans the classifier learned from."""
    if tune_datalist is not None:
        scans = datalist_scans(tune_datalist, tune_section)
        learned = set(ckpt["scans"])
        overlap = sorted(s.name for s in scans if s.name in learned)
        if overlap:
            raise ValueError(f"{len(overlap)} tuning scan(s) of {tune_datalist} [{tune_section}] trained the classifier "
                             f"({', '.join(overlap[:3])}): tune on scans it never saw (another section or datalist)")
        return scans, f"{len(scans)} real scans of {tune_datalist} [{tune_section}]"
    trained_on = {int(n.split("-")[1]) for n in ckpt["scans"] if n.startswith("phantom-")}
    overlap = set(range(eval_seeds[0], eval_seeds[1] + 1)) & trained_on
    if overlap:
        raise ValueError(f"evaluation seeds overlap the classifier's training seeds: {sorted(overlap)[:5]}...")
    return phantom_scans(*eval_seeds, tuning), f"phantoms {eval_seeds[0]}-{eval_seeds[1]}"


def attach(model: str, checkpoint: Path, out: Path, version: str, eval_seeds: tuple[int, int],
           max_fp_per_scan: float | None, tuning=None, views: int | None = None, recentre_mm: float = RECENTRE_MM,
           tune_datalist: Path | None = None, tune_section: str = "validation", threshold: float | None = None) -> Path:
    """``tuning``: PhantomSettings of the tuning phantoms (real outlines), None for the generator's own;
    ``views``: copies of each patch the classifier reads (inference/rescoring.py; default: the model's
    second stage's, else 1); ``recentre_mm``: the furthest a classifier with a centre head moves a
    candidate; ``tune_datalist``: real scans that choose the weight and threshold instead of phantoms;
    ``threshold``: a score threshold chosen elsewhere (e.g. by leaving one scan out), the tuning scans then
    only giving the card's figures at it. A model that has a second stage gets the new classifier in its
    place (e.g. its own, fine-tuned on a site's reviewed scans) with its fusion weight kept; its first
    stage must be the one the candidates were mined with."""
    first = load_model(model)
    replaced = first.card.second_stage
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    mining = ckpt["mining"]
    if mining["model_sha256"] != first.info.sha256:
        raise ValueError(f"the classifier in {checkpoint} learned the candidates of {mining['model']}, "
                         f"not of {first.info.name}: mine {first.info.name}'s candidates and train again")
    scans, tuned_on = tuning_scans(ckpt, eval_seeds, tuning, tune_datalist, tune_section)
    views = views or (replaced.views if replaced else 1)
    check_views(views, ckpt["patch_size"])
    centre_head = bool(ckpt.get("centre_head"))
    net = CandidateClassifier(ckpt["channels"], centre_head_cells(ckpt["patch_size"], ckpt["channels"]) if centre_head else 0)
    net.load_state_dict(ckpt["network"])
    out.parent.mkdir(parents=True, exist_ok=True)
    name = out.name
    stage_onnx, stage_pt = out.with_name(name + "-rescorer.onnx"), out.with_name(name + "-rescorer.pt")
    diff = export_classifier(net, stage_onnx, ckpt["patch_size"])
    print(f"classifier ONNX vs PyTorch: max abs diff {diff:.2e}")
    if diff >= MAX_ABS_DIFF:
        raise RuntimeError(f"exported classifier differs from PyTorch by {diff} (limit {MAX_ABS_DIFF})")
    torch.save(net.state_dict(), stage_pt)
    onnx_path, pt_path = out.with_suffix(".onnx"), out.with_suffix(".pt")
    shutil.copy2(first.onnx_path, onnx_path)
    if first.state_dict_path is not None:
        shutil.copy2(first.state_dict_path, pt_path)

    cfg = ckpt["config"]
    fit_command = Path(checkpoint).parent / "command.txt"
    seeds = sorted(int(n.split("-")[1]) for n in ckpt["scans"] if n.startswith("phantom-"))
    others = [n for n in ckpt["scans"] if not n.startswith("phantom-")]
    data = (f"candidates of {mining['model']} (top {mining['per_scan']} a scan, score >= {mining['floor']}) and a patch "
            f"at every reference nodule, on {len(seeds)} phantoms of generator {GENERATOR_VERSION}"
            + (f" (seeds {seeds[0]}-{seeds[-1]})" if seeds else "") + f" and {len(others)} other scans")
    stage = SecondStage(
        onnx_file=stage_onnx.name, onnx_sha256=sha256_file(stage_onnx),
        state_dict_file=stage_pt.name, state_dict_sha256=sha256_file(stage_pt),
        channels=list(ckpt["channels"]), parameters=sum(p.numel() for p in net.parameters()),
        patch_size=tuple(ckpt["patch_size"]), views=views, recentre_mm=recentre_mm if centre_head else 0.0, weight=0.5, min_detector_score=float(mining["floor"]), data=data,
        training=TrainingInfo(command=fit_command.read_text().strip() if fit_command.is_file() else "", config=cfg,
                              iterations=int(ckpt["iteration"]), seconds=round(float(ckpt["seconds"]), 1),
                              device=f"cpu ({cfg['threads']} threads)"),
        metrics={f"validation_{k}": v for k, v in ckpt.get("validation", {}).items() if k.startswith("val_")},
    )
    what = (f", its second stage fine-tuned ({first.info.name}'s classifier retrained on {len(others)} real scans)"
            if replaced and cfg.get("init_weights") else
            f", rescored by a second-stage candidate classifier ({first.info.name} + rescorer)")
    card = first.card.model_copy(deep=True, update={
        "name": name, "version": version, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "description": first.card.description + what + (f"; operating point chosen on {tuned_on}" if tune_datalist
                                                         else outline_note(tuning)),
        "onnx_file": onnx_path.name, "state_dict_file": pt_path.name if first.state_dict_path else None,
        "second_stage": stage, "metrics": {}, "int8": None,  # a new model: its 8-bit copy is checked anew
    })
    card_path = out.with_suffix(".json")
    card_path.write_text(card.model_dump_json(indent=2))
    spec = load_model(str(card_path))
    detector = Detector(spec)
    if threshold is not None:
        card.inference.score_threshold, max_fp_per_scan = threshold, None
    weight, outcome, cpms = choose_weight(detector, detector.rescorer, scans, card.inference.score_threshold,
                                          (replaced.weight,) if replaced else WEIGHTS)
    print(f"fusion weight {weight} (CPM {cpms[weight]:.4f} on {tuned_on}"
          + (f"; the detector alone: {cpms[0.0]:.4f})" if 0.0 in cpms else ", kept from the replaced second stage)"))
    card.second_stage.weight = weight
    card.second_stage.metrics.update({f"weight_selection_cpm_w{w:g}": round(c, 4) for w, c in cpms.items()})
    real = mining.get("real_series", [])
    card.data.train_scans = sorted(set(card.data.train_scans) | set(real))
    if tune_datalist is not None:
        card.data.tune_scans = sorted({s.series_uid for s in scans})
    else:
        card.data.eval_seeds, card.data.eval_phantoms = list(eval_seeds), eval_seeds[1] - eval_seeds[0] + 1
    set_operating_point(card, outcome, max_fp_per_scan, card_path)
    print(f"wrote {card_path}, {out.with_suffix('.md')}, {onnx_path}, {stage_onnx}")
    print("metrics:", card.metrics)
    return card_path


def _run(args: argparse.Namespace) -> int:
    attach(args.model, args.checkpoint, args.out, args.version, tuple(args.eval_seeds), args.max_fp_per_scan,
           shape_settings(args), args.views, args.recentre_mm, args.tune_datalist, args.tune_section, args.threshold)
    return 0


def add_command(tsub: argparse._SubParsersAction) -> None:
    p = tsub.add_parser("attach-rescorer", help="a first-stage model + a trained rescorer -> a new two-stage model")
    p.add_argument("--model", default="default",
                   help="the model the candidates were mined with; a two-stage model gets the new second stage in "
                        "place of its own")
    p.add_argument("--checkpoint", type=Path, required=True, help="runs/NAME/checkpoint.pt from `train fit-rescorer`")
    p.add_argument("--out", type=Path, required=True, help="models/NAME (writes NAME.json, .md, .onnx, .pt, -rescorer.*)")
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--eval-seeds", type=int, nargs=2, default=(900040, 900049), metavar=("FIRST", "LAST"),
                   help="held-out phantoms that choose the fusion weight and threshold (inclusive)")
    p.add_argument("--max-fp-per-scan", type=float,
                   help="score threshold: the best sensitivity with at most this many FP/scan there, fewest FP for it")
    p.add_argument("--tune-datalist", type=Path, metavar="DATALIST",
                   help="choose the fusion weight and threshold on these real scans (e.g. reviewed studies the "
                        "classifier never learned from) instead of the --eval-seeds phantoms")
    p.add_argument("--tune-section", default="validation", help="the --tune-datalist section (default: validation)")
    p.add_argument("--threshold", type=float,
                   help="a score threshold chosen elsewhere (say how in the card), instead of --max-fp-per-scan")
    p.add_argument("--views", type=int, choices=VIEWS,
                   help="copies of each candidate's patch the classifier reads, its logits averaged: 1 as cut, "
                        "8 mirrored along every axis, 16 also turned in-plane (default: the replaced second "
                        "stage's, else 1)")
    p.add_argument("--recentre-mm", type=float, default=RECENTRE_MM,
                   help="with a classifier that has a centre head (fit-rescorer centre_head): the furthest it moves "
                        f"a candidate onto the nodule centre it finds (default {RECENTRE_MM:g})")
    add_shape_arguments(p)  # tuning phantoms with the training patients' real outlines
    p.set_defaults(func=_run)

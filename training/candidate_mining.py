"""`lungnode train candidates`: run a detector over training scans and keep a patch around every
candidate, labelled nodule or not, for the second-stage classifier (`lungnode train fit-rescorer`).

Each scan's patches go to ``OUT/scans/<name>.npz`` as it finishes, so an interrupted run resumes
where it stopped. Besides the detector's own candidates every reference nodule adds a patch at its
centre, so a nodule the detector ranked low or missed still teaches the classifier what one looks
like, and every finding known not to be one (``negative_box``: a site radiologist's rejected marks) adds
a patch labelled 0 at its centre, so the marks a site rejects are learned even where the detector's
top candidates crowd them out. Patches are larger than the classifier's input by ``margin`` voxels a side, room for the
shifts of training augmentation. Each patch also records where the nearest reference nodule's centre
lies from the patch's centre (model voxels), which teaches a second stage with a centre head
(``recentre``) to move a candidate the detector placed beside a small nodule onto it.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lungnode.inference.detector import Detector
from lungnode.inference.rescoring import box_centres, patches_at
from lungnode.models.registry import load_model
from lungnode.training import eval_sets
from lungnode.training.data import PhantomSettings
from lungnode.training.eval_sets import EvalScan
from lungnode.training.synth import ATTACHMENTS, add_shape_arguments

KIND_CANDIDATE, KIND_REFERENCE, KIND_NEGATIVE = 0, 1, 2  # a detector candidate, a nodule's patch, a rejected finding
PATCH_SIZE = (32, 32, 24)  # the classifier's input, model voxels


def mine_scan(detector: Detector, scan: EvalScan, patch_size, margin: int, floor: float, per_scan: int) -> dict:
    """Arrays for one scan: patches (float16), label (1 = inside a nodule's radius), detector score
    (-1 for reference patches), kind, diameter of the nodule hit (0 for none), and the offset (model
    voxels) from each patch's centre voxel to the nearest nodule's centre with that nodule's diameter
    (NaN and 0 in a scan without nodules)."""
    loaded = scan.load()
    found = detector.candidates(loaded.volume, floor)
    order = np.argsort(-found.scores, kind="stable")[:per_scan]
    centres_mm = np.array([found.detections[i].center_mm for i in order]).reshape(-1, 3)
    nodules = loaded.annotations
    hit = np.zeros(len(order))
    ignored = np.zeros(len(order), bool)
    for n in nodules:
        inside = np.linalg.norm(centres_mm - np.asarray(n.center_mm), axis=1) < n.size_mm / 2
        hit = np.where(inside & (hit == 0), n.size_mm, hit)
    for e in loaded.excluded:
        ignored |= np.linalg.norm(centres_mm - np.asarray(e.center_mm), axis=1) < e.size_mm / 2
    keep = ~ignored | (hit > 0)  # a don't-care finding teaches nothing either way
    order, hit = order[keep], hit[keep]
    prepared = found.prepared

    def model_index(findings) -> np.ndarray:
        world = np.array([f.center_mm for f in findings]).reshape(-1, 3)
        return prepared.to_model_index(loaded.volume.world_to_index(world)).reshape(-1, 3)

    ref_centres, negatives = model_index(nodules), loaded.negatives
    centres = np.concatenate([box_centres(found.boxes[order]), ref_centres, model_index(negatives)])
    size = np.asarray(patch_size) + 2 * margin
    patches = patches_at(prepared.image.numpy(), centres, size).astype(np.float16)
    offset, near = nearest_nodule(centres, ref_centres, [n.size_mm for n in nodules], detector.settings.spacing_mm)
    counts = (len(order), len(nodules), len(negatives))
    return {
        "patches": patches,
        "label": np.concatenate([hit > 0, np.ones(len(nodules), bool), np.zeros(len(negatives), bool)]).astype(np.uint8),
        "score": np.concatenate([found.scores[order], -np.ones(len(nodules) + len(negatives))]).astype(np.float32),
        "kind": np.repeat(np.array([KIND_CANDIDATE, KIND_REFERENCE, KIND_NEGATIVE], np.uint8), counts),
        "diameter_mm": np.concatenate([hit, [n.size_mm for n in nodules], np.zeros(len(negatives))]).astype(np.float32),
        "offset_vox": offset.astype(np.float32),
        "near_diameter_mm": near.astype(np.float32),
    }


def nearest_nodule(centres: np.ndarray, nodules: np.ndarray, diameters_mm, spacing_mm) -> tuple[np.ndarray, np.ndarray]:
    """For each patch centre (model voxel index; the patch is cut at its rounded voxel, as
    ``patches_at`` does): the offset to the nearest nodule centre (by mm) and that nodule's diameter."""
    at = np.floor(np.asarray(centres, dtype=np.float64).reshape(-1, 3) + 0.5)
    if not len(nodules):
        return np.full((len(at), 3), np.nan), np.zeros(len(at))
    offsets = np.asarray(nodules, dtype=np.float64)[None] - at[:, None]  # (patches, nodules, 3)
    nearest = np.argmin(np.linalg.norm(offsets * np.asarray(spacing_mm), axis=2), axis=1)
    return offsets[np.arange(len(at)), nearest], np.asarray(diameters_mm, dtype=np.float64)[nearest]


def mine(model: str, scans: list[EvalScan], out: Path, patch_size, margin: int, floor: float, per_scan: int) -> Path:
    detector = Detector(load_model(model))  # its first stage's candidates; a second stage it has is not used
    folder = out / "scans"
    folder.mkdir(parents=True, exist_ok=True)
    (out / "mining.json").write_text(json.dumps({
        "model": detector.spec.info.name, "model_sha256": detector.spec.info.sha256,
        "second_stage_sha256": detector.spec.card.second_stage.onnx_sha256 if detector.spec.card.second_stage else None,
        "patch_size": list(patch_size), "margin": margin, "floor": floor, "per_scan": per_scan,
        "model_spacing_mm": list(detector.settings.spacing_mm),
    }, indent=2))
    totals = np.zeros(4, int)  # candidates, of them on a nodule, reference patches, rejected findings
    bar = tqdm(scans, desc="candidates", unit="scan", dynamic_ncols=True)
    for scan in bar:
        path = folder / f"{scan.name}.npz"
        if not path.is_file():
            arrays = mine_scan(detector, scan, patch_size, margin, floor, per_scan)
            tmp = path.with_name(path.stem + ".tmp.npz")
            np.savez(tmp, **arrays)
            tmp.rename(path)
        with np.load(path) as z:
            cand = z["kind"] == KIND_CANDIDATE
            totals += [cand.sum(), (z["label"][cand] == 1).sum(), (z["kind"] == KIND_REFERENCE).sum(),
                       (z["kind"] == KIND_NEGATIVE).sum()]
        bar.set_postfix(candidates=int(totals[0]), on_nodules=int(totals[1]), references=int(totals[2]))
    print(f"{len(scans)} scans: {totals[0]} candidates ({totals[1]} on nodules, {totals[0] - totals[1]} not), "
          f"{totals[2]} reference nodule patches, {totals[3]} rejected-finding patches in {folder}")
    return folder


def _run(args: argparse.Namespace) -> int:
    scans: list[EvalScan] = []
    if args.phantoms:
        settings = replace(eval_sets.shape_settings(args) or PhantomSettings(),
                           n_nodules=tuple(args.nodules) if args.nodules else None,
                           diameter_range_mm=tuple(args.diameters) if args.diameters else None,
                           attachments=tuple(args.attachments) if args.attachments else None)
        scans += eval_sets.phantom_scans(*args.phantoms, settings)
    for d in args.datalist or []:
        scans += eval_sets.datalist_scans(d, args.section)
    if not scans:
        raise SystemExit("nothing to mine: give --phantoms FIRST LAST and/or --datalist PATH")
    mine(args.model, scans, args.out, tuple(args.patch_size), args.margin, args.floor, args.per_scan)
    record_sources(args.out, args.datalist or [], args.section, phantoms=args.phantoms, nodules=args.nodules,
                   diameters_mm=args.diameters, attachments=args.attachments,
                   nodule_shapes=None if args.nodule_shapes is None else
                   {"library": str(args.nodule_shapes), "split": args.shape_split, "fraction": args.real_shape_fraction})
    return 0


def record_sources(out: Path, datalists: list[Path], section: str, **sources) -> None:
    """Add to ``OUT/mining.json`` what was mined (``sources``: the phantom settings) and the real series
    behind the datalists' scans (an inserted copy names its source): the model card lists them."""
    record = json.loads((out / "mining.json").read_text())
    record["sources"] = {**sources, "datalists": [str(d) for d in datalists]}
    record["real_series"] = sorted({item.get("source_series") or item.get("series_uid")
                                    for d in datalists for item in json.loads(Path(d).read_text()).get(section, [])
                                    if item.get("source_series") or item.get("series_uid")})
    (out / "mining.json").write_text(json.dumps(record, indent=2))


def add_command(tsub: argparse._SubParsersAction) -> None:
    p = tsub.add_parser("candidates", help="collect labelled candidate patches for the second-stage classifier")
    p.add_argument("--model", default="default", help="the first-stage detector (model name or card path)")
    p.add_argument("--phantoms", nargs=2, type=int, metavar=("FIRST", "LAST"),
                   help="training phantom seeds (keep them apart from every evaluation set)")
    p.add_argument("--nodules", type=int, nargs=2, metavar=("MIN", "MAX"),
                   help="nodules per phantom (default: the evaluation phantoms' 1-4)")
    p.add_argument("--diameters", type=float, nargs=2, metavar=("MIN_MM", "MAX_MM"),
                   help="nodule diameters (default: the evaluation phantoms' 4-25 mm); e.g. 4 10 for more small ones")
    p.add_argument("--attachments", nargs="+", choices=ATTACHMENTS,
                   help="what the phantoms' nodules may touch (default: all); e.g. vascular for juxtavascular ones")
    p.add_argument("--datalist", type=Path, action="append", help="datalist JSON (repeatable), e.g. inserted scans")
    p.add_argument("--section", default="training", help="datalist section (default: training)")
    add_shape_arguments(p)  # phantoms whose nodules have real outlines (the training patients')
    p.add_argument("--out", type=Path, required=True, help="runs/NAME")
    p.add_argument("--patch-size", type=int, nargs=3, default=PATCH_SIZE, help="classifier input, model voxels")
    p.add_argument("--margin", type=int, default=3, help="extra voxels a side for shift augmentation")
    p.add_argument("--floor", type=float, default=0.05, help="lowest detector score kept")
    p.add_argument("--per-scan", type=int, default=40, help="most candidates kept per scan (highest scores)")
    p.set_defaults(func=_run)

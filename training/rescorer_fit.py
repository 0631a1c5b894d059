"""`lungnode train fit-rescorer`: train the second-stage classifier on the patches of
`lungnode train candidates`.

Whole scans are held out for validation (a nodule's candidates and reference patch never straddle
the split). Batches are balanced (``positive_fraction`` nodules); patches are shifted by up to the
mining margin, mirrored on every axis and turned 90 degrees in-plane (the in-plane spacing is
square), so the classifier learns shape, not place. With ``centre_head`` the network also learns where
the nearest nodule's centre lies from the patch centre (its offset follows every shift, mirror and
turn), and a patch is a nodule's when that centre lies within the nodule's radius or ``near_mm``,
whichever is larger: at inference the candidate is moved by the offset and scored again there.
Writes ``OUT/checkpoint.pt``, ``OUT/config.yaml`` and ``OUT/train_log.jsonl`` (loss; validation loss and
ROC AUC every ``validate_every`` iterations).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel
from tqdm import tqdm

from lungnode.models.candidate_classifier import CandidateClassifier, centre_head_cells
from lungnode.training.fit import lr_factor, native_precision


class RescorerConfig(BaseModel):
    """configs/rescorer_cpu.yaml."""

    seed: int
    threads: int = 2
    channels: list[int] = [16, 32, 64, 128]
    batch_size: int = 64
    positive_fraction: float = 0.5
    iterations: int = 3000
    max_minutes: float = 1e9
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_iterations: int = 100
    intensity_jitter: float = 0.03
    validation_fraction: float = 0.1
    validate_every: int = 250
    precision: Literal["f32", "bf16"] = "f32"
    centre_head: bool = False  # also regress the nodule centre's offset (needs candidates mined with offsets)
    near_mm: float = 4.0  # with centre_head: a nodule centre this near the patch centre makes it a nodule's
    centre_weight: float = 0.1  # with centre_head: weight of the offset loss (smooth L1, voxels)
    init_weights: Path | None = None  # a classifier state dict (e.g. a shipped *-rescorer.pt) to start from


@dataclass
class PatchSet:
    """Every mined patch of a set of scans, in memory (float16)."""

    patches: np.ndarray  # (N, I + 2m, J + 2m, K + 2m)
    label: np.ndarray  # (N,) 0/1
    score: np.ndarray  # detector score, -1 for reference patches
    diameter_mm: np.ndarray
    scan: np.ndarray  # (N,) index into names
    names: list[str]
    offset: np.ndarray | None = None  # (N, 3) voxels from the patch's centre voxel to the nearest nodule (NaN: none)
    near_diameter_mm: np.ndarray | None = None  # (N,) that nodule's diameter


def load_patches(folders: list[Path]) -> PatchSet:
    files = [f for folder in folders for f in sorted(Path(folder).glob("*.npz"))]
    if not files:
        raise FileNotFoundError(f"no mined scans (*.npz) in {', '.join(map(str, folders))}: run `lungnode train candidates` first")
    names = [f.stem for f in files]
    if len(set(names)) != len(names):
        raise ValueError("the same scan was mined into two candidate folders: give each folder other seeds")
    keys = ("patches", "label", "score", "diameter_mm", "offset_vox", "near_diameter_mm")
    parts: dict[str, list] = {k: [] for k in (*keys, "scan")}
    for n, f in enumerate(files):
        with np.load(f) as z:
            for k in keys:
                if k in z:  # candidates mined before offsets were recorded have none
                    parts[k].append(z[k])
            parts["scan"].append(np.full(len(z["label"]), n))
    complete = {k: np.concatenate(v) for k, v in parts.items() if len(v) == len(files)}
    return PatchSet(complete["patches"], complete["label"], complete["score"], complete["diameter_mm"], complete["scan"],
                    names, complete.get("offset_vox"), complete.get("near_diameter_mm"))


def split_scans(names: list[str], fraction: float) -> np.ndarray:
    """A stable per-scan validation flag (by name hash, so adding scans keeps the old split)."""
    return np.array([zlib.crc32(n.encode()) % 1000 < fraction * 1000 for n in names])


def augment(patches: np.ndarray, size: np.ndarray, rng: np.random.Generator, jitter: float,
            offsets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Random crops of ``size`` out of the margin-padded patches, mirrored, turned, intensity-jittered;
    and the mined ``offsets`` (to the nearest nodule, from the padded patch's centre voxel) as seen from
    each crop's geometric centre through the same shift, mirrors and turn (NaN stays NaN)."""
    padded = np.array(patches.shape[1:])
    margin = (padded - size) // 2
    offsets = np.full((len(patches), 3), np.nan) if offsets is None else np.asarray(offsets, dtype=np.float64)
    out = np.empty((len(patches), *size), np.float32)
    seen = np.empty((len(patches), 3))
    for n, p in enumerate(patches):
        o = np.array([int(rng.integers(0, 2 * m + 1)) for m in margin])
        x = p[o[0] : o[0] + size[0], o[1] : o[1] + size[1], o[2] : o[2] + size[2]].astype(np.float32)
        t = offsets_in_crop(offsets[n], padded, o, size)
        axes = [a for a in range(3) if rng.random() < 0.5]
        if axes:
            x = np.flip(x, axes)
            t[axes] = -t[axes]
        if size[0] == size[1] and rng.random() < 0.5:
            x = x.transpose(1, 0, 2)
            t = t[[1, 0, 2]]
        out[n] = x * rng.uniform(1 - jitter, 1 + jitter) + rng.uniform(-jitter, jitter)
        seen[n] = t
    return out, seen


def offsets_in_crop(offsets: np.ndarray, padded: np.ndarray, start: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Mined offsets (from a ``padded`` patch's centre voxel) as seen from the geometric centre of its
    crop of ``size`` starting at ``start``."""
    return offsets + padded // 2 - start - (size - 1) / 2


def centre_crop(patches: np.ndarray, size: np.ndarray) -> np.ndarray:
    m = (np.array(patches.shape[1:]) - size) // 2
    return patches[:, m[0] : m[0] + size[0], m[1] : m[1] + size[1], m[2] : m[2] + size[2]].astype(np.float32)


def centre_targets(seen: np.ndarray, near_diameter_mm: np.ndarray, size: np.ndarray, spacing_mm, near_mm: float):
    """(label, offset target) of a centre-head classifier for crops whose nearest nodule lies ``seen``
    voxels from their centre: a nodule's patch when that centre is within max(radius, ``near_mm``); the
    offset is learned where the nodule's centre lies inside the crop (a voxel in from its faces), else 0."""
    known = ~np.isnan(seen).any(axis=1)
    t = np.where(known[:, None], seen, 0.0)
    distance = np.linalg.norm(t * np.asarray(spacing_mm), axis=1)
    label = known & (distance <= np.maximum(near_diameter_mm / 2, near_mm))
    inside = known & np.all(np.abs(t) < size / 2 - 1, axis=1)
    return label.astype(np.float32), np.where(inside[:, None], t, 0.0).astype(np.float32)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    from scipy.stats import rankdata

    labels = np.asarray(labels)
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = rankdata(scores)  # ties share their mean rank
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def predict(net: CandidateClassifier, patches: np.ndarray, batch: int = 128) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits for already-cropped (N, I, J, K) patches, and with a centre head the (N, 3) offsets."""
    net.eval()
    logits, centres = [], []
    with torch.no_grad():
        for i in range(0, len(patches), batch):
            out = net(torch.from_numpy(patches[i : i + batch])[:, None])
            logits.append(logits_of(out).float().numpy())
            if isinstance(out, tuple):
                centres.append(out[1].float().numpy())
    net.train()
    return (np.concatenate(logits) if logits else np.zeros(0)), (np.concatenate(centres) if centres else None)


def centre_error_mm(predicted: np.ndarray, targets: np.ndarray, label: np.ndarray, spacing_mm: np.ndarray) -> float:
    """Mean distance (mm) between the predicted and the true nodule centre over the nodules' patches."""
    chosen = label == 1
    if not chosen.any():
        return float("nan")
    return float(np.linalg.norm((predicted[chosen] - targets[chosen]) * spacing_mm, axis=1).mean())


def logits_of(output) -> torch.Tensor:
    """The logits of a classifier's output (with a centre head it also returns the offsets)."""
    return output[0] if isinstance(output, tuple) else output


def mining_record(folders: list[Path]) -> dict:
    """The first folder's `train candidates` record, with every folder's listed; they must share the
    detector and the patch geometry, or their patches could not train one classifier."""
    records = [json.loads((Path(f) / "mining.json").read_text()) for f in folders]
    for f, r in zip(folders[1:], records[1:]):
        for key in ("model_sha256", "patch_size", "margin", "floor"):
            if r[key] != records[0][key]:
                raise ValueError(f"{f} was mined with {key} {r[key]}, {folders[0]} with {records[0][key]}: "
                                 "mine every folder with the same detector and patch settings")
    return {**records[0], "folders": [{"path": str(f), **r} for f, r in zip(folders, records)],
            "real_series": sorted({uid for r in records for uid in r.get("real_series", [])})}


def fit_rescorer(cfg: RescorerConfig, candidates: list[Path], out: Path, command: str = "") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    mining = mining_record(candidates)
    size = np.array(mining["patch_size"])
    data = load_patches([Path(c) / "scans" for c in candidates])
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    precision = native_precision(cfg.precision)
    cfg = cfg.model_copy(update={"precision": precision})
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    (out / "command.txt").write_text(command + "\n")

    labels, spacing = data.label, None
    if cfg.centre_head:
        spacing = np.asarray(mining["model_spacing_mm"], dtype=np.float64)  # distances to nodules in mm
        if data.offset is None:
            raise ValueError("centre_head needs candidates mined with nodule offsets: run `lungnode train candidates` again")
        padded = np.array(data.patches.shape[1:])
        centred = offsets_in_crop(data.offset, padded, (padded - size) // 2, size)  # as the centre crop sees them
        labels, centred_targets = centre_targets(centred, data.near_diameter_mm, size, spacing, cfg.near_mm)
        labels = labels.astype(np.uint8)
    is_val = split_scans(data.names, cfg.validation_fraction)[data.scan]
    train_pos = np.flatnonzero(~is_val & (labels == 1))
    train_neg = np.flatnonzero(~is_val & (labels == 0))
    val_idx = np.flatnonzero(is_val & (data.score >= 0))  # the detector's candidates: what it will rescore
    val_x, val_y = centre_crop(data.patches[val_idx], size), labels[val_idx]
    print(f"{len(data.names)} scans ({int(split_scans(data.names, cfg.validation_fraction).sum())} held out): "
          f"training on {len(train_pos)} nodule and {len(train_neg)} other patches; "
          f"validating on {len(val_idx)} candidates ({int(val_y.sum())} on nodules)")

    net = CandidateClassifier(cfg.channels, centre_head_cells(size, cfg.channels) if cfg.centre_head else 0)
    if cfg.init_weights is not None:
        start = torch.load(cfg.init_weights, map_location="cpu", weights_only=True)
        missing, unexpected = net.load_state_dict(start, strict=False)
        if unexpected or any(not k.startswith("centre.") for k in missing):
            raise ValueError(f"{cfg.init_weights} is not a classifier with channels {cfg.channels}: "
                             f"missing {missing}, unexpected {unexpected}")
        print(f"starting from {cfg.init_weights}" + (" (the centre head from scratch)" if missing else ""))
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))
    rng = np.random.default_rng(cfg.seed)
    n_pos = int(round(cfg.batch_size * cfg.positive_fraction))
    log_rows: list[dict] = []
    t0 = time.monotonic()
    window: list[float] = []
    bar = tqdm(range(cfg.iterations), desc="fit-rescorer", dynamic_ncols=True)
    with open(out / "train_log.jsonl", "w") as logf:
        for it in bar:
            idx = np.concatenate([rng.choice(train_pos, n_pos), rng.choice(train_neg, cfg.batch_size - n_pos)])
            patches, seen = augment(data.patches[idx], size, rng, cfg.intensity_jitter,
                                    None if data.offset is None else data.offset[idx])
            x = torch.from_numpy(patches)[:, None]
            y = torch.from_numpy(data.label[idx].astype(np.float32))
            if cfg.centre_head:
                y, target = (torch.from_numpy(a) for a in centre_targets(seen, data.near_diameter_mm[idx], size, spacing, cfg.near_mm))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                output = net(x)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits_of(output).float(), y)
            if cfg.centre_head:
                loss = loss + cfg.centre_weight * torch.nn.functional.smooth_l1_loss(output[1].float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            window.append(loss.item())
            last = it + 1 == cfg.iterations or time.monotonic() - t0 > cfg.max_minutes * 60
            if (it + 1) % cfg.validate_every == 0 or last:
                row = {"iteration": it + 1, "loss": round(float(np.mean(window)), 4), "seconds": round(time.monotonic() - t0, 1)}
                window.clear()
                if len(val_idx):
                    v, centres = predict(net, val_x)
                    vloss = torch.nn.functional.binary_cross_entropy_with_logits(
                        torch.from_numpy(v), torch.from_numpy(val_y.astype(np.float32))).item()
                    row.update(val_loss=round(vloss, 4), val_auc=round(roc_auc(val_y, v), 4))
                    if cfg.centre_head:
                        row["val_centre_error_mm"] = round(centre_error_mm(centres, centred_targets[val_idx], val_y, spacing), 2)
                log_rows.append(row)
                logf.write(json.dumps(row) + "\n")
                logf.flush()
                bar.set_postfix({k: v for k, v in row.items() if k in ("loss", "val_loss", "val_auc", "val_centre_error_mm")})
            if last:
                break
    seconds = time.monotonic() - t0
    state = {"network": net.state_dict(), "channels": list(cfg.channels), "patch_size": size.tolist(),
             "centre_head": cfg.centre_head,
             "config": cfg.model_dump(mode="json"), "mining": mining, "scans": data.names, "iteration": it + 1, "seconds": seconds,
             "validation": log_rows[-1] if log_rows else {}}
    torch.save(state, out / "checkpoint.pt")
    print(f"trained {it + 1} iterations in {seconds:.0f} s; last: {log_rows[-1] if log_rows else {}}")
    print(f"checkpoint: {out / 'checkpoint.pt'}")
    return state


def _run(args: argparse.Namespace) -> int:
    cfg = RescorerConfig.model_validate(yaml.safe_load(Path(args.config).read_text()))
    if args.iterations is not None:
        cfg.iterations = args.iterations
    fit_rescorer(cfg, args.candidates, args.out, "lungnode " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    return 0


def add_command(tsub: argparse._SubParsersAction) -> None:
    p = tsub.add_parser("fit-rescorer", help="train the second-stage (false-positive reduction) classifier")
    p.add_argument("--config", type=Path, required=True, help="configs/rescorer_cpu.yaml")
    p.add_argument("--candidates", type=Path, required=True, action="append",
                   help="the OUT of `lungnode train candidates` (repeatable: several mined sets train together)")
    p.add_argument("--out", type=Path, required=True, help="run directory (checkpoint.pt, train_log.jsonl)")
    p.add_argument("--iterations", type=int, help="override the config's iterations")
    p.set_defaults(func=_run)

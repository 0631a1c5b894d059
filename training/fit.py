"""`lungnode train fit`: train the RetinaNet on synthetic phantoms and/or datalists (scans imported by
`lungnode train import`, real scans with inserted nodules from `train synth --insert-into`), resumable,
with a loss log.

Writes into ``--out``: ``config.yaml`` (as used), ``checkpoint.pt`` (network, optimiser, schedule,
iteration; for ``--resume``), ``model.pt`` (network state dict only, for export and the torch
backend) and ``train_log.jsonl`` (mean losses every ``log_every`` iterations).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel
from torch.utils.data import DataLoader
from tqdm import tqdm

from lungnode.models.registry import InferenceSettings
from lungnode.models.retinanet import AutocastNetwork, NetConfig, build_detector, build_network
from lungnode.training.data import PatchDataset, PatchSettings, PhantomMix, build_cache, build_scan_cache, collate
from lungnode.training.importers.datalist import image_path, read_datalist

log = logging.getLogger(__name__)


class PhantomConfig(BaseModel):
    """See training.data.PhantomMix."""

    model_spacing_fraction: float = 0.5
    native_inplane_mm: tuple[float, float] = (0.6, 0.9)
    native_slice_mm: tuple[float, float] = (1.25, 2.5)
    field_of_view_mm: tuple[float, float] = (330.0, 400.0)
    n_nodules: tuple[int, int] = (1, 5)
    diameter_range_mm: tuple[float, float] = (4.0, 25.0)
    focus_fraction: float = 0.0
    focus_n_nodules: tuple[int, int] = (2, 6)
    focus_diameter_range_mm: tuple[float, float] = (4.0, 10.0)
    focus_attachments: tuple[Literal["none", "pleural", "vascular"], ...] = ("vascular",)
    nodule_shapes: str | None = None  # `lungnode train shapes` library: real LIDC outlines (training split)
    real_shape_fraction: float = 0.0  # share of the nodules drawn with one


class DatalistSource(BaseModel):
    """Scans of one datalist section; ``repeat`` > 1 draws them that many times as often."""

    path: Path
    section: str = "training"
    repeat: int = 1


class PatchConfig(BaseModel):
    positive_fraction: float = 0.7
    flip: bool = True
    intensity_jitter: float = 0.03


class MatcherConfig(BaseModel):
    num_candidates: int = 4
    center_in_gt: bool = False


class SamplerConfig(BaseModel):
    batch_size_per_image: int = 256
    positive_fraction: float = 0.3
    min_neg: int = 128
    pool_size: float = 300


class TrainConfig(BaseModel):
    """configs/train_cpu.yaml."""

    seed: int
    threads: int = 2
    network: dict = {}
    phantoms: PhantomConfig = PhantomConfig()
    train_seeds: tuple[int, int] | None = None  # phantom seeds, inclusive; None: datalists only
    datalists: list[DatalistSource] = []
    cache_dir: Path
    inference: InferenceSettings
    patches: PatchConfig = PatchConfig()
    batch_size: int = 4
    workers: int = 1
    cache_processes: int = 2
    iterations: int
    max_minutes: float = 1e9
    optimizer: str = "adamw"  # or "sgd" (momentum, Nesterov)
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iterations: int = 100
    checkpoint_every: int = 100
    log_every: int = 10
    matcher: MatcherConfig = MatcherConfig()
    sampler: SamplerConfig = SamplerConfig()
    init_weights: Path | None = None  # a model .pt (e.g. the shipped model) to start from instead of random
    # "bf16": the network's forward and backward under torch.autocast (about 2x faster on CPUs with
    # AMX / AVX-512 BF16 and on recent GPUs); weights, optimiser and losses stay float32.
    precision: Literal["f32", "bf16"] = "f32"

    def net_config(self) -> NetConfig:
        return NetConfig.from_dict({**NetConfig().to_dict(), **self.network})

    def phantom_mix(self) -> PhantomMix:
        return PhantomMix(model_spacing_mm=self.inference.spacing_mm, **self.phantoms.model_dump())

    def seeds(self) -> list[int]:
        return [] if self.train_seeds is None else list(range(self.train_seeds[0], self.train_seeds[1] + 1))

    def datalist_scans(self) -> list[tuple[Path, list[list[float]]]]:
        """(image, nodule boxes) of every datalist item, each listed ``repeat`` times."""
        scans = []
        for src in self.datalists:
            items = getattr(read_datalist(src.path), src.section)
            if not items:
                raise ValueError(f"{src.path} has no items in its {src.section!r} section")
            scans += [(image_path(src.path, it.image), it.box) for it in items] * src.repeat
        return scans

    def real_scans(self) -> list[str]:
        """The real series behind the datalist items (an inserted scan's background, else the image)."""
        names = []
        for src in self.datalists:
            for it in getattr(read_datalist(src.path), src.section):
                extra = it.model_extra or {}
                names.append(extra.get("source_series") or it.series_uid or it.image)
        return sorted(set(names))


def load_config(path: Path) -> TrainConfig:
    return TrainConfig.model_validate(yaml.safe_load(Path(path).read_text()))


@dataclass
class FitResult:
    out_dir: Path
    iterations: int
    seconds: float
    losses: list[float]  # mean total loss per logged interval


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}: use sgd or adamw")


def lr_factor(it: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 5 % over ``iterations``."""
    if it < cfg.warmup_iterations:
        return (it + 1) / cfg.warmup_iterations
    t = (it - cfg.warmup_iterations) / max(1, cfg.iterations - cfg.warmup_iterations)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def cpu_precision(cfg: TrainConfig) -> TrainConfig:
    """The config with the precision this CPU trains at (see ``native_precision``)."""
    return cfg.model_copy(update={"precision": native_precision(cfg.precision)})


def native_precision(precision: str) -> str:
    """``bf16`` only where the CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX); on others
    PyTorch emulates it about 40x slower than float32 (measured: 76 s against 1.8 s a step on a
    2-core AVX2 EPYC), so the run trains in float32 and says so."""
    from lungnode.inference.onnx_runtime import cpu_has_bf16

    if precision != "bf16" or cpu_has_bf16():
        return precision
    log.warning("precision bf16 asked for, but this CPU has no native bfloat16 (AVX-512 BF16 or AMX): "
                "training in f32, which is ~40x faster here than emulated bf16")
    return "f32"


def fit(cfg: TrainConfig, out_dir: Path, resume: bool = False, command: str = "") -> FitResult:
    """Train (or continue) into ``out_dir``; stops at ``iterations`` or after ``max_minutes``."""
    out_dir = Path(out_dir)
    ckpt_path = out_dir / "checkpoint.pt"
    if ckpt_path.exists() and not resume:
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads)
        cfg = cpu_precision(cfg)

    net_cfg = cfg.net_config()
    network = build_network(net_cfg).to(device)
    detector = build_detector(net_cfg, AutocastNetwork(network, device.type) if cfg.precision == "bf16" else network)
    detector.set_target_keys(box_key="box", label_key="label")
    detector.set_atss_matcher(num_candidates=cfg.matcher.num_candidates, center_in_gt=cfg.matcher.center_in_gt)
    detector.set_hard_negative_sampler(**cfg.sampler.model_dump())
    optimizer = make_optimizer(network.parameters(), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))

    start_it, seconds_before = 0, 0.0
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        network.load_state_dict(ckpt["network"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_it, seconds_before = ckpt["iteration"], ckpt["seconds"]
        log.info("resuming %s at iteration %d", out_dir, start_it)
    elif cfg.init_weights is not None:
        # Fine-tuning: a site retrains the shipped model on its own data rather than starting over.
        network.load_state_dict(torch.load(cfg.init_weights, map_location=device, weights_only=True))
        log.info("starting from the weights in %s", cfg.init_weights)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    (out_dir / "command.txt").write_text(command + "\n")

    scans = cfg.datalist_scans()
    if not scans and not cfg.seeds():
        raise ValueError("nothing to train on: set train_seeds (phantoms) and/or datalists")
    log.info("preparing %d training phantoms and %d datalist scans in %s", len(cfg.seeds()), len(scans), cfg.cache_dir)
    paths = build_cache(Path(cfg.cache_dir), cfg.seeds(), cfg.phantom_mix(), cfg.inference, cfg.cache_processes)
    paths += build_scan_cache(Path(cfg.cache_dir), scans, cfg.inference)
    dataset = PatchDataset(
        paths,
        PatchSettings(patch_size=cfg.inference.patch_size, **cfg.patches.model_dump()),
        seed=cfg.seed,
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=range(start_it * cfg.batch_size, cfg.iterations * cfg.batch_size),
        num_workers=cfg.workers,
        collate_fn=collate,
    )

    def save(it: int, seconds: float) -> None:
        state = {
            "iteration": it,
            "seconds": seconds,
            "network": network.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "net_config": net_cfg.to_dict(),
            "config": cfg.model_dump(mode="json"),
        }
        torch.save(state, out_dir / "checkpoint.tmp")
        (out_dir / "checkpoint.tmp").replace(ckpt_path)
        torch.save(network.state_dict(), out_dir / "model.pt")

    detector.train()
    t0 = time.monotonic()
    it = start_it
    window: list[tuple[float, float]] = []
    losses: list[float] = []
    bar = tqdm(loader, total=cfg.iterations - start_it, initial=0, desc="fit", dynamic_ncols=True)
    with open(out_dir / "train_log.jsonl", "a") as logf:
        for images, targets in bar:
            images = images.to(device)
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            parts = detector(images, targets)
            loss = parts[detector.cls_key] + parts[detector.box_reg_key]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 5.0)
            optimizer.step()
            scheduler.step()
            it += 1
            window.append((parts[detector.cls_key].item(), parts[detector.box_reg_key].item()))
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
            if len(window) == cfg.log_every or it == cfg.iterations:
                cls_l, box_l = (float(v) for v in np.mean(window, axis=0))
                losses.append(cls_l + box_l)
                seconds = seconds_before + time.monotonic() - t0
                rec = {"iteration": it, "loss": cls_l + box_l, "cls": cls_l, "box": box_l, "seconds": round(seconds, 1)}
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
                window.clear()
            elapsed = time.monotonic() - t0
            if it % cfg.checkpoint_every == 0 or it == cfg.iterations:
                save(it, seconds_before + elapsed)
            if elapsed > cfg.max_minutes * 60:
                log.warning("stopping at iteration %d: max_minutes=%s reached", it, cfg.max_minutes)
                break
    total = seconds_before + time.monotonic() - t0
    save(it, total)
    log.info("trained to iteration %d in %.0f s; weights in %s", it, total, out_dir / "model.pt")
    return FitResult(out_dir=out_dir, iterations=it, seconds=total, losses=losses)


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if args.iterations is not None:
        cfg.iterations = args.iterations
    if args.max_minutes is not None:
        cfg.max_minutes = args.max_minutes
    if args.init_weights is not None:
        cfg.init_weights = args.init_weights
    cfg.datalists += [DatalistSource(path=p) for p in args.datalist or []]
    command = "lungnode " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    fit(cfg, args.out, resume=args.resume, command=command)
    return 0


def add_command(tsub: argparse._SubParsersAction) -> None:
    p = tsub.add_parser("fit", help="train the RetinaNet detector on synthetic phantoms")
    p.add_argument("--config", type=Path, required=True, help="training config YAML (configs/train_cpu.yaml)")
    p.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, logs, model.pt)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--iterations", type=int, help="override the config's iterations")
    p.add_argument("--max-minutes", type=float, help="override the config's time limit")
    p.add_argument("--datalist", type=Path, action="append", metavar="JSON",
                   help="also train on this datalist's 'training' section (repeatable; see `train import`)")
    p.add_argument("--init-weights", type=Path, metavar="MODEL_PT",
                   help="start from these network weights (fine-tune a shipped model, e.g. models/<name>.pt)")
    p.set_defaults(func=_run)

"""`lungnode train eval`: run a model over evaluation scans and score it as LUNA16 does (FROC, CPM,
per-size table, plot), with a per-scan table at the model's own score threshold."""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lungnode.inference.detector import TORCH_DEVICES, Detector
from lungnode.inference.onnx_runtime import PRECISIONS, PROVIDERS
from lungnode.models.registry import load_model
from lungnode.training.eval_report import markdown_table, plot_froc, size_table
from lungnode.training import eval_sets
from lungnode.training.card_markdown import rewrite_card_markdown
from lungnode.training.eval_sets import EvalScan
from lungnode.training.froc import (
    Annotation, Candidate, FrocResult, candidates_from_detections, evaluate_froc, save_candidates_csv,
)

EVAL_SCORE_FLOOR = 0.01  # candidates down to this score draw the FROC curve; the node reports fewer


@dataclass(frozen=True)
class ScanRow:
    name: str
    nodules: int
    found: int  # at the model's score threshold
    false_positives: int
    ignored: int
    seconds: float


@dataclass(frozen=True)
class ScanMatch:
    """LUNA16's rule: a nodule is found by a mark whose centre lies inside its radius; a mark in no
    nodule is a false positive unless it lies in a don't-care finding (then it is ignored)."""

    hits: list[bool]  # per nodule
    false_positives: int
    ignored: int


def match(cands: list[Candidate], nodules: list[Annotation], excluded: list[Annotation] = ()) -> ScanMatch:
    def inside(c: Candidate, a: Annotation) -> bool:
        return float(np.linalg.norm(np.subtract(c.center_mm, a.center_mm))) < a.size_mm / 2

    fps = ignored = 0
    for c in cands:
        if any(inside(c, a) for a in nodules):
            continue
        if any(inside(c, a) for a in excluded):
            ignored += 1
        else:
            fps += 1
    return ScanMatch([any(inside(c, a) for c in cands) for a in nodules], fps, ignored)


@dataclass(frozen=True)
class ScanResult:
    """One evaluated scan: every candidate down to EVAL_SCORE_FLOOR and its truth."""

    name: str
    candidates: list[Candidate]
    nodules: list[Annotation]
    excluded: list[Annotation]
    seconds: float

    def match(self, threshold: float) -> ScanMatch:
        return match([c for c in self.candidates if c.score >= threshold], self.nodules, self.excluded)


@dataclass
class EvalOutcome:
    froc: FrocResult | None  # None when the scans hold no nodule (only FP counts then)
    scans: list[ScanResult]
    threshold: float  # the model's own

    @property
    def rows(self) -> list[ScanRow]:
        rows = []
        for s in self.scans:
            m = s.match(self.threshold)
            rows.append(ScanRow(s.name, len(s.nodules), sum(m.hits), m.false_positives, m.ignored, s.seconds))
        return rows

    @property
    def candidates(self) -> list[Candidate]:
        return [c for s in self.scans for c in s.candidates]

    def metrics(self, prefix: str) -> dict[str, float | int]:
        rows = self.rows
        scans = max(1, len(rows))
        out: dict[str, float | int] = {
            f"{prefix}_scans": len(rows),
            f"{prefix}_nodules": sum(r.nodules for r in rows),
            f"{prefix}_found_at_threshold": sum(r.found for r in rows),
            f"{prefix}_fp_per_scan_at_threshold": round(sum(r.false_positives for r in rows) / scans, 3),
            f"{prefix}_seconds_per_scan": round(sum(r.seconds for r in rows) / scans, 2),
        }
        if self.froc is not None:
            out[f"{prefix}_cpm"] = round(self.froc.cpm, 4)
            out.update({f"{prefix}_sens_at_{fp:g}fp": round(s, 4) for fp, s in self.froc.operating_points.items()})
        return out

    def at_threshold(self, threshold: float) -> dict[str, float | int]:
        """The model card's operating-point figures: sensitivity (all, >= 6 mm) and false positives
        per scan for the marks scoring >= ``threshold``."""
        matches = [s.match(threshold) for s in self.scans]
        diam = np.array([a.size_mm for s in self.scans for a in s.nodules])
        hits = np.array([h for m in matches for h in m.hits], dtype=bool)
        n = max(1, len(self.scans))
        return {
            "score_threshold": threshold,
            "eval_scans": len(self.scans),
            "eval_nodules": int(len(hits)),
            "sensitivity": round(float(hits.mean()) if len(hits) else 0.0, 4),
            "eval_nodules_ge6mm": int((diam >= 6).sum()),
            "sensitivity_ge6mm": round(float(hits[diam >= 6].mean()) if (diam >= 6).any() else 0.0, 4),
            "false_positives_per_scan": round(sum(m.false_positives for m in matches) / n, 3),
            "seconds_per_scan": round(sum(s.seconds for s in self.scans) / n, 2),
        }


def evaluate(detector: Detector, scans: list[EvalScan], *, bootstraps: int = 1000, seed: int = 0) -> EvalOutcome:
    results = []
    for scan in tqdm(scans, desc="evaluate", unit="scan", dynamic_ncols=True):
        loaded = scan.load()
        started = time.perf_counter()
        detections = detector.detect(loaded.volume, score_threshold=EVAL_SCORE_FLOOR)
        seconds = time.perf_counter() - started
        results.append(ScanResult(scan.name, candidates_from_detections(scan.series_uid, detections),
                                  list(loaded.annotations), list(loaded.excluded), seconds))
    froc = None
    nodules = [a for r in results for a in r.nodules]
    if nodules:
        froc = evaluate_froc([c for r in results for c in r.candidates], nodules, [a for r in results for a in r.excluded],
                             [s.series_uid for s in scans], bootstraps=bootstraps, seed=seed)
    return EvalOutcome(froc, results, detector.spec.card.inference.score_threshold)


def scan_table(rows: list[ScanRow], threshold: float) -> str:
    lines = [f"at the model's score threshold {threshold:g}:",
             f"{'scan':<28}{'nodules':>8}{'found':>7}{'FP':>5}{'ignored':>9}{'seconds':>9}"]
    lines += [f"{r.name[:27]:<28}{r.nodules:>8}{r.found:>7}{r.false_positives:>5}{r.ignored:>9}{r.seconds:>9.1f}"
              for r in rows]
    n = max(1, len(rows))
    lines.append(f"{'total':<28}{sum(r.nodules for r in rows):>8}{sum(r.found for r in rows):>7}"
                 f"{sum(r.false_positives for r in rows):>5}{sum(r.ignored for r in rows):>9}"
                 f"{sum(r.seconds for r in rows) / n:>9.1f} s/scan")
    return "\n".join(lines)


def evaluate_and_report(detector: Detector, scans: list[EvalScan], described: str, name: str, out: Path,
                        bootstraps: int = 1000) -> dict:
    """Evaluate on ``scans``, print the tables and write ``out``'s report, plot, candidates and
    metrics.json; returns the metrics (prefixed ``name``)."""
    spec = detector.spec
    outcome = evaluate(detector, scans, bootstraps=bootstraps)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threshold = spec.card.inference.score_threshold
    print(f"\n{spec.info.name} {spec.info.version} on {name}: {described}")
    print(scan_table(outcome.rows, threshold))
    report = [f"# {spec.info.name} {spec.info.version} on {name}", "", described, "", "```",
              scan_table(outcome.rows, threshold), "```"]
    if outcome.froc is not None:
        print("\nLUNA16 FROC (all candidates):\n" + size_table(outcome.froc))
        plot_froc(outcome.froc, out / "froc.png", title=f"{spec.info.name} on {name}")
        report += ["", markdown_table(outcome.froc), "", "![FROC](froc.png)"]
        print(f"FROC plot: {out / 'froc.png'}")
    save_candidates_csv(outcome.candidates, out / "candidates.csv")
    metrics = {f"{name}_set": described, **outcome.metrics(name)}  # which scans (and generator) they are
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "report.md").write_text("\n".join(report) + "\n")
    return metrics


def _run(args: argparse.Namespace) -> int:
    spec = load_model(args.model)
    detector = Detector(spec, backend=args.backend, provider=args.onnx_provider, precision=args.onnx_precision,
                        device=args.torch_device)
    scans, described = eval_sets.from_arguments(args)
    metrics = evaluate_and_report(detector, scans, described, args.name, args.out, args.bootstraps)
    if args.update_card:
        card_path = spec.onnx_path.with_suffix(".json")
        card = json.loads(card_path.read_text())
        card.setdefault("metrics", {}).update(metrics)
        card_path.write_text(json.dumps(card, indent=2) + "\n")
        rewrite_card_markdown(card_path)
        print(f"metrics written into {card_path} and {card_path.with_suffix('.md')}")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def add_command(tsub: argparse._SubParsersAction) -> None:
    p = tsub.add_parser("eval", help="score a model with LUNA16's FROC/CPM on phantoms, a datalist or LUNA16 series")
    p.add_argument("--model", default="default", help="model name in models/ or a card path")
    eval_sets.add_arguments(p)
    p.add_argument("--name", default="eval", help="name of this evaluation set (metric prefix)")
    p.add_argument("--out", type=Path, default=Path("runs/eval"))
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    p.add_argument("--torch-device", default="auto", choices=TORCH_DEVICES,
                   help="with --backend torch (auto: a CUDA GPU when PyTorch sees one)")
    p.add_argument("--onnx-provider", default="auto", choices=PROVIDERS,
                   help="ONNX Runtime execution provider (auto: CUDA, else OpenVINO, else CPU)")
    p.add_argument("--onnx-precision", default="auto", choices=PRECISIONS,
                   help="f32: the float32 network, no bfloat16 even where the CPU has it; int8: the card's 8-bit "
                        "network (train quantize); auto: what the node would run")
    p.add_argument("--bootstraps", type=int, default=1000)
    p.add_argument("--update-card", action="store_true", help="write the metrics into the model card")
    p.set_defaults(func=_run)

"""`lungnode train promote`: make a model the node's default only if it beats the current default on the
registered reference set (`lungnode train reference`) by more than the bootstrap noise.

Both models run once on every reference scan; a paired bootstrap over the scans (the same resample for
both, training.froc.paired_cpm_difference) gives the 95% interval of the CPM difference, and the
candidate is promoted only when that whole interval lies above 0. The set cannot be chosen here, and
its data must still match the digest it was registered with, so every promotion on one digest was
judged on the same scans.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from lungnode.models.registry import DEFAULT_MODEL, MODELS_DIR, ModelSpec, load_installed, load_model
from lungnode.models.registry_file import OperatingPointRecord, PromotionRecord, ReferenceSet, Registry, now
from lungnode.training.eval_sets import EvalScan
from lungnode.training.froc import PairedComparison
from lungnode.training.reference_set import ReferenceSetError, checked_scans

RESAMPLES = 1000
SEED = 0  # fixed: the same models on the same set get the same verdict


@dataclass(frozen=True)
class Decision:
    candidate: str
    current: str
    comparison: PairedComparison  # candidate (a) against current (b)
    reference: ReferenceSet
    scans: int

    @property
    def accepted(self) -> bool:
        return self.comparison.a_is_better

    @property
    def reason(self) -> str:
        c = self.comparison
        low, high = c.difference_ci
        verdict = ("promoted: it beats the current default by more than the bootstrap noise" if self.accepted else
                   "refused: the interval of the difference does not lie above 0, so the candidate does not beat "
                   "the current default by more than the bootstrap noise")
        return (f"reference set: {self.reference.description} (digest {self.reference.digest[:12]}, {self.scans} scans)\n"
                f"{self.candidate} CPM {c.cpm_a:.4f}\n{self.current} CPM {c.cpm_b:.4f}\n"
                f"difference {c.difference:+.4f}, {c.confidence:.0%} CI {low:+.4f} to {high:+.4f} "
                f"(paired bootstrap, {c.resamples} resamples of the scans)\n{verdict}")

    def record(self) -> PromotionRecord:
        c = self.comparison
        return PromotionRecord(candidate=self.candidate, current=self.current, candidate_cpm=c.cpm_a,
                               current_cpm=c.cpm_b, eval_set=self.reference.description, accepted=self.accepted,
                               at=now(), reference_digest=self.reference.digest, difference_ci=c.difference_ci,
                               resamples=c.resamples)


def decide(candidate: ModelSpec, current: ModelSpec, scans: list[EvalScan], reference: ReferenceSet) -> Decision:
    """Run both models once on every scan, then compare them by the paired bootstrap."""
    from lungnode.inference.detector import Detector
    from lungnode.training.eval_run import evaluate
    from lungnode.training.froc import paired_cpm_difference

    ours, theirs = (evaluate(Detector(spec), scans, bootstraps=0) for spec in (candidate, current))
    comparison = paired_cpm_difference(
        ours.candidates, theirs.candidates, [a for s in ours.scans for a in s.nodules],
        [a for s in ours.scans for a in s.excluded], [s.series_uid for s in scans], resamples=RESAMPLES, seed=SEED)
    return Decision(candidate.info.name, current.info.name, comparison, reference, len(scans))


def install(spec: ModelSpec, models_dir: Path) -> None:
    """Copy the model's files into the registry folder (card, ONNX, state dict, human-readable card,
    second stage, 8-bit network): every file its card names, so it loads from there."""
    card = spec.onnx_path.with_suffix(".json")
    for f in (card, spec.onnx_path, spec.state_dict_path, card.with_suffix(".md"), spec.second_stage_path,
              spec.second_stage_state_dict_path, spec.int8_onnx_path):
        if f is not None and f.is_file() and f.parent.resolve() != models_dir.resolve():
            shutil.copy2(f, models_dir / f.name)


def ranking(spec: ModelSpec) -> tuple:
    """What decides a model's ranking of candidates: its networks and every inference setting but the
    score threshold. Two models equal in it have the same FROC, so the same CPM."""
    card, stage = spec.card, spec.card.second_stage
    return (card.onnx_sha256, card.inference.model_copy(update={"score_threshold": 0.0}).model_dump(),
            None if stage is None else (stage.onnx_sha256, stage.views, stage.weight, stage.min_detector_score,
                                        stage.recentre_mm))


def change_operating_point(spec: ModelSpec, current: ModelSpec, registry: Registry, models_dir: Path) -> int:
    """A candidate that is the default at another threshold: accepted when the threshold was chosen on named
    real scans (`train retune --tune-datalist`), never on phantoms alone; no reference set can judge it."""
    threshold, scans = spec.card.inference.score_threshold, spec.card.data.tune_scans
    if not scans:
        print(f"lungnode train promote: {spec.info.name} is {current.info.name} at another score threshold "
              f"({threshold:g} for {current.card.inference.score_threshold:g}), chosen on phantoms: choose it on real "
              "scans the site has reviewed (`lungnode train retune --tune-datalist ... --max-fp-per-scan 1`)",
              file=sys.stderr)
        return 1
    install(spec, models_dir)
    registry.history.append(OperatingPointRecord(
        candidate=spec.info.name, current=current.info.name, threshold=threshold,
        current_threshold=current.card.inference.score_threshold, tune_scans=list(scans),
        figures={k: v for k, v in spec.card.metrics.items() if isinstance(v, (int, float, str))}, at=now()))
    registry.default = spec.info.name
    registry.save(models_dir)
    print(f"{spec.info.name}: {current.info.name}'s networks at score threshold {threshold:g} (was "
          f"{current.card.inference.score_threshold:g}), chosen on {len(scans)} real series; the ranking is the same, "
          f"so no reference-set comparison was needed: promoted")
    return 0


def promote(candidate: Path, against: str | None = None, models_dir: Path = MODELS_DIR) -> int:
    """Decide on the registered reference set, install and record; prints the verdict. Returns the exit
    status: 0 promoted, 1 refused, 2 no usable reference set. A candidate that differs from the default
    only in its score threshold is an operating-point change (`change_operating_point`)."""
    registry = Registry.load(models_dir, DEFAULT_MODEL)
    spec = load_model(str(candidate))
    current = load_installed(against or registry.default, models_dir)
    if ranking(spec) == ranking(current):
        if spec.card.inference.score_threshold == current.card.inference.score_threshold:
            print(f"lungnode train promote: {spec.info.name} ranks and thresholds as {current.info.name} does: "
                  "nothing to promote", file=sys.stderr)
            return 1
        return change_operating_point(spec, current, registry, models_dir)
    try:
        reference, scans = checked_scans(registry)
    except ReferenceSetError as e:
        print(f"lungnode train promote: {e}", file=sys.stderr)
        return 2
    try:
        decision = decide(spec, current, scans, reference)
    except ValueError as e:  # no nodule in the set
        print(f"lungnode train promote: the reference set cannot rank two models: {e}", file=sys.stderr)
        return 2
    if decision.accepted:
        install(spec, models_dir)
        registry.default = decision.candidate
    registry.history.append(decision.record())
    registry.save(models_dir)
    print(decision.reason)
    return 0 if decision.accepted else 1


def _run(args: argparse.Namespace) -> int:
    return promote(args.candidate, args.against, args.models_dir)


def add_command(tsub: argparse._SubParsersAction) -> None:
    p = tsub.add_parser("promote", help="make a model the default if it beats the current one on the reference set "
                                        "(`train reference`) by more than the bootstrap noise")
    p.add_argument("candidate", type=Path, help="model card (.json) of the candidate, from `lungnode train export`")
    p.add_argument("--against", help="compare with this model instead of the current default")
    p.add_argument("--models-dir", type=Path, default=MODELS_DIR, help=argparse.SUPPRESS)
    p.set_defaults(func=_run)

"""`lungnode train promote`: make a model the node's default only if it scores at least as well as the
current default on the same evaluation set (LUNA16 CPM), so a retrained model never silently
replaces a better one."""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from lungnode.inference.detector import Detector
from lungnode.models.registry import MODELS_DIR, REGISTRY_FILE, ModelSpec, default_model_name, load_model
from lungnode.training.eval_run import evaluate
from lungnode.training import eval_sets
from lungnode.training.eval_sets import EvalScan


# CPMs are means of hit fractions: two equal ones can differ in the last bits by summation order.
CPM_TIE = 1e-9


def at_least_as_good(candidate_cpm: float, current_cpm: float) -> bool:
    return candidate_cpm >= current_cpm - CPM_TIE


@dataclass(frozen=True)
class Decision:
    candidate: str
    current: str
    candidate_cpm: float
    current_cpm: float
    eval_set: str
    accepted: bool

    @property
    def reason(self) -> str:
        verdict = "promoted" if self.accepted else "refused: it scores below the current default"
        return (f"{self.candidate} CPM {self.candidate_cpm:.4f} vs {self.current} CPM {self.current_cpm:.4f} "
                f"on {self.eval_set}: {verdict}")


def cpm_on(spec: ModelSpec, scans: list[EvalScan], bootstraps: int) -> float:
    outcome = evaluate(Detector(spec), scans, bootstraps=bootstraps)
    if outcome.froc is None:
        raise ValueError("the evaluation set holds no nodule: it cannot rank two models")
    return outcome.froc.cpm


def decide(candidate: ModelSpec, current: ModelSpec, scans: list[EvalScan], eval_set: str,
           bootstraps: int = 0) -> Decision:
    cand_cpm = cpm_on(candidate, scans, bootstraps)
    cur_cpm = cpm_on(current, scans, bootstraps)
    return Decision(candidate.info.name, current.info.name, cand_cpm, cur_cpm, eval_set,
                    at_least_as_good(cand_cpm, cur_cpm))


def install(spec: ModelSpec, models_dir: Path) -> None:
    """Copy the model's files into the registry folder (card, ONNX, state dict, human-readable card,
    second stage, 8-bit network): every file its card names, so it loads from there."""
    card = spec.onnx_path.with_suffix(".json")
    for f in (card, spec.onnx_path, spec.state_dict_path, card.with_suffix(".md"), spec.second_stage_path,
              spec.second_stage_state_dict_path, spec.int8_onnx_path):
        if f is not None and f.is_file() and f.parent.resolve() != models_dir.resolve():
            shutil.copy2(f, models_dir / f.name)


def record(decision: Decision, models_dir: Path) -> None:
    registry = models_dir / REGISTRY_FILE
    data = json.loads(registry.read_text()) if registry.is_file() else {"default": decision.current, "history": []}
    entry = {**asdict(decision), "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    data["history"].append(entry)
    if decision.accepted:
        data["default"] = decision.candidate
    registry.write_text(json.dumps(data, indent=2) + "\n")


def _run(args: argparse.Namespace) -> int:
    candidate = load_model(str(args.candidate))
    current = load_model(default_model_name(args.models_dir) if args.against is None else args.against)
    scans, eval_set = eval_sets.from_arguments(args)
    decision = decide(candidate, current, scans, eval_set)
    if decision.accepted:
        install(candidate, args.models_dir)
    record(decision, args.models_dir)
    print(decision.reason)
    return 0 if decision.accepted else 1


def add_command(tsub: argparse._SubParsersAction) -> None:
    p = tsub.add_parser("promote", help="make a model the default if it scores at least as well as the current one")
    p.add_argument("candidate", type=Path, help="model card (.json) of the candidate, from `lungnode train export`")
    p.add_argument("--against", help="compare with this model instead of the current default")
    eval_sets.add_arguments(p)
    p.add_argument("--models-dir", type=Path, default=MODELS_DIR, help=argparse.SUPPRESS)
    p.set_defaults(func=_run)

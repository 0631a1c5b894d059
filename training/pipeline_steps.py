"""The steps of `lungnode train pipeline`, each a call of the `train` command modules' functions.

A step writes into its own ``work`` folder (the runner renames it when the step is done) and returns
its outputs; what it needs from the steps before comes from their recorded outputs (``Run``).
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lungnode.models.registry import DEFAULT_MODEL, MODELS_DIR, ModelSpec, load_model
from lungnode.models.registry_file import Registry
from lungnode.training.pipeline_config import PipelineConfig

Outputs = dict[str, str | list[str]]


class StepError(RuntimeError):
    """A step cannot go on; the message says what to change."""


@dataclass
class Outcome:
    outputs: Outputs
    note: str = ""
    skipped: bool = False  # the config turns the step off: nothing was made


@dataclass
class Run:
    """What the steps share: the config, the base model, the completed steps' outputs."""

    cfg: PipelineConfig
    config_path: Path
    base: str  # the base model (name or card path), resolved once when the run began
    outputs: dict[str, Outputs] = field(default_factory=dict)
    measured: Callable[[str, float], None] = lambda what, seconds: None  # a speed measured on the way

    def base_spec(self) -> ModelSpec:
        return load_model(self.base)

    def command(self, step: str) -> str:
        return f"lungnode train pipeline --config {self.config_path} (step {step})"

    def datalists(self) -> list[Path]:
        """The site's datalists and the imported feedback: their training sections are learned from."""
        return [Path(p) for p in self.outputs["import"]["datalists"]]

    def training_datalists(self) -> list[Path]:
        """The site's datalists and the scans with inserted nodules."""
        inserted = self.outputs.get("synth", {}).get("datalist")
        return self.datalists() + ([Path(inserted)] if inserted else [])

    def mined_model(self) -> str:
        """The model whose first stage proposes the candidates: the fine-tuned one when `fit` ran."""
        return str(self.outputs.get("fit", {}).get("model") or self.base)


def training_items(datalists: list[Path]) -> int:
    return sum(len(json.loads(Path(d).read_text()).get("training", [])) for d in datalists)


def import_data(run: Run, work: Path) -> Outcome:
    from lungnode.training.importers import command as importers

    datalists = []
    for d in run.cfg.datalists:
        if not d.is_file():
            raise StepError(f"datalist {d} not found: make it with `lungnode train import ...` or fix `datalists:` "
                            f"in {run.config_path}")
        datalists.append(str(d))
    feedback = run.cfg.feedback
    if feedback is not None:
        out = work / "feedback.json"
        parser = argparse.ArgumentParser(prog="lungnode train")
        importers.add_command(parser.add_subparsers())
        args = parser.parse_args(["import", "feedback", "--data-dir", str(feedback.data_dir), "--out", str(out),
                                  "--val-fraction", str(feedback.val_fraction), "--quiet"])
        if args.func(args) != 0:
            raise StepError(f"no completed review was imported from {feedback.data_dir} (see above): complete reviews "
                            f"on the node first, or leave `feedback:` out of {run.config_path}")
        datalists.append(str(out))
    if not datalists:
        raise StepError(f"no data to learn from: name the site's datalists (`datalists:`) and/or `feedback: {{data_dir: "
                        f"var}}` in {run.config_path}")
    return Outcome({"datalists": datalists}, f"{training_items([Path(d) for d in datalists])} training scans")


def synth(run: Run, work: Path) -> Outcome:
    from lungnode.training.insertion import generate_inserted_dataset, sources_from_datalist
    from lungnode.training.synth import shape_model, summarize

    s = run.cfg.synth
    if s.copies == 0:
        return Outcome({}, "synth.copies is 0: no inserted scans", skipped=True)
    try:
        sources = [src for d in run.datalists() for src in sources_from_datalist(d, "training")]
    except ValueError as e:
        raise StepError(f"{e}; or set synth.copies: 0 to learn without inserted nodules") from e
    datalist = generate_inserted_dataset(sources, work, s.copies, s.seed, fmt=s.format,
                                         nodule_model=shape_model(s.nodule_shapes, "train", s.real_shape_fraction))
    print(summarize(datalist, "real series with simulated nodules"))
    return Outcome({"datalist": str(datalist)}, f"{s.copies} copies of {len(sources)} scans")


def fit_detector(run: Run, work: Path) -> Outcome:
    from lungnode.training import fit
    from lungnode.training.retune import retune

    f, op = run.cfg.fit, run.cfg.operating_point
    if not f.enabled:
        return Outcome({}, "fit.enabled is false: the base model's detector is kept", skipped=True)
    base = run.base_spec()
    if base.state_dict_path is None:
        raise StepError(f"{base.info.name} has no PyTorch weights (.pt) to fine-tune from: choose a base_model that has "
                        "them, or set fit.enabled: false")
    cfg = fit.load_config(f.config)
    cfg = cfg.model_copy(update={
        "init_weights": base.state_dict_path, "iterations": f.iterations or cfg.iterations,
        "datalists": cfg.datalists + [fit.DatalistSource(path=d) for d in run.training_datalists()]})
    fit.fit(cfg, work, resume=True, command=run.command("fit"))  # continues from work/checkpoint.pt
    card = retune(run.base, work / f"{run.cfg.name}-detector", run.cfg.version, {}, op.eval_seeds,
                  op.max_fp_per_scan, detector_checkpoint=work / "checkpoint.pt")
    return Outcome({"model": str(card), "checkpoint": str(work / "checkpoint.pt")},
                   f"{cfg.iterations} iterations from {base.info.name}'s detector")


def unique_scans(datalists: list[Path]):
    """The training scans of the datalists, each image once; names must differ (one file each when mined)."""
    from lungnode.training.eval_sets import datalist_scans

    scans = list({s.source: s for d in datalists for s in datalist_scans(d, "training")}.values())
    names = [s.name for s in scans]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise StepError(f"two different scans are both named {', '.join(twice[:3])} in {', '.join(map(str, datalists))}: "
                        "candidates are kept one file per name; give the images distinct names")
    return scans


def candidates(run: Run, work: Path) -> Outcome:
    from lungnode.training.candidate_mining import PATCH_SIZE, mine, record_sources

    c = run.cfg.candidates
    stage = run.base_spec().card.second_stage  # patches the size its classifier reads
    patch = c.patch_size or (tuple(stage.patch_size) if stage else PATCH_SIZE)
    datalists = run.training_datalists()
    scans = unique_scans(datalists)
    model = run.mined_model()
    if not (work / "scans" / f"{scans[0].name}.npz").is_file():  # the first scan times this machine
        started = time.perf_counter()
        mine(model, scans[:1], work, patch, c.margin, c.floor, c.per_scan)
        run.measured("scan", time.perf_counter() - started)
    mine(model, scans, work, patch, c.margin, c.floor, c.per_scan)  # resumes: mined scans are kept
    record_sources(work, datalists, "training", phantoms=None, nodules=None, diameters_mm=None, attachments=None,
                   nodule_shapes=None)
    return Outcome({"candidates": str(work)}, f"{len(scans)} scans, patches {'x'.join(map(str, patch))}")


def second_stage(run: Run, work: Path) -> Outcome:
    from lungnode.training.rescorer_fit import RescorerConfig, fit_rescorer

    s = run.cfg.second_stage
    cfg = RescorerConfig.model_validate(yaml.safe_load(Path(s.config).read_text()))
    base = run.base_spec()
    if base.card.second_stage is not None and base.second_stage_state_dict_path is None:
        raise StepError(f"{base.info.name}'s second stage has no PyTorch weights ({base.card.second_stage.state_dict_file}) "
                        "to start from: restore the file beside its card")
    init = base.second_stage_state_dict_path  # the config's init_weights is for its own recipe, not this base
    cfg = cfg.model_copy(update={"init_weights": init, "iterations": s.iterations or cfg.iterations})
    fit_rescorer(cfg, [Path(run.outputs["candidates"]["candidates"])], work, run.command("second-stage"))
    start = f"from {base.info.name}'s second stage" if init else f"from scratch ({base.info.name} has no second stage)"
    return Outcome({"checkpoint": str(work / "checkpoint.pt")}, f"{cfg.iterations} iterations {start}")


def attach_stage(run: Run, work: Path) -> Outcome:
    from lungnode.training.rescorer_attach import RECENTRE_MM, attach

    op = run.cfg.operating_point
    card = attach(run.mined_model(), Path(run.outputs["second-stage"]["checkpoint"]), work / run.cfg.name,
                  run.cfg.version, op.eval_seeds, op.max_fp_per_scan, None, None, RECENTRE_MM, op.tune_datalist,
                  op.tune_section)
    tuned = (f"{op.tune_datalist} [{op.tune_section}]" if op.tune_datalist
             else f"phantoms {op.eval_seeds[0]}-{op.eval_seeds[1]}")
    return Outcome({"model": str(card)}, f"operating point for {op.max_fp_per_scan:g} FP/scan on {tuned}")


def registry() -> Registry:
    return Registry.load(MODELS_DIR, DEFAULT_MODEL)


def eval_sets(run: Run) -> list[tuple[str, list, str]]:
    """(name, scans, description) of the registered reference set and the config's held-out sets."""
    from lungnode.training.eval_sets import GENERATOR_VERSION, datalist_scans, phantom_scans
    from lungnode.training.reference_set import ReferenceSetError, checked_scans

    sets = []
    try:
        reference, scans = checked_scans(registry())
        sets.append(("reference", scans, reference.description))
    except ReferenceSetError as e:
        print(f"not evaluated on a reference set: {e}")
    for s in run.cfg.eval:
        if s.phantoms is not None:
            sets.append((s.name, phantom_scans(*s.phantoms),
                         f"phantoms {s.phantoms[0]}-{s.phantoms[1]} (generator {GENERATOR_VERSION})"))
        else:
            sets.append((s.name, datalist_scans(s.datalist, s.section), f"{s.datalist} [{s.section}]"))
    return sets


def figures_table(rows: list[tuple[str, dict]]) -> str:
    """One line per evaluation set: the FROC's figures and the marks at the model's threshold."""
    def cell(m: dict, key: str, fmt: str) -> str:
        return format(m[key], fmt) if key in m else "-"

    lines = [f"{'set':<16}{'scans':>6}{'nodules':>8}{'CPM':>8}{'sens@1FP':>9}{'found':>7}{'FP/scan':>9}"]
    lines += [f"{n[:15]:<16}{m[n + '_scans']:>6}{m[n + '_nodules']:>8}{cell(m, n + '_cpm', '.4f'):>8}"
              f"{cell(m, n + '_sens_at_1fp', '.3f'):>9}{m[n + '_found_at_threshold']:>7}"
              f"{m[n + '_fp_per_scan_at_threshold']:>9.2f}" for n, m in rows]
    return "\n".join(lines)


def evaluate_model(run: Run, work: Path) -> Outcome:
    from lungnode.inference.detector import Detector
    from lungnode.training.eval_run import evaluate_and_report

    sets = eval_sets(run)
    if not sets:
        return Outcome({}, "no evaluation set: register a reference set (`lungnode train reference ...`) or name "
                           "`eval:` sets in the config", skipped=True)
    detector = Detector(load_model(str(run.outputs["attach"]["model"])))
    rows = [(name, evaluate_and_report(detector, scans, described, name, work / name)) for name, scans, described in sets]
    table = figures_table(rows)
    (work / "figures.txt").write_text(table + "\n")
    print(f"\n{detector.spec.info.name} (found and FP/scan at its score threshold):\n{table}")
    return Outcome({"figures": str(work / "figures.txt")}, f"{len(sets)} set(s): {', '.join(n for n, _ in rows)}")


def promote_model(run: Run, work: Path) -> Outcome:
    from lungnode.training.promote import promote

    card = run.outputs["attach"]["model"]
    command = f"lungnode train promote {card}"
    if registry().reference_set is None:
        if run.cfg.promote:
            raise StepError("no reference set is registered, so no promotion can be decided: register the fixed set "
                            "promotions are decided on with `lungnode train reference --phantoms FIRST LAST` (or "
                            "--datalist FILE --section S), then run the pipeline again")
        return Outcome({}, f"not promoted (promote: false); register a reference set (`lungnode train reference "
                           f"...`), then `{command}`", skipped=True)
    if not run.cfg.promote:
        return Outcome({}, f"not promoted (promote: false); to promote: `{command}`", skipped=True)
    status = promote(Path(card))
    if status == 2:
        raise StepError("the promotion could not be decided (the reason is above): fix the reference set, then run "
                        "the pipeline again")
    return Outcome({"registry": str(MODELS_DIR / "registry.json")},
                   "promoted: the node's default model now" if status == 0 else "refused: the current default stays")


STEPS: dict[str, Callable[[Run, Path], Outcome]] = {
    "import": import_data, "synth": synth, "fit": fit_detector, "candidates": candidates,
    "second-stage": second_stage, "attach": attach_stage, "eval": evaluate_model, "promote": promote_model,
}
FOLDERS = {"import": "import", "synth": "inserted", "fit": "fit", "candidates": "candidates",
           "second-stage": "second-stage", "attach": "model", "eval": "eval", "promote": None}
RESUMABLE = ("fit", "candidates")  # their partial work is kept after an interruption and continued

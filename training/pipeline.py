"""`lungnode train pipeline --config site.yaml`: a site's retraining end to end, resumable.

The steps (training.pipeline_steps) run in order; ``OUT/pipeline.json`` records each one's status,
outputs, start, end and seconds, and the config's digest. A step writes into ``OUT/<folder>.tmp`` and
renames it when done, so after an interruption the same command continues with the first step not
done (mining and the detector's fit also continue inside their step). A changed config refuses to
resume unless ``--restart-from STEP`` names where to start again. One overall bar (weighted by each
step's expected seconds) runs above the steps' own bars; the estimate comes from this machine's speed
and is updated as steps finish.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel
from tqdm import tqdm

from lungnode.models.registry import default_model_name, load_model
from lungnode.training.pipeline_config import STEP_SECTIONS, PipelineConfig, load_config
from lungnode.training.pipeline_steps import (FOLDERS, RESUMABLE, STEPS, Outputs, Run, StepError, registry,
                                              training_items)

STEPS_ORDER = list(STEPS)
Status = Literal["pending", "running", "done", "skipped", "failed"]
COPY_S = 15.0  # an inserted copy (load, lung mask, insertion, write) until this machine has made one
SCAN_S = 30.0  # a detector pass over a scan when the base model's card gives none


class StepRecord(BaseModel):
    status: Status = "pending"
    started: str | None = None
    ended: str | None = None
    seconds: float | None = None
    estimate_s: float | None = None  # expected when it started
    outputs: Outputs = {}
    note: str = ""

    def complete(self) -> bool:
        """Done (or turned off) and every file or folder it made still there."""
        paths = [p for v in self.outputs.values() for p in ([v] if isinstance(v, str) else v)]
        return self.status in ("done", "skipped") and all(Path(p).exists() for p in paths)


class PipelineState(BaseModel):
    """OUT/pipeline.json."""

    config_digest: str
    config: dict
    base_model: str
    cpu: str
    steps: dict[str, StepRecord]

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        tmp.replace(path)


def cpu_description() -> str:
    """The processor (lscpu's model name), its cores, and the instructions training speed depends on."""
    try:
        fields = {f["field"].rstrip(":"): f["data"] for f in
                  json.loads(subprocess.run(["lscpu", "-J"], capture_output=True, text=True, check=True).stdout)["lscpu"]}
    except (OSError, subprocess.CalledProcessError, ValueError, KeyError):
        fields = {}
    flags = set(fields.get("Flags", "").split())
    has = {"AVX2": "avx2", "AVX-512 BF16": "avx512_bf16", "AMX": "amx_bf16"}
    return (f"{fields.get('Model name', 'unknown CPU')}, {os.cpu_count()} cores; "
            + ", ".join(f"{name} {'yes' if flag in flags else 'no'}" for name, flag in has.items()))


def duration(seconds: float) -> str:
    seconds = round(seconds)
    return (f"{seconds // 3600} h {seconds % 3600 // 60} min" if seconds >= 3600 else
            f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s")


@dataclass
class Speeds:
    """Seconds per unit of work on this machine: the training steps timed at the start, a scan from the
    first one mined (then from the whole mining); an inserted copy is a prior."""

    scan: float  # a detector pass over one scan (mining, tuning, evaluation)
    copy: float  # one scan with inserted nodules
    rescorer_iteration: float
    fit_iteration: float

    @classmethod
    def measure(cls, cfg: PipelineConfig, base: str) -> Speeds:
        """The second stage's and the detector's training steps timed here (a few seconds); a scan from the
        base model's card until the first one is mined here."""
        from lungnode.training.rescorer_fit import RescorerConfig

        rescorer = RescorerConfig.model_validate(yaml.safe_load(Path(cfg.second_stage.config).read_text()))
        spec = load_model(base)
        stage = spec.card.second_stage
        patch = cfg.candidates.patch_size or (tuple(stage.patch_size) if stage else (32, 32, 24))
        return cls(scan=float(spec.card.metrics.get("seconds_per_scan", SCAN_S)), copy=COPY_S,
                   rescorer_iteration=_time_classifier_step(rescorer, patch),
                   fit_iteration=_time_detector_step(cfg) if cfg.fit.enabled else 0.0)


def _timed(step, repeats: int = 2) -> float:
    step()  # the first call allocates
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats


def _time_classifier_step(cfg, patch) -> float:
    """One training step of the second-stage classifier at the config's batch, precision and threads."""
    import torch

    from lungnode.models.candidate_classifier import CandidateClassifier
    from lungnode.training.fit import native_precision

    torch.set_num_threads(cfg.threads)
    net = CandidateClassifier(cfg.channels)
    x = torch.rand(cfg.batch_size, 1, *patch)
    bf16 = native_precision(cfg.precision) == "bf16"

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(x)
        out.float().sum().backward()

    return _timed(step) * 1.3  # and the batch's augmentation


def _time_detector_step(cfg: PipelineConfig) -> float:
    """One forward and backward pass of the detector's network over a training batch."""
    import torch

    from lungnode.models.retinanet import build_network
    from lungnode.training.fit import load_config, native_precision

    train = load_config(cfg.fit.config)
    torch.set_num_threads(train.threads)
    net = build_network(train.net_config())
    x = torch.rand(train.batch_size, 1, *train.inference.patch_size)
    bf16 = native_precision(train.precision) == "bf16"

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(x)
        sum(o.float().sum() for outs in out.values() for o in outs).backward()

    return _timed(step, repeats=1) * 1.2  # and the loss's matching and sampling


def expected_seconds(step: str, run: Run, speeds: Speeds) -> float:
    """What a step should take here, from the sizes known so far (the datalists once imported)."""
    cfg = run.cfg
    items = training_items(run.datalists() if "import" in run.outputs else [d for d in cfg.datalists if d.is_file()])
    reference = _reference_size()
    tuning = (_section_size(cfg.operating_point.tune_datalist, cfg.operating_point.tune_section)
              if cfg.operating_point.tune_datalist else cfg.operating_point.eval_seeds[1] - cfg.operating_point.eval_seeds[0] + 1)
    if step == "import":
        return 30.0 if cfg.feedback else 1.0
    if step == "synth":
        return cfg.synth.copies * speeds.copy
    if step == "fit":
        iterations = cfg.fit.iterations or _fit_iterations(cfg) if cfg.fit.enabled else 0
        return iterations * speeds.fit_iteration + (tuning * speeds.scan if cfg.fit.enabled else 0)
    if step == "candidates":
        return (items + cfg.synth.copies) * speeds.scan * 1.2  # and cutting the patches
    if step == "second-stage":
        return _rescorer_iterations(cfg) * speeds.rescorer_iteration + 10
    if step == "attach":
        return tuning * speeds.scan * 1.5 + 10  # and the classifier's reading of the candidates
    if step == "eval":
        return (reference + sum(_eval_size(s) for s in cfg.eval)) * speeds.scan
    return 2 * reference * speeds.scan if cfg.promote else 0.0  # both models on the reference set


def _reference_size() -> int:
    """Scans of the registered reference set (0 when none is, or it has LUNA16 series, counted when built)."""
    from lungnode.training.eval_sets import add_arguments

    reference = registry().reference_set
    if reference is None:
        return 0
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    args = parser.parse_args(reference.arguments)
    if args.phantoms:
        return sum(last - first + 1 for first, last in args.phantoms)
    return _section_size(args.datalist, args.section) if args.datalist else 0


def _section_size(datalist: Path, section: str) -> int:
    return len(json.loads(Path(datalist).read_text()).get(section, [])) if Path(datalist).is_file() else 0


def _eval_size(s) -> int:
    return s.phantoms[1] - s.phantoms[0] + 1 if s.phantoms else _section_size(s.datalist, s.section)


def _rescorer_iterations(cfg: PipelineConfig) -> int:
    return cfg.second_stage.iterations or int(yaml.safe_load(Path(cfg.second_stage.config).read_text())["iterations"])


def _fit_iterations(cfg: PipelineConfig) -> int:
    from lungnode.training.fit import load_config as load_fit_config

    return load_fit_config(cfg.fit.config).iterations


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def changed_sections(old: dict, new: dict) -> list[str]:
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def first_affected(sections: list[str]) -> str:
    return next(s for s in STEPS if set(STEP_SECTIONS[s]) & set(sections))


class Pipeline:
    """The state of one run folder and the loop over its steps."""

    def __init__(self, config_path: Path, cfg: PipelineConfig, restart_from: str | None, resume: bool) -> None:
        self.cfg, self.config_path = cfg, config_path
        self.folder = cfg.folder
        self.state_path = self.folder / "pipeline.json"
        if self.state_path.is_file():
            self.state = PipelineState.model_validate_json(self.state_path.read_text())
            self._check_config(restart_from)
        elif resume:
            raise StepError(f"nothing to resume: {self.state_path} does not exist (run without --resume to begin)")
        else:
            self.state = self._new_state()
        if restart_from is not None:
            self._reset_from(restart_from)
        self.run = Run(cfg, config_path, self.state.base_model,
                       {s: r.outputs for s, r in self.state.steps.items() if r.complete()})

    def _new_state(self) -> PipelineState:
        base = default_model_name() if self.cfg.base_model == "default" else self.cfg.base_model
        load_model(base)  # a missing or altered model stops here, not hours later
        return PipelineState(config_digest=self.cfg.digest(), config=self.cfg.model_dump(mode="json"), base_model=base,
                             cpu=cpu_description(), steps={s: StepRecord() for s in STEPS})

    def _check_config(self, restart_from: str | None) -> None:
        if self.state.config_digest == self.cfg.digest():
            return
        sections = changed_sections(self.state.config, self.cfg.model_dump(mode="json"))
        first = first_affected(sections)
        if restart_from is None or STEPS_ORDER.index(restart_from) > STEPS_ORDER.index(first):
            raise StepError(f"{self.config_path} changed since {self.folder} began ({', '.join(sections)}), which "
                            f"affects step {first}: run again with --restart-from {first} to redo it and the steps "
                            f"after it, or give the run another name")
        if "base_model" in sections:
            self.state.base_model = self._new_state().base_model
        self.state.config_digest, self.state.config = self.cfg.digest(), self.cfg.model_dump(mode="json")

    def _reset_from(self, step: str) -> None:
        for s in STEPS_ORDER[STEPS_ORDER.index(step):]:
            self.state.steps[s] = StepRecord()
            if FOLDERS[s]:
                for path in (self.folder / FOLDERS[s], self.folder / f"{FOLDERS[s]}.tmp"):
                    shutil.rmtree(path, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.state.save(self.state_path)

    def todo(self) -> list[str]:
        """The steps from the first incomplete one on (one whose output is gone runs again, and all after it)."""
        first = next((s for s in STEPS_ORDER if not self.state.steps[s].complete()), None)
        return [] if first is None else STEPS_ORDER[STEPS_ORDER.index(first):]

    def execute(self) -> None:
        todo = self.todo()
        if not todo:
            print(f"{self.folder}: every step is complete; nothing to do")
            print(self.summary())
            return
        for s in todo:  # outputs of steps about to run again are not inputs any more
            self.run.outputs.pop(s, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.state.save(self.state_path)
        print(f"lungnode train pipeline: {self.cfg.name} in {self.folder}, base model {self.state.base_model}")
        self.state.cpu = cpu_description()  # this run's machine: the estimate is for it
        print(f"CPU: {self.state.cpu}")
        speeds = Speeds.measure(self.cfg, self.state.base_model)
        estimates = {s: expected_seconds(s, self.run, speeds) for s in todo}
        print("estimated: " + ", ".join(f"{s} {duration(estimates[s])}" for s in todo)
              + f"; total {duration(sum(estimates.values()))} on this machine")

        def measured(what: str, seconds: float) -> None:
            speeds.scan = seconds
            for s in todo[todo.index(step):]:
                estimates[s] = expected_seconds(s, self.run, speeds)
            left = sum(estimates[s] for s in todo[todo.index(step):])
            bar.total = max(1.0, done + left)
            bar.refresh()
            tqdm.write(f"the first scan was mined in {seconds:.1f} s: about {duration(left)} left")

        self.run.measured = measured
        done = 0.0
        bar = tqdm(total=max(1.0, sum(estimates.values())), desc="pipeline", unit="s", position=0, dynamic_ncols=True,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s expected {postfix}")
        try:
            for step in todo:
                bar.set_postfix_str(f"[{step}]")
                record = self._run_step(step, estimates[step])
                done += record.seconds or 0.0
                self._learn(step, record, speeds)
                for s in todo[todo.index(step) + 1:]:
                    estimates[s] = expected_seconds(s, self.run, speeds)
                left = sum(estimates[s] for s in todo[todo.index(step) + 1:])
                bar.total, bar.n = max(1.0, done + left), done
                bar.refresh()
                tqdm.write(f"{step}: {record.status} in {duration(record.seconds or 0)}"
                           + (f" ({record.note})" if record.note else "") + (f"; about {duration(left)} left" if left else ""))
        finally:
            bar.close()
        print(self.summary())

    def _run_step(self, step: str, estimate: float) -> StepRecord:
        name = FOLDERS[step]
        work = self.folder / f"{name}.tmp" if name else self.folder
        if name and not (step in RESUMABLE and self.state.steps[step].status in ("running", "failed")):
            shutil.rmtree(work, ignore_errors=True)  # a half-made output is made again from scratch
        work.mkdir(parents=True, exist_ok=True)
        record = StepRecord(status="running", started=_now(), estimate_s=round(estimate, 1))
        self.state.steps[step] = record
        self.state.save(self.state_path)
        started = time.monotonic()
        try:
            outcome = STEPS[step](self.run, work)
        except BaseException as e:
            record.status, record.note = "failed", f"{type(e).__name__}: {e}"
            record.ended, record.seconds = _now(), round(time.monotonic() - started, 1)
            self.state.save(self.state_path)
            raise
        outputs = outcome.outputs
        if name:
            final = self.folder / name
            shutil.rmtree(final, ignore_errors=True)
            work.rename(final)
            outputs = {k: _moved(v, work, final) for k, v in outputs.items()}
        record.status = "skipped" if outcome.skipped else "done"
        record.outputs, record.note = outputs, outcome.note
        record.ended, record.seconds = _now(), round(time.monotonic() - started, 1)
        self.state.save(self.state_path)
        self.run.outputs[step] = outputs
        return record

    def _learn(self, step: str, record: StepRecord, speeds: Speeds) -> None:
        """A scan's detector pass as the whole mining took it, for the tuning and evaluation still to come."""
        if step == "candidates" and record.status == "done" and record.seconds:
            speeds.scan = record.seconds / 1.2 / max(1, training_items(self.run.training_datalists()))

    def summary(self) -> str:
        rows = [(s, r.status, f"{r.seconds:.0f}" if r.seconds is not None else "-",
                 r.note if r.status in ("skipped", "failed") or not r.outputs else
                 ", ".join(p for v in r.outputs.values() for p in ([v] if isinstance(v, str) else v)))
                for s, r in self.state.steps.items()]
        total = sum(r.seconds or 0 for r in self.state.steps.values())
        lines = [f"{'step':<14}{'status':<9}{'seconds':>8}  output", *(f"{s:<14}{st:<9}{sec:>8}  {out}" for s, st, sec, out in rows),
                 f"{'total':<23}{total:>8.0f}  ({duration(total)}); record: {self.state_path}"]
        return "\n".join(lines)



def _moved(value: str | list[str], work: Path, final: Path) -> str | list[str]:
    """An output path inside the step's temporary folder, as it is after the rename."""
    def one(p: str) -> str:
        path = Path(p)
        return str(final / path.relative_to(work)) if path.is_relative_to(work) else p

    return one(value) if isinstance(value, str) else [one(p) for p in value]


def run_pipeline(config_path: Path, resume: bool = False, restart_from: str | None = None) -> int:
    try:
        cfg = load_config(config_path)
        Pipeline(Path(config_path), cfg, restart_from, resume).execute()
    except (StepError, ValueError, FileNotFoundError) as e:
        print(f"lungnode train pipeline: {e}", file=sys.stderr)
        print("completed steps are kept: fix that and run the same command again", file=sys.stderr)
        return 2
    return 0


def _run(args: argparse.Namespace) -> int:
    return run_pipeline(args.config, args.resume, args.restart_from)


def add_command(tsub: argparse._SubParsersAction) -> None:
    p = tsub.add_parser("pipeline", help="the site's retraining end to end (import, synth, fit, candidates, second stage, "
                                         "attach, eval, promote), resumable")
    p.add_argument("--config", type=Path, required=True, help="configs/site_pipeline.yaml")
    p.add_argument("--resume", action="store_true",
                   help="continue after the last completed step (running the same command again does the same; "
                        "--resume refuses when there is nothing to continue)")
    p.add_argument("--restart-from", choices=list(STEPS), metavar="STEP",
                   help=f"do this step and the ones after it again ({', '.join(STEPS)}), e.g. after changing the config")
    p.set_defaults(func=_run)

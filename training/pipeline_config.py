"""The site's retraining in one file (`lungnode train pipeline --config configs/site_pipeline.yaml`):
which data, which steps and their settings. Relative paths are taken from the folder it is run in, as
the other `train` commands take theirs."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error, not a silent default


class FeedbackSource(_Section):
    """Completed reviews of the node's radiologists (`train import feedback`)."""

    data_dir: Path  # the node's data folder (LUNGNODE_DATA_DIR)
    val_fraction: float = 0.0  # share of patients put in the validation section (e.g. to tune on)


class SynthSettings(_Section):
    """Simulated nodules inserted into the site's scans (their training sections; DICOM series)."""

    copies: int = 20  # 0: no inserted scans
    seed: int = 1
    format: Literal["nifti", "dicom"] = "nifti"
    nodule_shapes: Path | None = None  # `train shapes` library: real outlines (its training split)
    real_shape_fraction: float = 0.5


class FitSettings(_Section):
    """The detector's fine-tune from the base model's weights: hours on 2 cores, so off by default."""

    enabled: bool = False
    config: Path = Path("configs/train_site.yaml")
    iterations: int | None = None  # None: the config's


class CandidateSettings(_Section):
    """Mining of the (new) first stage's candidates (`train candidates`)."""

    patch_size: tuple[int, int, int] | None = None  # None: the base model's second stage's, else the command's
    margin: int = 3
    floor: float = 0.05
    per_scan: int = 40


class SecondStageSettings(_Section):
    """The classifier's fine-tune from the base model's second stage, whatever the config's init_weights says
    (`train fit-rescorer`; from scratch when the base model has none)."""

    config: Path = Path("configs/rescorer_site.yaml")
    iterations: int | None = None  # None: the config's


class OperatingPoint(_Section):
    """Where the fusion weight and the score threshold are chosen: real scans the classifier never
    learned from when ``tune_datalist`` names them, else the tuning phantoms ``eval_seeds``."""

    max_fp_per_scan: float = 1.0
    tune_datalist: Path | None = None
    tune_section: str = "validation"
    eval_seeds: tuple[int, int] = (900040, 900049)


class EvalSet(_Section):
    """A held-out set the new model is evaluated on: phantom seeds or a datalist section."""

    name: str
    phantoms: tuple[int, int] | None = None
    datalist: Path | None = None
    section: str = "validation"

    @model_validator(mode="after")
    def _one_source(self) -> "EvalSet":
        if (self.phantoms is None) == (self.datalist is None):
            raise ValueError(f"eval set {self.name!r}: give either phantoms: [FIRST, LAST] or datalist: PATH")
        return self


class PipelineConfig(_Section):
    """configs/site_pipeline.yaml."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # the run folder and the new model's name
    version: str = "1.0.0"  # the new model's version
    out: Path | None = None  # default runs/<name>
    base_model: str = "default"  # a model name or card path; default: the registry's default
    datalists: list[Path] = []  # the site's datalists (`train import`); their training sections are learned
    feedback: FeedbackSource | None = None
    synth: SynthSettings = SynthSettings()
    fit: FitSettings = FitSettings()
    candidates: CandidateSettings = CandidateSettings()
    second_stage: SecondStageSettings = SecondStageSettings()
    operating_point: OperatingPoint = OperatingPoint()
    eval: list[EvalSet] = []  # besides the registered reference set
    promote: bool = False  # promote on the reference set at the end (else the command is printed)

    @property
    def folder(self) -> Path:
        return self.out or Path("runs") / self.name

    def digest(self) -> str:
        """sha256 of the settings (not of the file's comments or layout)."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


# The config sections each step's work depends on: a change there means that step runs again.
STEP_SECTIONS = {
    "import": ("datalists", "feedback", "base_model", "out", "name"),
    "synth": ("synth",),
    "fit": ("fit",),
    "candidates": ("candidates",),
    "second-stage": ("second_stage",),
    "attach": ("operating_point", "version"),
    "eval": ("eval",),
    "promote": ("promote",),
}


def load_config(path: Path) -> PipelineConfig:
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a YAML mapping: see configs/site_pipeline.yaml")
    return PipelineConfig.model_validate(data)

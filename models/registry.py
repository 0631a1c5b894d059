"""Shipped detection models: find a model card, check its ONNX file's sha256, hand back a ModelSpec.

A model is ``models/<name>.json`` (the card), ``models/<name>.onnx`` and optionally
``models/<name>.pt`` (the same weights as a PyTorch state dict, for the torch comparison backend),
a second stage's files and an 8-bit copy of the network (``models/<name>-int8.onnx``).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from lungnode.inference.types import ModelInfo
from lungnode.models.registry_file import REGISTRY_FILE, Registry  # noqa: F401 (REGISTRY_FILE: the folder's file name)

MODELS_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = "lungnode-retina-cpu-v1"  # the shipped model, until a site promotes another


class ModelNotFoundError(FileNotFoundError):
    """The requested model card or one of its files does not exist."""


class ModelIntegrityError(RuntimeError):
    """A model file's sha256 differs from the one recorded in its card."""


class TrainingInfo(BaseModel):
    command: str
    config: dict
    iterations: int
    seconds: float
    device: str


class DataInfo(BaseModel):
    description: str
    train_phantoms: int
    train_seeds: list[int]  # [first, last] inclusive
    eval_phantoms: int
    eval_seeds: list[int]  # [first, last] inclusive
    # Real scans seen in training (imported, or backgrounds for inserted nodules): their scores are
    # training-set scores, never held-out ones.
    train_scans: list[str] = []
    # Real scans the operating point was chosen on (attach-rescorer --tune-datalist): not held out either.
    tune_scans: list[str] = []


class InferenceSettings(BaseModel):
    spacing_mm: tuple[float, float, float]  # model voxel size (i, j, k)
    window_hu: tuple[float, float]  # clipped to this range, then scaled to 0..1
    patch_size: tuple[int, int, int]  # training patch, model voxels (i, j, k)
    roi_size: tuple[int, int, int]  # sliding window, model voxels (i, j, k)
    overlap: float
    # Windows per network call: PyTorch runs 3D convolutions through oneDNN only for batches > 1 (a single
    # window takes its slow reference path), and ONNX Runtime gains a little too; same results either way.
    sw_batch_size: int = 2
    # Images (the lung crop at model spacing) of at most this many voxels go through the network whole,
    # in one call (sw_batch_size mirrored views a call), not in sliding windows; 0 = always windows.
    whole_image_max_voxels: int = 0
    score_threshold: float
    nms_threshold: float
    topk_candidates_per_level: int
    detections_per_image: int
    body_threshold_hu: float
    body_margin_mm: float
    # Lung mask: crop the input to the lungs (plus a margin) and drop detections outside them.
    lung_mask: bool = True
    lung_margin_mm: float = 15.0
    lung_tolerance_mm: float = 5.0
    # ... and findings with no aerated lung within their radius + this (tissue under the lung base); None = off
    aerated_lung_tolerance_mm: float | None = 2.0
    # Test-time augmentation: the image axes to mirror, one tuple per view (() = as given); empty = one
    # view. inference/tta.py fuses the views.
    tta_flips: tuple[tuple[int, ...], ...] = ()


class SecondStage(BaseModel):
    """False-positive reduction (inference/rescoring.py): a classifier rescoring each candidate from
    a patch around it; the reported score is detector^(1 - weight) * classifier^weight."""

    onnx_file: str
    onnx_sha256: str
    state_dict_file: str | None = None
    state_dict_sha256: str | None = None
    channels: list[int]  # lungnode.models.candidate_classifier.CandidateClassifier widths
    parameters: int
    patch_size: tuple[int, int, int]  # model voxels (i, j, k), centred on the candidate
    weight: float
    min_detector_score: float  # candidates the detector scores below this are not rescored
    views: int = 1  # mirrored/turned copies of each patch whose logits are averaged (inference/rescoring.py)
    recentre_mm: float = 0.0  # > 0: the classifier has a centre head; candidates move at most this far onto it
    data: str  # the scans its training candidates came from
    training: TrainingInfo
    metrics: dict[str, float | int | str] = {}


class Int8Network(BaseModel):
    """An 8-bit copy of the detector network (`lungnode train quantize`): static QDQ quantisation of
    its convolutions, calibrated on training phantoms and checked on tuning phantoms to find what the
    float32 network finds. OpenVINO runs it when the site asks (onnx_precision: int8)."""

    onnx_file: str
    onnx_sha256: str
    calibration: str  # the images its activation ranges were measured on
    check: dict[str, float | int | str]  # float32 against int8 on the check phantoms


class ModelCard(BaseModel):
    """The JSON model card written by `lungnode train export`."""

    name: str
    version: str
    created: str
    description: str
    onnx_file: str
    onnx_sha256: str
    onnx_opset: int
    state_dict_file: str | None = None
    state_dict_sha256: str | None = None
    parameters: int
    network: dict  # lungnode.models.retinanet.NetConfig.to_dict()
    anchor_shapes_voxels: list[list[float]]  # per pyramid level, per anchor (i, j, k)
    inference: InferenceSettings
    training: TrainingInfo
    data: DataInfo
    metrics: dict[str, float | int | str]
    export_max_abs_diff: float
    second_stage: SecondStage | None = None
    int8: Int8Network | None = None


@dataclass(frozen=True)
class ModelSpec:
    """A verified model ready for the Detector."""

    info: ModelInfo
    onnx_path: Path
    card: ModelCard
    state_dict_path: Path | None = None
    second_stage_path: Path | None = None  # the classifier's ONNX file, when the card has one
    second_stage_state_dict_path: Path | None = None
    int8_onnx_path: Path | None = None  # the card's 8-bit network, when it has one


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_model_name(models_dir: Path = MODELS_DIR) -> str:
    """The model the node runs: the last promoted one, else the shipped one."""
    return Registry.load(models_dir, DEFAULT_MODEL).default


def load_installed(name: str, models_dir: Path = MODELS_DIR) -> ModelSpec:
    """A model by name from a registry folder (where `promote` installs it), else as ``load_model`` finds it."""
    card = Path(models_dir) / f"{name}.json"
    return load_model(str(card) if card.is_file() else name)


def _card_path(name_or_path: str) -> Path:
    if name_or_path == "default":
        name_or_path = default_model_name()
    p = Path(name_or_path)
    if p.suffix == ".json" or p.is_file():
        return p
    return MODELS_DIR / f"{name_or_path}.json"


def load_model(name_or_path: str = "default") -> ModelSpec:
    """Resolve a model name ("default", a name in models/, or a card path) and verify its files."""
    card_path = _card_path(name_or_path)
    if not card_path.is_file():
        known = sorted(p.stem for p in MODELS_DIR.glob("*.json"))
        raise ModelNotFoundError(
            f"model card {card_path} not found (model {name_or_path!r}); shipped models: {known or 'none'}"
        )
    card = ModelCard.model_validate_json(card_path.read_text())
    onnx_path = card_path.parent / card.onnx_file
    if not onnx_path.is_file():
        raise ModelNotFoundError(f"ONNX file {onnx_path} named by {card_path} is missing")
    digest = sha256_file(onnx_path)
    if digest != card.onnx_sha256:
        raise ModelIntegrityError(
            f"{onnx_path} has sha256 {digest}, but its card {card_path} says {card.onnx_sha256}"
        )
    stage = card.second_stage
    second_path = _verified(card_path, stage.onnx_file, stage.onnx_sha256) if stage else None
    if stage and second_path is None:
        raise ModelNotFoundError(f"second-stage ONNX file {card_path.parent / stage.onnx_file} named by {card_path} is missing")
    int8_path = _verified(card_path, card.int8.onnx_file, card.int8.onnx_sha256) if card.int8 else None
    if card.int8 and int8_path is None:
        raise ModelNotFoundError(f"8-bit ONNX file {card_path.parent / card.int8.onnx_file} named by {card_path} is missing")
    return ModelSpec(
        info=ModelInfo(name=card.name, version=card.version, sha256=card.onnx_sha256),
        onnx_path=onnx_path,
        card=card,
        state_dict_path=_verified(card_path, card.state_dict_file, card.state_dict_sha256),
        second_stage_path=second_path,
        second_stage_state_dict_path=_verified(card_path, stage.state_dict_file, stage.state_dict_sha256) if stage else None,
        int8_onnx_path=int8_path,
    )


def _verified(card_path: Path, name: str | None, sha256: str | None) -> Path | None:
    """The file the card names beside it, checked against its sha256; None when it names none or it
    is absent (the optional PyTorch copies)."""
    if not name:
        return None
    path = card_path.parent / name
    if not path.is_file():
        return None
    if sha256_file(path) != sha256:
        raise ModelIntegrityError(f"{path} does not match the sha256 in {card_path}")
    return path

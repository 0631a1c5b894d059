"""`lungnode models import-bundle`: a site's own copy of the MONAI zoo weights -> ONNX + model card.

lungnode does not ship the zoo weights; a site that has the bundle (e.g. a GPU site that wants
the larger network) converts its ``models/model.pt`` here. Every key and shape is checked before
export, the ONNX graph is compared with PyTorch on a random input of another size than traced,
and the card is written in the registry's format so ``load_model`` verifies the files.
The ONNX graph has the shipped model's interface (``image`` in; ``cls_<level>``, ``box_<level>`` out).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from lungnode.models import zoo_bundle
from lungnode.models.registry import DataInfo, ModelCard, TrainingInfo, sha256_file
from lungnode.training.export import MAX_ABS_DIFF, OPSET, export_onnx, max_abs_diff

DEFAULT_NAME = "monai-zoo-lung-nodule-ct-detection"
TRACE_SIZE = (32, 32, 16)  # small: the cost is per voxel (256-channel head convolutions); axes stay dynamic
CHECK_SIZE = (64, 48, 24)  # another size on every axis, divisible by SIZE_DIVISIBLE


@dataclass(frozen=True)
class ImportedModel:
    card: ModelCard
    card_path: Path
    onnx_path: Path
    state_dict_path: Path


def resolve_weights(path: Path) -> tuple[Path, str]:
    """(weights file, bundle version): ``path`` is ``model.pt`` itself or the bundle folder."""
    path = Path(path)
    if path.is_dir():
        bundle_dir, weights = path, path / "models" / "model.pt"
    else:
        bundle_dir, weights = path.parent.parent, path
    if not weights.is_file():
        raise FileNotFoundError(f"no weights at {weights}: give the bundle's models/model.pt or the bundle folder")
    metadata = bundle_dir / "configs" / "metadata.json"
    version = json.loads(metadata.read_text()).get("version", "unknown") if metadata.is_file() else "unknown"
    return weights, str(version)


def import_bundle(path: Path, out_dir: Path, name: str = DEFAULT_NAME) -> ImportedModel:
    """Check and load the weights, write ``NAME.onnx``, ``NAME.pt`` and ``NAME.json`` into ``out_dir``."""
    weights, version = resolve_weights(path)
    net = zoo_bundle.load_zoo_network(weights)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path, pt_path, card_path = (out_dir / f"{name}{ext}" for ext in (".onnx", ".pt", ".json"))
    export_onnx(net, onnx_path, TRACE_SIZE, levels=len(zoo_bundle.FEATURE_MAP_SCALES))
    diff = max_abs_diff(net, onnx_path, CHECK_SIZE)
    if diff >= MAX_ABS_DIFF:
        raise RuntimeError(f"exported ONNX differs from PyTorch by {diff} on a {CHECK_SIZE} input (limit {MAX_ABS_DIFF})")
    torch.save(net.state_dict(), pt_path)
    card = ModelCard(
        name=name,
        version=version,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        description=f"MONAI model-zoo {zoo_bundle.BUNDLE_NAME} RetinaNet (3D ResNet-50 FPN), imported from a "
        "site's copy of the bundle weights; input axes are the bundle's RAS-oriented (x, y, z)",
        onnx_file=onnx_path.name,
        onnx_sha256=sha256_file(onnx_path),
        onnx_opset=OPSET,
        state_dict_file=pt_path.name,
        state_dict_sha256=sha256_file(pt_path),
        parameters=sum(p.numel() for p in net.parameters()),
        network=zoo_bundle.network_description(),
        anchor_shapes_voxels=zoo_bundle.anchor_shapes_voxels(),
        inference=zoo_bundle.INFERENCE,
        training=TrainingInfo(
            command=f"lungnode models import-bundle {path}",
            config={"weights_file": str(weights), "weights_sha256": sha256_file(weights), "bundle_version": version},
            iterations=0,
            seconds=0.0,
            device="not trained by lungnode (MONAI model zoo)",
        ),
        data=DataInfo(
            description="trained by MONAI on LUNA16 (see the bundle's README); no lungnode training data",
            train_phantoms=0,
            train_seeds=[],
            eval_phantoms=0,
            eval_seeds=[],
        ),
        metrics={},
        export_max_abs_diff=diff,
    )
    card_path.write_text(card.model_dump_json(indent=2))
    return ImportedModel(card=card, card_path=card_path, onnx_path=onnx_path, state_dict_path=pt_path)


def run(args: argparse.Namespace) -> int:
    """`lungnode models import-bundle PATH --out DIR [--name NAME]` (parser in lungnode.models.cli)."""
    try:
        model = import_bundle(args.path, args.out, args.name or DEFAULT_NAME)
    except (FileNotFoundError, zoo_bundle.ZooWeightsError) as e:
        print(f"lungnode models import-bundle: {e}", file=sys.stderr)
        return 2
    card = model.card
    print(
        f"{card.name} {card.version}: {card.parameters:,} parameters; wrote {model.onnx_path} "
        f"({model.onnx_path.stat().st_size / 1e6:.1f} MB, ONNX vs PyTorch max abs diff "
        f"{card.export_max_abs_diff:.1e}), {model.state_dict_path}, {model.card_path}"
    )
    return 0

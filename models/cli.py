"""`lungnode models ...`: the models in the registry folder (`list`), going back to an earlier default
(`rollback`), and importing a site's MONAI zoo bundle (`import-bundle`).

Nothing here loads PyTorch until `import-bundle` runs: listing and rolling back stay fast.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from lungnode.models.registry import (
    DEFAULT_MODEL, MODELS_DIR, ModelCard, ModelIntegrityError, ModelNotFoundError, load_installed,
)
from lungnode.models.registry_file import (
    REGISTRY_FILE, OperatingPointRecord, PromotionRecord, ReferenceRecord, Registry, RollbackRecord, now,
)

DESCRIPTION_WIDTH = 60


def _cards(models_dir: Path) -> list[ModelCard]:
    cards = []
    for path in sorted(models_dir.glob("*.json")):
        if path.name == REGISTRY_FILE:
            continue
        try:
            cards.append(ModelCard.model_validate_json(path.read_text()))
        except ValidationError:
            print(f"skipped {path}: not a model card", file=sys.stderr)
    return cards


def _reference_cpm(registry: Registry, name: str) -> float | None:
    """The model's CPM in the latest promotion decided on the current reference set."""
    for entry in reversed(registry.history):
        if isinstance(entry, PromotionRecord) and registry.comparable(entry):
            if entry.candidate == name:
                return entry.candidate_cpm
            if entry.current == name:
                return entry.current_cpm
    return None


def _one_line(text: str, width: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 3] + "..."


def model_table(registry: Registry, cards: list[ModelCard]) -> str:
    rows = [("", "name", "version", "created", "2nd stage", "threshold", "ref. CPM", "description")]
    for card in cards:
        stage = card.second_stage
        cpm = _reference_cpm(registry, card.name)
        rows.append(("*" if card.name == registry.default else "", card.name, card.version, card.created[:10],
                     f"yes ({stage.views} view{'s' if stage.views > 1 else ''})" if stage else "no", f"{card.inference.score_threshold:g}",
                     "-" if cpm is None else f"{cpm:.4f}", _one_line(card.description, DESCRIPTION_WIDTH)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


def history_lines(registry: Registry) -> list[str]:
    reference = registry.reference_set
    lines = []
    for e in registry.history:
        if isinstance(e, PromotionRecord):
            verdict = "promoted" if e.accepted else "refused"
            ci = f", difference CI {e.difference_ci[0]:+.4f} to {e.difference_ci[1]:+.4f}" if e.difference_ci else ""
            where = "reference set" if registry.comparable(e) else "not comparable (other set)"
            lines.append(f"{e.at}  {verdict:<9}{e.candidate} {e.candidate_cpm:.4f} vs {e.current} {e.current_cpm:.4f}"
                         f"{ci}  [{where}: {e.eval_set}]")
        elif isinstance(e, ReferenceRecord):
            now_or_before = "current" if reference and e.digest == reference.digest else "earlier"
            why = f" ({e.reason})" if e.reason else ""
            lines.append(f"{e.at}  reference {now_or_before} set {e.digest[:12]}: {e.description}{why}")
        elif isinstance(e, OperatingPointRecord):
            lines.append(f"{e.at}  operating point {e.candidate} (threshold {e.threshold:g}) for {e.current} "
                         f"({e.current_threshold:g}), chosen on {len(e.tune_scans)} real series")
        elif isinstance(e, RollbackRecord):
            lines.append(f"{e.at}  rollback {e.previous} -> {e.default}: {e.reason}")
    return lines


def _list(args: argparse.Namespace) -> int:
    registry = Registry.load(args.models_dir, DEFAULT_MODEL)
    print(model_table(registry, _cards(args.models_dir)))
    print("\n* the default (the model the node runs); ref. CPM: on the current reference set")
    reference = registry.reference_set
    print("\nreference set: " + (f"{reference.description} (digest {reference.digest[:12]}, since "
                                  f"{reference.registered_at})" if reference else
                                  "none registered (`lungnode train reference ...`)"))
    print("\nhistory:\n" + "\n".join(history_lines(registry) or ["(empty)"]))
    return 0


def _rollback(args: argparse.Namespace) -> int:
    registry = Registry.load(args.models_dir, DEFAULT_MODEL)
    target = args.to or registry.previous_default()
    if target is None:
        print(f"lungnode models rollback: the history names no model before {registry.default}; "
              "name one with --to NAME (`lungnode models list` shows the installed ones)", file=sys.stderr)
        return 2
    if target == registry.default:
        print(f"lungnode models rollback: {target} is the default already", file=sys.stderr)
        return 2
    try:
        load_installed(target, args.models_dir)  # its files present and matching their card
    except (ModelNotFoundError, ModelIntegrityError) as e:
        print(f"lungnode models rollback: {e}", file=sys.stderr)
        return 2
    registry.history.append(RollbackRecord(previous=registry.default, default=target, reason=args.reason, at=now()))
    print(f"default model: {registry.default} -> {target} ({args.reason})")
    registry.default = target
    registry.save(args.models_dir)
    return 0


def _import_bundle(args: argparse.Namespace) -> int:
    from lungnode.models.bundle_import import run

    return run(args)


def register(sub: argparse._SubParsersAction) -> None:
    """The top-level `models` command and its subcommands."""
    models = sub.add_parser("models", help="list the node's detection models, roll back the default, add models")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")

    p = msub.add_parser("list", help="the models in the registry folder, the reference set and the history")
    p.add_argument("--models-dir", type=Path, default=MODELS_DIR, help=argparse.SUPPRESS)
    p.set_defaults(func=_list)

    p = msub.add_parser("rollback", help="make the previous default (or --to NAME) the default again")
    p.add_argument("--to", metavar="NAME", help="an installed model to make the default (default: the previous one)")
    p.add_argument("--reason", required=True, help="why (kept in the registry's history)")
    p.add_argument("--models-dir", type=Path, default=MODELS_DIR, help=argparse.SUPPRESS)
    p.set_defaults(func=_rollback)

    p = msub.add_parser("import-bundle",
                        help="convert a site's MONAI zoo lung_nodule_ct_detection weights to ONNX + model card")
    p.add_argument("path", type=Path, help="the bundle's models/model.pt, or the bundle folder")
    p.add_argument("--out", type=Path, required=True, help="folder for NAME.onnx, NAME.pt and NAME.json")
    p.add_argument("--name", help="model name (default monai-zoo-lung-nodule-ct-detection)")
    p.set_defaults(func=_import_bundle)

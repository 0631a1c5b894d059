"""The scans an evaluation runs on, each with its reference nodules and don't-care findings:
held-out phantoms (by seed), a datalist from `lungnode train import`, or DICOM series scored against
the LUNA16 lists. Scans load one at a time, so an evaluation holds one volume in memory."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom

from lungnode.inference.types import Volume
from lungnode.inference.volume import load_any
from lungnode.training.froc import Annotation, load_luna16_csv
from lungnode.training.importers.datalist import image_path
from lungnode.training.synth import GENERATOR_VERSION, add_shape_arguments


@dataclass(frozen=True)
class LoadedScan:
    volume: Volume
    annotations: list[Annotation]
    excluded: list[Annotation]
    # findings known not to be nodules (a radiologist's rejected marks, `negative_box`): the second stage's
    # mining adds a patch at each; a FROC counts them as false positives like any other non-nodule
    negatives: tuple[Annotation, ...] = ()


@dataclass(frozen=True)
class EvalScan:
    series_uid: str
    name: str
    load: Callable[[], LoadedScan]
    source: Path | None = None  # the image file or series folder it loads (None: a phantom, made from its seed)


def phantom_scans(first_seed: int, last_seed: int, settings=None) -> list[EvalScan]:
    """Phantoms made like the training ones, from seeds the training never saw; ``settings`` (a
    training.data.PhantomSettings) changes how they are made, the default being the evaluation sets'."""
    from lungnode.training.data import PhantomSettings, phantom_volume

    settings = settings or PhantomSettings()
    suffix = "-outlines" if settings.nodule_shapes else ""  # real outlines: another image for the same seed

    def load(seed: int) -> LoadedScan:
        volume, ph = phantom_volume(seed, settings)
        uid = f"phantom-{seed}{suffix}"
        return LoadedScan(volume, [Annotation(uid, n.center_mm, n.diameter_mm) for n in ph.nodules], [])

    return [EvalScan(f"phantom-{s}{suffix}", f"phantom-{s}{suffix}", lambda s=s: load(s))
            for s in range(first_seed, last_seed + 1)]


def datalist_scans(path: Path, section: str) -> list[EvalScan]:
    """Items of one section of a MONAI-style datalist (boxes cccwhd in world mm; `ignore_box` = don't care)."""
    data = json.loads(Path(path).read_text())
    if section not in data:
        raise ValueError(f"{path} has no {section!r} section (it has {', '.join(data)})")
    scans = []
    for n, item in enumerate(data[section]):
        image = image_path(path, item["image"])
        uid = item.get("series_uid") or f"{image.name}-{n}"
        diameters = item.get("diameter_mm")
        nodules = [Annotation(uid, tuple(b[:3]), float(diameters[i]) if diameters else float(max(b[3:6])))
                   for i, b in enumerate(item.get("box", []))]
        ignore = [Annotation(uid, tuple(b[:3]), float(max(b[3:6]))) for b in item.get("ignore_box", [])]
        negatives = tuple(Annotation(uid, tuple(b[:3]), float(max(b[3:6]))) for b in item.get("negative_box", []))
        scans.append(EvalScan(uid, image.name, lambda image=image, a=nodules, e=ignore, r=negatives:
                              LoadedScan(load_any(image), a, e, r), image))
    return scans


def luna16_scans(series_root: Path, annotations_csv: Path, excluded_csv: Path | None) -> list[EvalScan]:
    """Every DICOM series under `series_root`, scored with the LUNA16 lists (a series absent from
    annotations.csv is a negative scan)."""
    annotations = load_luna16_csv(annotations_csv)
    excluded = load_luna16_csv(excluded_csv) if excluded_csv and Path(excluded_csv).is_file() else []
    folders: dict[str, Path] = {}
    for f in sorted(Path(series_root).rglob("*.dcm")):
        uid = str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)
        folders.setdefault(uid, f.parent)
    if not folders:
        raise ValueError(f"no DICOM series under {series_root}")
    scans = []
    for uid, folder in folders.items():
        mine = [a for a in annotations if a.series_uid == uid]
        ignore = [a for a in excluded if a.series_uid == uid]
        name = folder.parent.name if folder.parent != Path(series_root) else folder.name
        scans.append(EvalScan(uid, name, lambda folder=folder, a=mine, e=ignore: LoadedScan(load_any(folder), a, e),
                              folder))
    return scans


def add_arguments(p) -> None:
    """The command-line choice of evaluation set, shared by `eval` and `reference`."""
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--phantoms", nargs=2, type=int, metavar=("FIRST", "LAST"), action="append",
                      help="held-out phantom seeds; repeat to pool several ranges into one FROC (20 phantoms are few)")
    what.add_argument("--datalist", type=Path, help="datalist JSON from `lungnode train import`")
    what.add_argument("--luna16-series", type=Path, metavar="DIR", help="DICOM series scored with the LUNA16 lists")
    p.add_argument("--section", default="validation", help="datalist section (default: validation)")
    p.add_argument("--annotations", type=Path, help="LUNA16 annotations.csv (with --luna16-series)")
    p.add_argument("--excluded", type=Path, help="LUNA16 annotations_excluded.csv: don't-care findings")
    add_shape_arguments(p, default_split="eval")


def shape_settings(args):
    """The phantom settings that --nodule-shapes and its companions ask for (None: the generator's own shapes)."""
    if not getattr(args, "nodule_shapes", None):
        return None
    from lungnode.training.data import PhantomSettings

    return PhantomSettings(nodule_shapes=str(args.nodule_shapes), shape_split=args.shape_split,
                           real_shape_fraction=args.real_shape_fraction)


def shape_note(settings) -> str:
    """How a phantom set's nodules are drawn ('' for the generator's shapes), e.g. for the registry's history."""
    if settings is None or not settings.nodule_shapes:
        return ""
    return (f" with {settings.real_shape_fraction:.0%} real outlines "
            f"({settings.shape_split} split of {settings.nodule_shapes})")


def outline_note(settings) -> str:
    """How a tuning set's nodules were drawn, for a model's description ('' for the generator's shapes)."""
    note = shape_note(settings)
    return note and f"; operating point chosen on tuning phantoms{note}"


def from_arguments(args) -> tuple[list[EvalScan], str]:
    """The scans and a description of the set."""
    if args.phantoms:
        settings = shape_settings(args)
        scans = [scan for first, last in args.phantoms for scan in phantom_scans(first, last, settings)]
        if len({s.name for s in scans}) != len(scans):
            raise SystemExit("--phantoms ranges overlap: give each seed once")
        seeds = ", ".join(f"{first}-{last}" for first, last in args.phantoms)
        return scans, f"phantoms {seeds} (generator {GENERATOR_VERSION})" + shape_note(settings)
    if args.datalist:
        return datalist_scans(args.datalist, args.section), f"{args.datalist} [{args.section}]"
    if args.annotations is None:
        raise SystemExit("--luna16-series needs --annotations (LUNA16 annotations.csv)")
    return luna16_scans(args.luna16_series, args.annotations, args.excluded), str(args.luna16_series)

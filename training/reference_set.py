"""`lungnode train reference`: register THE evaluation set that `train promote` decides on.

The registry keeps the set's description, the arguments that rebuild it, the phantom generator's
version and a content digest: sha256 over the parts that define the scans (phantoms: the generator
version, the seeds and the nodule-shape library; a datalist or LUNA16 series: the JSON / CSV files and
every image file). Promotion recomputes the digest and refuses when the data no longer matches, so
two promotions on one digest were judged on the same scans.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from lungnode.models.registry import DEFAULT_MODEL, MODELS_DIR, sha256_file
from lungnode.models.registry_file import DigestPart, ReferenceRecord, ReferenceSet, Registry, now
from lungnode.training import eval_sets
from lungnode.training.eval_sets import EvalScan
from lungnode.training.synth import GENERATOR_VERSION

MISSING = "missing"  # a part's sha256 when its file is gone


class ReferenceSetError(RuntimeError):
    """No reference set is registered, or its data no longer matches its digest."""


def _text_part(name: str) -> DigestPart:
    """A part defined by its name alone (a generator version, a seed range)."""
    return DigestPart(name=name, sha256=hashlib.sha256(name.encode()).hexdigest())


def _mhd_data_file(header: Path) -> Path | None:
    """The raw data file a MetaImage header names (None when its data is inline)."""
    for line in header.read_text(errors="replace").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ElementDataFile" and value.strip() != "LOCAL":
            return header.parent / value.strip()
    return None


def source_sha256(path: Path) -> str:
    """sha256 of an image: a file (a .mhd with its raw data), or a series folder's files (hidden ones
    left out, as the loader does) with their relative paths, in sorted order. Files are streamed."""
    path = Path(path)
    if not path.exists():
        return MISSING
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    else:
        data = _mhd_data_file(path) if path.suffix.lower() == ".mhd" else None
        files = [path] + ([data] if data else [])
    root = path if path.is_dir() else path.parent
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root).as_posix()}\0{sha256_file(f) if f.is_file() else MISSING}\n".encode())
    return h.hexdigest()


def _file_part(label: str, path: Path) -> DigestPart:
    return DigestPart(name=f"{label} {path}", sha256=source_sha256(path))


def arguments_of(args: argparse.Namespace) -> list[str]:
    """The `train reference` arguments that rebuild the set ``args`` chose, paths made absolute."""
    if args.phantoms:
        out = [s for first, last in args.phantoms for s in ("--phantoms", str(first), str(last))]
        if args.nodule_shapes:
            out += ["--nodule-shapes", str(Path(args.nodule_shapes).resolve()), "--shape-split", args.shape_split,
                    "--real-shape-fraction", repr(args.real_shape_fraction)]
        return out
    if args.datalist:
        return ["--datalist", str(Path(args.datalist).resolve()), "--section", args.section]
    out = ["--luna16-series", str(Path(args.luna16_series).resolve())]
    out += ["--annotations", str(Path(args.annotations).resolve())] if args.annotations else []
    return out + (["--excluded", str(Path(args.excluded).resolve())] if args.excluded else [])


def parts_of(args: argparse.Namespace, scans: list[EvalScan]) -> list[DigestPart]:
    """What defines the scans, each with its sha256."""
    if args.phantoms:
        parts = [_text_part(f"phantom generator {GENERATOR_VERSION}")]
        parts += [_text_part(f"phantom seeds {first}-{last}") for first, last in args.phantoms]
        if args.nodule_shapes:
            parts += [_file_part("nodule-shape library", Path(args.nodule_shapes)),
                      _text_part(f"{args.shape_split} split, {args.real_shape_fraction!r} real outlines")]
        return parts
    if args.datalist:
        parts = [_file_part("datalist", Path(args.datalist)), _text_part(f"datalist section {args.section}")]
    else:
        parts = [_file_part("annotations", Path(args.annotations))]
        parts += [_file_part("excluded findings", Path(args.excluded))] if args.excluded else []
    sources = dict.fromkeys(s.source for s in scans if s.source is not None)
    return parts + [_file_part("image", source) for source in sources]


def digest_of(parts: list[DigestPart]) -> str:
    return hashlib.sha256("".join(f"{p.name}\0{p.sha256}\n" for p in parts).encode()).hexdigest()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lungnode train reference", add_help=False)
    eval_sets.add_arguments(p)
    return p


def build(args: argparse.Namespace) -> tuple[ReferenceSet, list[EvalScan]]:
    """The reference set ``args`` (eval_sets' arguments) describe, digest computed, and its scans."""
    args = _parser().parse_args(arguments_of(args))  # absolute paths: the same part names from any folder
    scans, description = eval_sets.from_arguments(args)
    parts = parts_of(args, scans)
    return ReferenceSet(description=description, arguments=arguments_of(args), generator_version=GENERATOR_VERSION,
                        digest=digest_of(parts), parts=parts, registered_at=now()), scans


def _changes(registered: list[DigestPart], current: list[DigestPart]) -> list[str]:
    now_by_name = {p.name: p.sha256 for p in current}
    then_by_name = {p.name: p.sha256 for p in registered}
    changes = [f"{name}: {'missing' if now_by_name[name] == MISSING else 'changed'}"
               for name, sha in then_by_name.items() if name in now_by_name and now_by_name[name] != sha]
    changes += [f"{name}: no longer part of it" for name in then_by_name if name not in now_by_name]
    return changes + [f"{name}: new" for name in now_by_name if name not in then_by_name]


def checked_scans(registry: Registry) -> tuple[ReferenceSet, list[EvalScan]]:
    """The registered reference set's scans, after checking that their data still has the registered digest."""
    reference = registry.reference_set
    if reference is None:
        raise ReferenceSetError(
            "no reference set is registered: register the fixed set promotions are decided on with "
            "`lungnode train reference --phantoms FIRST LAST` (or --datalist FILE / --luna16-series DIR "
            "--annotations CSV), then promote")
    rebuilt, scans = build(_parser().parse_args(reference.arguments))
    if rebuilt.digest != reference.digest:
        changes = "; ".join(_changes(reference.parts, rebuilt.parts))
        raise ReferenceSetError(
            f"the reference set ({reference.description}) no longer matches what was registered on "
            f"{reference.registered_at} (digest {reference.digest[:12]}, now {rebuilt.digest[:12]}): {changes}. "
            "Restore its data (or the phantom generator), or register the set as it is now with "
            "`lungnode train reference ... --replace --reason TEXT`; promotions decided before then are "
            "not comparable with later ones")
    return reference, scans


def register(registry: Registry, reference: ReferenceSet, replace: bool, reason: str | None) -> str:
    """Make ``reference`` the registry's reference set (recorded in its history); returns what was done.
    Raises ReferenceSetError for another set without ``replace`` and a reason."""
    old = registry.reference_set
    if old is not None and old.digest == reference.digest:
        return f"already registered: {old.description} (digest {old.digest[:12]}, since {old.registered_at})"
    if old is not None and not replace:
        raise ReferenceSetError(
            f"a reference set is registered already: {old.description} (digest {old.digest[:12]}, since "
            f"{old.registered_at}). Promotions are compared on it; to decide them on another set from now on, "
            "add --replace --reason TEXT (earlier promotions then show as not comparable)")
    if old is not None and not reason:
        raise ReferenceSetError("--replace needs --reason TEXT: the history says why the reference set changed")
    registry.reference_set = reference
    registry.history.append(ReferenceRecord(description=reference.description, digest=reference.digest,
                                            replaced_digest=old and old.digest, reason=reason, at=reference.registered_at))
    verb = "replaced" if old else "registered"
    return f"{verb} the reference set: {reference.description} (digest {reference.digest[:12]}, {len(reference.parts)} parts)"


def _run(args: argparse.Namespace) -> int:
    registry = Registry.load(args.models_dir, DEFAULT_MODEL)
    reference, scans = build(args)
    try:
        message = register(registry, reference, args.replace, args.reason)
    except ReferenceSetError as e:
        print(f"lungnode train reference: {e}", file=sys.stderr)
        return 2
    registry.save(args.models_dir)
    print(f"{message}; {len(scans)} scans")
    return 0


def add_command(tsub: argparse._SubParsersAction) -> None:
    p = tsub.add_parser("reference", help="register THE evaluation set that `train promote` decides on")
    eval_sets.add_arguments(p)
    p.add_argument("--replace", action="store_true", help="replace the registered reference set (needs --reason)")
    p.add_argument("--reason", help="why the reference set is registered or replaced (kept in the history)")
    p.add_argument("--models-dir", type=Path, default=MODELS_DIR, help=argparse.SUPPRESS)
    p.set_defaults(func=_run)

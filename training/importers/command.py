"""`lungnode train import SOURCE ...`: labelled scans from the hospital's sources -> datalist.json."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lungnode.training.importers.datalist import Datalist, ImportResult, Skipped, summary_table, write_datalist
from lungnode.training.importers.image_index import ImageIndex


def _luna16(args: argparse.Namespace) -> tuple[ImportResult, ImageIndex]:
    from lungnode.training.importers.luna16 import import_luna16

    index = ImageIndex.build(args.images, progress=not args.quiet)
    return import_luna16(args.annotations, index, excluded=args.excluded, series_list=args.series_list,
                         progress=not args.quiet), index


def _lidc(args: argparse.Namespace) -> tuple[ImportResult, ImageIndex]:
    from lungnode.training.importers.lidc_xml import import_lidc_xml

    index = ImageIndex.build(args.images, progress=not args.quiet)
    return import_lidc_xml(args.xml, index, min_readers=args.min_readers, progress=not args.quiet), index


def _dicom(args: argparse.Namespace) -> tuple[ImportResult, ImageIndex]:
    from lungnode.training.importers.dicom_objects import FINDING, import_dicom_objects

    folders = list(args.files or [])
    if args.orthanc_url:
        from lungnode.training.importers.orthanc_pull import pull

        if args.download_dir is None:
            raise ValueError("--orthanc-url needs --download-dir")

        got = pull(args.orthanc_url, args.download_dir, study_uids=args.study, progress=not args.quiet)
        print(f"Orthanc: {got.studies} studies with SEG/SR, {got.label_series} label series, "
              f"{got.image_series} image series, {got.files} files fetched into {args.download_dir}")
        folders.append(args.download_dir)
    index = ImageIndex.build(folders, progress=not args.quiet)
    return import_dicom_objects(index, finding=args.finding or FINDING, accept_device_sr=args.accept_device_sr,
                                progress=not args.quiet), index


def _csv(args: argparse.Namespace) -> tuple[ImportResult, ImageIndex]:
    from lungnode.training.importers.csv_series import import_csv

    index = ImageIndex.build(args.images, progress=not args.quiet)
    return import_csv(args.csv, index, voxel=args.voxel, progress=not args.quiet), index


def _feedback(args: argparse.Namespace) -> tuple[ImportResult, ImageIndex]:
    from lungnode.training.importers.feedback import import_feedback

    result = import_feedback(args.data_dir)
    return result, ImageIndex.build([s.image for s in result.scans], progress=not args.quiet)


def _run(args: argparse.Namespace) -> int:
    try:
        result, index = args.importer(args)
        scans = result.scans
        if args.deidentify:
            from lungnode.training.importers.deidentify import deidentify_scans, load_key

            out = Path(args.deidentify)
            key_file = Path(args.deid_key or out.parent / f"{out.name}.deid-key")
            scans, refused = deidentify_scans(scans, index, out, load_key(key_file), progress=not args.quiet)
            result.skipped += [Skipped(uid, reason) for uid, reason in refused]
            print(f"de-identified copies in {out}; key {key_file} (keep it private, out of the shared data)")
        if not scans:
            print(summary_table(Datalist(training=[]), result.skipped))
            print(f"nothing imported from {args.source}; {args.out} left as it was")
            return 1
        datalist = write_datalist(args.out, scans, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                                  seed=args.seed, append=args.append)
    except (ValueError, OSError) as exc:  # bad lists, missing folders, network errors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"imported {len(scans)} scans from {args.source}; the datalist now holds:")
    print(summary_table(datalist, result.skipped))
    print(f"datalist: {args.out}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="datalist JSON to write")
    p.add_argument("--append", action="store_true",
                   help="add to an existing datalist (re-imported series replace their old items)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="share of patients for validation")
    p.add_argument("--test-fraction", type=float, default=0.0, help="share of patients for test")
    p.add_argument("--seed", type=int, default=0, help="split seed (a patient keeps its split across imports)")
    p.add_argument("--deidentify", metavar="OUT_DIR", type=Path,
                   help="copy the images here de-identified (PS3.15 Basic Profile) and list the copies")
    p.add_argument("--deid-key", type=Path, metavar="FILE",
                   help="secret key of the UID/patient hashes (default OUT_DIR.deid-key, made when missing)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_command(tsub) -> None:
    """Register `lungnode train import` and its sources."""
    p = tsub.add_parser("import", help="build a datalist from LUNA16 lists, LIDC XML, DICOM SEG/SR, a CSV or radiologist feedback",
                        description=__doc__)
    sources = p.add_subparsers(dest="source", required=True, metavar="SOURCE")

    s = sources.add_parser("luna16", help="LUNA16 annotations.csv over .mhd files or DICOM series")
    s.add_argument("--annotations", required=True, type=Path, help="annotations.csv")
    s.add_argument("--excluded", type=Path, help="annotations_excluded.csv (don't-care boxes)")
    s.add_argument("--series-list", type=Path,
                   help="seriesuids.csv: the scans to import, negatives included (default: those in the lists)")
    s.add_argument("--images", required=True, type=Path, nargs="+", help="folders with <uid>.mhd or DICOM series")
    s.set_defaults(importer=_luna16)

    s = sources.add_parser("lidc-xml", help="LIDC-IDRI reader XML: consensus of >= --min-readers readers")
    s.add_argument("--xml", required=True, type=Path, nargs="+", help="XML files or folders of them")
    s.add_argument("--images", required=True, type=Path, nargs="+", help="folders with the DICOM series")
    s.add_argument("--min-readers", type=int, default=3, help="readers who must outline a nodule (LUNA16: 3)")
    s.set_defaults(importer=_lidc)

    s = sources.add_parser("dicom", help="DICOM SEG / TID 1500 SR from files or an Orthanc PACS")
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--files", type=Path, nargs="+", help="folders with SEG/SR objects and their CT series")
    where.add_argument("--orthanc-url", help="pull SEG/SR and referenced CT series from this Orthanc")
    s.add_argument("--study", nargs="+", help="StudyInstanceUIDs to pull (default: every study)")
    s.add_argument("--download-dir", type=Path, help="where pulled files go (required with --orthanc-url)")
    s.add_argument("--finding", default=None,
                   help="regex for nodule segments/findings (default: nodule|lesion|mass|tumour|neoplasm)")
    s.add_argument("--accept-device-sr", action="store_true",
                   help="also use SRs written by a device (AI results, lungnode's own), not only by readers")
    s.set_defaults(importer=_dicom)

    s = sources.add_parser("csv", help="CSV series_uid,x_mm,y_mm,z_mm,diameter_mm (or i,j,k with --voxel)")
    s.add_argument("--csv", required=True, type=Path)
    s.add_argument("--images", required=True, type=Path, nargs="+", help="folders with the DICOM series")
    s.add_argument("--voxel", action="store_true", help="coordinates are voxel indices i (column), j (row), k")
    s.set_defaults(importer=_csv)

    s = sources.add_parser("feedback", help="radiologists' reviews recorded on a lungnode node (completed only)")
    s.add_argument("--data-dir", required=True, type=Path, help="the node's data folder (LUNGNODE_DATA_DIR)")
    s.set_defaults(importer=_feedback)

    for s in sources.choices.values():
        _common(s)
        s.set_defaults(func=_run)

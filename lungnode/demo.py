"""`make demo`: a local Orthanc acting as the hospital PACS routes a CT study to lungnode, and the AI
results appear back in the same Orthanc study. Leaves both running for you to look, until Ctrl+C."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pydicom

from lungnode.peers import NodeProcess, OrthancServer, free_port, wait_for

REPO = Path(__file__).resolve().parent.parent


def sample_study(work: Path, use_lidc: bool) -> list[Path]:
    data = Path(os.environ.get("LUNGNODE_TEST_DATA", REPO.parent / "shared" / "data"))
    if use_lidc:
        files = sorted((data / "LIDC-IDRI-0001").glob("*/*.dcm"))
        if not files:
            sys.exit(f"LIDC-IDRI-0001 not found under {data}; set LUNGNODE_TEST_DATA or drop --lidc")
        return files
    from lungnode.training.synth import make_phantom, write_dicom_series

    phantom = make_phantom(2024, spacing=(0.703125, 0.703125, 2.5), field_of_view_mm=(360.0, 360.0, 250.0),
                           n_nodules=(3, 3), diameter_range_mm=(6.0, 18.0))
    print("Synthetic chest CT phantom with nodules at (LPS mm):")
    for n in phantom.nodules:
        print(f"  {n.kind:<12} {n.diameter_mm:5.1f} mm  ({n.center_mm[0]:7.1f}, {n.center_mm[1]:7.1f}, "
              f"{n.center_mm[2]:7.1f})  {n.attachment}")
    return write_dicom_series(phantom, work / "sample", patient_id="DEMO-0001", patient_name="DEMO^PHANTOM",
                              accession_number="DEMO1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lungnode demo", description=__doc__)
    parser.add_argument("--lidc", action="store_true", help="use the real LIDC-IDRI-0001 series instead of a phantom")
    parser.add_argument("--exit", action="store_true", help="stop the servers after printing the results")
    args = parser.parse_args(argv)
    work = REPO / "var" / "demo"
    node_port = free_port()
    orthanc = OrthancServer(work / f"orthanc-{int(time.time())}", modalities={"lungnode": ("LUNGNODE", "127.0.0.1",
                                                                                           node_port)}).start()
    node = NodeProcess(work / "node", stable_seconds=3, pacs=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
                       orthanc_url=orthanc.url)
    node.dicom_port = node_port
    node.env["LUNGNODE_DICOM_PORT"] = str(node_port)
    try:
        node.start()
        print(f"Orthanc (the PACS): {orthanc.url}   lungnode: DICOM LUNGNODE@127.0.0.1:{node_port}, web {node.url}")
        files = sample_study(work, args.lidc)
        (study_id,) = orthanc.upload(files)
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        print(f"Uploaded {len(files)} images to Orthanc; routing the study to lungnode (C-STORE) ...")
        started = time.monotonic()
        orthanc.send_to_modality("lungnode", study_id)

        def delivered() -> bool:
            s = node.study(study_uid)
            return bool(s and s["deliveries"] and s["deliveries"][-1]["state"] == "sent")

        wait_for(delivered, 900, "the results to reach Orthanc", interval=0.5)
        study = node.study(study_uid)
        print(f"\nResults back in Orthanc {time.monotonic() - started:.0f} s after routing "
              f"(processing {study['seconds']:.1f} s, model {study['model']}).")
        if study["reason"]:
            print(f"Not processed: {study['reason']}")
        print(f"\n{'finding':<8}{'x mm':>9}{'y mm':>9}{'z mm':>9}{'diameter':>10}{'score':>7}")
        for i, d in enumerate(study["result"]["detections"], start=1):
            x, y, z = d["center_mm"]
            print(f"N{i:<7}{x:>9.1f}{y:>9.1f}{z:>9.1f}{d['diameter_mm']:>8.1f}mm{d['score']:>7.2f}")
        print(f"\nlungnode's reading-room page: {node.url}/studies/{study_uid}  (Vietnamese: add ?lang=vi); "
              f"log in as admin, password {node.admin_password}")
        print("\nIn Orthanc's explorer, the study now holds the AI series (SR, key images, GSPS marks, SEG, KOS):")
        print(f"  {orthanc.url}/app/explorer.html#study?uuid={study_id}")
        for s in orthanc.series_of_study(study_uid):
            tags = s["MainDicomTags"]
            print(f"  series {tags.get('SeriesNumber', ''):>5} {tags.get('Modality', ''):<3} "
                  f"{tags.get('SeriesDescription', '')}: {len(s['Instances'])} instance(s)")
        if not args.exit:
            print("\nServers keep running; press Ctrl+C to stop.")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
        orthanc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make bench`: lungnode against its peers, measured in one run on this machine.

Receive: DCMTK `storescu` sends the 261-slice LIDC-IDRI-0002 series (real CT, 132 MiB) over loopback
to lungnode (every instance fsynced and indexed before Success), to Orthanc (Debian package, SQLite
index) and to DCMTK `storescp` (writes files, no fsync). Peers get TCP_NODELAY=1, their best setting.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from lungnode.peers import PEER_ENV, NodeProcess, OrthancServer, free_port, wait_for

REPO = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    return Path(os.environ.get("LUNGNODE_TEST_DATA", REPO.parent / "shared" / "data"))


def _send(files: list[Path], aec: str, port: int) -> float:
    started = time.perf_counter()
    done = subprocess.run(["storescu", "-aet", "BENCH", "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
                          env=PEER_ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"storescu to {aec} failed: {done.stderr[-500:]}")
    return seconds


def bench_receive(files: list[Path], runs: int, work: Path) -> dict[str, float]:
    times: dict[str, list[float]] = {"lungnode": [], "Orthanc": [], "storescp": []}

    node = NodeProcess(work / "lungnode", stable_seconds=36000).start()
    try:
        for _ in range(runs):
            times["lungnode"].append(_send(files, "LUNGNODE", node.dicom_port))
    finally:
        node.stop()

    with OrthancServer(work / "orthanc") as orthanc:
        for _ in range(runs):
            for sid in requests.get(f"{orthanc.url}/studies", timeout=10).json():
                requests.delete(f"{orthanc.url}/studies/{sid}", timeout=60)
            times["Orthanc"].append(_send(files, "ORTHANC", orthanc.dicom_port))

    port = free_port()
    out = work / "storescp"
    out.mkdir()
    scp = subprocess.Popen(["storescp", "-od", str(out), "-aet", "STORESCP", str(port)],
                           env=PEER_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: subprocess.run(["echoscu", "127.0.0.1", str(port)], env=PEER_ENV,
                                        capture_output=True).returncode == 0, 10, "storescp")
        for _ in range(runs):
            times["storescp"].append(_send(files, "STORESCP", port))
    finally:
        scp.terminate()
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lungnode bench", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    series = sorted((data_root() / "LIDC-IDRI-0002").glob("*/*.dcm"))
    if not series:
        print(f"LIDC-IDRI-0002 not found under {data_root()}: set LUNGNODE_TEST_DATA", file=sys.stderr)
        return 2
    for tool in ("storescu", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            print(f"{tool} missing: apt-get install dcmtk orthanc", file=sys.stderr)
            return 2
    size = sum(p.stat().st_size for p in series) / 2**20
    with tempfile.TemporaryDirectory(prefix="lungnode-bench-") as tmp:
        rx = bench_receive(series, args.runs, Path(tmp))
    print(f"\nReceive and persist LIDC-IDRI-0002: {len(series)} instances, {size:.0f} MiB, storescu over "
          f"loopback, median of {args.runs} runs")
    print(f"{'receiver':<44}{'seconds':>9}{'images/s':>10}{'lungnode speed-up':>19}")
    notes = {"lungnode": "lungnode (fsync + SQLite index per instance)",
             "Orthanc": "Orthanc 1.10 (Debian, TCP_NODELAY=1)", "storescp": "DCMTK storescp (TCP_NODELAY=1, no fsync)"}
    for name, secs in rx.items():
        print(f"{notes[name]:<44}{secs:>9.2f}{len(series) / secs:>10.0f}{secs / rx['lungnode']:>18.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

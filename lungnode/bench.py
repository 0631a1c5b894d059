"""`make bench`: lungnode against its peers, measured in one run on this machine.

Receive: DCMTK `storescu` sends the 261-slice LIDC-IDRI-0002 series (real CT, 132 MiB) over loopback
to lungnode (every instance fsynced and indexed before Success), plainly and over DICOM TLS (storescu
`+tls` with a client certificate the node checks), to Orthanc (Debian package, SQLite index) the same
two ways, and to DCMTK `storescp` (writes files, no fsync). Peers get TCP_NODELAY=1, their best setting.

Detect: the default model on the same series, whole pipeline from DICOM files to detections (volume,
preprocessing, sliding window, boxes), with ONNX Runtime and with PyTorch eager, each in its own
process so its peak memory is its own; on a machine with a CUDA GPU (and a CUDA build of PyTorch)
PyTorch on the GPU too. `--phantom SEED` times a generated phantom of LIDC-IDRI-0002's geometry
instead, on a machine that does not have the data.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from lungnode.peers import PEER_ENV, NodeProcess, OrthancServer, OrthancTls, free_port, wait_for

REPO = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    return Path(os.environ.get("LUNGNODE_TEST_DATA", REPO.parent / "shared" / "data"))


def _send(files: list[Path], aec: str, port: int, *options: str) -> float:
    started = time.perf_counter()
    done = subprocess.run(["storescu", *options, "-aet", "BENCH", "-aec", aec, "127.0.0.1", str(port),
                           *map(str, files)], env=PEER_ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"storescu to {aec} failed: {done.stderr[-500:]}")
    return seconds


def _orthanc_runs(orthanc: OrthancServer, files: list[Path], runs: int, *options: str) -> list[float]:
    """Each run into an empty Orthanc."""
    times = []
    for _ in range(runs):
        for sid in requests.get(f"{orthanc.url}/studies", timeout=10).json():
            requests.delete(f"{orthanc.url}/studies/{sid}", timeout=60)
        times.append(_send(files, "ORTHANC", orthanc.dicom_port, *options))
    return times


def bench_receive(files: list[Path], runs: int, work: Path) -> dict[str, float]:
    """Plain DICOM and DICOM TLS (the node checking storescu's client certificate) in turns, to one node."""
    from tests.tls_certs import make_certificates  # the test certificates (trustme, in the test extra)

    certs = make_certificates(work / "tls")
    tls = ("+tls", str(certs.client.key), str(certs.client.cert), "+cf", str(certs.ca))
    times: dict[str, list[float]] = {"lungnode": [], "lungnode filed": [], "lungnode TLS": [], "Orthanc": [],
                                     "Orthanc TLS": [], "storescp": []}

    tls_port = free_port()
    node = NodeProcess(work / "lungnode", stable_seconds=36000, dicom_tls_port=tls_port, tls_cert=certs.server.cert,
                       tls_key=certs.server.key, tls_ca=certs.ca).start()
    journal = work / "lungnode" / "journal"
    try:
        for _ in range(runs):
            started = time.perf_counter()
            times["lungnode"].append(_send(files, "LUNGNODE", node.dicom_port))
            wait_for(lambda: not any(journal.glob("seg-*.log")), 120, "the node to file what it received", 0.01)
            times["lungnode filed"].append(time.perf_counter() - started)
            times["lungnode TLS"].append(_send(files, "LUNGNODE", tls_port, *tls))
            wait_for(lambda: not any(journal.glob("seg-*.log")), 120, "the node to file what it received", 0.01)
    finally:
        node.stop()

    with OrthancServer(work / "orthanc") as orthanc:
        times["Orthanc"] = _orthanc_runs(orthanc, files, runs)
    with OrthancServer(work / "orthanc-tls", tls=OrthancTls(certs.server.cert, certs.server.key, certs.ca)) as orthanc:
        times["Orthanc TLS"] = _orthanc_runs(orthanc, files, runs, *tls)

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


# LIDC-IDRI-0002's geometry: 512 x 512 x 261 voxels of 0.681641 x 0.681641 x 1.25 mm.
LIDC_0002_SPACING = (0.681641, 0.681641, 1.25)
LIDC_0002_SHAPE = (512, 512, 261)


@dataclass(frozen=True)
class DetectRun:
    """One row of the detect table: a backend and, for ONNX Runtime, its provider and precision;
    for PyTorch, ``provider`` is the torch device ("cpu" or "cuda")."""

    label: str
    backend: str
    provider: str = "auto"
    precision: str = "auto"

    @property
    def argument(self) -> str:
        return f"{self.backend}:{self.provider}:{self.precision}"


def detect_runs() -> list[DetectRun]:
    """What `make bench` compares: the node's default (auto), OpenVINO in float32 and on the model's
    8-bit network, ONNX Runtime's CPU provider, PyTorch."""
    from lungnode.inference.onnx_runtime import cpu_has_bf16, network_precision, resolve_provider
    from lungnode.models.registry import load_model

    default = resolve_provider("auto")
    has_int8 = load_model("default").int8_onnx_path is not None
    precision = network_precision("auto", default, has_int8)
    runs = [DetectRun(f"ONNX Runtime, {default} {precision} (node default)", "onnxruntime", default)]
    if default == "openvino" and precision != "f32":
        runs.append(DetectRun("ONNX Runtime, openvino f32", "onnxruntime", "openvino", "f32"))
    if default == "openvino" and has_int8:
        runs.append(DetectRun("ONNX Runtime, openvino int8", "onnxruntime", "openvino", "int8"))
    if default != "cpu":
        runs.append(DetectRun("ONNX Runtime, cpu provider", "onnxruntime", "cpu"))
    # PyTorch's own bfloat16 (autocast) too, so the comparison at equal precision is in the table; not on
    # a CPU without native bfloat16, where PyTorch emulates it ~40x slower than f32 (no one would run it).
    if cpu_has_bf16():
        runs.append(DetectRun("PyTorch eager, bf16 autocast", "torch", "cpu", "bf16"))
    if _torch_sees_cuda():
        runs += [DetectRun("PyTorch eager on the GPU, f32", "torch", "cuda"),
                 DetectRun("PyTorch eager on the GPU, bf16 autocast", "torch", "cuda", "bf16")]
    return runs + [DetectRun("PyTorch eager, f32", "torch", "cpu")]


def _torch_sees_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def detect_once(argument: str, files: list[Path], threads: int) -> dict:
    """One study, timed from DICOM files to detections (run in a fresh process); the network's own
    calls are timed apart, since they are what differs between backends."""
    import torch

    from lungnode.inference.detector import Detector
    from lungnode.inference.volume import load_volume
    from lungnode.models.registry import load_model
    from lungnode.models.retinanet import AutocastNetwork

    class TimedNetwork(torch.nn.Module):
        def __init__(self, network: torch.nn.Module) -> None:
            super().__init__()
            self.inner, self.seconds, self.calls = network, 0.0, 0

        def forward(self, images):
            self.calls += 1
            t = time.perf_counter()
            out = self.inner(images)
            if images.is_cuda:  # GPU calls return before the work is done
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - t
            return out

    backend, provider, precision = argument.split(":")
    torch_bf16 = backend == "torch" and precision == "bf16"
    if backend == "torch":
        detector = Detector(load_model("default"), backend=backend, threads=threads, device=provider)
    else:
        detector = Detector(load_model("default"), backend=backend, threads=threads, provider=provider,
                            precision=precision)
    network = detector._detector.network
    timed = detector._detector.network = TimedNetwork(
        AutocastNetwork(network, detector.device.type) if torch_bf16 else network)
    started = time.perf_counter()
    volume = load_volume(files)
    loaded = time.perf_counter()
    detections = detector.detect(volume)
    first_done = time.perf_counter()
    # The node keeps its model loaded from study to study: the next study's time is the steady state
    # (the first call also pays one-off costs: kernel selection, memory pools, OpenVINO's compilation).
    timed.seconds, timed.calls = 0.0, 0
    again = detector.detect(volume)
    done = time.perf_counter()
    if len(again) != len(detections) or any(max(abs(a - b) for a, b in zip(x.center_mm, y.center_mm)) > 0.5
                                            for x, y in zip(again, detections)):
        raise RuntimeError("the same volume gave different detections on a second call")
    gpu = detector.device.type == "cuda"
    return {"load_s": loaded - started, "first_s": first_done - loaded, "detect_s": done - first_done,
            "network_s": timed.seconds, "total_s": first_done - started,
            "detections": len(detections), "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "gpu": torch.cuda.get_device_name() if gpu else None,
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
            "calls": timed.calls, "views": len(detector.settings.tta_flips or ((),))}


def bench_detect(series_dir: Path, threads: int) -> list[tuple[DetectRun, dict]]:
    results = []
    for run in detect_runs():
        out = subprocess.run([sys.executable, "-m", "lungnode.bench", "--detect-once", run.argument,
                              "--series", str(series_dir), "--threads", str(threads)], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{run.label} detection failed:\n{out.stderr[-2000:]}")
        results.append((run, json.loads(out.stdout.strip().splitlines()[-1])))
    return results


def print_detect(results: list[tuple[DetectRun, dict]], source: str, n_slices: int, threads: int) -> None:
    first = results[0][1]
    print(f"\nDetect on {source} ({n_slices} slices), default model ({first['views']} flip views, {first['calls']} "
          f"network calls a study), {threads} CPU threads, whole pipeline from DICOM files")
    torch_s = results[-1][1]["detect_s"]
    torch_net = results[-1][1]["network_s"]
    print(f"{'backend':<44}{'load s':>7}{'1st detect':>11}{'total s':>8}{'detect s':>9}{'network s':>10}"
          f"{'peak GiB':>9}{'findings':>9}{'vs PyTorch: detect':>20}{'network':>9}")
    for run, r in results:
        print(f"{run.label:<44}{r['load_s']:>7.1f}{r['first_s']:>11.1f}{r['total_s']:>8.1f}{r['detect_s']:>9.1f}"
              f"{r['network_s']:>10.1f}{r['peak_rss_gib']:>9.2f}{r['detections']:>9}{torch_s / r['detect_s']:>19.2f}x"
              f"{torch_net / r['network_s']:>8.2f}x")
    for run, r in results:
        if r.get("gpu"):
            print(f"{run.label}: {r['gpu']}, peak GPU memory {r['peak_gpu_gib']:.2f} GiB")
    bf16 = next((r for run, r in results if run.argument == "torch:cpu:bf16"), None)
    against_bf16 = (f"against PyTorch's bf16 autocast: network {_faster(bf16['network_s'] / first['network_s'])}"
                    if bf16 else "no PyTorch bf16 row: this CPU has no native bfloat16")
    print(f"total = load + 1st detect: a study on a freshly started node (the first call also pays one-off costs);\n"
          f"detect = the next study's detection, the node's steady state: lung mask + preparation + network calls\n"
          f"(the whole lung crop or sliding windows, as the model card says) + boxes + second stage; network = those\n"
          f"calls alone. Ratios are on the steady state.\n"
          f"The node's {results[0][0].label.removesuffix(' (node default)')} against PyTorch eager f32: network "
          f"{_faster(torch_net / first['network_s'])}, detect stage {_faster(torch_s / first['detect_s'])}; "
          f"{against_bf16}.\n"
          "Targets: <= 60 s per study, ONNX Runtime >= 2x PyTorch eager, <= 4 GiB")
    if any(run.precision == "int8" for run, _ in results):
        from lungnode.models.registry import load_model

        check = load_model("default").card.int8.check
        print("int8 = the model card's 8-bit network (lungnode train quantize), checked against float32 on phantoms "
              f"{check.get('phantoms')}: CPM {check.get('cpm_int8')} against {check.get('cpm_f32')}, nodules found "
              f"{check.get('found_int8')} against {check.get('found_f32')}")


def _faster(ratio: float) -> str:
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lungnode bench", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--skip-receive", action="store_true")
    parser.add_argument("--skip-detect", action="store_true")
    parser.add_argument("--phantom", type=int, metavar="SEED",
                        help="a generated phantom of LIDC-IDRI-0002's geometry instead of the real series")
    parser.add_argument("--detect-once", metavar="BACKEND:PROVIDER:PRECISION", help=argparse.SUPPRESS)
    parser.add_argument("--series", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.detect_once:
        print(json.dumps(detect_once(args.detect_once, sorted(args.series.rglob("*.dcm")), args.threads)))
        return 0
    if not args.skip_receive:
        for tool in ("storescu", "storescp", "echoscu"):
            if shutil.which(tool) is None:
                print(f"{tool} missing: apt-get install dcmtk orthanc", file=sys.stderr)
                return 2
    with tempfile.TemporaryDirectory(prefix="lungnode-bench-series-") as tmp:
        if args.phantom is not None:
            series_dir, source = phantom_series(args.phantom, Path(tmp)), f"phantom {args.phantom} (LIDC-IDRI-0002's geometry)"
        else:
            series_dir, source = data_root() / "LIDC-IDRI-0002", "LIDC-IDRI-0002"
        series = sorted(series_dir.rglob("*.dcm"))
        if not series:
            print(f"LIDC-IDRI-0002 not found under {data_root()}: set LUNGNODE_TEST_DATA, or time a phantom "
                  "(--phantom SEED)", file=sys.stderr)
            return 2
        print(machine())
        if not args.skip_receive:
            print_receive(series, source, args.runs)
        if not args.skip_detect:
            print_detect(bench_detect(series_dir, args.threads), source, len(series), args.threads)
    return 0


def phantom_series(seed: int, out: Path) -> Path:
    """A phantom with LIDC-IDRI-0002's voxel grid, written as a DICOM series under ``out``."""
    from lungnode.training.synth import make_phantom, write_dicom_series

    spacing = LIDC_0002_SPACING
    fov = tuple(n * s for n, s in zip(LIDC_0002_SHAPE, spacing))
    phantom = make_phantom(seed, spacing=spacing, field_of_view_mm=fov, z_fov_fraction=(1.0, 1.0))
    write_dicom_series(phantom, out / "phantom", patient_id=f"BENCH-{seed}")
    return out / "phantom"


def machine() -> str:
    """The processor the figures were taken on: they differ between Intel and AMD, with and without
    native bfloat16."""
    from lungnode.inference.onnx_runtime import cpu_has_bf16

    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"Machine: {name}, {os.cpu_count()} CPUs, native bfloat16: {'yes' if cpu_has_bf16() else 'no'}"


def print_receive(series: list[Path], source: str, runs: int) -> None:
    size = sum(p.stat().st_size for p in series) / 2**20
    with tempfile.TemporaryDirectory(prefix="lungnode-bench-") as tmp:
        rx = bench_receive(series, runs, Path(tmp))
    print(f"\nReceive and persist {source}: {len(series)} instances, {size:.0f} MiB, storescu over "
          f"loopback, median of {runs} runs")
    print(f"{'receiver':<56}{'seconds':>9}{'images/s':>10}{'lungnode speed-up':>19}")
    notes = {"lungnode": "lungnode (journal fsynced + indexed, then Success)",
             "lungnode filed": "  ... until every file is filed and flushed",
             "lungnode TLS": "lungnode over DICOM TLS (client certificate checked)",
             "Orthanc": "Orthanc 1.10 (Debian, TCP_NODELAY=1)", "Orthanc TLS": "Orthanc 1.10 over DICOM TLS",
             "storescp": "DCMTK storescp (TCP_NODELAY=1, no fsync)"}
    for name, secs in rx.items():
        against = rx["lungnode TLS"] if name.endswith("TLS") else rx["lungnode"]  # like for like
        ratio = "" if name == "lungnode filed" else f"{secs / against:>18.2f}x"
        print(f"{notes[name]:<56}{secs:>9.2f}{len(series) / secs:>10.0f}{ratio}")


if __name__ == "__main__":
    sys.exit(main())

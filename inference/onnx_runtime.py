"""Which ONNX Runtime execution provider runs the network, and at what precision.

ONNX Runtime's own CPU provider runs 3D convolutions through im2col + GEMM: on the 2-core Xeon
this project is measured on it is about half as fast as PyTorch's oneDNN kernels. The OpenVINO
execution provider (the ``onnxruntime-ep-openvino`` plugin, installed beside ``onnxruntime`` on
x86-64 Linux) has direct 3D convolution kernels and, on CPUs with AMX or AVX-512 BF16, runs them
in bfloat16. ``auto`` takes a CUDA GPU when ``onnxruntime-gpu`` sees one, else OpenVINO when the
plugin is installed, else the plain CPU provider, so the same model file runs everywhere.
"""
from __future__ import annotations

import json
import logging
import threading
from typing import Literal, get_args

log = logging.getLogger(__name__)

Provider = Literal["auto", "cuda", "openvino", "cpu"]
Precision = Literal["auto", "f32"]
PROVIDERS: tuple[str, ...] = get_args(Provider)
PRECISIONS: tuple[str, ...] = get_args(Precision)

OPENVINO_EP = "OpenVINOExecutionProvider"
_registered = threading.Lock()
_openvino_ready: bool | None = None


def openvino_available() -> bool:
    """Register the OpenVINO plugin with ONNX Runtime once per process; False when it is not installed."""
    global _openvino_ready
    with _registered:
        if _openvino_ready is None:
            try:
                import onnxruntime as ort
                import onnxruntime_ep_openvino as plugin
            except ImportError:
                _openvino_ready = False
            else:
                try:
                    ort.register_execution_provider_library(OPENVINO_EP, plugin.get_library_path())
                    _openvino_ready = bool(_openvino_cpus())
                except Exception as exc:  # a plugin built for another ONNX Runtime ABI
                    log.warning("OpenVINO execution provider not usable: %s", exc)
                    _openvino_ready = False
        return _openvino_ready


def _openvino_cpus() -> list:
    import onnxruntime as ort

    return [d for d in ort.get_ep_devices()
            if d.ep_name == OPENVINO_EP and d.device.type == ort.OrtHardwareDeviceType.CPU]


def cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def resolve_provider(provider: str) -> str:
    """The concrete provider ``provider`` means on this machine; a clear error when it is missing."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown ONNX provider {provider!r}: use one of {', '.join(PROVIDERS)}")
    if provider == "auto":
        return "cuda" if cuda_available() else "openvino" if openvino_available() else "cpu"
    if provider == "cuda" and not cuda_available():
        raise RuntimeError("ONNX provider 'cuda' asked for but this onnxruntime has no CUDA provider: "
                           "install onnxruntime-gpu on the GPU server, or set onnx_provider to auto")
    if provider == "openvino" and not openvino_available():
        raise RuntimeError("ONNX provider 'openvino' asked for but the onnxruntime-ep-openvino plugin is not "
                           "installed (x86-64 Linux only): pip install onnxruntime-ep-openvino, or set "
                           "onnx_provider to auto")
    return provider


def create_session(onnx_path: str, threads: int = 0, provider: str = "auto", precision: str = "auto"):
    """An ``InferenceSession`` on the chosen provider. ``precision='f32'`` keeps OpenVINO from
    running in bfloat16 on CPUs that have it (the CPU and CUDA providers run the file's float32)."""
    import onnxruntime as ort

    if precision not in PRECISIONS:
        raise ValueError(f"unknown ONNX precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    chosen = resolve_provider(provider)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if chosen == "openvino":
        cpu: dict[str, str] = {}
        if threads > 0:
            cpu["INFERENCE_NUM_THREADS"] = str(threads)
        if precision == "f32":
            cpu["INFERENCE_PRECISION_HINT"] = "f32"
        opts.add_provider_for_devices(_openvino_cpus(), {"load_config": json.dumps({"CPU": cpu})} if cpu else {})
        session = ort.InferenceSession(onnx_path, sess_options=opts)
    else:
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if chosen == "cuda" else ["CPUExecutionProvider"]
        session = ort.InferenceSession(onnx_path, sess_options=opts, providers=providers)
    log.info("ONNX Runtime session for %s on %s (precision %s)", onnx_path, session.get_providers()[0], precision)
    return session

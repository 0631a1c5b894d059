"""Which ONNX Runtime execution provider runs the network, and at what precision.

ONNX Runtime's own CPU provider runs 3D convolutions through im2col + GEMM: on the 2-core servers
this project is measured on it is about half as fast as PyTorch's oneDNN kernels. OpenVINO's
execution provider has direct 3D convolution kernels and, on CPUs with AMX or AVX-512 BF16, can
run them in bfloat16. On x86-64 Linux the project installs ``onnxruntime-openvino`` (ONNX Runtime
built with that provider, in place of plain ``onnxruntime``): it takes Intel and AMD processors
alike, where the newer ``onnxruntime-ep-openvino`` plugin offers none but Intel's. ``auto`` takes a
CUDA GPU when ``onnxruntime-gpu`` sees one, else OpenVINO when this ONNX Runtime has it, else the
plain CPU provider, so the same model file runs everywhere.

A model card may also carry an 8-bit copy of the network (``lungnode train quantize``, checked to
find what the float32 network finds). It is taken only when asked for (``int8``): on the AVX2-only
EPYC it was measured on, OpenVINO ran it no faster than float32 (2.3x faster on a Xeon with VNNI and
AMX, where bfloat16 is faster still), so whether it pays is the site's call (``make bench`` shows
both). ONNX Runtime's own CPU provider runs it slower than float32 (10-11 s a view against 7.8
there), so it runs on OpenVINO only.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal, get_args

log = logging.getLogger(__name__)

Provider = Literal["auto", "cuda", "openvino", "cpu"]
Precision = Literal["auto", "f32", "int8"]
PROVIDERS: tuple[str, ...] = get_args(Provider)
PRECISIONS: tuple[str, ...] = get_args(Precision)

OPENVINO_EP = "OpenVINOExecutionProvider"
_EPS = {"cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"], "openvino": [OPENVINO_EP, "CPUExecutionProvider"],
        "cpu": ["CPUExecutionProvider"]}


def openvino_available() -> bool:
    import onnxruntime as ort

    return OPENVINO_EP in ort.get_available_providers()


def cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX-512 BF16): then OpenVINO runs the
    network in bfloat16, as OpenVINO's own default does on such processors."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


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
        raise RuntimeError("ONNX provider 'openvino' asked for but this onnxruntime has no OpenVINO provider "
                           "(the onnxruntime-openvino package, x86-64 Linux): pip install onnxruntime-openvino "
                           "in place of onnxruntime, or set onnx_provider to auto")
    return provider


def openvino_precision(precision: str) -> str:
    """OpenVINO's inference precision for our ``precision`` setting on this CPU (an int8 network's
    float parts run in float32)."""
    return "bf16" if precision == "auto" and cpu_has_bf16() else "f32"


def network_precision(precision: str, provider: str, has_int8: bool, model: str = "this model") -> str:
    """What the detector network runs in on this machine: 'bf16', 'int8' or 'f32'. ``auto`` takes
    bfloat16 where OpenVINO runs on a CPU that has it, else float32; ``int8`` the card's 8-bit network."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown ONNX precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    chosen = resolve_provider(provider)
    if precision == "int8":
        if not has_int8:
            raise RuntimeError(f"ONNX precision int8 asked for but {model} has no 8-bit network: make one with "
                               f"`lungnode train quantize --model {model}`, or set onnx_precision to auto")
        if chosen != "openvino":
            raise RuntimeError(f"ONNX precision int8 runs on OpenVINO only (provider {chosen} runs 8-bit 3D convolutions "
                               "slower than float32): set onnx_provider to openvino or auto, or onnx_precision to auto")
        return "int8"
    return "bf16" if chosen == "openvino" and precision == "auto" and cpu_has_bf16() else "f32"


def create_session(onnx_path: str, threads: int = 0, provider: str = "auto", precision: str = "auto"):
    """An ``InferenceSession`` on the chosen provider. ``precision='f32'`` keeps OpenVINO from
    running in bfloat16 on CPUs that have it (the CPU and CUDA providers run the file's float32);
    'int8' says the file is an 8-bit network, whose float parts OpenVINO runs in float32."""
    import onnxruntime as ort

    if precision not in PRECISIONS:
        raise ValueError(f"unknown ONNX precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    chosen = resolve_provider(provider)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    options: list[dict] | None = None
    if chosen == "openvino":
        cpu = {"INFERENCE_PRECISION_HINT": openvino_precision(precision)}
        if threads > 0:
            cpu["INFERENCE_NUM_THREADS"] = str(threads)
        options = [{"device_type": "CPU", "load_config": json.dumps({"CPU": cpu})}, {}]
    session = ort.InferenceSession(onnx_path, sess_options=opts, providers=_EPS[chosen], provider_options=options)
    log.info("ONNX Runtime session for %s on %s (%s)", onnx_path, session.get_providers()[0],
             precision if precision == "int8" else openvino_precision(precision) if chosen == "openvino" else "f32")
    return session

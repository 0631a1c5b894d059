"""Find nodules in a CT Volume with the shipped RetinaNet, via ONNX Runtime (default) or PyTorch.

Both backends sit inside MONAI's RetinaNetDetector, so sliding windows, anchors, box decoding and
NMS are the same code for both; only the network call differs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from lungnode.inference.lung_mask import inside_lungs, lung_bbox, lung_mask, touching_aerated_lung
from lungnode.inference.onnx_runtime import create_session, network_precision
from lungnode.inference.rescoring import Rescored, Rescorer, fuse
from lungnode.inference.tta import fuse_views, mirror_boxes
from lungnode.inference.types import Detection, Volume
from lungnode.models import zoo_bundle
from lungnode.models.registry import InferenceSettings, ModelSpec
from lungnode.models.retinanet import NetConfig, build_detector, build_network

log = logging.getLogger(__name__)

BOX_KEY, LABEL_KEY = "box", "label"
SCORE_KEY = LABEL_KEY + "_scores"
TTA_VIEW_FLOOR = 0.01  # with several views, each reports candidates down to this score: they add up


@dataclass
class PreparedImage:
    """The network's view of a Volume: body crop, resampled to model spacing, windowed to 0..1.

    ``image`` is (I, J, K) in the network's axes. For the shipped models these are the source
    index axes; a network trained on RAS-oriented images (the MONAI zoo bundle) gets them permuted
    and flipped (``axes``/``flipped``). A resampled voxel coordinate ``r`` (source axis order) maps
    to source index ``(r + 0.5) * scale - 0.5 + crop_start`` (the half-voxel terms are those of
    ``F.interpolate(align_corners=False)``).
    """

    image: torch.Tensor
    crop_start: np.ndarray  # (i, j, k) source index of the crop's first voxel
    scale: np.ndarray  # source voxels per model voxel along (i, j, k)
    axes: tuple[int, int, int] = (0, 1, 2)  # network axis a is source axis axes[a]
    flipped: tuple[bool, bool, bool] = (False, False, False)  # per network axis

    def _unflip(self, m: np.ndarray) -> np.ndarray:
        size = np.array(self.image.shape[-3:], dtype=np.float64)
        return np.where(self.flipped, size - 1 - m, m)

    def to_source_index(self, ijk: np.ndarray) -> np.ndarray:
        m = self._unflip(np.asarray(ijk, dtype=np.float64))
        r = np.empty_like(m)
        r[..., list(self.axes)] = m
        return (r + 0.5) * self.scale - 0.5 + self.crop_start

    def to_model_index(self, ijk: np.ndarray) -> np.ndarray:
        r = (np.asarray(ijk, dtype=np.float64) - self.crop_start + 0.5) / self.scale - 0.5
        return self._unflip(r[..., list(self.axes)])

    # Box coordinates follow MONAI's convention: model voxel m spans [m, m + 1), its centre at
    # m + 0.5, so mirroring an axis of n voxels maps x to n - x (MONAI's flip_boxes, the training
    # patches' flips, tta.mirror_boxes). Index coordinates (above) put voxel m's centre at m.
    def box_to_source_index(self, xyz: np.ndarray) -> np.ndarray:
        return self.to_source_index(np.asarray(xyz, dtype=np.float64) - 0.5)

    def source_index_to_box(self, ijk: np.ndarray) -> np.ndarray:
        return self.to_model_index(ijk) + 0.5


def ras_axes(direction: np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """Which source axis, and flipped or not, points to the patient's right, anterior, superior.

    ``direction``'s columns are the LPS directions of the i, j, k axes; RAS negates x and y.
    """
    ras = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(direction, dtype=np.float64)
    axes = tuple(int(np.argmax(np.abs(ras[w]))) for w in range(3))
    if sorted(axes) != [0, 1, 2]:
        raise ValueError(f"oblique volume orientation {direction.tolist()}: no axis-aligned RAS view")
    return axes, tuple(bool(ras[w, a] < 0) for w, a in enumerate(axes))


def body_bbox(hu_ijk: np.ndarray, spacing: np.ndarray, threshold_hu: float, margin_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box [start, stop) of the largest connected region above ``threshold_hu`` (the body).

    Done on a ~4 mm grid because only the box is needed; falls back to the whole volume when
    nothing is above threshold.
    """
    shape = np.array(hu_ijk.shape)
    step = np.maximum(1, np.round(4.0 / spacing)).astype(int)
    mask = hu_ijk[:: step[0], :: step[1], :: step[2]] > threshold_hu
    labels, n = ndimage.label(mask)
    if n == 0:
        return np.zeros(3, int), shape
    largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    sl = ndimage.find_objects((labels == largest).astype(np.int8))[0]
    margin = np.ceil(margin_mm / spacing).astype(int)
    start = np.array([s.start for s in sl]) * step - margin
    stop = np.array([s.stop for s in sl]) * step + margin
    return np.clip(start, 0, shape), np.clip(stop, 0, shape)


def prepare(volume: Volume, settings: InferenceSettings, crop_body: bool = True,
            region: tuple[np.ndarray, np.ndarray] | None = None, ras: bool = False) -> PreparedImage:
    """Crop to `region` ((i, j, k) start, stop) or else the body, resample to the model spacing
    (trilinear), window to 0..1, and with ``ras`` turn the axes to RAS (``settings.spacing_mm`` is
    then per RAS axis)."""
    hu_ijk = np.transpose(volume.hu, (2, 1, 0))
    spacing = np.asarray(volume.spacing, dtype=np.float64)
    axes, flipped = ras_axes(volume.direction) if ras else ((0, 1, 2), (False, False, False))
    model_spacing = np.empty(3)
    model_spacing[list(axes)] = settings.spacing_mm
    if region is not None:
        start, stop = region
    elif crop_body:
        start, stop = body_bbox(hu_ijk, spacing, settings.body_threshold_hu, settings.body_margin_mm)
    else:
        start, stop = np.zeros(3, int), np.array(hu_ijk.shape)
    # Window and resample in the volume's own (k, j, i) memory order (a contiguous crop is several
    # times faster to copy and interpolate); only the small resampled image is transposed.
    crop = volume.hu[start[2] : stop[2], start[1] : stop[1], start[0] : stop[0]]
    lo, hi = settings.window_hu
    x = torch.from_numpy(crop.astype(np.float32, copy=False)).clamp(lo, hi)  # one pass makes the copy
    x = x.sub_(lo).div_(hi - lo)[None, None]
    in_size = np.array(crop.shape[::-1])
    out_size = np.maximum(1, np.round(in_size * spacing / model_spacing)).astype(int)
    if np.any(out_size != in_size):
        x = F.interpolate(x, size=tuple(int(v) for v in out_size[::-1]), mode="trilinear", align_corners=False)
    x = x[0, 0].permute(*(2 - a for a in axes))  # (k, j, i) -> the network's axes
    if any(flipped):
        x = x.flip([a for a in range(3) if flipped[a]])
    return PreparedImage(image=x.contiguous(), crop_start=start.astype(np.float64), scale=in_size / out_size,
                         axes=axes, flipped=flipped)


@dataclass
class Candidates:
    """The network's candidates for one volume: model-voxel boxes and scores in ``prepared``, and
    the same as world-mm Detections (aligned)."""

    prepared: PreparedImage
    boxes: np.ndarray  # (N, 6) MONAI corners in prepared.image
    scores: np.ndarray  # (N,)
    detections: list[Detection]


class OnnxNetwork(nn.Module):
    """The exported network behind an ``onnxruntime.InferenceSession``, callable like the torch one."""

    def __init__(self, onnx_path: str, threads: int = 0, provider: str = "auto", precision: str = "auto") -> None:
        super().__init__()
        self.path = onnx_path
        self.session = create_session(onnx_path, threads, provider, precision)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        outputs = self.session.run(None, {self.input_name: images.detach().cpu().numpy().astype(np.float32)})
        return [torch.from_numpy(o) for o in outputs]


def load_torch_network(cfg: NetConfig, state_dict_path) -> nn.Module:
    net = build_network(cfg, use_list_output=True)
    net.load_state_dict(torch.load(state_dict_path, map_location="cpu", weights_only=True))
    return net.eval()


TORCH_DEVICES = ("auto", "cpu", "cuda")


def resolve_torch_device(device: str) -> torch.device:
    """The device the PyTorch backend runs on: ``auto`` takes a CUDA GPU when this PyTorch sees one
    (a GPU server with a CUDA build of PyTorch), else the CPU; a clear error for a missing GPU."""
    if device not in TORCH_DEVICES:
        raise ValueError(f"unknown torch device {device!r}: use one of {', '.join(TORCH_DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("torch device 'cuda' asked for but this PyTorch sees no CUDA GPU (the CPU build, or no "
                           "driver): install a CUDA build of torch on the GPU server, or set torch_device to auto")
    return torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")


class Detector:
    """One loaded model; ``detect`` may be called for many volumes (the session is created once)."""

    def __init__(self, spec: ModelSpec, backend: str = "onnxruntime", threads: int = 0,
                 provider: str = "auto", precision: str = "auto", device: str = "auto") -> None:
        self.spec = spec
        # ONNX Runtime picks its own device through its provider; the torch backend runs on this one.
        self.device = resolve_torch_device(device) if backend == "torch" else torch.device("cpu")
        self.settings = spec.card.inference
        zoo = zoo_bundle.is_zoo_network(spec.card.network)
        self.ras = spec.card.network.get("image_axes") == "RAS"
        self.precision = "f32"  # what the network runs in: bf16, int8 or f32
        if backend == "onnxruntime":
            self.precision = network_precision(precision, provider, spec.int8_onnx_path is not None, spec.info.name)
            int8 = self.precision == "int8"
            network: nn.Module = OnnxNetwork(str(spec.int8_onnx_path if int8 else spec.onnx_path), threads, provider,
                                             "int8" if int8 else precision)
        elif backend == "torch":
            if spec.state_dict_path is None:
                raise FileNotFoundError(f"model {spec.info.name} ships no PyTorch state dict for backend 'torch'")
            if threads > 0:
                torch.set_num_threads(threads)
            network = (zoo_bundle.load_zoo_network(spec.state_dict_path) if zoo else
                       load_torch_network(NetConfig.from_dict(spec.card.network), spec.state_dict_path))
            network = network.to(self.device)
        else:
            raise ValueError(f"unknown backend {backend!r}: use 'onnxruntime' or 'torch'")
        self.backend = backend
        detector = (zoo_bundle.build_zoo_detector(network) if zoo else
                    build_detector(NetConfig.from_dict(spec.card.network), network))
        self._detector = configure_for_inference(detector, self.settings)
        # The second stage has no 8-bit copy: it runs its float32 file.
        rescorer_precision = "f32" if self.precision == "int8" else precision
        self.rescorer = self._rescorer(spec, backend, threads, provider, rescorer_precision, self.device)

    @staticmethod
    def _rescorer(spec: ModelSpec, backend: str, threads: int, provider: str, precision: str,
                  device: torch.device) -> Rescorer | None:
        """The card's second stage on the same backend as the network, or None."""
        stage, spacing = spec.card.second_stage, spec.card.inference.spacing_mm
        if stage is None:
            return None
        if backend == "torch":
            if spec.second_stage_state_dict_path is None:
                raise FileNotFoundError(f"model {spec.info.name} ships no PyTorch state dict for its second stage")
            return Rescorer.torch(stage, spec.second_stage_state_dict_path, device, spacing)
        return Rescorer.onnx(stage, spec.second_stage_path, threads, provider, precision, spacing)

    def detect(self, volume: Volume, score_threshold: float | None = None) -> list[Detection]:
        """Nodule candidates in LPS mm, highest score first. `score_threshold` overrides the card's
        (an evaluation wants every candidate to draw the whole FROC curve)."""
        threshold = self.settings.score_threshold if score_threshold is None else score_threshold
        # A second stage rescores every candidate it was trained on (those down to its floor), then thresholds.
        floor = threshold if self.rescorer is None else self.rescorer.stage.min_detector_score
        found = self.candidates(volume, floor)
        detections = found.detections
        if self.rescorer is not None and detections:
            verdict = self.rescorer.rescore(found.prepared.image.numpy(), found.boxes)
            detections = rescored(found, verdict, volume, self.rescorer.stage.min_detector_score, self.rescorer.stage.weight)
        return ranked(detections, threshold)

    def candidates(self, volume: Volume, floor: float) -> "Candidates":
        """The network's candidates scoring >= ``floor`` inside the lungs, before any rescoring."""
        lungs, prepared = self.prepare(volume)
        flips = self.settings.tta_flips or ((),)
        selector = self._detector.box_selector
        card_threshold = selector.score_thresh
        selector.score_thresh = min(floor, TTA_VIEW_FLOOR) if len(flips) > 1 else floor
        try:
            with torch.no_grad():
                results = self._views(prepared.image.to(self.device), flips)
        finally:
            selector.score_thresh = card_threshold
        views = [(mirror_boxes(r[BOX_KEY].cpu().numpy(), axes, prepared.image.shape),
                  r[SCORE_KEY].cpu().numpy().astype(np.float64)) for axes, r in zip(flips, results)]
        boxes, scores = fuse_views(views) if len(views) > 1 else views[0]
        keep = scores >= floor
        boxes, scores = boxes[keep], scores[keep]
        detections = [to_detection(box, score, prepared, volume) for box, score in zip(boxes, scores)]
        if lungs is not None and detections:
            centres = np.array([d.center_mm for d in detections])
            keep = inside_lungs(lungs, volume, centres, self.settings.lung_tolerance_mm)
            if self.settings.aerated_lung_tolerance_mm is not None:
                keep &= touching_aerated_lung(lungs, volume, centres, np.array([d.diameter_mm / 2 for d in detections]),
                                              self.settings.aerated_lung_tolerance_mm)
            boxes, scores = boxes[keep], scores[keep]
            detections = [d for d, k in zip(detections, keep) if k]
        return Candidates(prepared, boxes.reshape(-1, 6), scores, detections)

    def prepare(self, volume: Volume) -> tuple[np.ndarray | None, PreparedImage]:
        """The lung mask (None when off or empty) and the network's input: the lung crop (else the
        body) at model spacing."""
        lungs = self._lungs(volume)
        region = None
        if lungs is not None:
            box = lung_bbox(lungs, volume, self.settings.lung_margin_mm)[::-1]  # (i, j, k)
            region = (np.array([s.start for s in box]), np.array([s.stop for s in box]))
        return lungs, prepare(volume, self.settings, region=region, ras=self.ras)

    def _views(self, image: torch.Tensor, flips) -> list[dict]:
        """The detector's boxes for each mirrored view of ``image``. An image of at most the card's
        ``whole_image_max_voxels`` goes through the network whole, ``sw_batch_size`` views a call:
        overlapping sliding windows compute most voxels about twice, and each window's edges see zero
        padding instead of the tissue beyond them."""
        def view(axes) -> torch.Tensor:  # made when needed: a mirrored copy is as large as the image
            return image.flip(list(axes)) if axes else image

        if image.numel() > self.settings.whole_image_max_voxels:
            return [self._detector(view(axes)[None, None], use_inferer=True)[0] for axes in flips]
        step = max(1, self.settings.sw_batch_size)
        return [r for i in range(0, len(flips), step)
                for r in self._detector(torch.stack([view(a) for a in flips[i : i + step]])[:, None], use_inferer=False)]

    def _lungs(self, volume: Volume) -> np.ndarray | None:
        """The lung mask, or None when the card turns it off or no lungs are found (then the whole
        body is searched: better a false positive than a missed nodule)."""
        if not self.settings.lung_mask:
            return None
        mask = lung_mask(volume)
        if not mask.any():
            log.warning("no lungs found in series %s: searching the whole body", volume.series_instance_uid)
            return None
        return mask


def rescored(found: Candidates, verdict: Rescored, volume: Volume, min_detector_score: float,
             weight: float) -> list[Detection]:
    """The candidates a second stage rescores (detector score >= its floor), with the fused score, at
    the place the second stage moved them to (if it did)."""
    scores = fuse(found.scores, verdict.probabilities, weight)
    out = []
    for d, box, shift, s, raw in zip(found.detections, verdict.boxes, verdict.shifts, scores, found.scores):
        if raw >= min_detector_score:
            out.append(to_detection(box, float(s), found.prepared, volume) if np.any(shift) else replace(d, score=float(s)))
    return out


def ranked(detections: list[Detection], threshold: float) -> list[Detection]:
    """What is reported: scores >= ``threshold``, highest first, nested duplicates dropped."""
    return drop_nested(sorted((d for d in detections if d.score >= threshold), key=lambda d: -d.score))


def drop_nested(detections: list[Detection]) -> list[Detection]:
    """Drop a detection whose centre lies in the box of a higher-scoring one (score-sorted input).

    IoU-based NMS keeps a small anchor's box nested in a large one (their IoU is tiny), which
    would report one nodule twice.
    """
    kept: list[Detection] = []
    for d in detections:
        c = np.asarray(d.center_mm)
        if not any(np.all(c >= k.box_mm[:3]) and np.all(c <= k.box_mm[3:]) for k in kept):
            kept.append(d)
    return kept


def configure_for_inference(detector, settings: InferenceSettings):
    """Score threshold, NMS and sliding window from the model card; eval mode."""
    detector.set_target_keys(box_key=BOX_KEY, label_key=LABEL_KEY)
    detector.set_box_selector_parameters(
        score_thresh=settings.score_threshold,
        topk_candidates_per_level=settings.topk_candidates_per_level,
        nms_thresh=settings.nms_threshold,
        detections_per_img=settings.detections_per_image,
    )
    detector.set_sliding_window_inferer(
        roi_size=list(settings.roi_size), sw_batch_size=settings.sw_batch_size, overlap=settings.overlap,
        mode="constant"
    )
    return detector.eval()


def to_detection(box: np.ndarray, score: float, prepared: PreparedImage, volume: Volume) -> Detection:
    """A model-voxel box (i0, j0, k0, i1, j1, k1) -> Detection in the Volume's LPS world frame."""
    a, b = prepared.box_to_source_index(box[:3]), prepared.box_to_source_index(box[3:])
    lo, hi = np.minimum(a, b), np.maximum(a, b)  # a flipped axis swaps the corners
    corners = np.array([[a[0], b[1], c[2]] for a in (lo, hi) for b in (lo, hi) for c in (lo, hi)])
    world = volume.index_to_world(corners)
    center = volume.index_to_world((lo + hi) / 2)
    extents_mm = (hi - lo) * np.asarray(volume.spacing)
    return Detection(
        center_mm=tuple(float(v) for v in center),
        box_mm=tuple(float(v) for v in np.concatenate([world.min(0), world.max(0)])),
        diameter_mm=float(extents_mm.mean()),
        score=float(score),
    )

"""Detect cells with StarDist on any image or stack, and compare detections before and after deblurring.

One compute generator per job serves the CLI, the widget and scripts:
:func:`iter_detect` and :func:`iter_compare` yield :class:`DetectionProgress`
after every plane (close them to stop) and return their result;
:func:`detect` and :func:`compare` run them to the end.

Planes are read one at a time (memory stays flat in the stack depth),
normalised here (percentiles, as StarDist's own tools do) and labelled by
StarDist in its worker process (:mod:`.worker`), in tiles when they are large.
Label numbers start again at 1 in every plane.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import ConfigError, FrozenConfig, check_percentiles
from ..images import Image, as_image
from ..normalization import percentile_range
from ..runtime import run_to_end
from .metrics import BLURRY, DEBLURRED, IOU_THRESHOLDS, SHARP, Comparison, compare_labels
from .worker import DetectionError, ModelInfo, StarDistWorker, shared_worker

DEFAULT_STARDIST_MODEL = "2D_versatile_fluo"
PRETRAINED_MODELS = ("2D_versatile_fluo", "2D_versatile_he", "2D_paper_dsb2018")
"""StarDist's published 2-D models (downloaded once, then cached)."""


@dataclass(frozen=True)
class DetectionSettings(FrozenConfig):
    """How StarDist detects objects."""

    config_name = "detection settings"

    model: str = DEFAULT_STARDIST_MODEL
    """A pretrained model's name (:data:`PRETRAINED_MODELS`) or the folder of a model you trained."""

    prob_thresh: float | None = None
    """Object probability threshold in (0, 1); None uses the model's own (higher: fewer, surer objects)."""

    nms_thresh: float | None = None
    """Overlap threshold in (0, 1) for merging candidates; None uses the model's own (higher: more overlap kept)."""

    percentiles: tuple[float, float] = (1.0, 99.8)
    """Each plane's intensities are scaled so these percentiles become 0 and 1 (StarDist's convention)."""

    max_tile: int = 1024
    """Planes larger than this (pixels per side) are predicted in tiles, which StarDist stitches."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "percentiles", tuple(self.percentiles))  # JSON lists and tuples compare equal
        for name in ("prob_thresh", "nms_thresh"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise ConfigError(f"{name} must be between 0 and 1 (exclusive), or None for the model's own")
        if len(self.percentiles) != 2:
            raise ConfigError(f"percentiles must be two numbers (low, high), got {self.percentiles}")
        check_percentiles(*self.percentiles)
        if self.max_tile < 64:
            raise ConfigError("max_tile must be at least 64 pixels")
        if not str(self.model).strip():
            raise ConfigError("choose a StarDist model: a pretrained name or a model folder")


@dataclass(frozen=True)
class DetectionProgress:
    """Where a detection job stands; yielded after every plane."""

    planes_done: int
    planes_total: int
    image: str = ""
    """Which image is being worked on (e.g. ``blurry``)."""
    objects: int = 0
    """Objects found in the plane just finished."""

    @property
    def fraction(self) -> float:
        return self.planes_done / self.planes_total if self.planes_total else 1.0


@dataclass
class CompareResult:
    """What :func:`iter_compare` returns: the measurements and the label images they came from."""

    comparison: Comparison
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    model: ModelInfo | None = None
    """The StarDist model that detected them (its own thresholds included)."""


# --- planes ---------------------------------------------------------------------------------------------------------


def plane_indices(image: Image) -> list[tuple[int, ...]]:
    """Index of every plane: all axes but Y, X and S (channels of an RGB image)."""
    leading = [n for axis, n in zip(image.axes, image.shape) if axis not in "YXS"]
    return list(itertools.product(*(range(n) for n in leading)))


def plane_names(image: Image) -> list[str]:
    """A readable name per plane (``t=0 z=3``), or ``['all']`` for a single plane."""
    letters = [axis.lower() for axis in image.axes if axis not in "YXS"]
    indices = plane_indices(image)
    if not letters:
        return ["all"]
    return [" ".join(f"{a}={i}" for a, i in zip(letters, index)) for index in indices]


def labels_shape(image: Image) -> tuple[int, ...]:
    """The shape of the label image for ``image``: its shape without the RGB channel axis."""
    return tuple(n for axis, n in zip(image.axes, image.shape) if axis != "S")


def prepare_plane(plane: np.ndarray, rgb: bool, channels: int, percentiles: tuple[float, float]) -> np.ndarray:
    """Make a plane what the model takes: grey or RGB as it needs, scaled by percentiles (float64)."""
    plane = np.asarray(plane, dtype=np.float32)
    if rgb:
        plane = plane[..., :3]  # drop alpha
        if channels == 1:
            plane = plane.mean(axis=-1)
    elif channels == 3:
        raise DetectionError(
            "this StarDist model expects RGB images (e.g. H&E stains), but the image has one channel; "
            "choose a fluorescence model such as 2D_versatile_fluo"
        )
    if channels not in (1, 3):
        raise DetectionError(f"StarDist models with {channels} input channels are not supported")
    low, high = percentile_range(plane, percentiles)
    scaled = plane.astype(np.float64)  # scaled in float64; the worker hands StarDist float32
    scaled -= low
    scaled /= high - low
    return scaled


def tiles_for(shape: tuple[int, ...], max_tile: int, rgb_input: bool) -> tuple[int, ...] | None:
    """StarDist's ``n_tiles`` for a plane: None when it fits in one tile."""
    tiles = tuple(max(1, math.ceil(n / max_tile)) for n in shape[:2])
    if tiles == (1, 1):
        return None
    return tiles + ((1,) if rgb_input else ())


# --- detection ------------------------------------------------------------------------------------------------------


def iter_detect(
    data: Any,
    axes: str | None = None,
    settings: DetectionSettings | None = None,
    worker: StarDistWorker | None = None,
    name: str = "",
    out: np.ndarray | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Generator[DetectionProgress, None, np.ndarray]:
    """Label objects in every plane of ``data``, yielding progress after each plane; returns int32 labels.

    ``data`` is anything :func:`~napari_mpt_deblur.images.as_image` takes
    (numpy, dask or zarr array, a file path); the labels have its shape
    without an RGB channel axis. ``should_stop`` is checked while StarDist
    works on a plane, so a large plane stops at once (the worker process is
    stopped and restarted on the next call).
    """
    settings = settings or DetectionSettings()
    worker = worker or shared_worker()
    image = as_image(data, axes)
    shape = labels_shape(image)
    if out is None:
        out = np.zeros(shape, dtype=np.int32)
    elif out.shape != shape:
        raise ValueError(f"out must have shape {shape}")
    info = worker.load(settings.model, should_stop)
    yield from _detect_image(image, settings, worker, info, name, out, should_stop)
    return out


def _detect_image(
    image: Image,
    settings: DetectionSettings,
    worker: StarDistWorker,
    info: ModelInfo,
    name: str,
    out: np.ndarray,
    should_stop: Callable[[], bool] | None,
) -> Generator[DetectionProgress, None, None]:
    rgb = "S" in image.axes
    if "S" in image.axes and image.shape[image.axes.index("S")] not in (3, 4):
        raise DetectionError("StarDist needs grey or RGB planes; this image's channel axis has neither 3 nor 4 entries")
    indices = plane_indices(image)
    leading = [i for i, axis in enumerate(image.axes) if axis not in "YXS"]
    for done, index in enumerate(indices, start=1):
        selector = [slice(None)] * len(image.axes)
        for axis, i in zip(leading, index):
            selector[axis] = i
        plane = np.asarray(image.data[tuple(selector)].compute())
        plane = prepare_plane(plane, rgb, info.channels, settings.percentiles)
        labels = worker.predict(
            settings.model,
            plane,
            prob_thresh=settings.prob_thresh,
            nms_thresh=settings.nms_thresh,
            n_tiles=tiles_for(plane.shape, settings.max_tile, plane.ndim == 3),
            should_stop=should_stop,
        )
        out[index] = labels
        yield DetectionProgress(done, len(indices), name, int(labels.max()))


def detect(
    data: Any,
    axes: str | None = None,
    settings: DetectionSettings | None = None,
    worker: StarDistWorker | None = None,
    progress: Callable[[DetectionProgress], None] | None = None,
) -> np.ndarray:
    """Label objects in every plane of ``data`` with StarDist (see :func:`iter_detect`)."""
    return run_to_end(iter_detect(data, axes, settings, worker), progress)


# --- comparison -----------------------------------------------------------------------------------------------------


def iter_compare(
    blurry: Any,
    deblurred: Any,
    sharp: Any = None,
    truth: np.ndarray | None = None,
    axes: str | None = None,
    settings: DetectionSettings | None = None,
    worker: StarDistWorker | None = None,
    thresholds: tuple[float, ...] = IOU_THRESHOLDS,
    should_stop: Callable[[], bool] | None = None,
) -> Generator[DetectionProgress, None, CompareResult]:
    """Detect on the blurry, deblurred and (optional) sharp image, then measure and compare.

    Scores are against ``truth`` (ground-truth labels, the shape of the
    images without an RGB axis) when given, else against the detections on
    ``sharp``. Progress counts planes over all images.
    """
    settings = settings or DetectionSettings()
    worker = worker or shared_worker()
    sources = {BLURRY: blurry, DEBLURRED: deblurred}
    if sharp is not None:
        sources[SHARP] = sharp
    images = {key: as_image(value, axes, name=key) for key, value in sources.items()}
    shapes = {key: image.shape for key, image in images.items()}
    if len(set(shapes.values())) > 1:
        described = ", ".join(f"{key} {shape}" for key, shape in shapes.items())
        raise DetectionError(f"the images to compare must have the same shape; got {described}")
    first = images[BLURRY]
    if truth is not None:
        truth = np.asarray(truth)
        if truth.shape != labels_shape(first):
            raise DetectionError(
                f"the ground-truth labels have shape {truth.shape}, the images need {labels_shape(first)}"
            )
        if not np.issubdtype(truth.dtype, np.integer):
            raise DetectionError("ground-truth labels must be an integer label image (0 = background)")
    info = worker.load(settings.model, should_stop)
    per_image = len(plane_indices(first))
    total = per_image * len(images)
    labels: dict[str, np.ndarray] = {}
    for order, (key, image) in enumerate(images.items()):
        labels[key] = np.zeros(labels_shape(image), dtype=np.int32)
        for step in _detect_image(image, settings, worker, info, key, labels[key], should_stop):
            yield DetectionProgress(order * per_image + step.planes_done, total, key, step.objects)
    comparison = compare_labels(labels, truth, plane_names(first), thresholds)
    return CompareResult(comparison, labels, info)


def compare(
    blurry: Any,
    deblurred: Any,
    sharp: Any = None,
    truth: np.ndarray | None = None,
    axes: str | None = None,
    settings: DetectionSettings | None = None,
    worker: StarDistWorker | None = None,
    progress: Callable[[DetectionProgress], None] | None = None,
) -> CompareResult:
    """Detect and compare (see :func:`iter_compare`), running to the end."""
    return run_to_end(iter_compare(blurry, deblurred, sharp, truth, axes, settings, worker), progress)

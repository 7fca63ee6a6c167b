"""What the Compare detections dock checks, runs and shows (no Qt, no napari: testable without a window).

The dock reads the chosen layers into a :class:`Selection`;
:func:`selection_problem` refuses what cannot be compared with a message for
the user; a :class:`CompareRun` holds one run's inputs, and
:func:`compare_steps` (the worker's generator) deblurs first when asked, then
detects and compares with :func:`~napari_mpt_deblur.detection.iter_compare`
(StarDist in its own process). :func:`image_titles`, :func:`plot_bars` and
:func:`summary` turn the :class:`~napari_mpt_deblur.detection.Comparison`
into what the dock shows (its table is the comparison's own,
:meth:`~napari_mpt_deblur.detection.Comparison.summary_table`);
:func:`detections_layer_kwargs` places each image's detections over it, and
:func:`write_labels` saves them with the plugin's writer.
"""

from __future__ import annotations

import json
import re
import threading
import time
import weakref
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..detection.engine import PRETRAINED_MODELS, CompareResult, DetectionSettings, iter_compare
from ..detection.metrics import BLURRY, DEBLURRED, SHARP, Comparison
from ..detection.worker import ModelInfo, pretrained_cache_folder, shared_worker
from ..images import ImageError
from . import session
from .deblur_job import DeblurJob
from .io import write_tiff_layer
from .layer_info import RECORD_KEY, LayerInfo

ROLES = {BLURRY: "before", DEBLURRED: "after", SHARP: "sharp"}
"""The dock's word for each image the engine compares."""
PLACEMENT = ("scale", "translate", "rotate", "shear", "affine", "axis_labels", "units")
"""What a detections layer copies from its source, so that it lies exactly over it."""
CONTOUR = 1
"""Detections are drawn as outlines this many pixels wide (napari's ``contour``): filled, they hide the objects."""
RGB_MODELS = {"2D_versatile_he": 3}
"""Input channels of the pretrained models that do not take one (grey) channel."""
INSTALL_HINT = (
    "StarDist is not installed: pip install 'napari-mpt-deblur[stardist]' (it runs in its own process, "
    "so napari need not restart)"
)

# --- layers and choices (no Qt) -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """The napari layers to compare (None where none is chosen)."""

    before: Any
    """The blurry image."""
    after: Any = None
    """Its deblurred version (ignored when the dock deblurs first)."""
    sharp: Any = None
    """An in-focus image of the same field (optional)."""
    truth: Any = None
    """Ground-truth labels (optional): a Labels layer, or an image of integer labels."""


def is_label_image(layer: Any) -> bool:
    """Whether a layer can hold ground truth: a Labels layer, or a grey image of integers (as read from a file)."""
    info = LayerInfo.of(layer)
    if info.kind == "labels":
        return True
    return info.kind == "image" and not info.rgb and np.issubdtype(np.dtype(info.pixels.dtype), np.integer)


LABEL_SAMPLE_SIDE = 512
"""Side of the central crop of the middle plane that :func:`label_like` looks at (pixels)."""
LABEL_MIN_PIXELS_PER_VALUE = 16
"""A label image has few distinct values: at most one per this many pixels (objects are larger)."""
LABEL_MIN_EQUAL_NEIGHBOURS = 0.8
"""And is piecewise constant: at least this share of neighbouring pixels are equal. Measured: label images
0.96-0.99; microscope and photo images 0.02-0.6 (the sample's noise-free ``sharp cells``, 256 values: 0.48)."""

_LABEL_LIKE: weakref.WeakKeyDictionary[Any, tuple[int, bool]] = weakref.WeakKeyDictionary()
"""layer -> (id of its data, :func:`label_like`), so a menu refresh reads no pixels twice."""


def label_like(data: Any) -> bool:
    """Whether an integer array looks like labels: few distinct values, and mostly equal neighbours.

    Only a crop (``LABEL_SAMPLE_SIDE`` pixels square, at the centre of the middle plane) is read, so that a menu
    refresh stays fast on large or lazy (dask, zarr) stacks.
    """
    if not np.issubdtype(np.dtype(data.dtype), np.integer) or data.ndim < 2 or 0 in data.shape:
        return False
    middle = tuple(n // 2 for n in data.shape[:-2])
    starts = [max(0, (n - LABEL_SAMPLE_SIDE) // 2) for n in data.shape[-2:]]
    crop = tuple(slice(start, start + LABEL_SAMPLE_SIDE) for start in starts)
    plane = np.asarray(data[middle + crop])
    if len(np.unique(plane)) > max(2, plane.size // LABEL_MIN_PIXELS_PER_VALUE):
        return False
    equal = np.count_nonzero(plane[:, 1:] == plane[:, :-1]) + np.count_nonzero(plane[1:] == plane[:-1])
    pairs = plane[:, 1:].size + plane[1:].size
    return pairs == 0 or equal >= LABEL_MIN_EQUAL_NEIGHBOURS * pairs


def looks_like_labels(layer: Any) -> bool:
    """Whether a layer is a Labels layer, or a grey integer image that looks like labels (:func:`label_like`).

    An image the plugin made (a deblurred result: ``metadata["napari_mpt_deblur"]``) is intensities, never labels,
    and is not read: the menus ask in the GUI thread, where reading a lazy result's plane would compute it there.
    """
    info = LayerInfo.of(layer)
    if info.kind == "labels":
        return True
    if not is_label_image(layer) or info.made_by_plugin:
        return False
    data = info.pixels
    known = _LABEL_LIKE.get(layer)
    if known is None or known[0] != id(data):
        known = _LABEL_LIKE[layer] = (id(data), label_like(data))
    return known[1]


def stardist_channels(model: str) -> int | None:
    """Input channels of a StarDist model (a pretrained name or a folder), read without TensorFlow; None if unknown."""
    if model in PRETRAINED_MODELS:
        return RGB_MODELS.get(model, 1)
    try:
        config = json.loads((Path(model).expanduser() / "config.json").read_text())
        return int(config.get("n_channel_in", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def stardist_choices(_: Any = None) -> list[tuple[str, str]]:
    """(label, choice) for the StarDist menu: folders chosen so far (newest first), then the pretrained names.

    A folder is labelled with its name, or its full path when two share a name.
    """
    folders = session.SESSION.stardist_folders()
    names = [Path(folder).name for folder in folders]
    labelled = [(name if names.count(name) == 1 else folder, folder) for name, folder in zip(names, folders)]
    return labelled + [(name, name) for name in PRETRAINED_MODELS]


def folder_problem(folder: Path) -> str | None:
    """Why a folder is not a StarDist model folder, or None."""
    if not (folder / "config.json").is_file():
        return (
            f"{folder.name} is not a StarDist model folder: it has no config.json. Pick the folder that holds "
            "config.json and the weights (weights_best.h5), or choose a pretrained model."
        )
    return None


def describe_stardist(choice: str) -> str:
    """A status line for a StarDist model choice: what it takes and whether it is on this computer."""
    channels = stardist_channels(choice)
    kind = {1: "grey images", 3: "RGB images"}.get(channels or 0, "unknown input")
    if choice in PRETRAINED_MODELS:
        where = "on this computer" if pretrained_cache_folder(choice).is_dir() else "downloaded on first use"
        return f"StarDist model: {choice} (pretrained, for {kind}; {where})"
    return f"StarDist model: {Path(choice).name} (your folder, for {kind})"


def _image_problem(role: str, layer: LayerInfo) -> str | None:
    name = layer.name
    if layer.kind != "image":
        kind = layer.kind
        what = "segmentations" if kind == "labels" else "annotations"
        return (
            f"'{name}' ({role}) is a {kind} layer: choose an image layer; {kind} layers hold {what}, not intensities."
        )
    if 0 in layer.shape:
        return f"'{name}' ({role}) is empty (shape {layer.shape}): choose a layer with pixels."
    return None


def _described(layer: LayerInfo) -> str:
    return f"{layer.shape}{' RGB' if layer.rgb else ''}"


def selection_problem(selection: Selection, deblur_first: bool, channels: int | None) -> str | None:
    """What is wrong with the chosen layers (a message for the user), or None.

    Parameters
    ----------
    selection
        The chosen layers.
    deblur_first
        The dock makes the *after* image itself (``selection.after`` is ignored).
    channels
        The StarDist model's input channels (None when unknown).
    """
    if selection.before is None:
        return "No 'before' image: open the blurry image (or the sample) and choose it under 'before'."
    if not deblur_first and selection.after is None:
        return "No 'after' image: choose the deblurred layer under 'after', or click 'Deblur, then detect'."
    chosen = [("before", selection.before)]
    if not deblur_first:
        chosen.append(("after", selection.after))
    if selection.sharp is not None:
        chosen.append(("sharp", selection.sharp))
    images = [(role, LayerInfo.of(layer)) for role, layer in chosen]
    for role, layer in images:
        problem = _image_problem(role, layer)
        if problem:
            return problem
    before = images[0][1]
    for i, (role, layer) in enumerate(images):
        for other_role, other in chosen[:i]:
            if chosen[i][1] is other:
                return (
                    f"'{layer.name}' is chosen as both '{other_role}' and '{role}': choose a different layer for each."
                )
        if layer.shape != before.shape or layer.rgb != before.rgb:
            return (
                f"'{layer.name}' ({role}) is {_described(layer)} but '{before.name}' (before) is {_described(before)}: "
                "the layers to compare must show the same field, with the same shape."
            )
    try:
        axes = {layer.axes for _, layer in images}
    except ImageError as error:
        return f"{str(error).rstrip('.')}."
    if len(axes) > 1:
        return f"The layers' axis labels name different axes ({', '.join(sorted(axes))}): set them alike."
    if channels == 3 and not before.rgb:
        return (
            "This StarDist model takes RGB images (stained slides such as H&E), but the layers are grey: "
            "choose a fluorescence model such as 2D_versatile_fluo."
        )
    if selection.truth is not None:
        truth = LayerInfo.of(selection.truth)
        if not is_label_image(selection.truth):
            return (
                f"'{truth.name}' (ground truth) is not a label image: choose a Labels layer, or an image of integer "
                "labels (0 = background), or 'none'."
            )
        if truth.shape != before.shape_without_samples:
            return (
                f"'{truth.name}' (ground truth) has shape {truth.shape}, but the images need labels of shape "
                f"{before.shape_without_samples}."
            )
    return None


def rgb_note(selection: Selection, channels: int | None) -> str | None:
    """A warning when a grey (fluorescence) model will see RGB layers as the mean of their samples."""
    if channels == 1 and selection.before is not None and getattr(selection.before, "rgb", False):
        return (
            f"'{selection.before.name}' is RGB and this StarDist model takes grey images: it detects on the mean of "
            "the red, green and blue samples. For stained slides (H&E), choose 2D_versatile_he."
        )
    return None


def suggest_after(names: list[str], before: str | None) -> str | None:
    """An image to compare with ``before``: its newest deblurred result, else any deblurred layer, else another."""
    others = [name for name in names if name != before]
    for candidates in (
        [name for name in others if before and name.startswith(f"{before} deblurred")],
        [name for name in others if "deblurred" in name],
        others,
    ):
        if candidates:
            return candidates[-1]
    return None


# --- results (no Qt) ------------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def image_titles(comparison: Comparison, names: Mapping[str, str]) -> dict[str, str]:
    """Each engine image's title in the dock's table, e.g. ``cells (before)``; ``names`` gives its layer's name."""
    return {key: f"{names.get(key, key)} ({ROLES.get(key, key)})" for key in comparison.reports}


def plot_bars(comparison: Comparison, names: Mapping[str, str]) -> tuple[str, list[tuple[str, float]], float | None]:
    """(title, bars, axis maximum) for the bar plot: mean AP per image when scored, else object counts."""
    reports = comparison.reports
    if comparison.reference:
        bars = [(names.get(key, key), report.mean_ap) for key, report in reports.items() if report.mean_ap is not None]
        return f"mean AP against the {comparison.reference}", bars, 1.0
    return "objects detected", [(names.get(key, key), float(r.stats.objects)) for key, r in reports.items()], None


def summary(comparison: Comparison, info: ModelInfo | None = None, settings: DetectionSettings | None = None) -> str:
    """What the comparison shows, in a line or two for the status line."""
    reports = comparison.reports
    if comparison.reference:
        scores = ", ".join(f"{ROLES.get(key, key)} {_fmt(r.mean_ap, 3)}" for key, r in reports.items())
        lines = [f"mean AP against the {comparison.reference}: {scores}"]
        lines += comparison.findings()  # the words mpt-deblur compare prints
    else:
        counts = ", ".join(f"{ROLES.get(key, key)} {r.stats.objects}" for key, r in reports.items())
        lines = [f"objects: {counts} (add a sharp layer or ground truth to score them)"]
    if info is not None:
        prob = settings.prob_thresh if settings and settings.prob_thresh is not None else info.prob_thresh
        nms = settings.nms_thresh if settings and settings.nms_thresh is not None else info.nms_thresh
        lines.append(f"StarDist {Path(info.name).name}: probability {prob:.2f}, overlap {nms:.2f}")
    return "\n".join(lines)


def detections_layer_kwargs(source: Mapping[str, Any], record: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``viewer.add_labels`` of an image's detections, lying exactly over the image.

    Parameters
    ----------
    source
        The image layer's state (``layer.as_layer_data_tuple()[1]``).
    record
        How the detections were made, stored under ``metadata["napari_mpt_deblur"]``.
    """
    kwargs: dict[str, Any] = {"name": f"{source.get('name', 'image')} detections"}
    kwargs.update({key: source[key] for key in PLACEMENT if source.get(key) is not None})
    kwargs["metadata"] = {RECORD_KEY: dict(record)}
    return kwargs


def labels_file_name(layer_name: str) -> str:
    """A TIFF file name for a labels layer: its name, with the characters file systems refuse replaced by ``_``."""
    name = re.sub(r'[<>:"/\\|?*\x00-\x1f]', "_", layer_name).strip(" .")
    return f"{name or 'labels'}.tif"


def write_labels(path: str | Path, data: Any, state: Mapping[str, Any]) -> list[str]:
    """Save a labels layer as a TIFF with the plugin's writer: atomically, with its pixel size, Z spacing and units.

    Labels that fit are written as 16-bit, so that ImageJ/Fiji open the file as a hyperstack (as
    ``mpt-deblur compare --save-labels`` does). The plugin's reader opens the file again as an image layer of the same
    values and calibration (an image of integers that looks like labels: the Compare dock offers it as ground truth).

    Parameters
    ----------
    path
        The ``.tif`` file; an existing one is replaced only by a complete new one.
    data
        The layer's labels.
    state
        The layer's state (``layer.as_layer_data_tuple()[1]``); the axes recorded by the dock (see
        :func:`detection_record`) name the axes when its axis labels do not.

    Returns
    -------
    list of str
        ``[path]``.

    Raises
    ------
    SaveError
        When the file cannot be written; nothing is left under ``path``.
    """
    labels = np.asarray(data)
    if labels.dtype.kind in "iu" and labels.size and labels.min() >= 0 and labels.max() < 2**16:
        labels = labels.astype(np.uint16)
    meta = {**state, "rgb": False}
    metadata = state.get("metadata") or {}
    record = metadata.get(RECORD_KEY)
    if isinstance(record, Mapping) and isinstance(record.get("axes"), str):
        meta["metadata"] = {**metadata, "axes": record["axes"]}
    return write_tiff_layer(str(path), labels, meta)


# --- the work (in the worker thread) --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deblurred:
    """Yielded once the *before* image is deblurred: the dock adds it as a layer while detection goes on."""

    data: np.ndarray


@dataclass(eq=False)
class CompareRun:
    """One comparison: its inputs and what the worker leaves behind (no Qt widgets, no layers)."""

    sources: dict[str, dict[str, Any]]
    """Engine image -> its layer's state (name and placement; the full state for the deblurred one's source)."""
    data: dict[str, Any]
    truth: Any
    axes: str
    settings: DetectionSettings
    deblur: DeblurJob | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.perf_counter)
    info: ModelInfo | None = None
    """The StarDist model that detected, once the comparison is done."""


def detection_record(run: CompareRun, key: str) -> dict[str, Any]:
    """How an image's detections were made (JSON-ready), for their layer's metadata."""
    settings, info = run.settings, run.info
    return {
        "detections_of": run.sources[key].get("name", key),
        "role": ROLES.get(key, key),
        "axes": run.axes.replace("S", ""),
        "stardist_model": settings.model,
        "prob_thresh": settings.prob_thresh or (info.prob_thresh if info else None),
        "nms_thresh": settings.nms_thresh or (info.nms_thresh if info else None),
        "software": f"napari-mpt-deblur {__version__}",
    }


def compare_steps(run: CompareRun) -> Generator[Any, None, CompareResult]:
    """Deblur first (when asked), then detect and compare; yields progress, status strings and :class:`Deblurred`."""
    job = run.deblur
    if job is not None:
        result = yield from job.deblur_steps()
        run.data[DEBLURRED] = result
        yield Deblurred(result)
    worker = shared_worker()
    yield "loading the StarDist model" + ("" if worker.alive else " (its first start takes a while)") + "..."
    truth = None if run.truth is None else np.asarray(run.truth)
    data = run.data
    steps = iter_compare(
        data[BLURRY],
        data[DEBLURRED],
        data.get(SHARP),
        truth,
        run.axes,
        run.settings,
        worker,
        should_stop=run.stop.is_set,  # checked while StarDist loads and works: it stops within a plane
    )
    result = yield from steps
    run.info = result.model
    return result

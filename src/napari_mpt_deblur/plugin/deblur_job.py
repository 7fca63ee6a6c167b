"""What one run of the Deblur widget does, checked before it starts (no Qt, no napari: testable headless).

The widget reads the chosen layer (:class:`~.layer_info.LayerInfo`), hands it to
:meth:`DeblurJob.from_layer` (which refuses what the model cannot process with
a message for the user), runs the job's engine (:meth:`DeblurJob.deblur_steps`,
or :meth:`DeblurJob.planes` for a lazy result) and adds the result with
:func:`result_layer_kwargs`. A lazy run's result is a
:class:`LazyResult`, whose planes are computed on request; :class:`SavedPlanes`
lets *Save result...* follow and stop a writer. :func:`focus_profile` draws the
per-plane focus curve.
"""

from __future__ import annotations

import copy
import itertools
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property, partial
from pathlib import PurePath
from typing import Any

import numpy as np

from .._version import __version__
from ..config import DeblurSettings
from ..data.focus import focus_score
from ..images import Image, ImageError, check_axes
from ..inference import (
    Cancelled,
    DeblurProgress,
    Deblurrer,
    InputError,
    PlaneByPlane,
    PlaneLayout,
    iter_deblur,
    width_summary,
)
from ..models.files import BUNDLED_MODELS
from ..models.mpt import MPT
from ..runtime import resolve_device, run_to_end
from .layer_info import RECORD_KEY, LayerInfo


@dataclass(frozen=True, eq=False)
class DeblurJob:
    """One validated deblurring run of a napari image layer.

    Build it with :meth:`from_layer`, which checks everything that can be
    checked without computing.
    """

    source: str
    """Name of the layer it deblurs."""
    data: Any = field(repr=False)
    """The layer's data (numpy, dask or zarr; the full-resolution level of a multiscale layer)."""
    axes: str
    """Axes letters of ``data``."""
    settings: DeblurSettings
    """How the engine runs."""
    model: MPT = field(repr=False)
    """The network, a copy of the cached one when it runs on another device."""
    lazy: bool = False
    """True: a lazy result computed plane by plane when shown; False: everything at once."""
    model_name: str = ""
    """The model choice it came from (a bundled name or a file), for the record."""

    @classmethod
    def from_layer(
        cls,
        layer: LayerInfo,
        model: MPT | None,
        settings: DeblurSettings,
        lazy: bool,
        *,
        model_name: str = "",
    ) -> DeblurJob:
        """Check a layer against a model and settings; the job, or an :class:`InputError` saying what to do.

        Parameters
        ----------
        layer
            The layer to deblur (its full-resolution level, for a multiscale layer).
        model
            The network (None when no model is chosen yet).
        settings
            Engine settings; the device must be present on this machine.
        lazy
            Compute planes when shown instead of all at once.
        model_name
            The model choice, recorded in the result's metadata.

        Raises
        ------
        InputError
            For a layer that is not an image, an empty one, a pixel type other
            than integers or floating point, axes that cannot be told apart, a
            3-channel model on grey data, no model, or a device that is missing.
        """
        name, kind = layer.name, layer.kind
        if kind != "image":
            what = "meshes" if kind == "surface" else "annotations"
            raise InputError(
                f"layer {name!r} is a {kind} layer: choose an image layer; {kind} layers hold {what}, not intensities"
            )
        try:
            axes = layer.axes
        except ImageError as error:
            raise InputError(f"layer {name!r}: {error}") from None
        if model is None:
            raise InputError(
                "no model chosen: pick a model file (.safetensors) or a reference checkpoint (.pth) under 'model file'"
            )
        try:
            PlaneLayout.of(Image(layer.pixels, axes, name), model.config.in_channels)
        except InputError as error:
            raise InputError(f"layer {name!r}: {error}") from None
        return cls(name, layer.pixels, axes, settings, _model_for_device(model, settings.device), lazy, model_name)

    @cached_property
    def engine(self) -> Deblurrer:
        """The engine that runs the job, built on first use (it moves the model to the device)."""
        return Deblurrer(self.model, self.settings)

    def deblur_steps(self) -> Generator[DeblurProgress, None, np.ndarray]:
        """The eager run's compute generator: every plane, tile by tile; returns the deblurred array.

        The engine is built when it starts, in the thread that runs it.
        """
        return (yield from iter_deblur(self.engine, self.data, self.axes))

    def planes(self) -> PlaneByPlane:
        """The lazy run's engine: the image deblurred one block at a time, on request."""
        return PlaneByPlane(self.engine, self.data, self.axes)

    def rgb_note(self) -> str | None:
        """How an RGB layer is treated, for a notification (None for other layers): the user sees only colours."""
        if "S" not in self.axes:
            return None
        samples = self.data.shape[self.axes.index("S")]
        alpha = samples == 4
        if self.model.config.in_channels == 1:
            what = "red, green, blue and alpha" if alpha else "red, green and blue"
            return (
                f"'{self.source}' is RGB and the model is grey: its {what} channels are deblurred one by one, "
                "each with its own intensity scaling, then put back together. For colour, choose an RGB model."
            )
        if alpha:
            return f"'{self.source}' is RGBA: the model deblurs its colours; the alpha channel is kept unchanged."
        return None

    def provenance(self) -> dict[str, Any]:
        """What made the result (JSON-ready), for its metadata: model choice and card, axes, the settings as
        the engine used them (:meth:`~napari_mpt_deblur.inference.Deblurrer.settings_used`), and the blur widths
        the model estimated (:func:`~napari_mpt_deblur.inference.width_summary`) when it judged any."""
        card = getattr(self.model, "card", None)
        used = self.engine.settings_used()
        judged = width_summary(self.engine.estimated_widths)  # none before a lazy result computes its planes
        return {
            "source": self.source,
            "model": self.model_name,
            "model_provenance": dict(card.provenance) if card else {},
            "normalization": asdict(used.normalization),
            "tile": used.tile,
            "settings": asdict(used),
            "axes": self.axes,
            "mode": "lazy" if self.lazy else "eager",
            "software": f"napari-mpt-deblur {__version__}",
        } | ({"estimated_blur_width": judged} if judged else {})


def _model_for_device(model: MPT, device: str) -> MPT:
    """The model itself when it already lives on ``device``, else a copy.

    The engine moves its model to the device in place; the session's cached
    model is shared by every layer and widget, so a GPU run must not move it
    away from under a lazy layer that computes on the CPU.
    """
    try:
        target = resolve_device(device)
    except ValueError as error:
        raise InputError(str(error)) from None
    current = next(iter(model.parameters()), None)
    if current is None or current.device == target:
        return model
    return copy.deepcopy(model)


def model_label(choice: str) -> str:
    """A short name for a model choice: a bundled model's name, or a file's name without its suffix."""
    return choice if choice in BUNDLED_MODELS else PurePath(choice).stem


def result_name(source: str, model: str = "") -> str:
    """The result layer's name: ``"<source> deblurred (<model>)"`` (e.g. ``cells deblurred (tuned)``)."""
    return f"{source} deblurred ({model_label(model)})" if model else f"{source} deblurred"


def result_source(name: str, metadata: Mapping[str, Any] | None, names: Sequence[str]) -> str | None:
    """Which of ``names`` a layer is the deblurred result of, or None.

    The source its metadata records (see :func:`result_layer_kwargs`), else, for a result made elsewhere, the
    longest of ``names`` that its name starts with, followed by ``" deblurred"``.
    """
    record = (metadata or {}).get(RECORD_KEY)
    recorded = record.get("source") if isinstance(record, Mapping) else None
    if recorded in names and recorded != name:
        return recorded
    made_from = [other for other in names if other != name and name.startswith(f"{other} deblurred")]
    return max(made_from, key=len, default=None)


def result_layer_kwargs(source: Mapping[str, Any], provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``viewer.add_image`` of a result that lies exactly over its source.

    Parameters
    ----------
    source
        The source layer's state (``layer.as_layer_data_tuple()[1]``).
    provenance
        How the result was made (:meth:`DeblurJob.provenance`), stored under
        ``metadata["napari_mpt_deblur"]``.

    Returns
    -------
    dict
        ``name`` (:func:`result_name`: ``"<source> deblurred (<model>)"``), the source's placement (scale,
        translate, rotate, shear, affine), axis labels and units, display
        (contrast limits, so a lazy result is not computed to find them; RGB;
        colormap for grey data; blending) and metadata.
    """
    kwargs: dict[str, Any] = {"name": result_name(source.get("name", "image"), (provenance or {}).get("model", ""))}
    for key in ("scale", "translate", "rotate", "shear", "affine", "axis_labels", "units", "rgb", "blending"):
        if source.get(key) is not None:
            kwargs[key] = source[key]
    if source.get("contrast_limits") is not None:
        kwargs["contrast_limits"] = list(source["contrast_limits"])
    if not source.get("rgb") and source.get("colormap") is not None:
        kwargs["colormap"] = source["colormap"]
    metadata = dict(source.get("metadata") or {})
    metadata[RECORD_KEY] = dict(provenance or {})
    kwargs["metadata"] = metadata
    return kwargs


CACHE_BYTES = 512 * 2**20
"""A lazy result keeps its computed planes up to this size (the planes on display are always kept)."""


def _napari_draws(frame: Any) -> bool:
    """Whether ``frame`` is napari slicing a layer to draw it (its ``napari.layers.<kind>._slice`` modules).

    That reader must never wait: it runs in the GUI thread. Any other reader gets the deblurred values. napari
    has no public way to tell its drawing apart; should it move this code, a lazy layer waits for its planes in
    the GUI thread, as a dask array does, and ``test_lazy_mode_never_blocks_the_event_loop`` fails.
    """
    module = frame.f_globals.get("__name__", "") if frame is not None else ""
    return module.startswith("napari.layers.") and module.endswith("._slice")


class LazyResult:
    """The result layer's data in lazy mode: a read-only array of the deblurred image, planes computed on request.

    Read like an array (``result[index]``, ``numpy.asarray(result)``), it gives the deblurred values: planes
    computed before come from a cache, the others are computed there and then. napari drawing the layer is the
    exception, since it slices in the GUI thread: planes not computed yet come back as zeros, they become
    :meth:`wanted`, and :attr:`on_wanted` is called (from the thread that drew) for whoever computes them,
    in a worker (:meth:`iter_compute`), before the layer is refreshed. Being read-only, a copy is the same
    object.

    Parameters
    ----------
    planes
        The engine, block by block.
    cache_bytes
        How much of the computed planes to keep (least recently read first out), beyond those on display.
    """

    def __init__(self, planes: PlaneByPlane, cache_bytes: int = CACHE_BYTES) -> None:
        self.planes = planes
        self.shape = planes.shape
        self.dtype = planes.dtype
        self.cache_bytes = cache_bytes
        self.on_wanted: Callable[[], None] | None = None
        """Called when what napari draws needs planes not computed yet (from the thread that drew)."""
        self._cache: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._wanted: list[tuple[int, ...]] = []
        self._shown: set[tuple[int, ...]] = set()

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __copy__(self) -> LazyResult:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> LazyResult:
        return self  # read-only: a copy (napari's Duplicate Layer makes one) is the same array, computed once

    def __repr__(self) -> str:
        return f"LazyResult(shape={self.shape}, dtype={self.dtype}, computed={self.computed()}/{self.blocks})"

    @property
    def blocks(self) -> int:
        """How many blocks (planes) the image has."""
        return math.prod(self.shape[axis] for axis in self.planes.iterated)

    def computed(self) -> int:
        """How many blocks are in the cache now."""
        return len(self._cache)

    def is_computed(self, position: tuple[int, ...]) -> bool:
        return position in self._cache

    def wanted(self) -> list[tuple[int, ...]]:
        """The positions (see :meth:`PlaneByPlane.positions`) napari's last drawing needed and did not get."""
        with self._lock:
            return [position for position in self._wanted if position not in self._cache]

    def shown(self) -> set[tuple[int, ...]]:
        """The positions napari's last drawing covered."""
        with self._lock:
            return set(self._shown)

    def forget_display(self) -> None:
        """Nothing is drawn any more (the layer left the viewer): nothing is wanted."""
        with self._lock:
            self._wanted, self._shown = [], set()

    def __getitem__(self, index: Any) -> np.ndarray:
        import sys

        return self._read(index, wait=not _napari_draws(sys._getframe(1)))

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        values = self._read((), wait=True)
        return values if dtype is None else values.astype(dtype, copy=False)

    def read(self, index: Any, stop: Callable[[], bool] | None = None) -> np.ndarray:
        """``result[index]``, computing what is missing; :class:`~napari_mpt_deblur.inference.Cancelled` between
        two tiles once ``stop()`` is true."""
        return self._read(index, wait=True, stop=stop)

    def iter_compute(self, position: tuple[int, ...]) -> Generator[DeblurProgress, None, np.ndarray]:
        """Compute the block at ``position`` (tile by tile, stoppable between tiles) and keep it; returns it."""
        block = yield from self.planes.iter_block(position)
        self._keep(position, block)
        return block

    def _keep(self, position: tuple[int, ...], block: np.ndarray) -> None:
        with self._lock:
            self._cache[position] = block
            self._cache.move_to_end(position)
            held = sum(kept.nbytes for kept in self._cache.values())
            for old in list(self._cache):
                if held <= self.cache_bytes:
                    break
                if old not in self._shown and old != position:
                    held -= self._cache.pop(old).nbytes

    def _cached(self, position: tuple[int, ...]) -> np.ndarray | None:
        with self._lock:
            block = self._cache.get(position)
            if block is not None:
                self._cache.move_to_end(position)
            return block

    def _read(self, index: Any, wait: bool, stop: Callable[[], bool] | None = None) -> np.ndarray:
        items = _full_index(index, self.ndim)
        if items is None:  # newaxis and the like: rare, read everything and let numpy index it
            return self._read((), wait, stop)[index]
        index = items
        iterated = self.planes.iterated
        chosen: dict[int, list[int]] = {}
        for axis in iterated:
            item, length = index[axis], self.shape[axis]
            if isinstance(item, (int, np.integer)):
                if not -length <= item < length:
                    raise IndexError(f"index {item} is out of bounds for axis {axis} with size {length}")
                chosen[axis] = [int(item) % length]
            elif isinstance(item, slice):
                chosen[axis] = list(range(length)[item])
            else:  # a list or array of indices: every block, numpy picks
                chosen[axis] = list(range(length))
        out = np.zeros([len(chosen[a]) if a in chosen else n for a, n in enumerate(self.shape)], self.dtype)
        missing, covered = [], []
        for combination in itertools.product(*(range(len(chosen[axis])) for axis in iterated)):
            position = tuple(chosen[axis][k] for axis, k in zip(iterated, combination))
            covered.append(position)
            block = self._cached(position)
            if block is None and wait:
                block = run_to_end(self.iter_compute(position), None if stop is None else partial(_check, stop))
            if block is None:
                missing.append(position)
                continue
            where: list[int | slice] = [slice(None)] * self.ndim
            for axis, k in zip(iterated, combination):
                where[axis] = slice(k, k + 1)
            out[tuple(where)] = block
        if not wait:
            self._want(covered, missing)
        return out[tuple(_within(item) if axis in chosen else item for axis, item in enumerate(index))]

    def _want(self, covered: list[tuple[int, ...]], missing: list[tuple[int, ...]]) -> None:
        with self._lock:
            changed = missing != self._wanted
            self._wanted, self._shown = missing, set(covered)
        callback = self.on_wanted
        if callback is not None and (changed or missing):
            callback()


def _check(stop: Callable[[], bool], _: Any) -> None:
    if stop():
        raise Cancelled()


class SavedPlanes:
    """A layer's data as a writer reads it, a plane at a time: each plane read is reported, and the reading
    stops (:class:`~napari_mpt_deblur.inference.Cancelled`) once ``stop()`` is true, between two tiles of a lazy
    result's plane, so the writer leaves nothing behind.

    Parameters
    ----------
    data
        The layer's data (numpy, dask, zarr or :class:`LazyResult`).
    planes
        How many planes the writer reads (one per position on the axes before Y).
    report
        Called with (planes read, ``planes``) after every plane, in the writer's thread.
    stop
        Whether the user cancelled.
    """

    def __init__(self, data: Any, planes: int, report: Callable[[int, int], None], stop: Callable[[], bool]) -> None:
        self.data, self.planes, self.report, self.stop = data, planes, report, stop
        self.shape, self.dtype = tuple(data.shape), np.dtype(data.dtype)
        self.done = 0

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index: Any) -> np.ndarray:
        if self.stop():
            raise Cancelled()
        values = self.data.read(index, self.stop) if isinstance(self.data, LazyResult) else np.asarray(self.data[index])
        if values.size:  # not a probe for the dtype
            self.done += 1
            self.report(min(self.done, self.planes), self.planes)
        return values


def _within(item: Any) -> Any:
    """An iterated axis's index into the blocks read for it: all of a slice's, the one of an integer's."""
    if isinstance(item, slice):
        return slice(None)
    return 0 if np.ndim(item) == 0 else item  # a list or array of indices: every block was read


def _full_index(index: Any, ndim: int) -> tuple[Any, ...] | None:
    """``index`` as one entry per axis (Ellipsis expanded), or None for what :class:`LazyResult` leaves to numpy."""
    items = index if isinstance(index, tuple) else (index,)
    if any(item is None for item in items) or sum(item is Ellipsis for item in items) > 1:
        return None
    if any(isinstance(item, np.ndarray) and item.dtype == bool and item.ndim > 1 for item in items):
        return None  # a mask over several axes
    at = next((i for i, item in enumerate(items) if item is Ellipsis), None)
    if at is not None:
        items = items[:at] + (slice(None),) * (ndim - len(items) + 1) + items[at + 1 :]
    if len(items) > ndim:
        raise IndexError(f"too many indices: the array is {ndim}-dimensional, but {len(items)} were indexed")
    return items + (slice(None),) * (ndim - len(items))


def focus_profile(data: Any, axes: str) -> np.ndarray:
    """Focus score (:func:`~napari_mpt_deblur.data.focus.focus_score`) of every plane.

    Parameters
    ----------
    data
        A numpy, dask or zarr array; a dask array is computed one plane at a time.
    axes
        Its axes letters; Y and X (then S, if any) come last.

    Returns
    -------
    numpy.ndarray
        One score per plane, planes in C order over every axis before Y
        (RGB planes scored on the mean of their samples); NaN for planes
        smaller than 3 x 3 pixels.
    """
    try:
        axes = check_axes(axes, tuple(data.shape))
    except ImageError as error:
        raise ValueError(str(error)) from None
    outer = tuple(data.shape[: axes.index("Y")])
    scores = np.empty(math.prod(outer), dtype=np.float64)
    for position, index in enumerate(np.ndindex(*outer)):
        plane = np.asarray(data[index])
        if "S" in axes:
            plane = plane.mean(axis=-1)
        scores[position] = focus_score(plane) if min(plane.shape) >= 3 else np.nan
    return scores

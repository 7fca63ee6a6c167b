"""The inference engine: deblur any 2-D to N-D image, lazily or eagerly, locally or on a dask cluster.

One path serves every caller:

- :class:`Deblurrer` holds a model on a device with the :class:`DeblurSettings`
  and deblurs one *block* (a plane, or an RGB plane) in blended tiles; a
  generator, so it reports each tile and stops between tiles when closed.
- :func:`deblur_lazy` returns a dask array of the input's shape, one plane per
  chunk, computed only when read (napari shows one plane while the rest waits).
- :func:`iter_deblur` computes everything, yielding :class:`DeblurProgress`
  (the GUI's and the CLI's progress bars, cancellation by closing it).
- :func:`deblur_file` streams a file (TIFF, OME-TIFF, OME-Zarr) to a new file,
  plane by plane, so memory stays flat in the stack depth.

Intensities are normalised as the model file records (or as the settings say)
and mapped back to the input's scale and dtype (clipped, never wrapped).
"""

from __future__ import annotations

import functools
import os
import queue
import threading
import uuid
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import DeblurSettings, IntensityNormalization
from .data.defocus import widefield_psf
from .data.optics import sharpen_in_focus
from .images import Image, ImageError, as_image, output_format, write_image
from .models.files import model_from_bytes, model_to_bytes
from .models.mpt import MPT, MilderBlur
from .normalization import intensity_range
from .runtime import MAX_CPU_WORKERS, autocast_dtype, cpu_workers, resolve_device, run_to_end, torch_threads
from .tiling import TILE_GROWTH, iter_tiled_forward, tile_grid

DEFAULT_TILE = 512
"""Tile side when the model file names none: big tiles agree better with whole planes (ISCA is global
per tile) and cost about the same per pixel on large planes; see docs/inference.md. The planner may
enlarge tiles up to :data:`~napari_mpt_deblur.tiling.TILE_GROWTH` (1.5x the side) to need fewer of them."""
DEFAULT_OVERLAP = 32
"""Overlap when the settings name none (and at most a quarter of the tile): with tiles rounded to the
network's 64-pixel multiple, 32 keeps the pixels computed within 1.3x the plane's from 512^2 to 4096^2
(64 would reach 1.38x); agreement with whole planes is measured in docs/inference.md."""
MIN_TILE = 64
STACK_SAMPLE = 2**24
"""At most this many values per channel are kept to estimate stack-wide percentiles."""
FINITE_PRECHECK_BYTES = 2**30
"""Floating-point inputs up to this size are checked for NaN and infinity before the first plane is
deblurred (reading them costs far less than deblurring them); larger ones plane by plane."""


class InputError(ValueError):
    """An input the model cannot process; the message says why."""


class Cancelled(Exception):
    """The computation was stopped on request."""


@dataclass(frozen=True)
class DeblurProgress:
    """Where a computation stands; yielded after every forward pass."""

    planes_done: int
    planes_total: int
    tiles_done: int
    """Tiles finished over the whole job (planes x tiles per plane)."""
    tiles_total: int
    message: str | None = None
    """Something the user should know (e.g. a smaller batch after running out of GPU memory)."""

    @property
    def fraction(self) -> float:
        return self.tiles_done / self.tiles_total if self.tiles_total else 1.0


# --- how an image maps onto the model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlaneLayout:
    """How the axes of an image map onto a model's input.

    A *block* is what one task reads: the whole Y and X, the whole ``group_axis``
    and one entry of every other axis. A 1-channel model deblurs each entry of
    the group axis (RGB samples) on its own; a 3-channel model takes the group
    axis (S, or a C axis of 3 or 4 entries) as its colours, and a 4th entry
    (alpha) passes through unchanged.
    """

    axes: str
    shape: tuple[int, ...]
    model_channels: int
    group_axis: int | None
    """Axis kept whole in a block (RGB samples or colours), or None."""
    stat_axis: int | None
    """Axis whose entries get their own stack-wide statistics (channels of a 1-channel model), or None."""

    @classmethod
    def of(cls, image: Image, model_channels: int) -> PlaneLayout:
        axes, shape = image.axes, image.shape
        if 0 in shape:
            raise InputError(f"the image is empty (shape {shape})")
        dtype = np.dtype(image.dtype)
        if dtype == np.bool_ or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
            raise InputError(f"unsupported pixel type {dtype}: need integers or floating point")
        if model_channels == 1:
            group = axes.index("S") if "S" in axes else None
            stat = group if group is not None else (axes.index("C") if "C" in axes else None)
            return cls(axes, shape, 1, group, stat)
        colour = next((axes.index(a) for a in "SC" if a in axes and shape[axes.index(a)] in (3, 4)), None)
        if colour is None or model_channels != 3:
            found = ", ".join(f"{a}={n}" for a, n in zip(axes, shape))
            raise InputError(
                f"a {model_channels}-channel model needs RGB data (an S or C axis of 3 or 4 entries); "
                f"this image is 1-channel ({found}). Use a grayscale model, or pass axes"
            )
        return cls(axes, shape, 3, colour, None)

    @property
    def block_chunks(self) -> tuple[int, ...]:
        return tuple(
            n if (a in "YX" or i == self.group_axis) else 1 for i, (a, n) in enumerate(zip(self.axes, self.shape))
        )

    @property
    def plane_size(self) -> tuple[int, int]:
        return self.shape[self.axes.index("Y")], self.shape[self.axes.index("X")]

    def block_indices(self) -> Iterator[tuple[int | slice, ...]]:
        """Index of every block in C order (the page order of a TIFF)."""
        iterated = [i for i, a in enumerate(self.axes) if a not in "YX" and i != self.group_axis]
        for position in np.ndindex(*[self.shape[i] for i in iterated]):
            index: list[int | slice] = [slice(None)] * len(self.shape)
            for axis, value in zip(iterated, position):
                index[axis] = slice(value, value + 1)
            yield tuple(index)

    @property
    def blocks(self) -> int:
        return int(np.prod([n for n, c in zip(self.shape, self.block_chunks) if c == 1], dtype=np.int64))

    def to_units(self, block: np.ndarray) -> np.ndarray:
        """A block as (k, Y, X): its group-axis entries first."""
        order = [self.group_axis] if self.group_axis is not None else []
        order += [i for i in range(block.ndim) if i != self.group_axis]
        y, x = self.plane_size
        return block.transpose(order).reshape(-1, y, x)

    def from_units(self, units: np.ndarray, block_shape: tuple[int, ...]) -> np.ndarray:
        """Inverse of :meth:`to_units`."""
        if self.group_axis is None:
            return units.reshape(block_shape)
        moved = (block_shape[self.group_axis],) + tuple(n for i, n in enumerate(block_shape) if i != self.group_axis)
        return np.moveaxis(units.reshape(moved), 0, self.group_axis)

    def describe(self, index: tuple[int | slice, ...]) -> str:
        """A block's place for messages, e.g. ``'plane T=0, Z=4'`` (``'the plane'`` for a single plane)."""
        where = [
            f"{axis}={position.start}"
            for axis, position in zip(self.axes, index)
            if isinstance(position, slice) and position.start is not None
        ]
        return f"plane {', '.join(where)}" if where else "the plane"

    def stat_index(self, index: tuple[int | slice, ...]) -> int | None:
        """For a block whose stat axis is iterated (C of a 1-channel model), its channel."""
        if self.stat_axis is None or self.stat_axis == self.group_axis:
            return None
        return index[self.stat_axis].start


def stack_ranges(image: Image, layout: PlaneLayout, normalization: IntensityNormalization) -> np.ndarray:
    """Stack-wide (low, high) per channel, shape (channels, 2), from a bounded sample of every plane.

    Channels are the entries of the layout's stat axis (one row when it has none).
    Reads the whole stack once; memory stays below ``STACK_SAMPLE`` values per channel.
    """
    channels = layout.shape[layout.stat_axis] if layout.stat_axis is not None else 1
    per_block = max(1, STACK_SAMPLE // max(1, layout.blocks // channels))
    samples: list[list[np.ndarray]] = [[] for _ in range(channels)]
    for index in layout.block_indices():
        units = layout.to_units(read_block(image, index, layout))
        check_finite(units, layout.describe(index))
        inner = layout.stat_index(index)
        groups = [units] if layout.stat_axis is None else ([units] if inner is not None else list(units))
        for offset, values in enumerate(groups):
            flat = values.reshape(-1)
            step = max(1, flat.size // per_block)
            samples[inner if inner is not None else offset].append(flat[::step].astype(np.float32))
    return np.array([intensity_range(np.concatenate(s), normalization) for s in samples])


def read_block(image: Image, index: tuple[int | slice, ...], layout: PlaneLayout | None = None) -> np.ndarray:
    """Read one block here, in this thread (never through a distributed client: file handles stay local).

    Raises
    ------
    InputError
        When the pixel data cannot be read (a file cut short, corrupt
        compressed data...), naming the plane.
    """
    try:
        return np.asarray(image.data[index].compute(scheduler="sync"))
    except (InputError, ImageError):
        raise
    except Exception as error:  # tifffile, zlib, zarr and codecs raise many types for damaged data
        where = layout.describe(index) if layout is not None else "a plane"
        reason = str(error).splitlines()[0] if str(error) else ""
        raise InputError(
            f"cannot read {where}: the pixel data are damaged or cut short ({type(error).__name__}: {reason})"
        ) from None


def check_finite(values: np.ndarray, where: str = "the image") -> None:
    """Refuse NaN and infinite values; ``where`` names the plane in the message."""
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        raise InputError(f"{where} contains NaN or infinite values; replace them (e.g. with 0) first")


def check_all_finite(image: Image, layout: PlaneLayout) -> None:
    """Check every plane for NaN and infinity before any is deblurred, where that is cheap.

    Only floating-point data can hold them, and only inputs up to
    :data:`FINITE_PRECHECK_BYTES` are read for it (larger ones are checked plane
    by plane as they are deblurred). The message names the first bad plane.
    """
    if not np.issubdtype(np.dtype(image.dtype), np.floating):
        return
    if int(np.prod(image.shape, dtype=np.int64)) * np.dtype(image.dtype).itemsize > FINITE_PRECHECK_BYTES:
        return
    for index in layout.block_indices():
        check_finite(read_block(image, index, layout), layout.describe(index))


# --- the model on a device ------------------------------------------------------------------------------------------


class Deblurrer:
    """A model on a device with the engine's settings; deblurs blocks tile by tile.

    Parameters
    ----------
    model
        The network (``model.card`` supplies the normalisation and tile size when present).
    settings
        Tile, overlap, batch, device, precision and normalisation.
    """

    def __init__(self, model: MPT, settings: DeblurSettings | None = None) -> None:
        self.settings = settings or DeblurSettings()
        try:
            self.device = resolve_device(self.settings.device)
        except ValueError as error:
            raise InputError(str(error)) from None
        if self.settings.blur_sigma_px is not None and not model.config.blur_conditioned:
            raise InputError(
                "this model takes no blur width (it judges the blur from the image): leave the blur width out, "
                "or use a model that takes one (mpt-deblur grow --blur-width, then train it)"
            )
        self.model = model.to(self.device).eval()
        card = getattr(model, "card", None)
        self.normalization = self.settings.normalization or (card.normalization if card else IntensityNormalization())
        tile = self.settings.tile
        self.tile = tile if tile is not None else ((card.tile_size if card else None) or DEFAULT_TILE)
        self.batch = self.settings.batch or (1 if self.device.type == "cpu" else 4)
        self.autocast = autocast_dtype(self.device, self.settings.precision)
        self.channels = model.config.in_channels
        self.size_multiple = model.config.size_multiple
        self.tile_growth = TILE_GROWTH
        """How far the planner may enlarge tiles; 1 after running out of memory (tiles then stay as asked)."""
        self.estimated_widths: list[float] = []
        """The blur widths (pixels) the model's estimator judged, one per unit, in the order they were judged."""
        optics = card.in_focus_optics if card is not None and self.settings.sharpen_in_focus else None
        self.in_focus_psf = None if optics is None else widefield_psf(0.0, **optics.optics())
        """The in-focus PSF each output is sharpened against (:func:`sharpen_in_focus`), or None."""

    @property
    def overlap(self) -> int:
        """The overlap in use: the setting, or a quarter of the tile (at most 32); at most half the tile."""
        if self.tile == 0:
            return 0
        requested = self.settings.overlap
        return default_overlap(self.tile) if requested is None else min(requested, self.tile // 2)

    def settings_used(self) -> DeblurSettings:
        """The settings as this deblurrer resolved them: the model file's tile and normalisation where the settings
        left them to it, the device ``auto`` found, the batch and precision for that device. Tile and batch are
        those in use now (smaller after running out of GPU memory)."""
        precision = "fp32" if self.autocast is None else "bf16" if self.autocast == torch.bfloat16 else "fp16"
        return replace(
            self.settings,
            tile=self.tile,
            overlap=self.overlap,
            batch=self.batch,
            device=str(self.device),
            precision=precision,
            normalization=self.normalization,
        )

    def tile_windows(self, height: int, width: int) -> list[tuple[slice, slice]]:
        """The tiles of a plane as this deblurrer plans them in the calling thread (see
        :func:`~napari_mpt_deblur.tiling.plan_tiles`; on the CPU a plane of one tile is cut into one per worker
        when that wastes little, except inside a plane deblurred side by side with others)."""
        return tile_grid(height, width, self.tile, self.overlap, self.size_multiple, self.tile_growth, self._split())

    def _split(self) -> int:
        """Tiles a plane is cut into at least, so each CPU worker has one (1 on a GPU or on one thread)."""
        return cpu_workers(MAX_CPU_WORKERS) if self.device.type == "cpu" else 1

    def tiles_per_plane(self, height: int, width: int) -> int:
        return len(self.tile_windows(height, width))

    def unit_width(self, scaled: torch.Tensor) -> float | None:
        """The blur width the network is told for one normalised (C, H, W) unit, or None (it judges the blur).

        The settings' width when there is one (only a blur-conditioned model is given one: ``__init__``
        checks); else the model's own estimate from the whole unit when it carries an estimator
        (``MPTConfig.blur_estimator``), so that every tile of a plane is told the same width. The network reads
        either widened by ``MPTConfig.width_margin`` (:meth:`MPT.forward`).
        """
        if self.settings.blur_sigma_px is not None:
            return self.settings.blur_sigma_px
        estimator = getattr(self.model, "blur_estimator", None)
        if estimator is None:
            return None
        width = estimator.estimate(scaled)
        self.estimated_widths.append(width)  # one append per unit: safe from the threads that run planes side by side
        return width

    def describe_judged(self, since: int = 0) -> str | None:
        """The blur widths judged from the ``since``-th unit on, in words (:func:`describe_estimated_widths`)."""
        return describe_estimated_widths(self.estimated_widths[since:], self.model.milder_blur)

    def _network(self, x: torch.Tensor, width: float | None = None) -> torch.Tensor:
        network = self.model.network_for(width)  # planes less blurred than a fine-tune learned from: MilderBlur
        arguments = (x,) if width is None else (x, width)
        if self.autocast is None:
            return network(*arguments)
        with torch.autocast(self.device.type, dtype=self.autocast):
            return network(*arguments).float()

    def iter_block(
        self, block: np.ndarray, layout: PlaneLayout, ranges: np.ndarray | None = None, stat_index: int | None = None
    ) -> Generator[tuple[int, int, str | None], None, np.ndarray]:
        """Deblur one block, yielding (tiles done, tiles total, message) and returning the result.

        ``ranges`` are stack-wide (low, high) rows (see :func:`stack_ranges`);
        None normalises each unit by its own statistics.
        """
        block = np.asarray(block)
        check_finite(block)
        units = layout.to_units(block)
        out = np.empty(units.shape, dtype=block.dtype)
        if self.channels == 3:
            groups = [(slice(0, 3), 0)]
            out[3:] = units[3:]  # alpha passes through
        else:
            groups = [(slice(k, k + 1), k) for k in range(units.shape[0])]
        per_unit = self.tiles_per_plane(*layout.plane_size)
        done_before = 0
        total = per_unit * len(groups)
        for where, offset in groups:
            values = units[where]
            if ranges is None:
                low, high = intensity_range(values, self.normalization)
            else:
                row = ranges[stat_index if stat_index is not None else (offset if len(ranges) > 1 else 0)]
                low, high = float(row[0]), float(row[1])
            result = yield from self._forward_with_fallback(values, low, high, done_before, total)
            if self.in_focus_psf is not None:  # the whole plane: sharpening tiles would seam them
                result = np.stack([sharpen_in_focus(plane, self.in_focus_psf) for plane in result])
            out[where] = to_dtype(result * (high - low) + low, block.dtype)
            done_before += per_unit
        return layout.from_units(out, block.shape)

    def _forward_with_fallback(
        self, values: np.ndarray, low: float, high: float, done_before: int, total: int
    ) -> Generator[tuple[int, int, str | None], None, np.ndarray]:
        scaled = ((values.astype(np.float32) - low) / (high - low)).astype(np.float32)
        x = torch.from_numpy(scaled)[None].to(self.device)
        with torch.inference_mode():  # once per unit, not again when running out of memory shrinks the tiles
            network = functools.partial(self._network, width=self.unit_width(x[0]))
        messages: list[str] = []
        while True:
            try:
                with torch.inference_mode():
                    steps = iter_tiled_forward(
                        network,
                        x,
                        self.tile,
                        self.overlap,
                        self.batch,
                        self.size_multiple,
                        self.tile_growth,
                        workers=self._tile_workers(*x.shape[-2:]),
                        split=self._split(),
                    )
                    while True:
                        try:
                            done, _ = next(steps)
                        except StopIteration as finished:
                            return finished.value[0].float().cpu().numpy()
                        yield done_before + done, total, "; ".join(messages) or None
                        messages.clear()
            except torch.OutOfMemoryError:
                messages.append(self._shrink())

    def _tile_workers(self, height: int, width: int) -> int:
        """Forward passes of one plane's tiles to run side by side (on the CPU; 1 inside a side-by-side plane)."""
        if self.device.type != "cpu":
            return 1
        return cpu_workers(-(-self.tiles_per_plane(height, width) // self.batch))

    def _shrink(self) -> str:
        """After running out of memory: halve the batch, else stop enlarging tiles, else halve the tile; a message."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.batch > 1:
            self.batch //= 2
            return f"out of GPU memory: retrying with {self.batch} tile(s) per batch"
        if self.tile != 0 and self.tile_growth > 1:
            self.tile_growth = 1.0  # the planner's enlarged tiles (up to 2.25x the area) are the first thing to give up
            return f"out of GPU memory: retrying with tiles of at most {self.tile} pixels"
        if self.tile == 0 or self.tile > MIN_TILE:
            self.tile = DEFAULT_TILE if self.tile == 0 else max(MIN_TILE, self.tile // 2)
            return f"out of GPU memory: retrying with {self.tile}-pixel tiles"
        raise InputError(
            f"out of memory on {self.device} even with one {MIN_TILE}-pixel tile per pass; "
            "use device 'cpu' or a smaller model"
        )


def default_overlap(tile: int) -> int:
    """The overlap used when the settings name none: a quarter of the tile, at most :data:`DEFAULT_OVERLAP`."""
    return min(DEFAULT_OVERLAP, tile // 4)


def to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast to the input's dtype: rounded and clipped for integers (no wrap-around)."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype, copy=False)


# --- sending the model to dask workers ------------------------------------------------------------------------------

_WORKER_DEBLURRERS: dict[str, Deblurrer] = {}
_WORKER_LOCK = threading.Lock()


class ModelHandle:
    """A picklable reference to a :class:`Deblurrer` for dask tasks.

    In this process it is the live deblurrer. Pickled (for process workers or a
    distributed cluster) it travels as the model file's bytes plus the settings,
    and each worker process builds its deblurrer once and reuses it for every
    plane (``auto`` then picks the worker's own GPU).
    """

    def __init__(self, deblurrer: Deblurrer) -> None:
        self.key = uuid.uuid4().hex
        self._deblurrer: Deblurrer | None = deblurrer
        self._bytes: bytes | None = None
        self._settings = deblurrer.settings

    def __dask_tokenize__(self) -> str:
        return self.key

    def __getstate__(self) -> dict[str, Any]:
        if self._bytes is None and self._deblurrer is not None:
            self._bytes = model_to_bytes(self._deblurrer.model)
        return {"key": self.key, "_bytes": self._bytes, "_settings": self._settings, "_deblurrer": None}

    def get(self) -> Deblurrer:
        if self._deblurrer is not None:
            return self._deblurrer
        with _WORKER_LOCK:
            deblurrer = _WORKER_DEBLURRERS.get(self.key)
            if deblurrer is None:
                deblurrer = Deblurrer(model_from_bytes(self._bytes), self._settings)
                _WORKER_DEBLURRERS[self.key] = deblurrer
        return deblurrer


def loaded_models() -> int:
    """How many models this process has built from handles (one per job and worker process)."""
    return len(_WORKER_DEBLURRERS)


def _deblur_block(
    block: np.ndarray, handle: ModelHandle, layout: PlaneLayout, ranges: np.ndarray | None, stat_index: int | None
) -> np.ndarray:
    """A dask task: one block, start to end."""
    return run_to_end(handle.get().iter_block(block, layout, ranges, stat_index))


def _prepare(
    model: MPT | Deblurrer, data: Any, axes: str | None, settings: DeblurSettings | None
) -> tuple[Deblurrer, Image, PlaneLayout]:
    deblurrer = model if isinstance(model, Deblurrer) else Deblurrer(model, settings)
    try:
        image = as_image(data, axes)
    except ImageError as error:
        raise InputError(str(error)) from None
    return deblurrer, image, PlaneLayout.of(image, deblurrer.channels)


# --- public entry points --------------------------------------------------------------------------------------------


def deblur_lazy(
    model: MPT | Deblurrer, data: Any, axes: str | None = None, settings: DeblurSettings | None = None
) -> Any:
    """The deblurred image as a lazy dask array: the input's shape and dtype, one plane per chunk.

    Nothing is computed until a chunk is read. With stack-wide normalisation
    (``per='stack'``), the statistics are computed once, on first read.
    Computing it with a ``dask.distributed`` client runs on the cluster, the
    model built once per worker process; inputs read from files are best sent
    with :func:`deblur_file` (``client=``), which reads them on this side.
    """
    import dask
    import dask.array as da

    deblurrer, image, layout = _prepare(model, data, axes, settings)
    source = image.data.rechunk(layout.block_chunks)
    handle = dask.delayed(ModelHandle(deblurrer), pure=True)
    ranges = None
    if deblurrer.normalization.per == "stack":
        # a partial, so dask does not compute the whole stack into memory as the argument
        ranges = dask.delayed(functools.partial(stack_ranges, image, layout, deblurrer.normalization), pure=True)()
    stat_axis = layout.stat_axis if layout.stat_axis != layout.group_axis else None

    def task(block: np.ndarray, handle: ModelHandle, ranges: np.ndarray | None, block_info: Any = None) -> np.ndarray:
        location = block_info[0]["chunk-location"] if block_info else None
        channel = location[stat_axis] if (stat_axis is not None and location is not None) else None
        return _deblur_block(block, handle, layout, ranges, channel)

    meta = np.empty((0,) * source.ndim, image.dtype)
    return da.map_blocks(task, source, handle, ranges, dtype=image.dtype, meta=meta)


class PlaneByPlane:
    """An image deblurred one block at a time, in any order, on request (the napari plugin's lazy results).

    Unlike :func:`deblur_lazy`, each block is a generator (:meth:`iter_block`): it reports every tile and
    stops between two tiles when closed, so a viewer can drop a plane the user has moved away from. Each
    block equals :func:`iter_deblur`'s to rounding (the same tiles and normalisation, summed in another
    order when the eager engine runs planes side by side; with ``per='stack'`` the stack's statistics are
    computed once, at the first block).

    Parameters
    ----------
    model, data, axes, settings
        As for :func:`iter_deblur`.

    Raises
    ------
    InputError
        For an input the model cannot process.
    """

    def __init__(
        self, model: MPT | Deblurrer, data: Any, axes: str | None = None, settings: DeblurSettings | None = None
    ) -> None:
        self.deblurrer, self.image, self.layout = _prepare(model, data, axes, settings)
        self.iterated = tuple(i for i, a in enumerate(self.image.axes) if a not in "YX" and i != self.layout.group_axis)
        """The axes a block has one entry of (the others, Y, X and the colour axis, are whole in every block)."""
        self._ranges: np.ndarray | None = None
        self._ranges_lock = threading.Lock()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.image.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.image.dtype)

    @property
    def axes(self) -> str:
        return self.image.axes

    def positions(self) -> list[tuple[int, ...]]:
        """Every block's position on the :attr:`iterated` axes, in C order."""
        return list(np.ndindex(*[self.shape[i] for i in self.iterated]))

    def index(self, position: tuple[int, ...]) -> tuple[int | slice, ...]:
        """The block at ``position`` as an index into the image (one-entry slices on the iterated axes)."""
        index: list[int | slice] = [slice(None)] * len(self.shape)
        for axis, value in zip(self.iterated, position):
            index[axis] = slice(value, value + 1)
        return tuple(index)

    def describe(self, position: tuple[int, ...]) -> str:
        """A block's place for messages, e.g. ``'plane Z=4'`` (``'the plane'`` for a single plane)."""
        return self.layout.describe(self.index(position))

    @property
    def tiles_per_block(self) -> int:
        return self.deblurrer.tiles_per_plane(*self.layout.plane_size) * _units_per_block(
            self.layout, self.deblurrer.channels
        )

    def _stack_ranges(self) -> np.ndarray | None:
        if self.deblurrer.normalization.per != "stack":
            return None
        with self._ranges_lock:  # once, whichever thread asks first
            if self._ranges is None:
                self._ranges = stack_ranges(self.image, self.layout, self.deblurrer.normalization)
        return self._ranges

    def iter_block(self, position: tuple[int, ...]) -> Generator[DeblurProgress, None, np.ndarray]:
        """Deblur the block at ``position``, yielding progress after every forward pass; returns the block.

        The block has the image's dimensions, with one entry on each iterated axis. The progress counts the
        block's tiles (``planes_total`` is 1).
        """
        index = self.index(position)
        ranges = self._stack_ranges()
        block = read_block(self.image, index, self.layout)
        check_finite(block, self.layout.describe(index))
        steps = self.deblurrer.iter_block(block, self.layout, ranges, self.layout.stat_index(index))
        while True:
            try:
                tiles, total, message = next(steps)
            except StopIteration as finished:
                return finished.value
            yield DeblurProgress(0, 1, tiles, total, message)


def iter_deblur(
    model: MPT | Deblurrer,
    data: Any,
    axes: str | None = None,
    settings: DeblurSettings | None = None,
    out: np.ndarray | None = None,
    client: Any = None,
) -> Generator[DeblurProgress, None, np.ndarray]:
    """Deblur everything into ``out`` (default: a new array), yielding progress after every forward pass.

    The compute generator behind the progress bars: close it (or stop
    iterating) and the work stops between two tiles. Returns ``out``
    (``result = yield from iter_deblur(...)``, or :func:`deblur_array`).
    """
    deblurrer, image, layout = _prepare(model, data, axes, settings)
    if out is None:
        out = np.empty(image.shape, dtype=image.dtype)
    elif out.shape != image.shape or out.dtype != image.dtype:
        raise ValueError(f"out must have shape {image.shape} and dtype {image.dtype}")
    for item in _iter_blocks(deblurrer, image, layout, client):
        if isinstance(item, DeblurProgress):
            yield item
        else:
            index, result = item
            out[index] = result
    return out


def estimate_blur_width(model: MPT, plane: np.ndarray, settings: DeblurSettings | None = None) -> float | None:
    """The blur width (pixels) the engine would tell ``model`` for one 2-D ``plane`` given no width, or None.

    None when the model carries no estimator (``MPTConfig.blur_estimator``): it then judges the blur
    itself. The plane is normalised as the engine normalises it (the settings', else the model file's).
    """
    deblurrer = Deblurrer(model, replace(settings or DeblurSettings(), blur_sigma_px=None))
    values = np.asarray(plane, dtype=np.float32)[None]
    low, high = intensity_range(values, deblurrer.normalization)
    scaled = torch.from_numpy((values - low) / (high - low)).to(deblurrer.device)
    with torch.inference_mode():
        return deblurrer.unit_width(scaled)


def describe_estimated_widths(widths: Sequence[float], milder: MilderBlur | None = None) -> str | None:
    """The blur widths a model estimated (:attr:`Deblurrer.estimated_widths`) in words, or None for none.

    A colour plane deblurred channel by channel by a grey model counts once per channel. Given the model's
    milder-blur network, it also says how many planes that network deblurred.

    >>> describe_estimated_widths([2.04])
    'blur width estimated at 2.0 px'
    >>> describe_estimated_widths([1.2, 3.4, 2.0])
    'blur width estimated at 1.2-3.4 px (median 2.0) over 3 planes'
    >>> from napari_mpt_deblur.models.mpt import MilderBlur
    >>> describe_estimated_widths([1.2, 3.4, 2.0], MilderBlur(network=None, below_width=2.5)).split("; ")[1]
    '2 planes below 2.5 px (milder than the fine-tune learned from) deblurred by its starting model'
    """
    summary = width_summary(widths)
    if not summary:
        return None
    low, middle, high = summary["min_px"], summary["median_px"], summary["max_px"]
    if len(widths) == 1 or high - low < 0.05:
        text = f"blur width estimated at {middle:.1f} px"
    else:
        text = f"blur width estimated at {low:.1f}-{high:.1f} px (median {middle:.1f}) over {len(widths)} planes"
    taken = 0 if milder is None else sum(milder.takes(width) for width in widths)
    if taken:
        which = f"{taken} plane{'s' if taken > 1 else ''} " if len(widths) > 1 else ""
        text += f"; {which}below {milder.below_width:.1f} px (milder than the fine-tune learned from) deblurred by its "
        text += "starting model"
    return text


def width_summary(widths: Sequence[float]) -> dict[str, float | int]:
    """The estimated widths for a result's metadata: count, min, median and max (pixels); empty for none."""
    if not widths:
        return {}
    low, middle, high = (round(float(np.percentile(widths, q)), 3) for q in (0, 50, 100))
    return {"planes": len(widths), "min_px": low, "median_px": middle, "max_px": high}


def deblur_array(
    model: MPT | Deblurrer,
    data: Any,
    axes: str | None = None,
    settings: DeblurSettings | None = None,
    progress: Callable[[DeblurProgress], None] | None = None,
    client: Any = None,
) -> np.ndarray:
    """Deblur an array (numpy, dask or zarr) eagerly; returns a numpy array of the same shape and dtype.

    ``progress`` is called after every forward pass; raising from it (e.g.
    :class:`Cancelled`) stops the work between tiles.
    """
    return run_to_end(iter_deblur(model, data, axes, settings, client=client), progress)


def deblur_file(
    model: MPT | Deblurrer,
    source: str | os.PathLike | Image,
    target: str | os.PathLike,
    axes: str | None = None,
    settings: DeblurSettings | None = None,
    progress: Callable[[DeblurProgress], None] | None = None,
    client: Any = None,
    overwrite: bool = True,
) -> Path:
    """Deblur an image file (or :class:`Image`) into a TIFF / OME-TIFF / OME-Zarr file, plane by plane.

    Memory holds a few planes whatever the stack depth. The output keeps the
    input's shape, dtype, axes and pixel size; it is written under a temporary
    name and renamed when complete, so a failed or cancelled run leaves no file
    under ``target``. The input is only read: an output equal to the input, or
    inside an input Zarr store, is refused.

    ``overwrite=False`` never replaces an existing ``target``, not even one that
    another run created while this one was computing
    (:class:`~napari_mpt_deblur.atomic.OutputExistsError`).

    Raises
    ------
    InputError
        For an input the model cannot process, or pixel data that cannot be
        read or hold NaN; the message names the file and the plane.
    """
    target = Path(target)
    if not isinstance(source, Image):
        inside = Path(source).resolve()
        if inside == target.resolve():
            raise InputError(f"{target}: the output would replace the input; choose another name")
        if inside in target.resolve().parents:
            raise InputError(f"{target}: the output would be written inside the input {source}; choose another place")
    try:
        return _deblur_file(model, source, target, axes, settings, progress, client, overwrite)
    except InputError as error:
        if isinstance(source, Image) or str(error).startswith(str(Path(source))):
            raise
        raise InputError(f"{source}: {error}") from None


def _deblur_file(
    model: MPT | Deblurrer,
    source: str | os.PathLike | Image,
    target: Path,
    axes: str | None,
    settings: DeblurSettings | None,
    progress: Callable[[DeblurProgress], None] | None,
    client: Any,
    overwrite: bool,
) -> Path:
    deblurrer, image, layout = _prepare(model, source, axes, settings)
    group = layout.group_axis
    tiff = output_format(target) == "tiff"
    if tiff and group is not None and image.axes[group] != "S" and image.axes[group + 1] != "Y":
        # A TIFF page order needs each block to be a run of whole pages.
        raise InputError(f"axes {image.axes!r}: put the colour axis C right before Y (e.g. 'ZCYX') for this model")

    def blocks() -> Iterator[tuple[tuple[int | slice, ...], np.ndarray]]:
        for item in _iter_blocks(deblurrer, image, layout, client):
            if isinstance(item, DeblurProgress):
                if progress:
                    progress(item)
            else:
                yield item

    try:
        return write_image(target, blocks(), image.shape, image.dtype, image.axes, like=image, overwrite=overwrite)
    except ImageError as error:
        raise InputError(str(error)) from None


def _iter_blocks(
    deblurrer: Deblurrer, image: Image, layout: PlaneLayout, client: Any = None
) -> Iterator[DeblurProgress | tuple[tuple[int | slice, ...], np.ndarray]]:
    """Deblur block after block in C order, yielding progress events and (index, result) pairs."""
    if deblurrer.normalization.per == "stack":
        ranges = stack_ranges(image, layout, deblurrer.normalization)  # reads and checks every plane
    else:
        ranges = None
        check_all_finite(image, layout)
    planes_total = layout.blocks
    per_block = deblurrer.tiles_per_plane(*layout.plane_size) * _units_per_block(layout, deblurrer.channels)
    if client is not None:
        yield from _iter_blocks_distributed(deblurrer, image, layout, ranges, client, per_block)
        return
    indices = list(layout.block_indices())
    workers = cpu_workers(planes_total) if deblurrer.device.type == "cpu" else 1
    # Whole rounds of planes side by side; the planes left over run one at a time on every thread
    # (alone on its share, the last plane of a stack would leave the other cores idle).
    side_by_side = planes_total - planes_total % workers if workers > 1 else 0
    if side_by_side:
        yield from _iter_blocks_side_by_side(
            deblurrer, image, layout, ranges, workers, per_block, indices[:side_by_side]
        )
    for done, index in enumerate(indices[side_by_side:], start=side_by_side):
        block = read_block(image, index, layout)
        check_finite(block, layout.describe(index))
        steps = deblurrer.iter_block(block, layout, ranges, layout.stat_index(index))
        while True:
            try:
                tiles, _, message = next(steps)
            except StopIteration as finished:
                result = finished.value
                break
            yield DeblurProgress(done, planes_total, done * per_block + tiles, planes_total * per_block, message)
        yield index, result
    yield DeblurProgress(planes_total, planes_total, planes_total * per_block, planes_total * per_block)


def _iter_blocks_side_by_side(
    deblurrer: Deblurrer,
    image: Image,
    layout: PlaneLayout,
    ranges: np.ndarray | None,
    workers: int,
    per_block: int,
    block_indices: list[tuple[int | slice, ...]],
) -> Iterator[DeblurProgress | tuple[tuple[int | slice, ...], np.ndarray]]:
    """The first blocks of a job (``block_indices``), ``workers`` at a time on the CPU, each on its share
    of the threads (see :func:`~napari_mpt_deblur.runtime.cpu_workers`); results come out in C order.

    Every finished tile is reported; closing the generator stops each worker at its next tile.
    """
    threads = max(1, torch.get_num_threads() // workers)
    planes_total = layout.blocks
    events: queue.SimpleQueue = queue.SimpleQueue()  # (tiles finished, message), or None when a block ends
    stop = threading.Event()

    def deblur(index: tuple[int | slice, ...], block: np.ndarray) -> np.ndarray | None:
        with torch_threads(threads):
            steps = deblurrer.iter_block(block, layout, ranges, layout.stat_index(index))
            finished = 0
            while not stop.is_set():
                try:
                    tiles, _, message = next(steps)
                except StopIteration as end:
                    return end.value
                events.put((tiles - finished, message))
                finished = tiles
            steps.close()
            return None

    window = 2 * workers  # blocks read ahead: a worker never waits for the reader
    tiles_done = planes_done = 0
    in_flight: deque = deque()
    indices = iter(block_indices)
    exhausted = False
    pool = ThreadPoolExecutor(workers, thread_name_prefix="deblur")
    try:
        while True:
            while not exhausted and len(in_flight) < window:
                index = next(indices, None)
                if index is None:
                    exhausted = True
                    break
                block = read_block(image, index, layout)  # read here, in order: file readers are not thread-safe
                check_finite(block, layout.describe(index))
                future = pool.submit(deblur, index, block)
                future.add_done_callback(lambda _: events.put(None))  # after the future is done: no lost wake-up
                in_flight.append((index, future))
            while in_flight and in_flight[0][1].done():
                index, future = in_flight.popleft()
                planes_done += 1
                yield index, future.result()
                tiles_shown = max(tiles_done, planes_done * per_block)  # the finished planes' tiles, reported or not
                yield DeblurProgress(planes_done, planes_total, tiles_shown, planes_total * per_block)
            if not in_flight and exhausted:
                break
            if not in_flight or (not exhausted and len(in_flight) < window):
                continue
            event = events.get()
            if event is not None:
                tiles_done += event[0]
                tiles_shown = max(tiles_done, planes_done * per_block)
                yield DeblurProgress(planes_done, planes_total, tiles_shown, planes_total * per_block, event[1])
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


def _units_per_block(layout: PlaneLayout, channels: int) -> int:
    if layout.group_axis is None or channels == 3:
        return 1
    return layout.shape[layout.group_axis]


def _iter_blocks_distributed(
    deblurrer: Deblurrer, image: Image, layout: PlaneLayout, ranges: np.ndarray | None, client: Any, per_block: int
) -> Iterator[DeblurProgress | tuple[tuple[int | slice, ...], np.ndarray]]:
    """The same on a dask.distributed cluster: planes are read here, sent to workers, collected in order.

    A bounded window of planes is in flight (two per worker thread), so memory
    stays flat; closing the generator cancels what is still running.
    """
    handle = client.scatter(ModelHandle(deblurrer), broadcast=True, hash=False)
    window = 2 * max(1, sum(client.nthreads().values()))
    in_flight: deque = deque()
    planes_total = layout.blocks

    submitted = 0

    def collect_oldest() -> Iterator[DeblurProgress | tuple[tuple[int | slice, ...], np.ndarray]]:
        index, future = in_flight.popleft()
        yield index, future.result()
        done = submitted - len(in_flight)
        yield DeblurProgress(done, planes_total, done * per_block, planes_total * per_block)

    try:
        for index in layout.block_indices():
            block = read_block(image, index, layout)
            check_finite(block, layout.describe(index))
            future = client.submit(_deblur_block, block, handle, layout, ranges, layout.stat_index(index), pure=False)
            in_flight.append((index, future))
            submitted += 1
            if len(in_flight) >= window:
                yield from collect_oldest()
        while in_flight:
            yield from collect_oldest()
    finally:
        if in_flight:
            client.cancel([future for _, future in in_flight])

"""Deblurring arrays and TIFF files plane by plane.

The last two axes are Y and X; every leading axis (T, Z, C) is processed plane
by plane. Intensities are normalised as the model file records, and the result
is mapped back to the input's scale and dtype (clipped, never wrapped).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .config import IntensityNormalization
from .models.files import atomic_write
from .models.mpt import MPT
from .tiling import tiled_forward


class InputError(ValueError):
    """An input the model cannot process; the message says why."""


def normalization_range(plane: np.ndarray, normalization: IntensityNormalization) -> tuple[float, float]:
    """The input values that map to 0 and 1."""
    if normalization.mode == "percentile":
        low, high = np.percentile(plane, (normalization.low, normalization.high))
    elif normalization.mode == "minmax":
        low, high = float(plane.min()), float(plane.max())
    else:
        low, high = normalization.low, normalization.high
    if high <= low:  # a flat plane: keep it flat instead of dividing by zero
        high = low + 1.0
    return float(low), float(high)


def check_input(array: np.ndarray, model: MPT) -> None:
    """Raise :class:`InputError` for arrays the model cannot deblur."""
    if array.ndim < 2:
        raise InputError(f"need at least 2 dimensions (Y, X), got shape {array.shape}")
    if 0 in array.shape:
        raise InputError(f"the image is empty (shape {array.shape})")
    if model.config.in_channels != 1:
        channels = model.config.in_channels
        raise InputError(f"this command deblurs grayscale planes; the model expects {channels} channels")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InputError(f"unsupported pixel type {array.dtype}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError("the image contains NaN or infinite values")


DEFAULT_TILE = 256
DEFAULT_OVERLAP = 32


def iter_deblur(
    model: MPT, array: np.ndarray, out: np.ndarray, tile: int | None = None, overlap: int = DEFAULT_OVERLAP
) -> Iterator[tuple[int, int]]:
    """Deblur ``array`` into ``out`` (same shape and dtype), yielding (planes done, planes total).

    Each plane runs in overlapping tiles of ``tile`` pixels (default: the model
    file's tile size, else 256; 0: the whole plane at once). Serves both one-shot
    use (:func:`deblur_array`) and callers that show progress or stop between planes.
    """
    check_input(array, model)
    if out.shape != array.shape or out.dtype != array.dtype or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous array of the input's shape and dtype")
    card = getattr(model, "card", None)
    normalization = card.normalization if card else IntensityNormalization()
    if tile is None:
        tile = (card.tile_size if card else None) or DEFAULT_TILE
    device = next(model.parameters()).device
    planes = array.reshape(-1, *array.shape[-2:])
    results = out.reshape(-1, *array.shape[-2:])
    if normalization.per == "stack":
        stack_range = normalization_range(planes, normalization)
    info = np.iinfo(array.dtype) if np.issubdtype(array.dtype, np.integer) else None
    for index, plane in enumerate(planes):
        low, high = stack_range if normalization.per == "stack" else normalization_range(plane, normalization)
        x = torch.from_numpy((plane.astype(np.float32) - low) / (high - low)).to(device)
        with torch.inference_mode():
            y = x[None, None]
            y = tiled_forward(model, y, tile, overlap) if tile else model(y)
            y = y[0, 0].float().cpu().numpy()
        y = y * (high - low) + low
        if info is not None:
            y = np.clip(np.rint(y), info.min, info.max)
        results[index] = y.astype(array.dtype, copy=False)
        yield index + 1, len(planes)


def deblur_array(model: MPT, array: np.ndarray, tile: int | None = None, overlap: int = DEFAULT_OVERLAP) -> np.ndarray:
    """Deblur every plane of an array; returns an array of the same shape and dtype."""
    out = np.empty_like(array)
    for _ in iter_deblur(model, array, out, tile, overlap):
        pass
    return out


def deblur_tiff(
    model: MPT,
    source: str | os.PathLike,
    target: str | os.PathLike,
    progress=None,
    tile: int | None = None,
    overlap: int = DEFAULT_OVERLAP,
) -> Path:
    """Deblur a TIFF file into a new TIFF file, written under a temporary name then renamed.

    ``progress``, if given, is called with (planes done, planes total).
    """
    import tifffile

    source, target = Path(source), Path(target)
    try:
        with tifffile.TiffFile(source) as tif:
            if not tif.series or not tif.pages:
                raise ValueError("it holds no image")
            series = tif.series[0]
            array = series.asarray()
            axes = series.axes
            resolution = None
            page = tif.pages[0]
            if "XResolution" in page.tags and "YResolution" in page.tags:
                resolution = (page.tags["XResolution"].value, page.tags["YResolution"].value)
    except (OSError, ValueError, tifffile.TiffFileError) as error:
        raise InputError(f"{source}: cannot read as TIFF ({error})") from error
    if axes and axes[-1] in "SC" and array.shape[-1] in (3, 4):
        raise InputError(f"{source}: RGB images need a 3-channel model (this command deblurs grayscale planes)")
    out = np.empty_like(array)
    for done, total in iter_deblur(model, array, out, tile, overlap):
        if progress:
            progress(done, total)
    metadata = {"axes": axes} if axes else None

    def write(path: Path) -> None:
        # Grayscale planes, always: without this tifffile stores a 3- or 4-plane stack as RGB(A).
        tifffile.imwrite(
            path, out, photometric="minisblack", metadata=metadata, resolution=resolution, bigtiff=out.nbytes > 2**31
        )

    atomic_write(target, write)
    return target

"""napari reader and writer: TIFF / OME-TIFF / OME-Zarr in, TIFF out, through the headless IO layer.

The reader opens files with :func:`napari_mpt_deblur.images.open_image` (lazy,
one plane per chunk) and turns each into napari layer data: scale from the
image's pixel size and Z spacing, axis labels from the axes, RGB and channel
axes, an OME-Zarr pyramid as a multiscale layer, and a ``metadata`` dict that
the writer reads back. The writer saves one
image layer as a TIFF through :func:`napari_mpt_deblur.images.write_tiff`,
atomically (under a temporary name, renamed when complete), and reports failures
as :class:`SaveError`.

Nothing here imports Qt or napari: the functions take and return plain napari
"LayerData" tuples ``(data, meta, "image")``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import images
from ..images import Image, ImageError
from .layer_info import LayerInfo

LayerData = tuple[Any, dict[str, Any], str]
"""A napari layer data tuple: ``(data, meta, layer_type)``."""

PathOrPaths = str | os.PathLike | Sequence[str | os.PathLike]
ReaderFunction = Callable[[PathOrPaths], list[LayerData]]

SMALL_BYTES = 64 * 2**20
"""Images up to this size are read into memory at once; larger ones stay lazy (dask, one plane per chunk)."""


class SaveError(RuntimeError):
    """A layer that cannot be saved as asked; the message says why.

    Deliberately not a ``ValueError`` (as :class:`~napari_mpt_deblur.images.ImageError` is): napari 0.9 takes a
    ``ValueError`` from a writer for "no writer found", and would show that instead of this message.
    """


# --- reader ----------------------------------------------------------------------------------------------------------


def get_reader(path: PathOrPaths) -> ReaderFunction | None:
    """The npe2 reader hook: a reader function for paths this plugin can open, else None.

    Parameters
    ----------
    path
        One path, or a list of paths (each becomes its own layer or layers).

    Returns
    -------
    callable or None
        :func:`read_images` when every path is a ``.tif``/``.tiff`` file or a Zarr
        folder (``.zarr`` or holding Zarr metadata); None otherwise, so napari tries
        another reader. Whether the file really is readable is found out by the
        reader function, whose :class:`~napari_mpt_deblur.images.ImageError` says why not.
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(_can_read(p) for p in paths):
        return None
    return read_images


def _can_read(path: Any) -> bool:
    if not isinstance(path, (str, os.PathLike)):
        return False
    text = os.fspath(path)
    if "://" in str(text):  # URLs are for other readers
        return False
    path = Path(text)
    if path.is_dir():  # a fast pre-check; open_image refuses a folder that is not a Zarr store, saying so
        return path.name.lower().endswith(images.ZARR_SUFFIXES) or images.is_zarr_store(path)
    return path.name.lower().endswith(images.TIFF_SUFFIXES)


def read_images(path: PathOrPaths) -> list[LayerData]:
    """Read TIFF / OME-TIFF files and OME-Zarr folders as napari image layer data.

    Parameters
    ----------
    path
        One path or a list of paths.

    Returns
    -------
    list of (data, meta, "image")
        One tuple per path (napari splits a multi-channel image into one layer per
        channel, as ``meta["channel_axis"]`` asks). See :func:`image_layer_data`.

    Raises
    ------
    ImageError
        When a file cannot be read; the message names the file and says why.
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers: list[LayerData] = []
    for one in paths:
        layers.append(image_layer_data(images.open_image(one), source=os.fspath(one)))
    return layers


def image_layer_data(image: Image, *, source: str | None = None) -> LayerData:
    """napari layer data for an :class:`~napari_mpt_deblur.images.Image`.

    Parameters
    ----------
    image
        The image, with its axes, pixel size, Z spacing and unit.
    source
        Where the image came from (kept in the metadata).

    Returns
    -------
    (data, meta, "image")
        ``data`` is a numpy array when the image is at most :data:`SMALL_BYTES`,
        else the lazy dask array; for an OME-Zarr pyramid, the list of its levels
        (lazy, finest first) with ``meta["multiscale"]`` set, which napari shows
        as a multiscale layer. ``meta`` holds ``name``, ``scale`` (Y and X from
        the pixel size, Z from the Z spacing, 1 otherwise), ``axis_labels`` (the
        axis letters, lower case), ``units`` when the unit is a known length,
        ``rgb`` for a trailing S axis, ``channel_axis`` (with a name and a
        metadata dict per channel) for a C axis of more than one channel, and ``metadata``: ``axes`` (of
        each napari layer, S included), ``file_axes``, ``pixel_size``, ``unit``,
        ``z_spacing`` and ``source``, which :func:`write_tiff_layer` uses.
    """
    axes = image.axes
    data = image.data
    if image.pyramid:
        # napari reads the level the zoom needs, one plane at a time: nothing is read here
        data = [image.data, *image.pyramid]
    elif data.nbytes <= SMALL_BYTES:
        try:
            data = data.compute()
        except (OSError, ValueError, KeyError) as error:
            raise ImageError(f"{source or image.name}: cannot read the pixels ({error})") from error
    rgb = axes.endswith("S")
    channels = image.shape[axes.index("C")] if "C" in axes else 1
    split = channels > 1
    layer_axes = axes.replace("C", "") if split else axes
    shown = layer_axes.replace("S", "")  # the axes napari has dimensions for

    z_spacing = float(image.z_spacing) if image.z_spacing and "Z" in axes else None
    unit = images.length_unit(image.unit) if image.pixel_size or z_spacing else None
    scale, units = [], []
    for letter in shown:
        value, value_unit = 1.0, "pixel"
        if letter in "YX" and image.pixel_size:
            value, value_unit = float(image.pixel_size["YX".index(letter)]), unit or "pixel"
        elif letter == "Z" and z_spacing:
            value, value_unit = z_spacing, unit or "pixel"
        scale.append(value)
        units.append(value_unit)
    labels = tuple(letter.lower() for letter in shown)
    metadata = {
        "axes": layer_axes,
        "file_axes": axes,
        "pixel_size": tuple(float(v) for v in image.pixel_size) if image.pixel_size else None,
        "unit": image.unit,
        "z_spacing": z_spacing,
        "source": source,
    }
    meta: dict[str, Any] = {"name": image.name, "scale": tuple(scale), "axis_labels": labels, "rgb": rgb}
    if image.pyramid:
        meta["multiscale"] = True
    if unit:
        meta["units"] = tuple(units)
    meta["metadata"] = metadata
    if split:
        # napari gives scale, axis_labels and units (one value per axis) to every channel's layer, and reads a
        # list of names or of metadata dicts as one per channel
        meta["channel_axis"] = axes.index("C")
        meta["name"] = [f"{image.name} ch{i}" for i in range(channels)]
        meta["metadata"] = [{**metadata, "channel": i} for i in range(channels)]
    return data, meta, "image"


# --- writer ----------------------------------------------------------------------------------------------------------


def write_tiff_layer(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """The npe2 single-layer writer: save an image layer as a TIFF file, atomically.

    The layer becomes an :class:`~napari_mpt_deblur.images.Image` (data, axes,
    pixel size, Z spacing, unit) written by
    :func:`napari_mpt_deblur.images.write_tiff`, the package's one TIFF writer.
    The flavour of TIFF follows the data: an ImageJ hyperstack (8/16-bit
    unsigned or float32 data, axes in ImageJ's T, Z, C order, RGB as 8-bit) that
    Fiji opens with its calibration; an OME-TIFF when ``path`` ends in
    ``.ome.tif``/``.ome.tiff``; otherwise a plain TIFF whose JSON description
    (tifffile's) records the axes, unit and Z spacing. Every flavour keeps the
    dtype, the values, the axes, the Y/X pixel size (as the resolution tags too,
    whose ResolutionUnit is never a made-up inch) and the Z spacing;
    :func:`read_images` reads all three back. OME-TIFF records sizes only with
    a length unit. Translation, contrast limits, colormap and a T/C scale are
    not kept.

    Parameters
    ----------
    path
        Target file, ``.tif`` or ``.tiff``. An existing file is replaced only by a
        complete new one: the file is written under a temporary name and renamed.
    data
        The layer's data (numpy, dask or zarr array; for a multiscale layer the
        list of levels, of which the first, full-resolution one is written).
        Lazy data are written plane by plane.
    meta
        The layer's attributes (``layer.as_layer_data_tuple()[1]``). The axes are
        those every dock reads (:attr:`~.layer_info.LayerInfo.axes`: the axis labels,
        else ``metadata["axes"]``, else the default for the number of dimensions);
        ``rgb`` adds S. The pixel size and Z spacing come from ``scale``, their
        unit from ``units`` or ``metadata["unit"]``.

    Returns
    -------
    list of str
        ``[path]``.

    Raises
    ------
    SaveError
        When the layer cannot be written (unsupported data type, axes that cannot
        be named, a path that cannot be written...); nothing is left behind under
        ``path`` and an existing file there is untouched.
    """
    target = Path(path)
    try:
        _write_tiff(target, data, meta)
    except SaveError:
        raise
    except ImageError as error:
        message = str(error) if str(error).startswith(str(target)) else f"{target}: {error}"
        raise SaveError(message) from error
    except Exception as error:
        raise SaveError(f"{target}: could not save the layer ({type(error).__name__}: {error})") from error
    return [os.fspath(target)]


def _write_tiff(target: Path, data: Any, meta: dict[str, Any]) -> None:
    if not target.name.lower().endswith(images.TIFF_SUFFIXES):
        raise ImageError(f"{target}: this writer saves TIFF files; name it .tif or .tiff")
    layer = LayerInfo.from_layer_data(data, meta)
    array = layer.pixels
    if not hasattr(array, "shape") or not hasattr(array, "dtype"):
        array = np.asarray(array)
        layer = replace(layer, pixels=array)
    shape = layer.shape
    dtype = np.dtype(array.dtype)
    dtype = dtype if dtype.isnative else dtype.newbyteorder("=")
    if dtype.kind not in "biufc":
        raise ImageError(f"{target}: cannot save data of type {dtype} as TIFF; convert the layer to a numeric type")
    if 0 in shape:
        raise ImageError(f"{target}: the layer is empty (shape {shape})")
    axes = layer.axes
    pixel_size, unit, z_spacing = _physical_size(layer, axes)
    name = layer.name or target.stem
    # The layer as an Image: the physical size and unit to record, and ImageJ wherever the data allow.
    like = replace(
        images.as_image(array, axes, name),
        pixel_size=pixel_size,
        unit=unit,
        z_spacing=z_spacing,
        tiff={"imagej": True},
    )
    page_shape = shape[axes.index("Y") :]
    leading = shape[: axes.index("Y")]

    def planes() -> Iterator[images.Block]:
        for index in np.ndindex(*leading):
            yield index + (slice(None),) * len(page_shape), np.asarray(array[index])

    images.write_tiff(target, planes(), shape, dtype, axes, like=like)


def _physical_size(layer: LayerInfo, axes: str) -> tuple[tuple[float, float] | None, str | None, float | None]:
    """(Y, X) pixel size, its unit (napari's name) and the Z spacing to record, from a layer's scale, units and
    metadata (what napari shows wins over what the file said)."""
    shown = axes.replace("S", "")
    scale = layer.scale
    scale = list(scale) if scale is not None and len(scale) == len(shown) else [1.0] * len(shown)
    units = layer.units
    if isinstance(units, (str, bytes)) or units is None or len(units) != len(shown):
        units = [units if isinstance(units, str) else None] * len(shown)
    units = [images.clean_unit(u) for u in units]  # None for no unit ('pixel', '')
    metadata = layer.metadata

    y, x = shown.index("Y"), shown.index("X")
    unit_text = units[x] or units[y] or images.clean_unit(metadata.get("unit"))
    unit = images.length_unit(unit_text) or (str(unit_text) if unit_text else None)
    pixel_size = (scale[y], scale[x])
    if pixel_size == (1.0, 1.0) and not unit and not metadata.get("pixel_size"):
        pixel_size = None  # nothing known: write no resolution
    z_spacing = None
    if "Z" in shown:
        z = shown.index("Z")
        if scale[z] != 1.0 or units[z] or metadata.get("z_spacing"):
            z_spacing = scale[z]
            if units[z] and unit_text:  # a Z in other units than X (nm and micrometres) is converted to X's
                z_spacing = images.convert_length(z_spacing, units[z], unit_text)
    if pixel_size and not all(np.isfinite(v) and v > 0 for v in pixel_size):
        raise ImageError(f"the layer's Y/X scale {pixel_size} is not a positive pixel size")
    if z_spacing is not None and not (np.isfinite(z_spacing) and z_spacing > 0):
        z_spacing = None
    return pixel_size, unit, z_spacing

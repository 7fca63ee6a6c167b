"""Reading and writing images: arrays, TIFF / OME-TIFF and OME-Zarr, with their axes.

Everything is read lazily as a dask array chunked one plane per chunk, and
written plane by plane under a temporary name that is renamed when complete, so
a stack larger than memory streams through and an interrupted run never leaves
a half-written file under the final name. OME-Zarr goes through ome-zarr-py,
with multiscale pyramids for large planes (written as the planes arrive, read
back as :attr:`Image.pyramid`).

Axes are letters: ``T`` (time), ``Z`` (depth), ``C`` (channel), ``Y``, ``X``
and ``S`` (the samples of an RGB/RGBA pixel). tifffile's ``Q`` (unknown) and
``I`` (image sequence) are accepted as further plane axes.

Physical sizes travel with an image as :class:`Image` ``pixel_size`` (Y, X),
``z_spacing`` and their common ``unit``: read from ImageJ, OME, tifffile's JSON
description, the TIFF resolution tags and OME-Zarr scales, and written back in
the form each output holds (see :func:`write_tiff` and :func:`write_ome_zarr`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write, atomic_write_folder

PLANE_AXES = "TZCQI"
"""Letters of axes that are processed plane by plane."""

KNOWN_AXES = PLANE_AXES + "YXS"
TIFF_SUFFIXES = (".tif", ".tiff")
ZARR_SUFFIXES = (".zarr", ".ome.zarr")
ZARR_MARKERS = (".zgroup", ".zarray", ".zattrs", "zarr.json")
"""Files whose presence makes a folder a Zarr store (Zarr v2 and v3)."""


class ImageError(ValueError):
    """An image that cannot be read or written as asked; the message says why."""


_DEFAULT_AXES = {2: "YX", 3: "ZYX", 4: "TZYX", 5: "TZCYX"}


def default_axes(ndim: int) -> str | None:
    """Axes of ``ndim`` dimensions (RGB samples not counted) when nothing names them, or None beyond 5.

    The last two are Y, X; leading axes are read as Z (3-D), T, Z (4-D) and T, Z, C (5-D).
    """
    return _DEFAULT_AXES.get(ndim)


def guess_axes(shape: tuple[int, ...]) -> str:
    """Axes of an array of this shape when nothing says otherwise.

    The last two axes are Y, X, unless the last one has 3 or 4 entries and the
    two before it are larger (an RGB/RGBA image, ``...YXS``). Leading axes are
    those of :func:`default_axes`.
    """
    rgb = len(shape) >= 3 and shape[-1] in (3, 4) and min(shape[-3:-1]) > 4
    axes = default_axes(len(shape) - (1 if rgb else 0))
    if axes is None:
        raise ImageError(f"cannot guess the axes of a {len(shape)}-D array of shape {shape}; pass axes, e.g. 'TZCYX'")
    return axes + ("S" if rgb else "")


def check_axes(axes: str, shape: tuple[int, ...]) -> str:
    """Validate an axes string against a shape; returns it upper-cased.

    Y and X must be present once each, X right after Y; S (RGB samples, 3 or 4
    of them) may only follow them; every other axis is processed plane by plane.
    """
    axes = axes.upper()
    if len(axes) != len(shape):
        raise ImageError(f"axes {axes!r} name {len(axes)} axes, but the image has {len(shape)} (shape {shape})")
    unknown = sorted(set(axes) - set(KNOWN_AXES))
    if unknown:
        raise ImageError(f"unknown axes {''.join(unknown)!r} in {axes!r}; use letters from {KNOWN_AXES!r}")
    repeated = sorted({a for a in axes if axes.count(a) > 1})
    if repeated:
        raise ImageError(f"axes {axes!r} name {''.join(repeated)!r} more than once")
    if "YX" not in axes:
        raise ImageError(f"axes {axes!r} need Y and X, with X right after Y (e.g. 'ZYX', 'YXS')")
    after = axes[axes.index("YX") + 2 :]
    if after not in ("", "S"):
        raise ImageError(f"axes {axes!r}: only S (RGB samples) may follow Y and X")
    if "S" in axes and shape[axes.index("S")] not in (3, 4):
        raise ImageError(f"axis S (RGB samples) must have 3 or 4 entries, got {shape[axes.index('S')]}; call it C")
    return axes


# --- units ---------------------------------------------------------------------------------------------------------

_LENGTH_SPELLINGS = {
    "nanometer": ("nm", "nanometer", "nanometers", "nanometre", "nanometres"),
    "micrometer": (
        "um",
        "\u00b5m",  # micro sign
        "\u03bcm",  # Greek mu
        "micron",
        "microns",
        "micrometer",
        "micrometers",
        "micrometre",
        "micrometres",
    ),
    "millimeter": ("mm", "millimeter", "millimeters", "millimetre", "millimetres"),
    "centimeter": ("cm", "centimeter", "centimeters", "centimetre", "centimetres"),
    "meter": ("m", "meter", "meters", "metre", "metres"),
    "inch": ("in", "inch", "inches"),
}
_LENGTH_UNITS = {spelling: name for name, spellings in _LENGTH_SPELLINGS.items() for spelling in spellings}
_METRES = {"nanometer": 1e-9, "micrometer": 1e-6, "millimeter": 1e-3, "centimeter": 1e-2, "meter": 1.0, "inch": 0.0254}
_IMAGEJ_UNITS = {"micrometer": "micron", "nanometer": "nm", "millimeter": "mm", "centimeter": "cm", "meter": "m"}
_OME_UNITS = {
    "micrometer": "\u00b5m",
    "nanometer": "nm",
    "millimeter": "mm",
    "centimeter": "cm",
    "meter": "m",
    "inch": "in",
}
_NO_UNIT = ("", "pixel", "pixels", "px", "none")
_RESOLUTION_UNITS = {"centimeter": "CENTIMETER", "inch": "INCH"}
"""TIFF ResolutionUnit for a length unit; NONE for every other (the unit is then in the metadata)."""


def length_unit(unit: str | None) -> str | None:
    """The standard name of a length unit as a file spells it, or None when it is not a known length.

    Parameters
    ----------
    unit
        A unit as found in a file or a napari layer: ``'micron'``, ``'um'``,
        ``'µm'``, ImageJ's ``'\\u00b5m'``, ``'nm'``, ``'centimeter'``...

    Returns
    -------
    str or None
        ``'nanometer'``, ``'micrometer'``, ``'millimeter'``, ``'centimeter'``,
        ``'meter'`` or ``'inch'``: the names napari (pint) and OME-Zarr (UDUNITS-2) use.
    """
    unit = clean_unit(unit)
    return None if unit is None else _LENGTH_UNITS.get(unit.lower())


def clean_unit(unit: Any) -> str | None:
    """A unit as text, with ImageJ's ``\\uXXXX`` escapes decoded; None for no unit (``''``, ``'pixel'``...)."""
    if unit is None:
        return None
    text = re.sub(r"\\u([0-9a-fA-F]{4})", lambda match: chr(int(match.group(1), 16)), str(unit)).strip()
    return None if text.lower() in _NO_UNIT else text


def convert_length(value: float, unit: str | None, to: str | None) -> float | None:
    """``value`` in ``unit`` expressed in unit ``to``; None when the two cannot be related.

    Two spellings of one unit (or no unit on either side) need no conversion;
    two known lengths are converted; anything else is unrelated.
    """
    unit, to = clean_unit(unit), clean_unit(to)
    if unit == to:
        return value
    known, target = length_unit(unit), length_unit(to)
    if known is None or target is None:
        return None
    return value * _METRES[known] / _METRES[target]


def _positive_or_none(value: Any) -> float | None:
    """A finite, positive float, or None."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


@dataclass
class Image:
    """An image of any dimension as a lazy dask array, with what we know about it."""

    data: Any
    """Dask array, chunked one plane per chunk (whole Y, X and S)."""

    axes: str
    """One letter per axis of ``data`` (see the module docstring)."""

    name: str = "image"
    """Display name (the file name without suffix, for files)."""

    pixel_size: tuple[float, float] | None = None
    """(Y, X) pixel size in ``unit``, when the file records it."""

    unit: str | None = None
    """Unit of ``pixel_size`` and ``z_spacing`` as the file spells it (e.g. ``'micron'``); None when unknown."""

    tiff: dict[str, Any] = field(default_factory=dict)
    """TIFF details: ``resolution`` and ``resolutionunit`` (the tags as read); ``imagej``, which makes
    :func:`write_tiff` write an ImageJ hyperstack when the data allow; and ``planar``, set when the file
    stores RGB samples as separate planes (each page ``S, Y, X``), which :func:`write_tiff` keeps."""

    z_spacing: float | None = None
    """Distance between Z planes in ``unit`` (the unit of ``pixel_size``), when the file records it."""

    pyramid: tuple[Any, ...] = ()
    """Lower-resolution levels of ``data`` (dask arrays in the same axes, smaller in Y and X, finest
    first), from an OME-Zarr multiscale image: what a viewer shows zoomed out. The engine reads ``data``."""

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype


def _plane_chunks(array: Any, axes: str) -> Any:
    """Rechunk a dask array to one chunk per plane (whole Y, X, S)."""
    return array.rechunk(tuple(-1 if a in "YXS" else 1 for a in axes))


def tiff_files(folder: Path) -> list[Path]:
    """The .tif/.tiff files in a folder, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name.lower().endswith(TIFF_SUFFIXES))


def as_image(data: Any, axes: str | None = None, name: str = "image") -> Image:
    """Wrap a numpy, dask or zarr array (or an :class:`Image`) as a lazy :class:`Image`."""
    import dask.array as da

    if isinstance(data, Image):
        if axes is None:
            return data
        axes = check_axes(axes, data.shape)
        return replace(data, data=_plane_chunks(data.data, axes), axes=axes)  # the caller's stays as is
    if isinstance(data, (str, os.PathLike)):
        return open_image(data, axes)
    if not hasattr(data, "shape") or not hasattr(data, "dtype"):
        data = np.asarray(data)
    if isinstance(data, da.Array):
        array = data
    else:
        # zarr and numpy arrays; dask reads a zarr array chunk by chunk on demand
        array = da.from_array(data, chunks=data.shape if isinstance(data, np.ndarray) else "auto")
    if 0 in array.shape:
        raise ImageError(f"the image is empty (shape {array.shape})")
    axes = check_axes(axes, array.shape) if axes else guess_axes(array.shape)
    return Image(_plane_chunks(array, axes), axes, name)


def open_image(path: str | os.PathLike, axes: str | None = None) -> Image:
    """Open a TIFF / OME-TIFF file or an OME-Zarr folder lazily.

    Parameters
    ----------
    path
        ``.tif``/``.tiff`` (incl. ``.ome.tif``, ImageJ hyperstacks) or an
        OME-Zarr folder (``.zarr``, or any folder holding Zarr metadata).
    axes
        The axes of the array as the file stores it (e.g. ``'ZCYX'`` for a
        plain ``(2, 3, Y, X)`` TIFF): applied before any guess the file's own
        axes would lead to, such as taking an axis of 3 or 4 entries for RGB
        samples. Only ``S`` (RGB samples) is then moved last, as for every
        RGB image.

    Returns
    -------
    Image
        The lazy image with its axes and what the file records of its physical
        size: ``pixel_size`` (OME ``PhysicalSizeX/Y``, OME-Zarr scale, or the
        TIFF resolution tags), ``z_spacing`` (ImageJ ``spacing``, OME
        ``PhysicalSizeZ``, tifffile's JSON ``spacing``, OME-Zarr Z scale; in the
        unit of the pixel size, converted where needed) and ``unit``. A unit is
        never guessed: resolution tags without a unit give ``unit=None``.

    Raises
    ------
    ImageError
        When the path is missing, is a folder that is not a Zarr store, or
        cannot be read as an image; the message names the path and says why.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file or folder")
    if path.is_dir():
        if not is_zarr_store(path):
            raise ImageError(
                f"{path}: a folder that is not a Zarr store (it holds no {', '.join(ZARR_MARKERS)}); "
                "open a .tif/.tiff file or an OME-Zarr folder"
            )
        return _open_zarr(path, axes or None)
    if path.name.lower().endswith(ZARR_SUFFIXES):
        return _open_zarr(path, axes or None)
    return _open_tiff(path, axes or None)


def is_zarr_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding Zarr metadata (``.zgroup``, ``.zarray``, ``.zattrs`` or ``zarr.json``).

    The one test of what is a Zarr store: by content, not by name, so ``z.zarr/``
    typed with a trailing slash, or a store named without ``.zarr``, is still one
    image and never a folder of images.
    """
    path = Path(path)
    return path.is_dir() and any((path / marker).is_file() for marker in ZARR_MARKERS)


def _given_axes(array: Any, axes: str, path: Path) -> tuple[Any, str]:
    """The caller's axes applied to the array as stored; RGB samples (S) then moved last."""
    axes = axes.upper()
    if len(axes) == array.ndim and "S" in axes and not axes.endswith("S"):
        order = [i for i, a in enumerate(axes) if a != "S"] + [axes.index("S")]
        array, axes = array.transpose(order), "".join(axes[i] for i in order)
    try:
        return array, check_axes(axes, array.shape)
    except ImageError as error:
        raise ImageError(f"{path}: {error}") from None


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _open_tiff(path: Path, given_axes: str | None = None) -> Image:
    import dask.array as da
    import tifffile
    import zarr

    try:
        with _tifffile_quiet(), tifffile.TiffFile(path) as tif:
            if not tif.series or not tif.pages:
                raise ImageError(f"{path}: cannot read as TIFF (it holds no image)")
            series = tif.series[0]
            axes = series.axes.upper()
            page = tif.pages.first
            details: dict[str, Any] = {"imagej": bool(tif.is_imagej)}
            if "S" in series.axes and page.planarconfig == tifffile.PLANARCONFIG.SEPARATE:
                # tifffile's default for a 3 or 4 x H x W array: the output keeps this page layout
                details["planar"] = True
            if "XResolution" in page.tags and "YResolution" in page.tags:
                details["resolution"] = (page.tags["XResolution"].value, page.tags["YResolution"].value)
                details["resolutionunit"] = page.tags["ResolutionUnit"].value if "ResolutionUnit" in page.tags else 1
            pixel_size, unit, z_spacing = _tiff_physical_size(tif, details)
            # tifffile reads pages on demand through this store (it reopens the file when needed)
            array = da.from_zarr(zarr.open(series.aszarr(), mode="r"))
    except (OSError, tifffile.TiffFileError, ValueError, KeyError, IndexError) as error:
        if isinstance(error, ImageError):
            raise
        raise ImageError(f"{path}: cannot read as TIFF ({error})") from error
    if 0 in array.shape:
        raise ImageError(f"{path}: the image is empty (shape {array.shape})")
    if given_axes:
        array, axes = _given_axes(array, given_axes, path)
        return Image(_plane_chunks(array, axes), axes, _stem(path), pixel_size, unit, details, z_spacing)
    axes = axes.replace("Q", "Z") if "Z" not in axes and axes.count("Q") == 1 else axes
    if "S" in axes and not axes.endswith("S"):  # planar RGB: samples last, like every other RGB image
        order = [i for i, a in enumerate(axes) if a != "S"] + [axes.index("S")]
        array, axes = array.transpose(order), "".join(axes[i] for i in order)
    try:
        axes = check_axes(axes, array.shape)
    except ImageError as error:
        raise ImageError(f"{path}: {error}; pass the axes explicitly") from error
    return Image(_plane_chunks(array, axes), axes, _stem(path), pixel_size, unit, details, z_spacing)


@contextlib.contextmanager
def _tifffile_quiet() -> Iterator[None]:
    """tifffile logs what it finds odd in a file; our error message says it once, in one line."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _tiff_physical_size(
    tif: Any, details: dict[str, Any]
) -> tuple[tuple[float, float] | None, str | None, float | None]:
    """(Y, X) pixel size, unit and Z spacing of a TIFF.

    OME metadata first (``PhysicalSizeX/Y/Z`` and their units, the Z spacing
    converted to the X unit); otherwise the resolution tags, with the unit of
    the ImageJ or tifffile JSON description when it names one, else the tags'
    own ``ResolutionUnit`` (inch, centimeter; NONE gives no unit), and the Z
    spacing of the description (``spacing``).
    """
    pixel_size = unit = z_spacing = None
    if "resolution" in details:
        (xn, xd), (yn, yd) = details["resolution"]
        size_y, size_x = (_positive_or_none(yd / yn), _positive_or_none(xd / xn)) if xn and yn else (None, None)
        if size_y and size_x:
            pixel_size = (size_y, size_x)
            unit = {2: "inch", 3: "centimeter"}.get(int(details["resolutionunit"]))
    if tif.is_ome:
        import xml.etree.ElementTree as ElementTree

        try:
            root = ElementTree.fromstring(tif.ome_metadata)
            pixels = next(el for el in root.iter() if el.tag.endswith("Pixels"))
        except (ElementTree.ParseError, StopIteration, TypeError):
            return pixel_size, unit, None
        default = "\u00b5m"  # the OME default unit
        size_x = _positive_or_none(pixels.get("PhysicalSizeX"))
        unit_x = pixels.get("PhysicalSizeXUnit", default)
        size_y = _positive_or_none(pixels.get("PhysicalSizeY"))
        size_y = convert_length(size_y, pixels.get("PhysicalSizeYUnit", default), unit_x) if size_y else None
        if size_x and size_y:
            pixel_size, unit = (size_y, size_x), unit_x
        size_z = _positive_or_none(pixels.get("PhysicalSizeZ"))
        if size_z:
            z_spacing = convert_length(size_z, pixels.get("PhysicalSizeZUnit", default), unit)
        return pixel_size, unit, z_spacing
    description: dict[str, Any] = {}
    if tif.is_imagej:
        description = tif.imagej_metadata or {}
    elif tif.is_shaped and tif.shaped_metadata:
        description = tif.shaped_metadata[0] or {}
    if description.get("unit") is not None:
        unit = clean_unit(description["unit"])
    return pixel_size, unit, _positive_or_none(description.get("spacing"))


def _open_zarr(path: Path, given_axes: str | None = None) -> Image:
    """A Zarr array, or an OME-Zarr image (NGFF 0.4 or 0.5, every resolution level) read with ome-zarr-py."""
    import dask.array as da
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as error:  # zarr raises many types for a folder that is not a zarr store
        raise ImageError(f"{path}: cannot read as Zarr ({error})") from error
    if isinstance(node, zarr.Array):  # a bare array: no OME metadata, one level
        array = da.from_zarr(node)
        if given_axes:
            array, given_axes = _given_axes(array, given_axes, path)
        return as_image(array, given_axes, name=_stem(path))
    attrs = dict(node.attrs)
    ome = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else attrs  # NGFF 0.5 nests its metadata
    if not ome.get("multiscales"):
        raise ImageError(f"{path}: a Zarr group without OME-Zarr 'multiscales' metadata")
    try:
        levels, meta = _read_multiscales(path, ome)
        return _ngff_image(path, levels, meta, given_axes)
    except ImageError:
        raise
    except Exception as error:  # ome-zarr and zarr raise ValueError, KeyError, TypeError... for bad metadata
        raise ImageError(
            f"{path}: unreadable OME-Zarr 'multiscales' metadata ({type(error).__name__}: {error})"
        ) from error


def _read_multiscales(path: Path, ome: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """The resolution levels (dask arrays, finest first) and metadata of the image at ``path``, by ome-zarr-py.

    The metadata are ome-zarr's node metadata: ``axes`` (validated: NGFF order and types),
    ``coordinateTransformations`` (one list per level) and ``name``.
    """
    from ome_zarr.format import format_from_version
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    # open with the store's own version: ome-zarr warns when it has to find it out itself
    version = ome.get("version") or ome["multiscales"][0].get("version") or "0.4"
    location = parse_url(str(path), fmt=format_from_version(str(version)))
    if location is None:
        raise ImageError(f"{path}: cannot read as OME-Zarr")
    for node in Reader(location)():
        if node.load(Multiscales) is not None and node.data:  # the image (labels, if any, come after it)
            return list(node.data), node.metadata
    raise ImageError(f"{path}: an OME-Zarr group without image data")


def _ngff_image(path: Path, levels: list[Any], meta: dict[str, Any], given_axes: str | None = None) -> Image:
    """An OME-Zarr multiscale image: the first level as ``data``, the others as the ``pyramid``.

    Axes, pixel size, Z spacing and unit come from the first level's metadata;
    ``given_axes`` (the caller's, for the arrays as stored) replace the metadata's.
    """
    names = [str(a["name"] if isinstance(a, dict) else a) for a in meta.get("axes") or []]
    if given_axes:
        stored = given_axes.upper()
        levels, axes = zip(*(_given_axes(level, given_axes, path) for level in levels))
        axes = axes[0]
    else:
        axes = stored = check_axes("".join(names).upper(), levels[0].shape) if names else guess_axes(levels[0].shape)
    pixel_size = z_spacing = None
    units = {str(a.get("name", "")).upper(): a.get("unit") for a in meta.get("axes") or [] if isinstance(a, dict)}
    unit = clean_unit(units.get("X"))
    for transform in (meta.get("coordinateTransformations") or [[]])[0] or []:
        if transform.get("type") == "scale":
            scale = [_positive_or_none(v) for v in transform["scale"]]  # in the stored order
            size_y, size_x = scale[stored.index("Y")], scale[stored.index("X")]
            if size_y and size_x:
                pixel_size = (size_y, size_x)
            if "Z" in stored and scale[stored.index("Z")]:
                z_spacing = convert_length(scale[stored.index("Z")], units.get("Z"), unit)
    pyramid = tuple(_plane_chunks(level, axes) for level in levels[1:])
    return Image(
        _plane_chunks(levels[0], axes), axes, _stem(path), pixel_size, unit, z_spacing=z_spacing, pyramid=pyramid
    )


# --- writing -------------------------------------------------------------------------------------------------------


def output_format(path: str | os.PathLike) -> str:
    """'tiff' or 'zarr': from the target's name, or 'zarr' for an existing Zarr store (see :func:`is_zarr_store`)."""
    name = Path(path).name.lower()
    if name.endswith(ZARR_SUFFIXES) or is_zarr_store(path):  # what open_image reads as Zarr, written as Zarr
        return "zarr"
    if name.endswith(TIFF_SUFFIXES):
        return "tiff"
    raise ImageError(f"{path}: unknown output format; name it .tif/.tiff (TIFF, OME-TIFF) or .zarr (OME-Zarr)")


Block = tuple[tuple[int | slice, ...], np.ndarray]
"""A piece of an image: its index into the full array, and its values."""


def needs_bigtiff(nbytes: int) -> bool:
    """Whether pixel data of this size need BigTIFF (classic TIFF offsets end at 4 GiB; stay well clear)."""
    return nbytes > 2**31 - 2**25


def write_tiff(
    target: str | os.PathLike,
    blocks: Iterable[Block],
    shape: tuple[int, ...],
    dtype: np.dtype,
    axes: str,
    like: Image | None = None,
    overwrite: bool = True,
) -> Path:
    """Stream blocks (whole planes, in C order) into a TIFF file, atomically.

    The file is written under a temporary name in the target folder and renamed
    when complete: a failure leaves no file under ``target``, and an existing
    one is replaced only by a complete new one.

    Parameters
    ----------
    target
        The file to write. A name ending in ``.ome.tif``/``.ome.tiff`` gives an
        OME-TIFF; otherwise an ImageJ hyperstack when ``like.tiff["imagej"]`` is
        set and ImageJ can hold the data (8/16-bit unsigned or float32, axes in
        ImageJ's T, Z, C order, RGB only as 8-bit RGB, not BigTIFF); otherwise a
        plain TIFF with tifffile's JSON description.
    blocks
        ``(index, values)`` pairs of whole planes, in C order.
    shape, dtype, axes
        Of the whole image. Only axes where S, if present, comes last can be
        written (the engine's output always is).
    like
        The image whose physical size and page layout to record: its
        ``pixel_size`` (also as the TIFF resolution tags), ``z_spacing`` (when
        ``axes`` has Z) and ``unit``; RGB samples are stored as separate planes
        (each page ``S, Y, X``, so the file reads back with the shape the
        source file had) when ``like.tiff["planar"]`` is set, else
        interleaved (each page ``Y, X, S``). The unit is written where the
        flavour keeps it (ImageJ ``unit``, OME ``PhysicalSize*Unit``, JSON
        ``unit``); the resolution tags
        are in pixels per that unit, with ResolutionUnit CENTIMETER or INCH for
        those units and NONE for every other or none, so no reader takes
        them for inches. OME-TIFF records sizes only with a length unit.
    overwrite
        Replace ``target`` if it exists when the file is complete. False never
        replaces: :class:`~napari_mpt_deblur.atomic.OutputExistsError` if
        another run created ``target`` meanwhile.

    Returns
    -------
    Path
        ``target``.

    Raises
    ------
    ImageError
        For axes or data the flavour cannot hold (S not last; int64, uint64,
        float16 or an I axis in OME-TIFF).
    """
    import tifffile

    target = Path(target)
    dtype = np.dtype(dtype)
    if "S" in axes and not axes.endswith("S"):
        raise ImageError(f"cannot write axes {axes!r} as TIFF: RGB samples must come last")
    rgb = axes.endswith("S")
    planar = rgb and bool(like and like.tiff.get("planar"))
    bigtiff = needs_bigtiff(int(np.prod(shape)) * dtype.itemsize)
    ome = target.name.lower().endswith((".ome.tif", ".ome.tiff"))
    pixel_size = like.pixel_size if like else None
    unit = clean_unit(like.unit) if like else None
    known_unit = length_unit(unit)
    z_spacing = _positive_or_none(like.z_spacing) if like and "Z" in axes else None

    options: dict[str, Any] = {"photometric": "rgb" if rgb else "minisblack", "bigtiff": bigtiff}
    # the file's axes and shape as stored: planar RGB holds its samples before Y, X on every page
    file_axes = axes[:-3] + "SYX" if planar else axes
    file_shape = (*shape[:-3], shape[-1], *shape[-3:-1]) if planar else tuple(shape)
    if planar:
        options["planarconfig"] = "separate"
    if pixel_size:
        options["resolution"] = (1 / pixel_size[1], 1 / pixel_size[0])
        options["resolutionunit"] = _RESOLUTION_UNITS.get(known_unit or "", "NONE")
    metadata: dict[str, Any] = {"axes": file_axes}
    if ome:
        if dtype.name in ("int64", "uint64", "float16") or "I" in axes:
            raise ImageError(
                f"{target}: OME-TIFF cannot hold {dtype} data or an 'I' axis (axes {axes}); "
                "save it as a plain .tif, or convert the data"
            )
        options["ome"] = True
        ome_unit = _OME_UNITS.get(known_unit or "")
        if ome_unit:  # OME sizes need a length unit; without one, Y/X live in the resolution tags alone
            if pixel_size:
                metadata.update(PhysicalSizeY=pixel_size[0], PhysicalSizeYUnit=ome_unit)
                metadata.update(PhysicalSizeX=pixel_size[1], PhysicalSizeXUnit=ome_unit)
            if z_spacing:
                metadata.update(PhysicalSizeZ=z_spacing, PhysicalSizeZUnit=ome_unit)
    elif like and like.tiff.get("imagej") and not planar and imagej_can_hold(dtype, axes, shape, bigtiff):
        options["imagej"] = True
        if unit:
            metadata["unit"] = _imagej_unit(unit)
        if z_spacing:
            metadata["spacing"] = z_spacing
    else:
        options["ome"] = False
        if unit:
            metadata["unit"] = unit
        if z_spacing:
            metadata["spacing"] = z_spacing
    # One page per plane; RGB samples belong to their page.
    page_shape = shape[axes.index("Y") :]

    def pages() -> Iterator[np.ndarray]:
        for _, block in blocks:
            for page in np.asarray(block).reshape(-1, *page_shape):
                page = np.moveaxis(page, -1, 0) if planar else page
                yield np.ascontiguousarray(page, dtype=dtype)

    def write(path: Path) -> None:
        tifffile.imwrite(path, pages(), shape=file_shape, dtype=dtype, metadata=metadata, **options)

    atomic_write(target, write, overwrite=overwrite)
    return target


def imagej_can_hold(dtype: np.dtype, axes: str, shape: tuple[int, ...], bigtiff: bool = False) -> bool:
    """Whether an ImageJ hyperstack can hold this data as it is.

    8/16-bit unsigned or float32 data, axes in ImageJ's T, Z, C, Y, X order,
    RGB samples only as 8-bit RGB, and no BigTIFF.
    """
    dtype = np.dtype(dtype)
    if bigtiff or dtype not in (np.uint8, np.uint16, np.float32):
        return False
    if axes.endswith("S") and (dtype != np.uint8 or shape[-1] != 3):
        return False
    return _is_ordered_subsequence(axes, "TZCYXS")


def _imagej_unit(unit: str) -> str:
    """A unit as ImageJ writes it: its own names for the standard length names, ``\\uXXXX`` for non-ASCII."""
    known = length_unit(unit)
    if unit in _IMAGEJ_UNITS or (known and not unit.isascii()):
        unit = _IMAGEJ_UNITS.get(known or unit, unit)
    return "".join(c if c.isascii() else f"\\u{ord(c):04x}" for c in unit)


def _is_ordered_subsequence(axes: str, order: str) -> bool:
    positions = [order.find(a) for a in axes]
    return -1 not in positions and positions == sorted(positions)


NGFF_AXIS_TYPES = {"T": "time", "C": "channel", "Z": "space", "Y": "space", "X": "space"}

PYRAMID_ABOVE = 2048
"""OME-Zarr outputs with a plane side above this get a multiscale pyramid: levels that halve Y and X
until the largest side is at most half of this, so a viewer shows the whole plane without reading it all."""

ZARR_CHUNK_SIDE = 1024
"""OME-Zarr chunks hold one plane, cut into tiles of at most this side (a zoomed-in view reads a few)."""


def pyramid_shapes(height: int, width: int, above: int = PYRAMID_ABOVE) -> list[tuple[int, int]]:
    """The (Y, X) sizes of the resolution levels :func:`write_ome_zarr` writes for a plane, finest first.

    One level up to ``above`` pixels a side; beyond, each further level halves
    the previous one (rounding up: no pixel is dropped) until the largest side
    is at most ``above // 2``.
    """
    shapes = [(height, width)]
    if max(height, width) > above:
        while max(shapes[-1]) > above // 2:
            shapes.append(tuple(-(-n // 2) for n in shapes[-1]))
    return shapes


def half_plane(values: np.ndarray) -> np.ndarray:
    """``values`` at half the resolution in its last two axes (Y, X): the mean of every 2 x 2 block.

    An odd side repeats its last row or column. Integers are rounded back to their type (a mean
    stays within the type's range); floating point keeps its type.
    """
    pad = [(0, 0)] * (values.ndim - 2) + [(0, values.shape[-2] % 2), (0, values.shape[-1] % 2)]
    if any(after for _, after in pad):
        values = np.pad(values, pad, mode="edge")
    # summed block corner by corner: the work array is a quarter of the plane, not a float copy of it all
    total = values[..., 0::2, 0::2].astype(np.float64 if values.dtype.itemsize > 4 else np.float32)
    for dy, dx in ((0, 1), (1, 0), (1, 1)):
        total += values[..., dy::2, dx::2]
    total *= 0.25
    if values.dtype.kind in "iub":
        np.rint(total, out=total)
    return total.astype(values.dtype)


def write_ome_zarr(
    target: str | os.PathLike,
    blocks: Iterable[Block],
    shape: tuple[int, ...],
    dtype: np.dtype,
    axes: str,
    like: Image | None = None,
    overwrite: bool = True,
    pyramid_above: int = PYRAMID_ABOVE,
) -> Path:
    """Stream blocks into an OME-Zarr folder (NGFF 0.4, with ome-zarr-py), with a pyramid for large planes.

    NGFF allows at most T, C, Z, Y, X in that order: RGB samples (S) are stored
    as the channel axis and the array is stored in NGFF order, whatever the
    input's axis order. The scale transform holds ``like``'s pixel size (Y, X)
    and Z spacing (1 where unknown); the space axes whose size is known get
    ``like``'s unit when it is a known length (its UDUNITS-2 name, e.g.
    ``'micrometer'``). Planes with a side above ``pyramid_above`` also get
    lower-resolution levels (:func:`pyramid_shapes`, each the 2 x 2 mean of the
    one before, :func:`half_plane`), written as each block arrives: memory
    holds one block at a time, whatever the stack's depth or the plane's size.
    ome-zarr-py validates and writes the metadata (NGFF 0.4 on Zarr v2, which
    Fiji, QuPath and napari all read); arrays use ``/`` chunk keys, as NGFF
    asks. The folder is written under a temporary name and renamed when
    complete; without ``overwrite``, never onto an existing one.
    """
    import zarr
    from ome_zarr.format import FormatV04

    with warnings.catch_warnings():  # ome-zarr >= 0.14 makes a deprecated Scaler, a default argument, on import
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr.writer import write_multiscales_metadata

    target = Path(target)
    stored_axes = axes.replace("S", "C") if "S" in axes and "C" not in axes else axes
    extra = sorted(set(stored_axes) - set("TCZYX"))
    if extra:
        raise ImageError(f"cannot write axes {axes!r} as OME-Zarr (it allows T, C, Z, Y, X)")
    order = [stored_axes.index(a) for a in "TCZYX" if a in stored_axes]
    ngff_axes = "".join(stored_axes[i] for i in order)
    ngff_shape = tuple(shape[i] for i in order)
    levels = pyramid_shapes(*ngff_shape[-2:], above=pyramid_above)
    scale = [1.0] * len(ngff_axes)
    sized = set()  # the axes whose scale is a physical size
    if like and like.pixel_size:
        scale[ngff_axes.index("Y")], scale[ngff_axes.index("X")] = (float(v) for v in like.pixel_size)
        sized |= {"Y", "X"}
    z_spacing = _positive_or_none(like.z_spacing) if like else None
    if z_spacing and "Z" in ngff_axes:
        scale[ngff_axes.index("Z")] = z_spacing
        sized.add("Z")
    unit = length_unit(like.unit) if like else None
    axis_meta = []
    for a in ngff_axes:
        entry = {"name": a.lower(), "type": NGFF_AXIS_TYPES[a]}
        if a in sized and unit:
            entry["unit"] = unit
        axis_meta.append(entry)
    datasets = [
        {
            "path": str(level),
            "coordinateTransformations": [
                {"type": "scale", "scale": [*scale[:-2], *(v * 2**level for v in scale[-2:])]}
            ],
        }
        for level in range(len(levels))
    ]
    fmt = FormatV04()

    def write(folder: Path) -> None:
        group = zarr.open_group(str(folder), mode="w", zarr_format=fmt.zarr_format)
        arrays = [
            group.create_array(
                str(level),
                shape=(*ngff_shape[:-2], *size),
                chunks=(*(1,) * (len(ngff_shape) - 2), *(min(n, ZARR_CHUNK_SIDE) for n in size)),
                dtype=dtype,
                fill_value=0,
                chunk_key_encoding=fmt.chunk_key_encoding,
            )
            for level, size in enumerate(levels)
        ]
        for index, block in blocks:
            index = tuple(index[i] for i in order)[:-2] + (slice(None), slice(None))
            values = np.asarray(block, dtype=dtype).transpose(order)
            for level, array in enumerate(arrays):
                if level:
                    values = half_plane(values)
                # a row of chunks at a time: zarr copies what it is given a few times over while encoding
                for top in range(0, values.shape[-2], ZARR_CHUNK_SIDE):
                    rows = slice(top, top + ZARR_CHUNK_SIDE)
                    array[index[:-2] + (rows, slice(None))] = values[..., rows, :]
        write_multiscales_metadata(group, datasets, fmt=fmt, axes=axis_meta, name=like.name if like else _stem(target))

    atomic_write_folder(target, write, overwrite=overwrite)
    return target


def write_image(
    target: str | os.PathLike,
    blocks: Iterable[Block],
    shape: tuple[int, ...],
    dtype: np.dtype,
    axes: str,
    like: Image | None = None,
    overwrite: bool = True,
) -> Path:
    """Write blocks to ``target`` as TIFF or OME-Zarr, chosen by its name (``overwrite``: see :func:`write_tiff`)."""
    writer = write_ome_zarr if output_format(target) == "zarr" else write_tiff
    return writer(target, blocks, shape, dtype, axes, like, overwrite=overwrite)


def output_is_complete(path: str | os.PathLike, shape: tuple[int, ...], dtype: Any) -> bool:
    """Whether ``path`` is a complete output of this shape and dtype (what ``--skip-existing`` skips).

    Complete means: it opens as an image, has ``dtype`` and ``shape`` (axes of
    one entry aside: ImageJ drops them), and, for a TIFF, the pixel data of
    every page lie inside the file (a copy cut short fails this). Outputs are
    published only when complete, so this guards against files cut short or
    made by other tools; it does not read the pixels.
    """
    path = Path(path)
    try:
        image = open_image(path)
    except ImageError:
        return False
    if np.dtype(image.dtype) != np.dtype(dtype):
        return False
    if tuple(n for n in image.shape if n != 1) != tuple(n for n in shape if n != 1):
        return False
    if path.is_dir():
        return True
    import tifffile

    try:
        size = path.stat().st_size
        with _tifffile_quiet(), tifffile.TiffFile(path) as tif:
            for page in tif.pages:
                if any(o + n > size for o, n in zip(page.dataoffsets, page.databytecounts)):
                    return False
    except (OSError, tifffile.TiffFileError, ValueError, AttributeError):
        return False
    return True

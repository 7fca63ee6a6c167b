"""Reading and writing images: arrays, TIFF / OME-TIFF and OME-Zarr, with their axes.

Everything is read lazily as a dask array chunked one plane per chunk, and
written plane by plane under a temporary name that is renamed when complete, so
a stack larger than memory streams through and an interrupted run never leaves
a half-written file under the final name.

Axes are letters: ``T`` (time), ``Z`` (depth), ``C`` (channel), ``Y``, ``X``
and ``S`` (the samples of an RGB/RGBA pixel). tifffile's ``Q`` (unknown) and
``I`` (image sequence) are accepted as further plane axes.
"""

from __future__ import annotations

import contextlib
import logging
import os
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


class ImageError(ValueError):
    """An image that cannot be read or written as asked; the message says why."""


def guess_axes(shape: tuple[int, ...]) -> str:
    """Axes of an array of this shape when nothing says otherwise.

    The last two axes are Y, X, unless the last one has 3 or 4 entries and the
    two before it are larger (an RGB/RGBA image, ``...YXS``). Leading axes are
    read as Z (3-D), T, Z (4-D) and T, Z, C (5-D).
    """
    rgb = len(shape) >= 3 and shape[-1] in (3, 4) and min(shape[-3:-1]) > 4
    spatial = len(shape) - (1 if rgb else 0)
    leading = {2: "", 3: "Z", 4: "TZ", 5: "TZC"}.get(spatial)
    if leading is None:
        raise ImageError(f"cannot guess the axes of a {len(shape)}-D array of shape {shape}; pass axes, e.g. 'TZCYX'")
    return leading + "YX" + ("S" if rgb else "")


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
    """Unit of ``pixel_size`` (e.g. ``'micron'``)."""

    tiff: dict[str, Any] = field(default_factory=dict)
    """TIFF details to carry over to a TIFF output: ``resolution``, ``resolutionunit``, ``imagej``."""

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
        OME-Zarr folder (``.zarr``).
    axes
        Overrides the axes the file records.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file or folder")
    if path.is_dir() or path.name.lower().endswith(ZARR_SUFFIXES):
        image = _open_zarr(path)
    else:
        image = _open_tiff(path)
    if axes:
        image.axes = check_axes(axes, image.shape)
        image.data = _plane_chunks(image.data, image.axes)
    return image


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _open_tiff(path: Path) -> Image:
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
            if "XResolution" in page.tags and "YResolution" in page.tags:
                details["resolution"] = (page.tags["XResolution"].value, page.tags["YResolution"].value)
                details["resolutionunit"] = page.tags["ResolutionUnit"].value if "ResolutionUnit" in page.tags else 1
            pixel_size, unit = _tiff_pixel_size(tif, details)
            # tifffile reads pages on demand through this store (it reopens the file when needed)
            array = da.from_zarr(zarr.open(series.aszarr(), mode="r"))
    except (OSError, tifffile.TiffFileError, ValueError, KeyError, IndexError) as error:
        if isinstance(error, ImageError):
            raise
        raise ImageError(f"{path}: cannot read as TIFF ({error})") from error
    if 0 in array.shape:
        raise ImageError(f"{path}: the image is empty (shape {array.shape})")
    axes = axes.replace("Q", "Z") if "Z" not in axes and axes.count("Q") == 1 else axes
    if "S" in axes and not axes.endswith("S"):  # planar RGB: samples last, like every other RGB image
        order = [i for i, a in enumerate(axes) if a != "S"] + [axes.index("S")]
        array, axes = array.transpose(order), "".join(axes[i] for i in order)
    try:
        axes = check_axes(axes, array.shape)
    except ImageError as error:
        raise ImageError(f"{path}: {error}; pass the axes explicitly") from error
    return Image(_plane_chunks(array, axes), axes, _stem(path), pixel_size, unit, details)


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


def _tiff_pixel_size(tif: Any, details: dict[str, Any]) -> tuple[tuple[float, float] | None, str | None]:
    """(Y, X) pixel size and unit from OME metadata or the resolution tags."""
    if tif.is_ome:
        import xml.etree.ElementTree as ElementTree

        try:
            root = ElementTree.fromstring(tif.ome_metadata)
            pixels = next(el for el in root.iter() if el.tag.endswith("Pixels"))
            size_x, size_y = pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeY")
            if size_x and size_y:
                return (float(size_y), float(size_x)), pixels.get("PhysicalSizeXUnit", "µm")
        except (ElementTree.ParseError, StopIteration, ValueError):
            pass
    if "resolution" in details:
        (xn, xd), (yn, yd) = details["resolution"]
        if xn and yn:
            unit = {2: "inch", 3: "centimeter"}.get(int(details["resolutionunit"]))
            if tif.is_imagej:
                unit = (tif.imagej_metadata or {}).get("unit", unit)
            return (yd / yn, xd / xn), unit
    return None, None


def _open_zarr(path: Path) -> Image:
    import dask.array as da
    import zarr

    try:
        group = zarr.open(str(path), mode="r")
    except Exception as error:  # zarr raises many types for a folder that is not a zarr store
        raise ImageError(f"{path}: cannot read as Zarr ({error})") from error
    if isinstance(group, zarr.Array):
        return as_image(da.from_zarr(group), name=_stem(path))
    attrs = dict(group.attrs)
    multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if not multiscales:
        raise ImageError(f"{path}: a Zarr group without OME-Zarr 'multiscales' metadata")
    meta = multiscales[0]
    dataset = meta["datasets"][0]
    array = da.from_zarr(group[dataset["path"]])
    names = [a["name"] if isinstance(a, dict) else a for a in meta.get("axes", [])]
    axes = "".join("S" if n.lower() == "c" and names[-1].lower() == "c" else n.upper() for n in names)
    axes = check_axes(axes, array.shape) if axes else guess_axes(array.shape)
    pixel_size = unit = None
    for transform in dataset.get("coordinateTransformations", []):
        if transform.get("type") == "scale":
            scale = transform["scale"]
            pixel_size = (float(scale[axes.index("Y")]), float(scale[axes.index("X")]))
    space = [a for a in meta.get("axes", []) if isinstance(a, dict) and a.get("name", "").lower() == "x"]
    if space:
        unit = space[0].get("unit")
    return Image(_plane_chunks(array, axes), axes, _stem(path), pixel_size, unit)


# --- writing -------------------------------------------------------------------------------------------------------


def output_format(path: str | os.PathLike) -> str:
    """'tiff' or 'zarr', from the target's name."""
    name = Path(path).name.lower()
    if name.endswith(ZARR_SUFFIXES):
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
) -> Path:
    """Stream blocks (whole planes, in C order) into a TIFF file, atomically.

    BigTIFF when the data exceeds 2 GiB; OME-TIFF when the name ends in
    ``.ome.tif``; an ImageJ hyperstack when ``like`` was one and its axes allow;
    axes, resolution and pixel size of ``like`` are kept. Only axes where S, if
    present, comes last can be written (the engine's output always is).
    """
    import tifffile

    target = Path(target)
    dtype = np.dtype(dtype)
    if "S" in axes and not axes.endswith("S"):
        raise ImageError(f"cannot write axes {axes!r} as TIFF: RGB samples must come last")
    rgb = axes.endswith("S")
    nbytes = int(np.prod(shape)) * dtype.itemsize
    ome = target.name.lower().endswith((".ome.tif", ".ome.tiff"))
    like_tiff = like.tiff if like else {}
    options: dict[str, Any] = {
        "photometric": "rgb" if rgb else "minisblack",
        "bigtiff": needs_bigtiff(nbytes),
    }
    metadata: dict[str, Any] = {"axes": axes}
    if like_tiff.get("resolution"):
        options["resolution"] = like_tiff["resolution"]
        options["resolutionunit"] = like_tiff.get("resolutionunit")
    imagej = (
        like_tiff.get("imagej")
        and not ome
        and not options["bigtiff"]
        and dtype in (np.uint8, np.uint16, np.float32)
        and _is_ordered_subsequence(axes, "TZCYXS")
    )
    if ome:
        options["ome"] = True
        if like and like.pixel_size:
            metadata.update(PhysicalSizeY=like.pixel_size[0], PhysicalSizeX=like.pixel_size[1])
    elif imagej:
        options["imagej"] = True
        if like and like.unit:
            metadata["unit"] = like.unit
    # One page per plane; RGB samples belong to their page.
    page_shape = shape[axes.index("Y") :]

    def pages() -> Iterator[np.ndarray]:
        for _, block in blocks:
            yield from np.ascontiguousarray(block, dtype=dtype).reshape(-1, *page_shape)

    def write(path: Path) -> None:
        tifffile.imwrite(path, pages(), shape=shape, dtype=dtype, metadata=metadata, **options)

    atomic_write(target, write)
    return target


def _is_ordered_subsequence(axes: str, order: str) -> bool:
    positions = [order.find(a) for a in axes]
    return -1 not in positions and positions == sorted(positions)


NGFF_AXIS_TYPES = {"T": "time", "C": "channel", "Z": "space", "Y": "space", "X": "space"}


def write_ome_zarr(
    target: str | os.PathLike,
    blocks: Iterable[Block],
    shape: tuple[int, ...],
    dtype: np.dtype,
    axes: str,
    like: Image | None = None,
) -> Path:
    """Stream blocks into an OME-Zarr folder (NGFF 0.4, one scale).

    NGFF allows at most T, C, Z, Y, X in that order: RGB samples (S) are stored
    as the channel axis and the array is stored in NGFF order, whatever the
    input's axis order. The folder is written under a temporary name and
    renamed when complete.
    """
    import zarr

    target = Path(target)
    stored_axes = axes.replace("S", "C") if "S" in axes and "C" not in axes else axes
    extra = sorted(set(stored_axes) - set("TCZYX"))
    if extra:
        raise ImageError(f"cannot write axes {axes!r} as OME-Zarr (it allows T, C, Z, Y, X)")
    order = [stored_axes.index(a) for a in "TCZYX" if a in stored_axes]
    ngff_axes = "".join(stored_axes[i] for i in order)
    ngff_shape = tuple(shape[i] for i in order)
    chunks = tuple(n if a in "YX" else 1 for a, n in zip(ngff_axes, ngff_shape))

    def write(folder: Path) -> None:
        group = zarr.open_group(str(folder), mode="w", zarr_format=2)
        array = group.create_array("0", shape=ngff_shape, chunks=chunks, dtype=dtype, fill_value=0)
        for index, block in blocks:
            array[tuple(index[i] for i in order)] = np.asarray(block, dtype=dtype).transpose(order)
        scale = [1.0] * len(ngff_axes)
        if like and like.pixel_size:
            scale[ngff_axes.index("Y")], scale[ngff_axes.index("X")] = like.pixel_size
        axis_meta = []
        for a in ngff_axes:
            entry = {"name": a.lower(), "type": NGFF_AXIS_TYPES[a]}
            if a in "YX" and like and like.unit and like.unit in _NGFF_UNITS:
                entry["unit"] = _NGFF_UNITS[like.unit]
            axis_meta.append(entry)
        group.attrs["multiscales"] = [
            {
                "version": "0.4",
                "name": like.name if like else target.stem,
                "axes": axis_meta,
                "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
            }
        ]

    atomic_write_folder(target, write)
    return target


_NGFF_UNITS = {
    "micron": "micrometer",
    "µm": "micrometer",
    "um": "micrometer",
    "nm": "nanometer",
    "micrometer": "micrometer",
    "nanometer": "nanometer",
    "mm": "millimeter",
    "centimeter": "centimeter",
    "inch": "inch",
}


def write_image(
    target: str | os.PathLike,
    blocks: Iterable[Block],
    shape: tuple[int, ...],
    dtype: np.dtype,
    axes: str,
    like: Image | None = None,
) -> Path:
    """Write blocks to ``target`` as TIFF or OME-Zarr, chosen by its name."""
    writer = write_ome_zarr if output_format(target) == "zarr" else write_tiff
    return writer(target, blocks, shape, dtype, axes, like)

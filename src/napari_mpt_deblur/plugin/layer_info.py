"""What the plugin reads of a napari layer, one way for every dock and the writer (no Qt, no napari).

A :class:`LayerInfo` is built from a layer (:meth:`LayerInfo.of`, duck-typed: any object with a layer's
attributes) or from the ``(data, meta)`` a writer receives (:meth:`LayerInfo.from_layer_data`), so that
saving a layer and deblurring, comparing or fine-tuning on it read the same pixels and the same axes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .. import images
from ..images import ImageError

RECORD_KEY = "napari_mpt_deblur"
"""Key of the metadata entry of a layer the plugin made (a deblurred result, detections): how it was made."""

LABEL_LETTERS = images.PLANE_AXES + "YX"
"""Axis labels read as axes (case-insensitive): single letters among these."""


def full_resolution(data: Any, multiscale: bool) -> Any:
    """A layer's full-resolution array: the first level of a multiscale layer's pyramid (nothing is read)."""
    return data[0] if multiscale else data


def layer_axes(shape: Sequence[int], rgb: bool, axis_labels: Sequence[Any] | None, recorded: Any = None) -> str:
    """Axes letters (see :mod:`napari_mpt_deblur.images`) of a layer's data.

    The axis labels, when they are distinct single letters among :data:`LABEL_LETTERS` (any case),
    one per dimension: they name the axes, right or wrong. Otherwise the first of these that fits
    the shape: the axes the reader recorded (``recorded``, the layer's ``metadata["axes"]``), the
    default for the number of dimensions (:func:`~napari_mpt_deblur.images.default_axes`: YX, ZYX,
    TZYX, TZCYX).

    Parameters
    ----------
    shape
        Shape of the data (RGB samples last when ``rgb``).
    rgb
        Whether the last axis holds RGB(A) samples.
    axis_labels
        The layer's axis labels (napari's defaults, ``-3``, ``-2``..., name no axes).
    recorded
        The axes the plugin's reader recorded for the layer, if any.

    Returns
    -------
    str
        One upper-case letter per axis of the data, ending in ``S`` exactly when ``rgb``.

    Raises
    ------
    ImageError
        When the labels name axes that do not fit the data (the message says why), or when
        nothing fits: the message says how to name the axes.
    """
    shape = tuple(int(n) for n in shape)
    samples = "S" if rgb else ""
    ndim = len(shape) - len(samples)
    letters = [str(label).strip().upper() for label in axis_labels] if axis_labels is not None else []
    if (
        len(letters) == ndim
        and all(len(letter) == 1 and letter in LABEL_LETTERS for letter in letters)
        and len(set(letters)) == ndim
    ):
        return images.check_axes("".join(letters) + samples, shape)
    candidates = [recorded.upper()] if isinstance(recorded, str) else []
    default = images.default_axes(ndim)
    if default is not None:
        candidates.append(default + samples)
    for axes in candidates:
        if axes.endswith("S") != rgb:
            continue
        try:
            return images.check_axes(axes, shape)
        except ImageError:
            continue
    example = ", ".join(repr(a) for a in ("t", "z", "c", "y", "x")[-ndim:]) if 2 <= ndim <= 5 else "'t', 'z', ..."
    raise ImageError(
        f"cannot tell the axes of a layer of shape {shape}: name them with letters among t, z, c, y, x in its "
        f"axis labels (e.g. layer.axis_labels = ({example}))"
    )


@dataclass(frozen=True, eq=False)
class LayerInfo:
    """A napari layer as the plugin reads it: its full-resolution pixels, shape, axes and placement."""

    name: str
    kind: str
    """The layer type in lower case: ``image``, ``labels``, ``points``..."""
    pixels: Any = field(repr=False)
    """The full-resolution array (numpy, dask, zarr...; the first level of a multiscale layer), not read here."""
    rgb: bool = False
    """Whether the last axis of :attr:`pixels` holds RGB(A) samples."""
    axis_labels: tuple[str, ...] | None = None
    scale: tuple[float, ...] | None = None
    """One value per axis napari shows (RGB samples excluded)."""
    units: Any = None
    """napari's units: one per shown axis, one for all, or None."""
    metadata: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, layer: Any) -> LayerInfo:
        """What the plugin reads of a napari layer (any object with its attributes)."""
        return cls(
            name=str(layer.name),
            kind=layer.__class__.__name__.lower(),  # a proxy napari hands a dock reports the layer's class
            pixels=full_resolution(layer.data, bool(getattr(layer, "multiscale", False))),
            rgb=bool(getattr(layer, "rgb", False)),
            axis_labels=_labels(getattr(layer, "axis_labels", None)),
            scale=_floats(getattr(layer, "scale", None)),
            units=getattr(layer, "units", None),
            metadata=_mapping(getattr(layer, "metadata", None)),
        )

    @classmethod
    def from_layer_data(cls, data: Any, meta: Mapping[str, Any], kind: str = "image") -> LayerInfo:
        """What the plugin reads of a layer given as napari's layer data: ``data`` and its attributes ``meta``
        (``layer.as_layer_data_tuple()[:2]``, what a writer receives). A list of arrays is a pyramid."""
        multiscale = bool(meta.get("multiscale", False)) or isinstance(data, (list, tuple))
        name = meta.get("name")
        return cls(
            name=name if isinstance(name, str) else "",
            kind=kind,
            pixels=full_resolution(data, multiscale),
            rgb=bool(meta.get("rgb", False)),
            axis_labels=_labels(meta.get("axis_labels")),
            scale=_floats(meta.get("scale")),
            units=meta.get("units"),
            metadata=_mapping(meta.get("metadata")),
        )

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of :attr:`pixels` (RGB samples included)."""
        return tuple(int(n) for n in self.pixels.shape)

    @property
    def shape_without_samples(self) -> tuple[int, ...]:
        """The shape napari shows: :attr:`shape` without the RGB samples."""
        return self.shape[:-1] if self.rgb else self.shape

    @cached_property
    def axes(self) -> str:
        """Axes letters of :attr:`pixels` (:func:`layer_axes`); :class:`~napari_mpt_deblur.images.ImageError`
        when they cannot be told."""
        return layer_axes(self.shape, self.rgb, self.axis_labels, self.metadata.get("axes"))

    @property
    def made_by_plugin(self) -> bool:
        """Whether the plugin made this layer (its metadata holds :data:`RECORD_KEY`)."""
        return RECORD_KEY in self.metadata


def _labels(labels: Any) -> tuple[str, ...] | None:
    return None if labels is None else tuple(str(label) for label in labels)


def _floats(values: Any) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(value) for value in values)


def _mapping(metadata: Any) -> Mapping[str, Any]:
    return metadata if isinstance(metadata, Mapping) else {}

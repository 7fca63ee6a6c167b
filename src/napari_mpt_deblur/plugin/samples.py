"""napari sample data: a through-focus z-stack of real cells, made with the project's physical PSF, and its truth.

The sharp plane is scikit-image's bundled ``cell`` image (no download). Each
plane of the stack is that image seen through a widefield microscope focused
``z`` micrometres away (:func:`~napari_mpt_deblur.data.defocus.widefield_psf`),
with camera shot and read noise, as 16-bit counts. Nothing here imports Qt or napari:
``mpt-deblur sample`` writes the same data to a file through :func:`sample_image`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from ..data.defocus import add_poisson_gaussian_noise, blur, widefield_psf
from ..images import Image, as_image

PIXEL_SIZE_UM = 0.2
"""Pixel side in the sample, micrometres (what the PSF model assumes)."""

DEFOCUS_UM = tuple(float(z) for z in np.linspace(-3.0, 3.0, 9))
"""Distance from focus of each plane, micrometres; the middle plane is in focus."""

Z_STEP_UM = DEFOCUS_UM[1] - DEFOCUS_UM[0]

PSF = {"na": 0.8, "wavelength_um": 0.52, "refractive_index": 1.33, "pixel_size_um": PIXEL_SIZE_UM}
"""The widefield microscope: a 0.8 NA water objective, green emission."""

PHOTONS = 1000.0
"""Expected photons at full intensity (1.0): the camera counts one per photon."""

READ_NOISE = 0.002
"""Read noise, in units of full intensity (2 counts)."""

OFFSET = 100
"""Camera offset added to every pixel, counts (keeps the read noise above zero)."""

SEED = 0

SAMPLES = {
    "cells": "defocused cell z-stack: scikit-image's cell through a widefield microscope 3 um below to 3 um above "
    "focus, with camera noise (ZYX, 9 x 660 x 550, uint16, 0.2 um pixels, 0.75 um Z steps)",
    "cells-truth": "the sharp truth of 'cells': the in-focus cell image, noise-free, on each of the 9 planes",
}
"""The samples :func:`sample_image` makes, by name, with what each is."""

_SAMPLE_LAYERS = {"cells": 1, "cells-truth": 0}
"""Index of each named sample in :func:`defocused_cell_stack`'s layers."""


def defocused_cell_stack() -> list[tuple[np.ndarray, dict[str, Any], str]]:
    """The npe2 sample: a defocused z-stack of cells and its sharp truth, as two image layers.

    Returns
    -------
    list of (data, meta, "image")
        First "sharp cells": the noise-free in-focus truth repeated on every plane
        (so the Z sliders of both layers line up); then, on top, "defocused
        cells": 9 planes from -3 to +3 um around focus (0.75 um apart), each
        blurred with the widefield PSF at that distance, with Poisson shot noise
        (1000 photons at full intensity), Gaussian read noise and a 100-count
        offset. Both are ``uint16`` of shape ``(9, 660, 550)`` with scale
        ``(0.75, 0.2, 0.2)`` micrometres, axis labels ``("z", "y", "x")``, the
        same contrast limits, and metadata saying how they were made. The same
        seed gives the same stack every time.
    """
    from skimage import data

    sharp = data.cell().astype(np.float32) / 255.0
    rng = np.random.default_rng(SEED)
    psfs: dict[float, np.ndarray] = {}  # the widefield PSF is the same at +z and -z
    planes = []
    for z in DEFOCUS_UM:
        distance = round(abs(z), 9)
        if distance not in psfs:
            psfs[distance] = widefield_psf(distance, **PSF)
        noisy = add_poisson_gaussian_noise(blur(sharp, psfs[distance]), PHOTONS, READ_NOISE, rng)
        planes.append(_counts(noisy))
    defocused = np.stack(planes)
    truth = np.repeat(_counts(sharp)[None], len(DEFOCUS_UM), axis=0)

    limits = (float(truth.min()), float(truth.max()))
    common = {
        "scale": (Z_STEP_UM, PIXEL_SIZE_UM, PIXEL_SIZE_UM),
        "axis_labels": ("z", "y", "x"),
        "units": ("micrometer",) * 3,
        "contrast_limits": limits,
        "colormap": "gray",
    }
    made_of = {
        "axes": "ZYX",
        "pixel_size": (PIXEL_SIZE_UM, PIXEL_SIZE_UM),
        "unit": "micrometer",
        "z_spacing": Z_STEP_UM,
        "source": "scikit-image data.cell() (bundled), intensities / 255",
        "defocus_um": list(DEFOCUS_UM),
    }
    sharp_meta = {
        **common,
        "name": "sharp cells",
        "metadata": {
            **made_of,
            "description": "the in-focus truth: the cell image, noise-free, as counts "
            f"(intensity x {PHOTONS:g} + {OFFSET}), the same on every plane",
        },
    }
    defocused_meta = {
        **common,
        "name": "defocused cells",
        "metadata": {
            **made_of,
            "description": "the cell image seen through a widefield microscope focused defocus_um away "
            "(scalar pupil model, napari_mpt_deblur.data.defocus.widefield_psf), with Poisson shot noise, "
            "Gaussian read noise and a camera offset, as counts",
            "psf": {"model": "widefield", **PSF},
            "photons": PHOTONS,
            "read_noise": READ_NOISE,
            "offset": OFFSET,
            "seed": SEED,
        },
    }
    return [(truth, sharp_meta, "image"), (defocused, defocused_meta, "image")]


def _counts(intensity: np.ndarray) -> np.ndarray:
    """Intensities (1.0 = PHOTONS photons) as 16-bit camera counts, with the offset."""
    return np.clip(np.rint(intensity * PHOTONS) + OFFSET, 0, np.iinfo(np.uint16).max).astype(np.uint16)


def sample_image(name: str) -> Image:
    """One sample as an :class:`~napari_mpt_deblur.images.Image`, ready to write to a file.

    Parameters
    ----------
    name
        A key of :data:`SAMPLES`: ``'cells'`` (the defocused stack) or
        ``'cells-truth'`` (its sharp truth).

    Returns
    -------
    Image
        The ``uint16`` ``ZYX`` stack with its pixel size, Z spacing and unit
        (micrometre), marked to be written as an ImageJ hyperstack so Fiji
        reads the calibration too.

    Raises
    ------
    KeyError
        For a name that is not a sample; the message lists the samples.
    """
    if name not in SAMPLES:
        raise KeyError(f"no sample {name!r}; the samples are {', '.join(SAMPLES)}")
    data, meta, _ = defocused_cell_stack()[_SAMPLE_LAYERS[name]]
    image = as_image(data, "ZYX", name=meta["name"])
    made_of = meta["metadata"]
    return replace(
        image,
        pixel_size=made_of["pixel_size"],
        unit=made_of["unit"],
        z_spacing=made_of["z_spacing"],
        tiff={"imagej": True},
    )

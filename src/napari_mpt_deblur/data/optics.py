"""The user's microscope and the blur measured in their own stacks, for optics-aware fine-tuning.

A fine-tune learns from synthetic pairs: the sharpest of the user's planes, blurred
again. Those pairs teach the lab's blur only when the synthetic blur looks like it.
:class:`~napari_mpt_deblur.config.Microscope` holds what the user (or the file's metadata) says about the
optics; :func:`estimate_blur` measures how much blur the stack holds, by comparing
the power spectra of its planes with that of its sharpest ones; and
:meth:`BlurEstimate.defocus_config` turns both into the
:class:`~napari_mpt_deblur.data.defocus.DefocusConfig` the pairs are drawn from.

The spectral comparison needs no registration: defocus multiplies a plane's
spectrum by the optical transfer function, so the ratio of two planes' spectra
(each less its white-noise floor) falls off as a Gaussian in frequency whose width
gives the extra blur, whatever moved between the two planes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import Microscope
from ..normalization import percentile_values
from .defocus import GAUSSIAN_R80, DefocusConfig, defocus_for_blur
from .focus import focus_score, haar_noise_sd

MAX_WIDEFIELD_R80_PX = 16.0
"""The strongest widefield blur a fine-tune draws (80 %-energy radius, pixels): the default model's coverage."""

IN_FOCUS_EXCESS_SIGMA_PX = 1.5
"""A stack has usable in-focus planes when its sharpest planes are blurred by at most this much (Gaussian
sigma, pixels) beyond the in-focus PSF of the optics. Gaussian blur of sigma 1 still leaves what a
network needs to learn sharp detail; at 2 the finest structure is gone."""

SHARPEN_BACKGROUND_PERCENTILE = 0.5
"""Percentile of a plane taken as its background (the offset) before :func:`sharpen_in_focus`."""

ANALYSIS_SIDE = 512
"""Planes are measured on a central crop of at most this side (the spectrum needs no more)."""

MAX_MEASURED_PLANES = 48
"""Planes measured at most, evenly spread over the stack (every plane gets a focus score)."""

LOWEST_FREQUENCY = 0.02
"""Cycles per pixel below which the spectrum is left out (the window's leakage and the mean)."""


def microscope_from_metadata(
    pixel_size: Sequence[float] | None, unit: str | None, z_spacing: float | None, **given: Any
) -> Microscope:
    """A :class:`~napari_mpt_deblur.config.Microscope`: pixel size and Z step from metadata where the user gave none.

    Parameters
    ----------
    pixel_size
        (Y, X) pixel size as the file records it, in ``unit`` (or None).
    unit
        The unit of ``pixel_size`` and ``z_spacing`` (``'micron'``, ``'nm'``...); sizes without a known
        length unit are ignored.
    z_spacing
        Distance between Z planes in ``unit`` (or None).
    **given
        Fields the user set (``na``, ``medium``, ``wavelength_um``, ``pixel_size_um``, ``z_step_um``);
        a None value counts as not given.
    """
    from ..images import convert_length

    fields = {name: value for name, value in given.items() if value is not None}
    if "pixel_size_um" not in fields and pixel_size:
        size = convert_length(float(np.mean(pixel_size)), unit, "um")
        if size:
            fields["pixel_size_um"] = size
    if "z_step_um" not in fields and z_spacing:
        step = convert_length(float(z_spacing), unit, "um")
        if step:
            fields["z_step_um"] = step
    return Microscope(**fields)


# --- measuring the blur ------------------------------------------------------------------------------------------


@dataclass
class _Spectrum:
    """A plane's radially averaged power spectrum, relative to its mean intensity squared."""

    signal: np.ndarray
    """Power above the white-noise floor, per frequency ring (may be negative where noise dominates)."""
    noise: float
    """The white-noise floor, in the same units."""
    noise_sd: float
    """The noise's standard deviation relative to the mean intensity."""

    def resolved(self) -> np.ndarray:
        """Rings where the signal stands clear of the noise (twice the floor)."""
        return (_FREQUENCIES > LOWEST_FREQUENCY) & (self.signal > 2 * self.noise)


_RINGS = 40
_FREQUENCIES = (np.arange(_RINGS) + 0.5) * 0.5 / _RINGS


def central_crop(plane: np.ndarray, side: int = ANALYSIS_SIDE) -> np.ndarray:
    """The plane's central square of at most ``side`` pixels a side (the whole plane where it is smaller)."""
    starts = [max(0, (length - side) // 2) for length in plane.shape]
    return plane[starts[0] : starts[0] + side, starts[1] : starts[1] + side]


def sharpen_in_focus(plane: np.ndarray, psf: np.ndarray) -> np.ndarray:
    """One Richardson-Lucy step on a denoised in-focus plane, against the optics' in-focus PSF.

    A plane in focus still holds the objective's own blur: at NA 1.4 and 0.1 um pixels its PSF spreads over
    several pixels. One multiplicative step, started from the plane and fitted to the plane itself, takes part
    of that blur out without the noise a full deconvolution would bring back (the plane should already be
    denoised, e.g. a model's output). It is a no-op for a PSF of one pixel, and the background (the plane's
    :data:`SHARPEN_BACKGROUND_PERCENTILE`) is taken off first and put back after, since Richardson-Lucy assumes
    an image without offset.

    Parameters
    ----------
    plane
        2-D denoised plane, in any intensity units.
    psf
        The in-focus PSF (2-D, odd sides, summing to 1), e.g.
        ``widefield_psf(0.0, **microscope.optics())``.

    Returns
    -------
    numpy.ndarray
        Float32 array of the plane's shape and units.
    """
    from .defocus import blur

    x = np.asarray(plane, dtype=np.float64)
    background, top = np.percentile(x, (SHARPEN_BACKGROUND_PERCENTILE, 100.0))
    floor = max(1e-6 * float(top - background), 1e-12)
    signal = np.clip(x - background, floor, None)
    ratio = signal / np.maximum(blur(signal, psf), floor)
    return (signal * blur(ratio, np.asarray(psf)[::-1, ::-1]) + background).astype(np.float32)


def _spectrum(plane: np.ndarray) -> _Spectrum:
    x = np.asarray(central_crop(plane), dtype=np.float64)
    mean = float(x.mean())
    scale = abs(mean) if abs(mean) > 1e-12 else float(x.std()) or 1.0
    x = x / scale
    window = np.outer(np.hanning(x.shape[0]), np.hanning(x.shape[1]))
    power = np.abs(np.fft.fft2((x - x.mean()) * window)) ** 2 / (window**2).sum()
    radius = np.hypot(np.fft.fftfreq(x.shape[0])[:, None], np.fft.fftfreq(x.shape[1])[None])
    ring = np.minimum((radius / 0.5 * _RINGS).astype(int), _RINGS)  # corners beyond 0.5 go to an extra ring
    counts = np.bincount(ring.ravel(), minlength=_RINGS + 1)[:_RINGS]
    rings = np.bincount(ring.ravel(), power.ravel(), minlength=_RINGS + 1)[:_RINGS] / np.maximum(counts, 1)
    # white noise: the finest Haar band's median absolute value, or the power left near Nyquist, whichever is
    # larger (a plane with flat background has a zero median there, and quantised planes a floor above it)
    noise = max(haar_noise_sd(x) ** 2, float(np.median(rings[_FREQUENCIES > 0.42])))
    return _Spectrum(rings - noise, noise, math.sqrt(noise))


def _extra_sigma(plane: _Spectrum, reference: _Spectrum) -> float:
    """Gaussian blur (sigma, pixels) that takes ``reference``'s spectrum to ``plane``'s.

    Fits ``log(plane / reference) = c - 4 pi^2 sigma^2 f^2`` over the rings both resolve. A plane
    blurred so much that fewer than three rings are left is given the blur that would leave its
    last resolved ring at the noise (sigma about 0.35 / f), a lower bound.
    """
    usable = plane.resolved() & reference.resolved()
    if usable.sum() >= 3:
        f2 = _FREQUENCIES[usable] ** 2
        ratio = np.log(plane.signal[usable] / reference.signal[usable])
        slope = np.polyfit(f2, ratio, 1)[0]
        return math.sqrt(max(-slope, 0.0) / (4 * math.pi**2))
    resolved = _FREQUENCIES[plane.resolved()]
    highest = float(resolved.max()) if resolved.size else LOWEST_FREQUENCY
    return 0.35 / highest


def _absolute_sigma(plane: _Spectrum) -> float | None:
    """The plane's own blur (sigma, pixels), assuming its content has a power-law spectrum.

    Fits ``log P = c - alpha log f - 4 pi^2 sigma^2 f^2`` over the resolved rings from the lowest up;
    None when fewer than four are resolved. Rough (content that is smooth by nature reads as
    blurred), which is why it only decides whether a stack has in-focus planes at all.
    """
    usable = plane.resolved()
    first = int(np.argmax(_FREQUENCIES > LOWEST_FREQUENCY))
    end = first
    while end < _RINGS and usable[end]:
        end += 1
    if end - first < 4:
        return None
    f = _FREQUENCIES[first:end]
    design = np.stack([np.ones_like(f), np.log(f), f**2], axis=1)
    coefficients = np.linalg.lstsq(design, np.log(plane.signal[first:end]), rcond=None)[0]
    return math.sqrt(max(-coefficients[2], 0.0) / (4 * math.pi**2))


def _photons(plane: np.ndarray, relative_noise_sd: float) -> float | None:
    """Photons at intensity 1 of the plane scaled to 0..1 (as training crops are), if its noise were Poisson.

    None when the noise is too low to measure (below 0.1 % of the range).
    """
    x = np.asarray(central_crop(plane), dtype=np.float64)
    low, high = percentile_values(x, (1.0, 99.8))
    if high <= low:
        return None
    mean = float(x.mean())
    noise = relative_noise_sd * (abs(mean) if abs(mean) > 1e-12 else float(x.std()) or 1.0) / (high - low)
    level = min(max((mean - low) / (high - low), 0.05), 1.0)
    return level / noise**2 if noise > 1e-3 else None  # Poisson: variance = level / photons


@dataclass
class BlurEstimate:
    """The blur a stack holds, measured against its sharpest planes.

    Attributes
    ----------
    microscope
        The optics it was measured for.
    focus_scores
        Every plane's :func:`~napari_mpt_deblur.data.focus.focus_score`, in stack order.
    reference_planes
        Indices of the sharpest planes (the reference the others are measured against).
    extra_sigma_px
        {plane index: Gaussian sigma (pixels) of the blur beyond the reference}, for the planes measured.
    sharpest_sigma_px
        The sharpest planes' own blur (median Gaussian sigma, pixels), from a power-law spectrum
        model; None when too little of their spectrum stands above the noise to say.
    in_focus
        Whether the sharpest planes are close enough to focus to serve as targets
        (:data:`IN_FOCUS_EXCESS_SIGMA_PX` beyond the optics' in-focus PSF).
    photons
        Photons at the sharpest planes' mean intensity, from their noise (None: noise too low to measure).
    """

    microscope: Microscope
    focus_scores: list[float]
    reference_planes: list[int]
    extra_sigma_px: dict[int, float]
    sharpest_sigma_px: float | None
    in_focus: bool
    photons: float | None
    notes: list[str] = field(default_factory=list)

    @property
    def max_extra_sigma_px(self) -> float:
        """The largest blur measured beyond the reference (Gaussian sigma, pixels)."""
        return max(self.extra_sigma_px.values(), default=0.0)

    def defocus_config(self, margin: float = 1.2, max_sigma_px: float = 8.0, unblurred: float = 0.1) -> DefocusConfig:
        """The synthetic defocus to draw fine-tuning pairs from: this microscope, this stack's blur.

        Widefield PSFs of :attr:`microscope`'s optics (NA, medium, wavelength, pixel size) and Gaussian
        blur, both from none up to ``margin`` times the strongest blur measured (in a Z stack with a
        known step, widefield defocus up to the farthest plane's distance from the sharpest, at most
        that blur); noise around the photons measured; a share of the samples unblurred, so in-focus
        planes are left as they are (the targets must then be sharp: the sharpest planes when they are
        in focus, a deblurred version of them otherwise).

        Parameters
        ----------
        margin
            Factor on the strongest blur measured (the estimate is a lower bound for planes blurred
            past the noise).
        max_sigma_px
            Cap on the Gaussian sigma (the default model's coverage stops at 8); the widefield blur stops at
            :data:`MAX_WIDEFIELD_R80_PX`.
        unblurred
            Share of samples left unblurred (noise only).
        """
        wanted = max(self.max_extra_sigma_px * margin, 1.0)
        sigma = min(wanted, max_sigma_px)
        optics = self.microscope.optics()
        # The widefield range is not held to the Gaussian's cap: sigma 8 is an 80 % radius of 14.3 px, short of
        # the 16 px of the coverage (a Z stack's farthest planes). A PSF 16 px wide still fits the 48-pixel
        # margin patches are blurred with.
        r80 = min(wanted * GAUSSIAN_R80, MAX_WIDEFIELD_R80_PX)
        widefield: dict[str, Any] = {"widefield_blur_px": (0.0, r80)}
        step, count = self.microscope.z_step_um, len(self.focus_scores)
        if step and count >= 3 and self.reference_planes:
            centre = self.reference_planes[0]
            farthest = max(centre, count - 1 - centre) * step
            widefield = {"defocus_um": (0.0, min(farthest, defocus_for_blur(r80, **optics)))}
        photons = (50.0, 20000.0)
        if self.photons is not None:
            photons = (max(self.photons / 2, 20.0), min(self.photons * 2, 1e5))
            photons = (min(photons), max(photons))
        return DefocusConfig(
            kinds=("gaussian", "widefield"),
            gaussian_sigma=(0.0, sigma),
            **widefield,
            **{name: optics[name] for name in ("na", "wavelength_um", "refractive_index", "pixel_size_um")},
            photons=photons,
            read_noise=(0.0, 0.005),
            noise_probability=0.9 if self.photons is not None else 0.5,
            no_blur_probability=unblurred,
        )

    def describe(self) -> str:
        """One line for the user: how blurred the stack is and whether it has in-focus planes."""
        measured = len(self.extra_sigma_px)
        text = (
            f"blur beyond the sharpest planes: up to sigma {self.max_extra_sigma_px:.1f} px "
            f"(80 % radius {self.max_extra_sigma_px * GAUSSIAN_R80:.1f} px) over {measured} planes measured"
        )
        if self.sharpest_sigma_px is not None:
            text += f"; sharpest planes blurred by about sigma {self.sharpest_sigma_px:.1f} px"
        if not self.in_focus:
            text += "; no usable in-focus planes"
        return text

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record for the model file's provenance."""
        return {
            "microscope": self.microscope.to_dict(),
            "reference_planes": self.reference_planes,
            "max_extra_sigma_px": round(self.max_extra_sigma_px, 3),
            "sharpest_sigma_px": None if self.sharpest_sigma_px is None else round(self.sharpest_sigma_px, 3),
            "in_focus": self.in_focus,
            "photons": None if self.photons is None else round(self.photons, 1),
        }


def estimate_blur(planes: Sequence[np.ndarray], microscope: Microscope | None = None) -> BlurEstimate:
    """Measure the blur across a stack against its sharpest planes.

    Parameters
    ----------
    planes
        The stack's planes (2-D arrays, blank ones already left out), in order (Z or time).
    microscope
        The optics (default: :class:`~napari_mpt_deblur.config.Microscope`'s); its in-focus PSF
        sets what counts as in focus.

    Returns
    -------
    BlurEstimate
        Focus scores, the reference (sharpest) planes, the blur of the others beyond them, whether
        the sharpest are in focus, and the noise level.

    Raises
    ------
    ValueError
        For no planes, or a plane smaller than 16 x 16 pixels.
    """
    microscope = microscope or Microscope()
    if not planes:
        raise ValueError("no planes to measure the blur of")
    for plane in planes:
        if np.ndim(plane) != 2 or min(np.shape(plane)) < 16:
            raise ValueError(f"need 2-D planes of at least 16 x 16 pixels, got shape {np.shape(plane)}")
    scores = [focus_score(central_crop(np.asarray(plane, np.float64))) for plane in planes]
    order = list(np.argsort(scores)[::-1])
    references = [int(i) for i in order[: max(1, min(3, len(planes) // 8))]]
    spectra = {i: _spectrum(planes[i]) for i in references}
    reference = spectra[references[0]]
    measured = np.unique(np.linspace(0, len(planes) - 1, min(len(planes), MAX_MEASURED_PLANES)).round().astype(int))
    extra = {}
    for index in measured:
        index = int(index)
        spectrum = spectra.get(index) or _spectrum(planes[index])
        extra[index] = 0.0 if index == references[0] else _extra_sigma(spectrum, reference)
    own = [s for s in (_absolute_sigma(spectra[i]) for i in references) if s is not None]
    sharpest = float(np.median(own)) if own else None
    optical = microscope.in_focus_sigma_px()
    # unmeasurable (noise over nearly all of the spectrum) counts as not in focus: the safe reading
    in_focus = sharpest is not None and sharpest <= math.hypot(optical, IN_FOCUS_EXCESS_SIGMA_PX)
    photons = _photons(planes[references[0]], spectra[references[0]].noise_sd)
    notes = []
    if not in_focus:
        notes.append(
            "no usable in-focus planes: even the sharpest planes look blurred "
            + (f"(about sigma {sharpest:.1f} px)" if sharpest is not None else "(too noisy to measure)")
        )
    return BlurEstimate(microscope, [float(s) for s in scores], references, extra, sharpest, in_focus, photons, notes)

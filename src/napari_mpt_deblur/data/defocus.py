"""Synthetic defocus: point spread functions, blurring and camera noise.

Training pairs are made from sharp microscopy planes: each plane is blurred with a
randomly drawn PSF and, usually, given shot and read noise. Three PSF families are
offered, from cheap to physical:

* ``gaussian``: a Gaussian, the usual stand-in for mild blur;
* ``disk``: a uniform disk, the geometric-optics picture of defocus;
* ``widefield``: the scalar pupil model of a widefield microscope, with the Airy
  disk in focus and the ringed, widening pattern of real defocus.

Every PSF is a float64 array of odd side, non-negative, centred on the middle pixel
and summing to 1, so blurring preserves the mean intensity.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import ConfigError, FrozenConfig
from ..normalization import percentile_values

KINDS: tuple[str, ...] = ("gaussian", "disk", "widefield")

GAUSSIAN_R80 = math.sqrt(-2 * math.log(0.2))
"""A Gaussian PSF's 80 %-encircled-energy radius, in units of its sigma (1.79)."""

MILD_FRACTION = 0.25
"""The share of each blur range, from its low end, that :attr:`DefocusConfig.mild_probability` draws from."""

MAX_DEFAULT_SIZE = 127
"""Largest side a PSF gets when its size is left to the default (larger blurs are cropped)."""

DISK_SUPERSAMPLING = 8
"""Subpixels per pixel side used to anti-alias the disk edge."""

MIN_PUPIL_SAMPLES = 32
"""Frequency samples the widefield model wants across the pupil radius."""

MAX_FFT_SIZE = 4096
"""Largest frequency grid the widefield model will build (a 4096^2 complex grid is 256 MiB)."""


# --- point spread functions ------------------------------------------------------------------------------------------


def gaussian_psf(sigma: float, size: int | None = None) -> np.ndarray:
    """A centred, normalised Gaussian PSF.

    Parameters
    ----------
    sigma
        Standard deviation in pixels (>= 0); 0 gives a delta (no blur).
    size
        Odd side of the array; by default ``2 * ceil(4 * sigma) + 1``, at most 127.

    Returns
    -------
    numpy.ndarray
        ``(size, size)`` float64 array, non-negative, summing to 1.
    """
    sigma = _non_negative("sigma", sigma)
    size = _resolve_size(size, 4 * sigma)
    if sigma == 0:
        return _delta(size)
    # Point-sampled at pixel centres, like scipy.ndimage.gaussian_filter.
    psf = np.exp(-_radius_squared(size) / (2 * sigma**2))
    return psf / psf.sum()


def disk_psf(radius: float, size: int | None = None) -> np.ndarray:
    """A uniform disk, the geometric-optics PSF of defocus, with an anti-aliased edge.

    Each pixel's value is the fraction of its ``8 x 8`` subpixel centres inside the
    disk, so the PSF changes smoothly with the radius (2.3 differs from 2.0).

    Parameters
    ----------
    radius
        Disk radius in pixels (>= 0); 0 (or a disk smaller than a subpixel) gives a delta.
    size
        Odd side of the array; by default just large enough to hold the disk, at most 127.

    Returns
    -------
    numpy.ndarray
        ``(size, size)`` float64 array, non-negative, summing to 1.
    """
    radius = _non_negative("radius", radius)
    size = _resolve_size(size, radius + 0.5)
    if radius == 0:
        return _delta(size)
    steps = DISK_SUPERSAMPLING
    offsets = (np.arange(steps) + 0.5) / steps - 0.5  # subpixel centres within a pixel
    sub = ((np.arange(size) - size // 2)[:, None] + offsets[None, :]).ravel()
    inside = sub[:, None] ** 2 + sub[None, :] ** 2 <= radius**2
    psf = inside.reshape(size, steps, size, steps).mean(axis=(1, 3))
    total = psf.sum()
    if total == 0:  # the disk misses every subpixel centre: it is a point at this sampling
        return _delta(size)
    return psf / total


def widefield_psf(
    defocus_um: float,
    na: float = 0.8,
    wavelength_um: float = 0.52,
    refractive_index: float = 1.33,
    pixel_size_um: float = 0.2,
    size: int | None = None,
) -> np.ndarray:
    """The intensity PSF of a widefield microscope, from the scalar pupil model.

    The pupil is 1 inside ``|k| <= NA / wavelength`` (spatial frequency in cycles/um)
    and carries the defocus phase ``exp(i 2 pi z sqrt((n / wavelength)^2 - |k|^2))``;
    the PSF is ``|FT(pupil)|^2`` point-sampled at the pixel centres and normalised to
    sum 1. In focus it is the Airy pattern (FWHM about ``0.51 * wavelength / NA``); it
    widens with ``|defocus|`` and is the same for ``+z`` and ``-z``.

    Parameters
    ----------
    defocus_um
        Distance from focus in micrometres, measured in the immersion/sample medium.
    na
        Numerical aperture (``0 < na < refractive_index``).
    wavelength_um
        Emission wavelength in vacuum, micrometres.
    refractive_index
        Refractive index of the medium (1.33 water, 1.515 oil).
    pixel_size_um
        Pixel side in the sample plane, micrometres.
    size
        Odd side of the array; by default large enough for the Airy rings plus the
        geometric defocus blur, at most 127.

    Returns
    -------
    numpy.ndarray
        ``(size, size)`` float64 array, non-negative, summing to 1.

    Raises
    ------
    ValueError
        If the pixels are too coarse for this NA and wavelength (the pupil's cut-off
        ``NA / wavelength`` exceeds the Nyquist frequency ``1 / (2 * pixel_size)``,
        i.e. the PSF would be undersampled), or an argument is out of range.
    """
    defocus_um = _finite("defocus_um", defocus_um)
    na = _require_positive("na", na)
    wavelength_um = _require_positive("wavelength_um", wavelength_um)
    refractive_index = _require_positive("refractive_index", refractive_index)
    pixel_size_um = _require_positive("pixel_size_um", pixel_size_um)
    if na >= refractive_index:
        raise ValueError(f"na ({na}) must be smaller than refractive_index ({refractive_index})")
    cutoff = na / wavelength_um  # cycles/um
    nyquist = 1 / (2 * pixel_size_um)
    if cutoff > nyquist:
        raise ValueError(
            f"pixels too coarse for this NA and wavelength: the pupil cut-off NA/wavelength = {cutoff:.3f} cycles/um "
            f"exceeds the Nyquist frequency 1/(2*pixel_size) = {nyquist:.3f} cycles/um, so the PSF would be "
            f"undersampled; use pixels of at most {wavelength_um / (2 * na):.4f} um"
        )

    natural_half = _widefield_half_extent(defocus_um, na, wavelength_um, refractive_index) / pixel_size_um
    size = _resolve_size(size, natural_half)
    n_fft = _widefield_fft_size(size, natural_half, cutoff * pixel_size_um)

    freqs = np.fft.fftfreq(n_fft, d=pixel_size_um)  # spacing 1 / (n_fft * pixel_size), cycles/um
    k_squared = freqs[:, None] ** 2 + freqs[None, :] ** 2
    inside = k_squared <= cutoff**2
    medium = refractive_index / wavelength_um
    # The constant piston n/lambda is dropped: it does not change the intensity and keeps the phases small.
    phase = 2 * np.pi * defocus_um * (np.sqrt(medium**2 - k_squared[inside]) - medium)
    pupil = np.zeros((n_fft, n_fft), dtype=np.complex128)
    pupil[inside] = np.exp(1j * phase)

    intensity = np.fft.fftshift(np.abs(np.fft.ifft2(pupil)) ** 2)
    centre, half = n_fft // 2, size // 2
    psf = intensity[centre - half : centre + half + 1, centre - half : centre + half + 1]
    return psf / psf.sum()


def _widefield_half_extent(defocus_um: float, na: float, wavelength_um: float, refractive_index: float) -> float:
    """Radius in micrometres that holds most of a widefield PSF's energy."""
    airy_radius = 0.61 * wavelength_um / na  # first dark ring
    # The marginal ray leaves focus at angle asin(NA / n): its lateral spread is the geometric blur radius.
    geometric_radius = abs(defocus_um) * na / math.sqrt(refractive_index**2 - na**2)
    # Margins: diffraction fringes reach past the geometric edge, and four Airy radii hold ~95 % of the focal energy.
    return 1.25 * geometric_radius + 4 * airy_radius


def _widefield_fft_size(size: int, natural_half: float, cutoff_cycles_per_pixel: float) -> int:
    """Side of the frequency grid: a power of two with no wrap-around and a well-sampled pupil."""
    needed = max(
        64,
        4 * size,
        # The periodic copies of the PSF (period n_fft pixels) must stay out of the crop.
        math.ceil(2 * (natural_half + size // 2)),
        # The pupil radius spans cutoff * n_fft * pixel_size frequency samples.
        math.ceil(MIN_PUPIL_SAMPLES / cutoff_cycles_per_pixel),
    )
    n_fft = 1 << (needed - 1).bit_length()
    if n_fft > MAX_FFT_SIZE:
        raise ValueError(
            f"the widefield PSF needs a {n_fft} x {n_fft} frequency grid (more than {MAX_FFT_SIZE}): "
            "the defocus blur is too large, or the PSF far too finely sampled, for this pixel size"
        )
    return n_fft


def encircled_energy_radius(psf: np.ndarray, fraction: float = 0.8) -> float:
    """Radius in pixels of the disk about the PSF's centre that holds ``fraction`` of its energy.

    The one measure of blur strength shared by every PSF family: a Gaussian's 80 %
    radius is ``1.79 sigma``, a disk's ``0.89 radius``, and a widefield PSF's grows with
    the defocus, the NA and the pixel size together. Interpolated linearly between
    pixel radii, so it changes smoothly; a delta gives 0.

    Parameters
    ----------
    psf
        2-D PSF with odd sides, centred on its middle pixel.
    fraction
        Share of the energy, in ``(0, 1)``.

    Returns
    -------
    float
        The radius in pixels.
    """
    psf = np.asarray(psf, dtype=np.float64)
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    radii = np.sqrt(_radius_squared(psf.shape[0])) if psf.shape[0] == psf.shape[1] else None
    if radii is None:
        raise ValueError(f"encircled_energy_radius expects a square PSF, got shape {psf.shape}")
    # Energy within each distinct pixel radius, accumulated outwards.
    unique_radii, ring = np.unique(radii.ravel(), return_inverse=True)
    energy = np.cumsum(np.bincount(ring, weights=psf.ravel())) / psf.sum()
    # The centre pixel alone may already hold the fraction (a delta, or a PSF narrower than a pixel).
    if energy[0] >= fraction:
        return 0.0
    index = min(int(np.searchsorted(energy, fraction)), len(energy) - 1)
    r0, r1, e0, e1 = unique_radii[index - 1], unique_radii[index], energy[index - 1], energy[index]
    return float(r0 + (r1 - r0) * (fraction - e0) / max(e1 - e0, 1e-12))


def blur_sigma_px(psf: np.ndarray) -> float:
    """A PSF's width as the sigma (pixels) of the Gaussian with its 80 %-encircled-energy radius.

    The width a blur-conditioned model is told (``DeblurSettings.blur_sigma_px``), and the
    one Richardson-Lucy with a Gaussian is given in ``benchmarks/validate.py``. The radius is
    measured on the pixel grid (:func:`encircled_energy_radius`), which reads narrow PSFs a little
    narrow: a Gaussian of sigma 1 px reads 0.87, one of 1.5 px 1.38, one of 3 px 2.88.
    """
    return encircled_energy_radius(psf) / GAUSSIAN_R80


# --- blur and noise --------------------------------------------------------------------------------------------------


def blur(image: np.ndarray, psf: np.ndarray) -> np.ndarray:
    """Convolve a 2-D image with a PSF, reflecting the image at its borders.

    Same result as ``scipy.ndimage.convolve(image, psf, mode="reflect")`` (the edge
    pixel is repeated in the reflection), computed with FFTs.

    Parameters
    ----------
    image
        2-D array.
    psf
        2-D array with odd sides, centred on its middle pixel.

    Returns
    -------
    numpy.ndarray
        Float32 array of the image's shape.
    """
    image = np.asarray(image, dtype=np.float64)
    psf = np.asarray(psf, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"blur expects a 2-D image, got shape {image.shape}")
    if psf.ndim != 2 or psf.shape[0] % 2 == 0 or psf.shape[1] % 2 == 0:
        raise ValueError(f"the PSF must be a 2-D array with odd sides (it needs a centre pixel), got shape {psf.shape}")
    height, width = image.shape
    half_y, half_x = psf.shape[0] // 2, psf.shape[1] // 2
    # numpy's "symmetric" is scipy.ndimage's "reflect": d c b a | a b c d | d c b a.
    padded = np.pad(image, ((half_y, half_y), (half_x, half_x)), mode="symmetric")
    # A circular convolution over the padded plane: the wrap-around only touches the padding, which is cut away.
    shape = padded.shape
    full = np.fft.irfft2(np.fft.rfft2(padded, shape) * np.fft.rfft2(psf, shape), shape)
    # The PSF's centre sits at (half_y, half_x), so output pixel (i, j) lands at (i + 2 half_y, j + 2 half_x).
    return full[2 * half_y : 2 * half_y + height, 2 * half_x : 2 * half_x + width].astype(np.float32)


def add_poisson_gaussian_noise(
    image: np.ndarray, photons: float, read_noise: float, rng: np.random.Generator
) -> np.ndarray:
    """Add camera noise: photon shot noise plus Gaussian read noise.

    The image (nominally in ``[0, 1]``) is scaled so that 1.0 means ``photons``
    expected photons, Poisson-sampled and scaled back, then Gaussian noise of standard
    deviation ``read_noise`` (in the same 0..1 units) is added. A flat level ``v``
    thus gets variance ``v / photons + read_noise**2``. Values below zero carry no
    photons and pass through with read noise only. Nothing is clipped.

    Parameters
    ----------
    image
        2-D (or any-shape) array.
    photons
        Expected photon count at intensity 1.0 (> 0).
    read_noise
        Standard deviation of the read noise in intensity units (>= 0).
    rng
        The random generator to draw from.

    Returns
    -------
    numpy.ndarray
        Float32 array of the image's shape.
    """
    photons = _require_positive("photons", photons)
    read_noise = _non_negative("read_noise", read_noise)
    image = np.asarray(image, dtype=np.float64)
    # Poisson needs a non-negative rate; the part below zero is kept as is, so the mean is preserved everywhere.
    level = np.clip(image, 0.0, None)
    noisy = image - level + rng.poisson(level * photons) / photons
    if read_noise > 0:
        noisy = noisy + rng.normal(0.0, read_noise, size=image.shape)
    return noisy.astype(np.float32)


def denoise_target(plane: np.ndarray) -> np.ndarray:
    """A real "sharp" plane with its camera noise suppressed, to serve as a training target.

    Real in-focus planes carry shot and read noise. Blurred and given fresh noise,
    that noise survives as faint texture the network then learns to restore, so it
    learns to amplify fine fluctuations: on a clean, low-contrast image it sharpens
    noise instead of structure. Wavelet shrinkage (BayesShrink, soft thresholds,
    the noise level estimated from the finest band) removes the pixel-scale noise
    and keeps the detail a few pixels across that deblurring restores.

    Parameters
    ----------
    plane
        2-D plane, any intensity range.

    Returns
    -------
    numpy.ndarray
        Float32 plane of the same shape and intensity range.
    """
    try:
        from skimage.restoration import denoise_wavelet
    except ImportError:
        raise ImportError(
            "denoising training targets needs scikit-image: pip install 'napari-mpt-deblur[train]'"
        ) from None
    plane = np.asarray(plane, dtype=np.float64)
    if plane.ndim != 2:
        raise ValueError(f"denoise_target expects a 2-D plane, got shape {plane.shape}")
    low, high = percentile_values(plane, (0.1, 99.9))
    if high <= low:
        return plane.astype(np.float32)
    unit = (plane - low) / (high - low)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        clean = denoise_wavelet(unit, method="BayesShrink", mode="soft", rescale_sigma=True)
    if not np.isfinite(clean).all():
        # A plane whose finest band is exactly zero (8-bit images with flat regions, such as
        # scikit-image's moon) has no measurable noise: BayesShrink divides by it. Nothing to remove.
        return plane.astype(np.float32)
    return (clean * (high - low) + low).astype(np.float32)


# --- random defocus for training -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DefocusConfig(FrozenConfig):
    """How synthetic defocus is drawn for blurry/sharp training pairs.

    Ranges are ``(min, max)`` pairs; a value is drawn uniformly between them (the
    photon count log-uniformly). Set ``min == max`` for a fixed value.
    """

    config_name = "defocus config"

    kinds: tuple[str, ...] = KINDS
    """PSF families to draw from, each equally likely: a subset of ``gaussian``, ``disk``, ``widefield``."""

    gaussian_sigma: tuple[float, float] = (0.0, 3.0)
    """Range of the Gaussian PSF's standard deviation, pixels. Ranges start at no blur so the network
    also learns to leave an in-focus plane as it is (only denoised) instead of sharpening it further."""

    disk_radius: tuple[float, float] = (0.0, 5.0)
    """Range of the disk PSF's radius, pixels."""

    defocus_um: tuple[float, float] = (0.0, 3.0)
    """Range of the widefield PSF's distance from focus, micrometres (the sign is drawn at random; 0 is
    the in-focus Airy pattern)."""

    widefield_blur_px: tuple[float, float] | None = None
    """When set, the widefield defocus is drawn so that the PSF's 80 %-encircled-energy radius
    (:func:`encircled_energy_radius`) falls in this range of pixels, whatever the optics drawn, and
    ``defocus_um`` is not used. The same micrometres of defocus blur a 0.065 um-pixel oil image by
    tens of pixels and a 0.65 um-pixel air image by a few, so a range of optics needs its blur set in
    pixels."""

    na: float | tuple[float, float] = 0.8
    """Numerical aperture of the widefield model, or a (min, max) range to draw from (capped below
    each drawn medium's index: at most ``0.95 n``)."""

    wavelength_um: float | tuple[float, float] = 0.52
    """Emission wavelength of the widefield model, micrometres, or a (min, max) range."""

    refractive_index: float | tuple[float, ...] = 1.33
    """Refractive index of the medium in the widefield model (1.0 air, 1.33 water, 1.515 oil), or a
    tuple of media to choose from, each equally likely."""

    pixel_size_um: float | tuple[float, float] = 0.2
    """Pixel side in the sample plane, micrometres, or a (min, max) range (drawn log-uniformly and
    capped at the Nyquist size ``wavelength / (2 NA)`` of each draw). A fixed size must be at most
    ``wavelength / (2 NA)``."""

    no_blur_probability: float = 0.0
    """Chance that a sample is not blurred at all (only noise): the network must leave in-focus
    planes as they are."""

    photons: tuple[float, float] = (200.0, 5000.0)
    """Range of the expected photon count at intensity 1.0 (drawn log-uniformly; both > 0)."""

    read_noise: tuple[float, float] = (0.0, 0.01)
    """Range of the read noise's standard deviation, in intensity units (0..1)."""

    noise_probability: float = 0.9
    """Chance that a sample gets noise at all (the rest stay noise-free)."""

    mild_probability: float = 0.0
    """Chance that a sample's blur is drawn from the lowest :data:`MILD_FRACTION` of its kind's range (the
    Gaussian's sigma, the disk's radius, the widefield blur radius or defocus). Drawn uniformly, strong blur makes
    most of an L1 loss, and mild blur, where Richardson-Lucy does well, gets little of the network's attention."""

    def __post_init__(self) -> None:
        # Normalise sequences so JSON lists and tuples compare equal.
        if isinstance(self.kinds, str) or not _is_sequence(self.kinds):
            raise ConfigError(f"kinds must be a list of PSF kinds, got {self.kinds!r}")
        object.__setattr__(self, "kinds", tuple(self.kinds))
        for name in ("gaussian_sigma", "disk_radius", "defocus_um", "photons", "read_noise"):
            object.__setattr__(self, name, _as_range(name, getattr(self, name)))
        if self.widefield_blur_px is not None:
            object.__setattr__(self, "widefield_blur_px", _as_range("widefield_blur_px", self.widefield_blur_px))
        for name in ("na", "wavelength_um", "pixel_size_um"):
            object.__setattr__(self, name, _as_range(name, getattr(self, name), scalar_ok=True))
        media = self.refractive_index
        media = tuple(media) if _is_sequence(media) else (media,)
        if not media or not all(_is_real(n) and 1 <= n < 2 for n in media):
            raise ConfigError(f"refractive_index must be a number in [1, 2) or a list of them, got {media!r}")
        object.__setattr__(self, "refractive_index", tuple(float(n) for n in media))
        self._validate()

    @classmethod
    def coverage(cls) -> DefocusConfig:
        """The defocus the bundled default model is trained for: what labs record.

        In focus up to an 80 %-encircled-energy radius of 16 pixels; widefield PSFs over
        NA 0.25-1.4 in air, water and oil, emission 450-700 nm and pixels of 0.065-0.65 um;
        pillbox defocus up to radius 10 and Gaussian blur up to sigma 8; Poisson noise of
        50-20,000 photons at full scale with read noise up to 2 % of the range, and some
        samples without noise or without blur.
        """
        return cls(
            gaussian_sigma=(0.0, 8.0),
            disk_radius=(0.0, 10.0),
            widefield_blur_px=(0.0, 16.0),
            na=(0.25, 1.4),
            wavelength_um=(0.45, 0.70),
            refractive_index=(1.0, 1.33, 1.515),
            pixel_size_um=(0.065, 0.65),
            photons=(50.0, 20000.0),
            read_noise=(0.0, 0.02),
            noise_probability=0.85,
            no_blur_probability=0.08,
        )

    @property
    def fixed_optics(self) -> bool:
        """True when the widefield optics are one microscope (no ranges to draw from)."""
        ranges = (self.na, self.wavelength_um, self.pixel_size_um)
        return all(low == high for low, high in ranges) and len(self.refractive_index) == 1

    def _validate(self) -> None:
        if not self.kinds:
            raise ConfigError("kinds must name at least one PSF kind")
        unknown = [kind for kind in self.kinds if kind not in KINDS]
        if unknown:
            raise ConfigError(f"unknown PSF kind(s) {unknown}; expected a subset of {list(KINDS)}")
        if len(set(self.kinds)) != len(self.kinds):
            raise ConfigError(f"kinds must not repeat (each kind is equally likely), got {list(self.kinds)}")
        for name in ("gaussian_sigma", "disk_radius", "defocus_um", "read_noise"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ConfigError(f"{name} must satisfy 0 <= min <= max, got ({low}, {high})")
        low, high = self.photons
        if not 0 < low <= high:
            raise ConfigError(f"photons must satisfy 0 < min <= max, got ({low}, {high})")
        if self.widefield_blur_px is not None and not 0 <= self.widefield_blur_px[0] <= self.widefield_blur_px[1]:
            raise ConfigError(f"widefield_blur_px must satisfy 0 <= min <= max, got {self.widefield_blur_px}")
        for name in ("na", "wavelength_um", "pixel_size_um"):
            low, high = getattr(self, name)
            if not 0 < low <= high < math.inf:
                raise ConfigError(f"{name} must be a positive number or a (min, max) range of them, got {(low, high)}")
        if self.na[0] >= max(self.refractive_index):
            raise ConfigError(f"na ({self.na[0]}) must be smaller than refractive_index ({max(self.refractive_index)})")
        for name in ("noise_probability", "no_blur_probability", "mild_probability"):
            value = getattr(self, name)
            if not _is_real(value) or not 0 <= value <= 1:
                raise ConfigError(f"{name} must be between 0 and 1, got {value!r}")
        # Only a config that draws widefield PSFs with one fixed microscope needs its pixels fine enough;
        # ranges cap each drawn pixel size at the Nyquist size of the drawn NA and wavelength.
        if "widefield" in self.kinds and self.fixed_optics:
            na, wavelength, pixel = self.na[0], self.wavelength_um[0], self.pixel_size_um[0]
            if na / wavelength > 1 / (2 * pixel):
                raise ConfigError(
                    f"pixel_size_um {pixel} is too coarse for na {na} and wavelength_um {wavelength}: the "
                    f"widefield PSF would be undersampled (use at most {wavelength / (2 * na):.4f} um, "
                    "or drop 'widefield' from kinds)"
                )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        data = super().to_dict()
        # One microscope stays written as plain numbers, as earlier files have it.
        for name in ("na", "wavelength_um", "pixel_size_um"):
            if data[name][0] == data[name][1]:
                data[name] = data[name][0]
        if len(data["refractive_index"]) == 1:
            data["refractive_index"] = data["refractive_index"][0]
        return data


def sample_psf(config: DefocusConfig, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """Draw a random PSF as the config describes.

    The kind is uniform among ``config.kinds`` and its parameter uniform in its range (in the
    range's lowest :data:`MILD_FRACTION` for a share ``config.mild_probability`` of the draws);
    a widefield defocus gets a random sign.

    Parameters
    ----------
    config
        What to draw.
    rng
        The random generator to draw from.

    Returns
    -------
    psf : numpy.ndarray
        The PSF (float64, odd side, summing to 1).
    description : dict
        ``{"kind": ..., <parameter>: value}`` with parameter ``sigma`` (gaussian),
        ``radius`` (disk) or ``defocus_um`` (widefield, signed).
    """
    kind = config.kinds[int(rng.integers(len(config.kinds)))]
    # no draw without mild samples, so the random stream of every config before them is unchanged
    mild = config.mild_probability > 0 and rng.random() < config.mild_probability

    def draw(low: float, high: float) -> float:
        return float(rng.uniform(low, low + (high - low) * MILD_FRACTION if mild else high))

    if kind == "gaussian":
        sigma = draw(*config.gaussian_sigma)
        return gaussian_psf(sigma), {"kind": kind, "sigma": sigma}
    if kind == "disk":
        radius = draw(*config.disk_radius)
        return disk_psf(radius), {"kind": kind, "radius": radius}
    optics = draw_optics(config, rng)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    if config.widefield_blur_px is None:
        defocus = draw(*config.defocus_um)
    else:
        defocus = defocus_for_blur(draw(*config.widefield_blur_px), **optics)
    psf = widefield_psf(sign * defocus, **optics)
    return psf, {"kind": kind, "defocus_um": sign * defocus, **optics}


def draw_optics(config: DefocusConfig, rng: np.random.Generator) -> dict[str, float]:
    """One microscope from the config's ranges: ``widefield_psf`` keyword arguments except the defocus.

    The medium is chosen among ``refractive_index``, the NA uniformly up to ``0.95 n``, the
    wavelength uniformly, and the pixel size log-uniformly up to the Nyquist size of that NA and
    wavelength (cameras are matched to their objective; coarser pixels would alias the PSF).
    """
    if config.fixed_optics:  # nothing to draw (and the random stream stays as one microscope always had it)
        return {
            "na": config.na[0],
            "wavelength_um": config.wavelength_um[0],
            "refractive_index": config.refractive_index[0],
            "pixel_size_um": config.pixel_size_um[0],
        }
    medium = config.refractive_index[int(rng.integers(len(config.refractive_index)))]
    na_low, na_high = config.na
    na = float(rng.uniform(na_low, max(na_low, min(na_high, 0.95 * medium))))
    wavelength = float(rng.uniform(*config.wavelength_um))
    pixel_low, pixel_high = config.pixel_size_um
    pixel_high = max(pixel_low, min(pixel_high, wavelength / (2 * na)))
    pixel_low = min(pixel_low, pixel_high)
    pixel = float(np.exp(rng.uniform(math.log(pixel_low), math.log(pixel_high))))
    pixel = min(pixel, wavelength / (2 * na))
    return {"na": na, "wavelength_um": wavelength, "refractive_index": medium, "pixel_size_um": pixel}


def defocus_for_blur(
    radius_px: float, na: float, wavelength_um: float, refractive_index: float, pixel_size_um: float
) -> float:
    """The defocus (micrometres) at which a widefield PSF's 80 %-energy radius is about ``radius_px``.

    Starts from geometric optics (the marginal ray's spread, of which a uniform disk holds 80 %
    within 0.894 of its radius) and corrects it twice by measuring the PSF, so diffraction is
    counted. Radii below the in-focus Airy pattern's give 0.
    """
    optics = {"na": na, "wavelength_um": wavelength_um, "refractive_index": refractive_index}
    optics["pixel_size_um"] = pixel_size_um
    spread_per_um = na / math.sqrt(refractive_index**2 - na**2) / pixel_size_um  # geometric radius, px per um
    focal = encircled_energy_radius(widefield_psf(0.0, **optics))
    if radius_px <= focal:
        return 0.0
    defocus = radius_px / (0.894 * spread_per_um)
    for _ in range(2):
        measured = encircled_energy_radius(widefield_psf(defocus, **optics))
        if measured <= focal:
            break
        # Scale the geometric part of the blur (above the focal radius) towards the wanted radius.
        defocus *= (radius_px - focal) / max(measured - focal, 1e-6)
    return float(defocus)


def make_defocused(
    sharp: np.ndarray, config: DefocusConfig, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, Any]]:
    """Make the blurry partner of a sharp plane: a random PSF, then (usually) noise.

    The result is not clipped to ``[0, 1]``: noise may step slightly outside, and the
    network should see such values as a real camera produces them.

    Parameters
    ----------
    sharp
        2-D plane, intensities nominally in ``[0, 1]``.
    config
        How to draw the PSF and the noise.
    rng
        The random generator to draw from; the same seed gives the same result.

    Returns
    -------
    blurry : numpy.ndarray
        Float32 plane of the input's shape.
    description : dict
        What :func:`sample_psf` describes, plus ``sigma_px`` (the PSF's width, :func:`blur_sigma_px`;
        0 unblurred), ``photons`` and ``read_noise`` (both ``None`` when the sample got no noise).
    """
    sharp = np.asarray(sharp, dtype=np.float32)
    if sharp.ndim != 2:
        raise ValueError(f"make_defocused expects a 2-D plane, got shape {sharp.shape}")
    if config.no_blur_probability > 0 and rng.random() < config.no_blur_probability:
        psf, description = _delta(1), {"kind": "none"}
    else:
        psf, description = sample_psf(config, rng)
    blurry = blur(sharp, psf)
    photons: float | None = None
    read_noise: float | None = None
    if rng.random() < config.noise_probability:
        low, high = config.photons
        photons = float(np.exp(rng.uniform(math.log(low), math.log(high))))
        read_noise = float(rng.uniform(*config.read_noise))
        blurry = add_poisson_gaussian_noise(blurry, photons, read_noise, rng)
    return blurry, {**description, "sigma_px": blur_sigma_px(psf), "photons": photons, "read_noise": read_noise}


# --- helpers ---------------------------------------------------------------------------------------------------------


def _resolve_size(size: int | None, half_extent: float) -> int:
    """The PSF side: the given one (checked) or the default for a PSF reaching ``half_extent`` pixels."""
    if size is None:
        half = min(math.ceil(half_extent), MAX_DEFAULT_SIZE // 2)
        return 2 * half + 1
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1 or size % 2 == 0:
        raise ValueError(f"size must be a positive odd integer (the PSF needs a centre pixel), got {size!r}")
    return int(size)


def _delta(size: int) -> np.ndarray:
    psf = np.zeros((size, size))
    psf[size // 2, size // 2] = 1.0
    return psf


def _radius_squared(size: int) -> np.ndarray:
    coords = np.arange(size) - size // 2
    return (coords[:, None] ** 2 + coords[None, :] ** 2).astype(np.float64)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _is_sequence(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _finite(name: str, value: float) -> float:
    if not _is_real(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _non_negative(name: str, value: float) -> float:
    value = _finite(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _require_positive(name: str, value: float) -> float:
    """``value`` as a float; a ValueError naming ``name`` unless it is finite and above 0."""
    value = _finite(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _as_range(name: str, value: Any, scalar_ok: bool = False) -> tuple[float, float]:
    if scalar_ok and _is_real(value) and math.isfinite(value):
        return float(value), float(value)
    if not _is_sequence(value) or len(value) != 2 or not all(_is_real(v) and math.isfinite(v) for v in value):
        raise ConfigError(f"{name} must be a (min, max) pair of finite numbers, got {value!r}")
    return float(value[0]), float(value[1])

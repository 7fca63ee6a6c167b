"""A per-plane focus score: which planes of a stack are in focus, robust to noise."""

from __future__ import annotations

import functools

import numpy as np

BAND_SIGMAS = (1.0, 2.0)
"""The difference of Gaussians that measures detail: structure a few pixels across, which defocus removes
first, above the pixel-to-pixel scale where shot and read noise dominate."""


def _band(x: np.ndarray) -> np.ndarray:
    from .defocus import blur, gaussian_psf

    return blur(x, gaussian_psf(BAND_SIGMAS[0])).astype(np.float64) - blur(x, gaussian_psf(BAND_SIGMAS[1]))


@functools.cache
def _band_noise_gain() -> float:
    """Variance the band filter passes from unit white noise (the sum of its squared taps)."""
    impulse = np.zeros((41, 41))
    impulse[20, 20] = 1.0
    return float((_band(impulse) ** 2).sum())


def haar_noise_sd(x: np.ndarray) -> float:
    """White noise's standard deviation in a plane: the median absolute value of its finest Haar band / 0.6745.

    Structure barely reaches that band, so its median measures the noise (0 for a plane under 2 x 2 pixels).
    """
    h, w = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2
    finest = (x[0:h:2, 0:w:2] - x[0:h:2, 1:w:2] - x[1:h:2, 0:w:2] + x[1:h:2, 1:w:2]) / 2
    return float(np.median(np.abs(finest)) / 0.6745) if finest.size else 0.0


def focus_score(plane: np.ndarray) -> float:
    """Detail energy of a plane beyond what its noise explains: high in focus, near 0 when blurred or empty.

    The energy of a difference-of-Gaussians band (sigma 1 and 2 pixels), minus
    the share white noise of the plane's level would put there (noise estimated
    from the finest Haar wavelet band by its median absolute value), divided by
    the squared mean intensity plus the variance so exposure does not matter. A
    pixel-scale measure such as the variance of the Laplacian ranks noisy,
    empty planes above sharp ones; this one does not.
    """
    x = np.asarray(plane, dtype=np.float64)
    if x.ndim != 2 or min(x.shape) < 3:
        raise ValueError(f"need a 2-D plane of at least 3 x 3 pixels, got shape {x.shape}")
    noise_sd = haar_noise_sd(x)
    band = _band(x)
    margin = min(4, (min(x.shape) - 1) // 2)
    inner = band[margin : x.shape[0] - margin, margin : x.shape[1] - margin]
    energy = max(float(inner.var()) - _band_noise_gain() * noise_sd**2, 0.0)
    return energy / (x.mean() ** 2 + x.var() + 1e-12)


def sharpest_planes(planes: list[np.ndarray], fraction: float = 0.25) -> list[np.ndarray]:
    """The ``fraction`` of planes with the highest focus score (at least one)."""
    if not planes:
        return []
    scores = np.array([focus_score(p) for p in planes])
    keep = max(1, int(round(fraction * len(planes))))
    return [planes[i] for i in np.argsort(scores)[::-1][:keep]]

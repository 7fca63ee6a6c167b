"""The classical restorations biologists use, as baselines for the network.

* Richardson-Lucy deconvolution given the true PSF, and given a Gaussian of the
  PSF's width (the usual stand-in when the PSF is not measured): the best of
  several iteration counts, scored against the truth, so an upper bound on what
  each can do.
* A Wiener filter given the true PSF, its noise-to-signal ratio tuned against the
  truth (again an upper bound).

Every convolution reflects the image at its borders
(``napari_mpt_deblur.data.defocus.blur``), as the degradation did.
"""

from __future__ import annotations

import numpy as np

from napari_mpt_deblur.training.suite import per_channel

RL_ITERATIONS = (5, 10, 20, 40, 70, 100)
"""Iteration counts at which Richardson-Lucy is scored (one run, read out along the way)."""

WIENER_NSR = tuple(np.logspace(-4, -0.5, 15))
"""Noise-to-signal ratios the Wiener filter is tuned over."""


def gaussian_of_width(psf: np.ndarray) -> np.ndarray:
    """The Gaussian with the PSF's 80 %-encircled-energy radius (a Gaussian holds 80 % within 1.794 sigma)."""
    from napari_mpt_deblur.data.defocus import encircled_energy_radius, gaussian_psf

    sigma = encircled_energy_radius(psf) / 1.794
    return gaussian_psf(sigma, size=psf.shape[0]) if sigma > 0 else gaussian_psf(0.0, size=psf.shape[0])


def richardson_lucy(blurry: np.ndarray, psf: np.ndarray, iterations=RL_ITERATIONS):
    """Richardson-Lucy estimates of a plane at each of ``iterations`` (yields ``(count, estimate)``)."""
    from napari_mpt_deblur.data.defocus import blur

    observed = np.clip(blurry, 1e-6, None).astype(np.float64)
    flipped = psf[::-1, ::-1]
    estimate = np.full_like(observed, observed.mean())
    done = 0
    for target in sorted(iterations):
        while done < target:
            ratio = observed / np.maximum(blur(estimate, psf).astype(np.float64), 1e-6)
            estimate = estimate * blur(ratio, flipped)
            done += 1
        yield target, estimate.astype(np.float32)


def wiener(blurry: np.ndarray, psf: np.ndarray, nsr: float) -> np.ndarray:
    """Wiener deconvolution of a plane with a constant noise-to-signal ratio (reflected borders)."""
    height, width = blurry.shape
    half = psf.shape[0] // 2
    padded = np.pad(blurry.astype(np.float64), half, mode="symmetric")
    kernel = np.zeros(padded.shape)
    kernel[: psf.shape[0], : psf.shape[1]] = psf
    kernel = np.roll(kernel, (-half, -half), axis=(0, 1))  # the PSF's centre at the origin: no shift
    transfer = np.fft.rfft2(kernel)
    restored = np.fft.irfft2(np.fft.rfft2(padded) * np.conj(transfer) / (np.abs(transfer) ** 2 + nsr), padded.shape)
    return restored[half : half + height, half : half + width].astype(np.float32)


def best_richardson_lucy(blurry: np.ndarray, psf: np.ndarray, sharp: np.ndarray, score) -> dict:
    """The best Richardson-Lucy result over :data:`RL_ITERATIONS`: ``{"output", "iterations", "psnr"}``."""
    channels = [blurry] if blurry.ndim == 2 else [blurry[..., c] for c in range(blurry.shape[-1])]
    runs = [list(richardson_lucy(plane, psf)) for plane in channels]
    best = None
    for index, count in enumerate(sorted(RL_ITERATIONS)):
        planes = [run[index][1] for run in runs]
        output = planes[0] if blurry.ndim == 2 else np.stack(planes, axis=-1)
        value = score(output, sharp)
        if best is None or value > best["psnr"]:
            best = {"output": output, "iterations": count, "psnr": value}
    return best


def best_wiener(blurry: np.ndarray, psf: np.ndarray, sharp: np.ndarray, score) -> dict:
    """The best Wiener result over :data:`WIENER_NSR`: ``{"output", "nsr", "psnr"}``."""
    best = None
    for nsr in WIENER_NSR:
        output = per_channel(blurry, lambda plane, nsr=nsr: wiener(plane, psf, nsr))
        value = score(output, sharp)
        if best is None or value > best["psnr"]:
            best = {"output": output, "nsr": float(nsr), "psnr": value}
    return best

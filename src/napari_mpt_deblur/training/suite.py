"""The held-out validation suite: fixed, seeded defocus of images no model trains on.

Every suite image (:func:`~napari_mpt_deblur.data.bundled.suite_images`), its
grain removed as training targets' is (``denoise_target``), is seen through its
own microscope (a fixed NA, medium, wavelength and pixel size) and defocused at
five strengths, then given camera noise:

* ``in focus``: the Airy pattern only; a model must not make it worse;
* ``mild``, ``moderate``, ``strong``: widefield defocus whose 80 %-encircled-energy
  radius is 3, 7 and 13 pixels;
* ``pillbox``: geometric defocus, a disk of radius 6 pixels.

Checkpoints are chosen on this suite (:class:`SuiteValidation`), never on the final
report's images; a checkpoint worse than its input on any case is never chosen.
Colour images are deblurred channel by channel, as a 1-channel model does.

The model sees every case in its eight orientations (:data:`ORIENTATIONS`: quarter
turns, each also mirrored) and is scored on each. The network is not equivariant
under them: a checkpoint can restore small soft nuclei in one orientation and turn
them into bright dots in another, so a case scored in one orientation only can pass
by luck of the draw. The classical baselines need no turning: their PSFs are
symmetric, so they are equivariant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

SUITE_VERSION = 2
"""Bumped whenever the cases change, so stored figures of another suite are not compared."""

STRENGTHS: dict[str, float | None] = {"in focus": 0.0, "mild": 3.0, "moderate": 7.0, "strong": 13.0, "pillbox": None}
"""Strength name -> widefield 80 %-energy radius in pixels (``None``: the pillbox)."""

PILLBOX_RADIUS = 6.0
"""Radius of the pillbox case's disk, pixels."""

MICROSCOPES = (
    {"na": 1.4, "wavelength_um": 0.52, "refractive_index": 1.515, "pixel_size_um": 0.1},
    {"na": 0.8, "wavelength_um": 0.6, "refractive_index": 1.33, "pixel_size_um": 0.2},
    {"na": 0.3, "wavelength_um": 0.55, "refractive_index": 1.0, "pixel_size_um": 0.65},
    {"na": 1.2, "wavelength_um": 0.46, "refractive_index": 1.33, "pixel_size_um": 0.11},
)
"""The optics the suite's images are seen through, one per image in turn."""

PHOTONS = (300.0, 1000.0, 3000.0, 10000.0)
"""Photons at full scale, one per image in turn (read noise is 0.005 for all)."""

READ_NOISE = 0.005

ORIENTATIONS = 8
"""Orientations each case is scored in: ``k`` quarter turns (``k % 4``), mirrored left-right for ``k >= 4``."""


@dataclass
class SuiteCase:
    """One suite image at one strength: float32 planes in 0..1 (colour as ``(Y, X, 3)``)."""

    image: str
    strength: str
    sharp: np.ndarray
    blurry: np.ndarray
    psf: np.ndarray
    optics: dict = field(default_factory=dict)


def normalise(image: np.ndarray) -> np.ndarray:
    """Percentiles 0.1 and 99.9 (of all channels jointly) to 0..1, clipped."""
    low, high = np.percentile(image, (0.1, 99.9))
    return np.clip((image - low) / max(high - low, 1e-12), 0, 1).astype(np.float32)


def per_channel(image: np.ndarray, function) -> np.ndarray:
    """``function`` applied to a plane, or to each channel of a ``(Y, X, C)`` image."""
    if image.ndim == 2:
        return function(image)
    return np.stack([function(image[..., c]) for c in range(image.shape[-1])], axis=-1)


def suite_cases(images: dict[str, np.ndarray] | None = None, seed: int = 2026) -> list[SuiteCase]:
    """Every suite image at every strength (:data:`STRENGTHS`), with fixed, seeded noise.

    Parameters
    ----------
    images
        Sharp images by name; by default the bundled suite.
    seed
        Seed of the noise (the PSFs are fixed).
    """
    from ..data.bundled import suite_images
    from ..data.defocus import (
        add_poisson_gaussian_noise,
        blur,
        defocus_for_blur,
        denoise_target,
        disk_psf,
        widefield_psf,
    )

    images = suite_images() if images is None else images
    rng = np.random.default_rng(seed)
    cases = []
    for index, (name, image) in enumerate(images.items()):
        # The truth is denoised as training targets are: shipped images carry their own grain
        # (the Hubble field's sky, JPEG noise), and a model must not be scored down for removing it.
        sharp = normalise(per_channel(np.asarray(image, dtype=np.float32), denoise_target))
        optics = MICROSCOPES[index % len(MICROSCOPES)]
        photons = PHOTONS[index % len(PHOTONS)]
        for strength, radius in STRENGTHS.items():
            if radius is None:
                psf = disk_psf(PILLBOX_RADIUS)
            else:
                psf = widefield_psf(defocus_for_blur(radius, **optics), **optics)
            blurred = per_channel(sharp, lambda plane, psf=psf: blur(plane, psf))
            blurry = add_poisson_gaussian_noise(blurred, photons, READ_NOISE, rng)
            cases.append(SuiteCase(name, strength, sharp, blurry, psf, {**optics, "photons": photons}))
    return cases


def psnr(output: np.ndarray, sharp: np.ndarray) -> float:
    """PSNR in dB with data range 1, the output clipped to 0..1 as the truth is."""
    mse = float(np.mean((np.clip(output, 0, 1).astype(np.float64) - sharp) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def orient(image: np.ndarray, orientation: int) -> np.ndarray:
    """``image`` (Y, X[, S]) in orientation ``orientation`` of :data:`ORIENTATIONS`."""
    turned = np.rot90(image, orientation % 4, axes=(0, 1))
    return np.ascontiguousarray(turned[:, ::-1] if orientation >= 4 else turned)


def unorient(image: np.ndarray, orientation: int) -> np.ndarray:
    """The inverse of :func:`orient`: an image of orientation ``orientation`` back in the case's own."""
    if orientation >= 4:
        image = image[:, ::-1]
    return np.ascontiguousarray(np.rot90(image, -(orientation % 4), axes=(0, 1)))


WIDTHS = ("given", "judged")
"""Whether a blur-conditioned model is told a case's blur width (as Richardson-Lucy with a Gaussian is) or not."""


def told_width(model, psf: np.ndarray, width: str = "given", error: float = 1.0) -> float | None:
    """The blur width to tell ``model`` for an image blurred by ``psf``, or None: it judges the blur itself.

    The PSF's width (:func:`~napari_mpt_deblur.data.defocus.blur_sigma_px`) times ``error`` (an estimate
    that is off) when ``width`` is ``given`` and the model takes one; None when ``judged`` or it takes none.
    """
    from ..data.defocus import blur_sigma_px

    if width not in WIDTHS:
        raise ValueError(f"width must be one of {WIDTHS}, got {width!r}")
    return blur_sigma_px(psf) * error if width == "given" and model.config.blur_conditioned else None


def deblur_case(
    model,
    case: SuiteCase,
    device: str | torch.device = "cpu",
    orientation: int = 0,
    width: str = "given",
    width_error: float = 1.0,
) -> np.ndarray:
    """The model's output for a case seen in ``orientation``, turned back: whole planes, fp32, channels one by one.

    ``width`` and ``width_error``: what a blur-conditioned model is told (:func:`told_width`).
    """
    from ..config import DeblurSettings
    from ..inference import deblur_array

    sigma = told_width(model, case.psf, width, width_error)
    settings = DeblurSettings(tile=0, device=str(device), precision="fp32", blur_sigma_px=sigma)
    axes = "YXS" if case.blurry.ndim == 3 else "YX"
    return unorient(deblur_array(model, orient(case.blurry, orientation), axes=axes, settings=settings), orientation)


@dataclass
class SuiteValidation:
    """The suite as training's validation: PSNR per case, and which checkpoint to keep.

    Has the interface of :class:`~napari_mpt_deblur.training.engine.Validation`
    (``evaluate``) plus :meth:`selection_score`, which the training loop uses to keep
    the best checkpoint beside the output. A blur-conditioned model is scored both told
    each case's blur width, as Richardson-Lucy with a Gaussian is, and not told it.
    """

    cases: list[SuiteCase] = field(default_factory=suite_cases)
    input_psnr: list[float] = field(default_factory=list)
    orientations: int = ORIENTATIONS
    """Orientations each case is scored in (1: as stored only, 8 times faster)."""

    def evaluate(self, model, device: torch.device) -> dict[str, float]:
        """Mean PSNR of the model and of the input, the worst and mean gain, and the mean gain per strength.

        Means are over cases and orientations; the worst gain is over every case in every orientation.
        A blur-conditioned model is scored twice: told each case's width (the plain keys), and judging
        it itself, as it deblurs when a user gives no width (the same keys prefixed ``judged``).
        """
        if not self.input_psnr:
            self.input_psnr = [psnr(case.blurry, case.sharp) for case in self.cases]
        model.eval()
        scores = self._scores(model, device, "given")
        if model.config.blur_conditioned:
            judged = self._scores(model, device, "judged")
            scores.update({f"judged {key}": value for key, value in judged.items() if key != "input_psnr"})
        return scores

    def _scores(self, model, device: torch.device, width: str) -> dict[str, float]:
        """:meth:`evaluate`'s figures for one way of telling the model the width (:data:`WIDTHS`)."""
        gains: dict[str, list[float]] = {}
        outputs = []
        for case, before in zip(self.cases, self.input_psnr):
            for orientation in range(self.orientations):
                after = psnr(deblur_case(model, case, device, orientation, width), case.sharp)
                outputs.append(after)
                gains.setdefault(case.strength, []).append(after - before)
        every = [g for values in gains.values() for g in values]
        scores = {
            "psnr": float(np.mean(outputs)),
            "input_psnr": float(np.mean(self.input_psnr)),
            "worst_gain_db": float(min(every)),
            "mean_gain_db": float(np.mean(every)),
        }
        scores.update({f"gain_db {strength}": float(np.mean(values)) for strength, values in gains.items()})
        return scores

    @staticmethod
    def selection_score(scores: dict[str, float]) -> float | None:
        """The mean gain over the input, or ``None`` when any case is worse than its input (never kept).

        For a blur-conditioned model, the mean of its gains told and not told the width, and ``None``
        when either way leaves a case worse than its input.
        """
        ways = [prefix for prefix in ("", "judged ") if f"{prefix}worst_gain_db" in scores]
        if any(scores[f"{prefix}worst_gain_db"] < 0 for prefix in ways):
            return None
        return float(np.mean([scores[f"{prefix}mean_gain_db"] for prefix in ways]))

"""Training patches: random crops of labeled pairs, or of sharp planes blurred on the fly.

Every sampler draws from a ``numpy.random.Generator`` it is handed, so the
training loop controls reproducibility (step ``s`` uses the seed ``(seed, s)``).
Patches are normalised as the inference engine normalises planes: by the
statistics of the *blurry* input (:func:`~napari_mpt_deblur.normalization.intensity_range`),
the target mapped with the same range, so the network learns the mapping it will be asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..config import IntensityNormalization
from ..normalization import intensity_range

Batch = tuple[np.ndarray, np.ndarray]
"""(blurry, sharp), each float32 of shape (B, 1, P, P)."""


class PairSampler(Protocol):
    """Anything that draws batches of (blurry, sharp) patches."""

    def sample(self, rng: np.random.Generator, batch: int, patch: int, scale_range: tuple[float, float]) -> Batch: ...


def _as_planes(planes: Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
    """2-D float32 planes from a list of arrays or stacks (leading axes flattened)."""
    result = []
    for array in planes if isinstance(planes, (list, tuple)) else [planes]:
        array = np.asarray(array, dtype=np.float32)
        if array.ndim < 2:
            raise ValueError(f"need 2-D planes or stacks, got shape {array.shape}")
        result.extend(array.reshape(-1, *array.shape[-2:]))
    if not result:
        raise ValueError("no planes to sample from")
    return result


def drop_blank_planes(planes: list[np.ndarray]) -> tuple[list[np.ndarray], int]:
    """The planes that are not constant, and how many were.

    Blank planes (empty planes at the ends of a stack, a shutter closed) teach nothing; their
    intensity range is zero, and a network fed only constant patches learns nothing from them.
    """
    kept = [plane for plane in planes if not is_blank(plane)]
    return kept, len(planes) - len(kept)


def is_blank(plane: np.ndarray) -> bool:
    """Whether a plane is constant (or empty): nothing to learn from it."""
    # a plane holding NaN is not blank: it is kept, and the loss tells of it
    return plane.size == 0 or bool(np.ptp(plane) == 0)


def _check_content(kept: list[np.ndarray], blank: int) -> None:
    if not kept:
        raise ValueError(f"all {blank} planes are blank (constant): nothing to train on")


MIN_RANGE_FRACTION = 1e-3
"""A patch's normalisation range is at least this fraction of its full extent (maximum - minimum)."""


def safe_range(values: np.ndarray, normalization: IntensityNormalization) -> tuple[float, float]:
    """``intensity_range`` made safe for any patch: never a zero range, never one that blows values up.

    A constant patch maps to 0 (the flat range of ``intensity_range``). A patch whose
    percentiles coincide although it has content (a few bright spots on a dark background) is
    normalised by its full extent instead, so its spots do not become values in the thousands.
    """
    low, high = intensity_range(values, normalization)
    extent = float(values.max() - values.min())
    if high - low < MIN_RANGE_FRACTION * extent:
        high = low + extent
    return low, high


def _resize(plane: np.ndarray, size: int) -> np.ndarray:
    if plane.shape == (size, size):
        return plane
    tensor = torch.from_numpy(np.ascontiguousarray(plane))[None, None]
    return F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy()


def _crop(rng: np.random.Generator, shape: tuple[int, int], side: int) -> tuple[slice, slice]:
    """A random square window of ``side``, or of the plane's shorter side where the plane is smaller.

    The window stays square so that resizing it to the patch keeps the content's aspect ratio: a plane
    too small for the zoom-out drawn is zoomed out as far as it allows (a window of 256 x 160 pixels
    resized to a square would stretch round nuclei into ellipses 1.6 times as wide as tall).
    """
    size = min(side, *shape)
    starts = [int(rng.integers(0, length - size + 1)) for length in shape]
    return slice(starts[0], starts[0] + size), slice(starts[1], starts[1] + size)


def _augment(rng: np.random.Generator, *planes: np.ndarray) -> list[np.ndarray]:
    """The same random flip and quarter turn for every plane."""
    turns, flip = int(rng.integers(4)), bool(rng.integers(2))
    out = []
    for plane in planes:
        plane = np.rot90(plane, turns)
        out.append(np.ascontiguousarray(plane[:, ::-1] if flip else plane))
    return out


def _normalise_pair(
    blurry: np.ndarray, sharp: np.ndarray, normalization: IntensityNormalization
) -> tuple[np.ndarray, np.ndarray]:
    low, high = safe_range(blurry, normalization)
    scale = 1.0 / (high - low)
    return (blurry - low) * scale, (sharp - low) * scale


def _pick(rng: np.random.Generator, planes: list[np.ndarray], weights: np.ndarray | None = None) -> np.ndarray:
    """A plane, chosen by ``weights``, or with probability proportional to its area (every pixel equally likely)."""
    if weights is None:
        weights = np.array([p.size for p in planes], dtype=np.float64)
    return planes[int(rng.choice(len(planes), p=weights / weights.sum()))]


class LabeledPairs:
    """Random patches of blurry/sharp plane pairs (the user's, or a prepared set).

    Parameters
    ----------
    blurry, sharp
        Planes or stacks of equal shapes, pair by pair.
    normalization
        Intensity normalisation (by the blurry patch's statistics).
    """

    def __init__(
        self,
        blurry: Sequence[np.ndarray] | np.ndarray,
        sharp: Sequence[np.ndarray] | np.ndarray,
        normalization: IntensityNormalization | None = None,
    ) -> None:
        self.blurry, self.sharp = _as_planes(blurry), _as_planes(sharp)
        if len(self.blurry) != len(self.sharp):
            raise ValueError(f"{len(self.blurry)} blurry planes but {len(self.sharp)} sharp ones")
        for index, (b, s) in enumerate(zip(self.blurry, self.sharp)):
            if b.shape != s.shape:
                raise ValueError(f"pair {index}: blurry {b.shape} and sharp {s.shape} differ in shape")
        pairs = [(b, s) for b, s in zip(self.blurry, self.sharp) if not (is_blank(b) or is_blank(s))]
        self.blank_planes = len(self.blurry) - len(pairs)  # pairs left out: one of their planes is constant
        _check_content(pairs, self.blank_planes)
        self.blurry, self.sharp = [b for b, _ in pairs], [s for _, s in pairs]
        self.normalization = normalization or IntensityNormalization()

    def sample(self, rng: np.random.Generator, batch: int, patch: int, scale_range: tuple[float, float]) -> Batch:
        blurry, sharp = [], []
        areas = np.array([p.size for p in self.blurry], dtype=np.float64)
        for _ in range(batch):
            index = int(rng.choice(len(self.blurry), p=areas / areas.sum()))
            side = max(8, round(patch / rng.uniform(*scale_range)))
            window = _crop(rng, self.blurry[index].shape, side)
            b, s = (_resize(plane[window], patch) for plane in (self.blurry[index], self.sharp[index]))
            b, s = _augment(rng, *_normalise_pair(b, s, self.normalization))
            blurry.append(b)
            sharp.append(s)
        return np.stack(blurry)[:, None].astype(np.float32), np.stack(sharp)[:, None].astype(np.float32)


class SyntheticPairs:
    """Patches of sharp planes, defocused on the fly (Gaussian, disk or widefield PSF, and noise).

    Parameters
    ----------
    sharp
        Sharp planes or stacks.
    defocus
        Ranges of the blur and noise (:class:`~napari_mpt_deblur.data.defocus.DefocusConfig`).
    normalization
        Intensity normalisation (by the blurry patch's statistics).
    margin
        Pixels of context around a patch so the blur near its border is a real one.
    denoise_targets
        Suppress the camera noise of the sharp planes first
        (:func:`~napari_mpt_deblur.data.defocus.denoise_target`): with noisy
        targets the network learns to sharpen noise. Needs scikit-image.
    weights
        Relative chance of drawing each plane (one per plane after stacks are
        flattened); by default proportional to its area.
    """

    def __init__(
        self,
        sharp: Sequence[np.ndarray] | np.ndarray,
        defocus=None,
        normalization: IntensityNormalization | None = None,
        margin: int = 32,
        denoise_targets: bool = False,
        weights: Sequence[float] | None = None,
    ) -> None:
        from ..data.defocus import DefocusConfig, denoise_target

        planes = _as_planes(sharp)
        if weights is not None and len(weights) != len(planes):
            raise ValueError(f"need one weight per plane ({len(planes)}), got {len(weights)}")
        keep = [not is_blank(plane) for plane in planes]
        self.weights = None if weights is None else np.array([w for w, k in zip(weights, keep) if k], np.float64)
        self.sharp, self.blank_planes = drop_blank_planes(planes)
        _check_content(self.sharp, self.blank_planes)
        if denoise_targets:
            self.sharp = [denoise_target(plane) for plane in self.sharp]
        self.defocus = defocus or DefocusConfig()
        self.normalization = normalization or IntensityNormalization()
        self.margin = margin

    def sample(self, rng: np.random.Generator, batch: int, patch: int, scale_range: tuple[float, float]) -> Batch:
        blurry, sharp, _ = self.sample_with_widths(rng, batch, patch, scale_range)
        return blurry, sharp

    def sample_with_widths(
        self, rng: np.random.Generator, batch: int, patch: int, scale_range: tuple[float, float]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A batch as :meth:`sample` draws it (the same draws), and each sample's blur width: (B,) float32.

        The width is that of the PSF the sample was blurred with (``blur_sigma_px``, pixels of the patch:
        the crop is resized before it is blurred); 0 for an unblurred sample.
        """
        from ..data.defocus import make_defocused

        blurry, sharp, widths = [], [], []
        for _ in range(batch):
            plane = _pick(rng, self.sharp, self.weights)
            scale = rng.uniform(*scale_range)
            side = max(8, round((patch + 2 * self.margin) / scale))
            crop = _resize(plane[_crop(rng, plane.shape, side)], patch + 2 * self.margin)
            # the noise model counts photons: bring the sharp crop to 0..1 first
            low, high = safe_range(crop, IntensityNormalization())
            crop = np.clip((crop - low) / (high - low), 0, None).astype(np.float32)
            defocused, description = make_defocused(crop, self.defocus, rng)
            inner = slice(self.margin, self.margin + patch)
            b, s = _augment(rng, *_normalise_pair(defocused[inner, inner], crop[inner, inner], self.normalization))
            blurry.append(b)
            sharp.append(s)
            widths.append(description["sigma_px"])
        return (
            np.stack(blurry)[:, None].astype(np.float32),
            np.stack(sharp)[:, None].astype(np.float32),
            np.array(widths, np.float32),
        )


class UnlabeledPlanes:
    """Random patches of the user's own (unlabeled) planes, for EFCR_ex and the re-blur term.

    Parameters
    ----------
    planes
        Planes or stacks from the user's microscope.
    normalization
        Intensity normalisation (each patch by its own statistics, as at inference).
    min_focus_quantile
        Keep only planes whose focus score is at least this quantile of the
        stack's scores (0 keeps every plane; 0.5 the sharper half).
    """

    def __init__(
        self,
        planes: Sequence[np.ndarray] | np.ndarray,
        normalization: IntensityNormalization | None = None,
        min_focus_quantile: float = 0.0,
    ) -> None:
        from ..data.focus import focus_score

        self.planes, self.blank_planes = drop_blank_planes(_as_planes(planes))
        _check_content(self.planes, self.blank_planes)
        if not 0 <= min_focus_quantile < 1:
            raise ValueError(f"min_focus_quantile must be in [0, 1), got {min_focus_quantile}")
        if min_focus_quantile > 0 and len(self.planes) > 1:
            scores = np.array([focus_score(p) for p in self.planes])
            threshold = np.quantile(scores, min_focus_quantile)
            self.planes = [p for p, s in zip(self.planes, scores) if s >= threshold]
        self.normalization = normalization or IntensityNormalization()

    def sample(self, rng: np.random.Generator, batch: int, patch: int, scale_range: tuple[float, float]) -> np.ndarray:
        """(B, 1, P, P) float32 patches."""
        patches = []
        for _ in range(batch):
            plane = _pick(rng, self.planes)
            side = max(8, round(patch / rng.uniform(*scale_range)))
            crop = _resize(plane[_crop(rng, plane.shape, side)], patch)
            low, high = safe_range(crop, self.normalization)
            (crop,) = _augment(rng, (crop - low) / (high - low))
            patches.append(crop)
        return np.stack(patches)[:, None].astype(np.float32)

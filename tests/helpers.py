"""Helpers the tests import (``from helpers import ...``): small models and synthetic images.

Fixtures live in ``conftest.py``; plain functions live here, so that a test module
imports them by name instead of from pytest's conftest machinery.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from napari_mpt_deblur.config import MPTConfig


def tiny_config(**changes: Any) -> MPTConfig:
    """A small but complete MPT (every kind of block, both shifts) for fast tests.

    Parameters
    ----------
    **changes
        Fields of :class:`~napari_mpt_deblur.config.MPTConfig` to set instead.

    Returns
    -------
    MPTConfig
        Width 8, two blocks per level.
    """
    base: dict[str, Any] = dict(
        dim=8,
        num_blocks=(2, 2, 2, 2),
        heads=(1, 2, 2, 4),
        scales=((1 / 4, 1 / 4), (1 / 2, 1 / 2), (1.0, 1.0), (1.0, 1.0)),
    )
    base.update(changes)
    return MPTConfig(**base)


def pattern_pairs(count: int = 3, size: int = 96, seed: int = 0, discs: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Sharp synthetic cells (bright discs) and a Gaussian-blurred copy.

    Parameters
    ----------
    count
        Number of planes.
    size
        Side of each (square) plane in pixels.
    seed
        Seed of the discs' places, radii and brightness.
    discs
        Discs per plane.

    Returns
    -------
    blurry, sharp : numpy.ndarray
        float32, shape (count, size, size), in 0..1.
    """
    from napari_mpt_deblur.losses.efcr import gaussian_blur

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    sharp = np.zeros((count, size, size), np.float32)
    for plane in sharp:
        for _ in range(discs):
            cy, cx, r = rng.uniform(8, size - 8), rng.uniform(8, size - 8), rng.uniform(3, 7)
            plane[(y - cy) ** 2 + (x - cx) ** 2 < r**2] = rng.uniform(0.5, 1.0)
    blurry = gaussian_blur(torch.from_numpy(sharp)[:, None], 9, 2.0)[:, 0].numpy()
    return blurry, sharp

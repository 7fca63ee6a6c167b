"""Intensity ranges: which input values map to 0 and 1 before a network (or StarDist) sees an image.

Inference, training patches, the detection engine and the synthetic-data
helpers all scale intensities by percentiles; they compute the range here, so
the statistics and the treatment of flat inputs are defined once. Only numpy is
needed (no torch, no image files).
"""

from __future__ import annotations

import numpy as np

from .config import IntensityNormalization

FLAT_RANGE_WIDTH = 1.0
"""Width given to the range of a flat input (both ends equal): it then stays flat instead of dividing by zero."""


def percentile_values(values: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """The values at two percentiles of an array, as they are (equal for a flat input).

    Parameters
    ----------
    values
        Any numeric array; all its entries count.
    percentiles
        (low, high) percentiles, each in [0, 100].

    Returns
    -------
    tuple of float
        The values at the low and the high percentile.
    """
    low, high = np.percentile(values, percentiles)
    return float(low), float(high)


def _widen_if_flat(low: float, high: float) -> tuple[float, float]:
    # a flat input keeps a range of FLAT_RANGE_WIDTH; ``not high > low`` also catches NaN
    if not high > low:
        high = low + FLAT_RANGE_WIDTH
    return float(low), float(high)


def percentile_range(values: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """The values mapped to 0 and 1 when scaling by percentiles; a flat input gets a range of width 1.

    Parameters
    ----------
    values
        Any numeric array; all its entries count.
    percentiles
        (low, high) percentiles, each in [0, 100].

    Returns
    -------
    tuple of float
        (low, high) with ``high > low`` for finite inputs.
    """
    return _widen_if_flat(*percentile_values(values, percentiles))


def intensity_range(values: np.ndarray, normalization: IntensityNormalization) -> tuple[float, float]:
    """The values of ``values`` that ``normalization`` maps to 0 and 1; a flat input gets a range of width 1.

    Parameters
    ----------
    values
        The intensities the statistics are taken from (a plane, a patch or a sample of a stack).
    normalization
        ``percentile`` takes the ``low``/``high`` percentiles of ``values``, ``minmax`` their
        minimum and maximum, ``fixed`` the values ``low``/``high`` themselves.

    Returns
    -------
    tuple of float
        (low, high) with ``high > low`` for finite inputs.
    """
    if normalization.mode == "percentile":
        low, high = percentile_values(values, (normalization.low, normalization.high))
    elif normalization.mode == "minmax":
        low, high = float(values.min()), float(values.max())
    else:
        low, high = normalization.low, normalization.high
    return _widen_if_flat(low, high)

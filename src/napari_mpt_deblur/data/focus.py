"""A per-plane focus score: which planes of a stack are sharp enough to learn from."""

from __future__ import annotations

import numpy as np


def focus_score(plane: np.ndarray) -> float:
    """Normalised variance of the Laplacian: high for sharp planes, low for blurred or empty ones.

    Divided by the squared mean intensity (plus the plane's own spread), so the
    score does not change when the exposure does. Computed on the whole plane,
    with the border pixels left out.
    """
    x = np.asarray(plane, dtype=np.float64)
    if x.ndim != 2 or min(x.shape) < 3:
        raise ValueError(f"need a 2-D plane of at least 3 x 3 pixels, got shape {x.shape}")
    laplacian = x[:-2, 1:-1] + x[2:, 1:-1] + x[1:-1, :-2] + x[1:-1, 2:] - 4 * x[1:-1, 1:-1]
    scale = x.mean() ** 2 + x.var() + 1e-12
    return float(laplacian.var() / scale)


def sharpest_planes(planes: list[np.ndarray], fraction: float = 0.25) -> list[np.ndarray]:
    """The ``fraction`` of planes with the highest focus score (at least one)."""
    if not planes:
        return []
    scores = np.array([focus_score(p) for p in planes])
    keep = max(1, int(round(fraction * len(planes))))
    return [planes[i] for i in np.argsort(scores)[::-1][:keep]]

"""One-level orthonormal 2-D Haar wavelet transform in torch (any device, differentiable)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def haar_dwt2(x: Tensor) -> tuple[Tensor, Tensor]:
    """One-level orthonormal Haar DWT of every channel of (B, C, H, W).

    Equals ``pywt.dwt2(x, "haar")`` on even sizes; odd sizes are first padded by
    one row/column by reflection (``pywt.dwt2(x, "haar", mode="reflect")``).

    Returns
    -------
    low : Tensor
        (B, C, H/2, W/2) approximation band (pywt's ``cA``).
    high : Tensor
        (B, C, 3, H/2, W/2) detail bands in pywt's order: horizontal, vertical, diagonal.
    """
    if x.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        x = F.pad(x, (0, w % 2, 0, h % 2), mode="reflect" if min(h, w) > 1 else "replicate")
    a = x[..., 0::2, 0::2]  # top-left of every 2x2 block
    b = x[..., 0::2, 1::2]  # top-right
    c = x[..., 1::2, 0::2]  # bottom-left
    d = x[..., 1::2, 1::2]  # bottom-right
    low = (a + b + c + d) * 0.5
    horizontal = (a + b - c - d) * 0.5
    vertical = (a - b + c - d) * 0.5
    diagonal = (a - b - c + d) * 0.5
    return low, torch.stack((horizontal, vertical, diagonal), dim=2)

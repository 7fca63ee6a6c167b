"""The network's own estimate of the blur's width, for a blur-conditioned MPT told none.

A blur-conditioned network (``MPTConfig.blur_conditioned``) deblurs better told the blur's
width than judging it from the image (experiment 14 in docs/benchmarks.md), but users
rarely know it. :class:`BlurWidthEstimator` reads it from the blurry plane: a small
convolutional network whose features, averaged over the whole plane, give the logarithm of
the width. Averaging over a whole plane weighs the evidence of every edge and spot in it,
where the deblurring network decides from one tile; and it is trained as a quantile above
the median, because a width told too wide costs the deblurring network little and one
told too narrow leaves blur in place (``training.config.WIDTH_QUANTILE``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

WIDTH_OFFSET = 0.5
"""The estimator predicts ``log(width + WIDTH_OFFSET)``: finite for unblurred images (width 0)."""

ESTIMATE_CROP = 512
"""Planes larger than this are estimated from crops of this side."""

CROPS_PER_SIDE = 3
"""Most crops along each side of a large plane (so at most nine in all)."""


class BlurWidthEstimator(nn.Module):
    """Blurry image (B, C, H, W), normalised as the deblurring network sees it -> (B,) blur width in pixels.

    Five levels of two 3x3 convolutions (the first of each from the second level on halving
    the size), group-normalised, then the features' mean over the plane and a linear layer.

    An image of several channels is averaged to one first: the width is one for all channels.

    Parameters
    ----------
    channels
        Feature width of each level.
    """

    def __init__(self, channels: tuple[int, ...] = (8, 16, 32, 48, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, channels[0], 3, padding=1), nn.GELU()]
        for before, after in zip(channels[:-1], channels[1:]):
            layers += _normalised_conv(before, after, stride=2) + _normalised_conv(after, after, stride=1)
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels[-1], 1)

    def log_width(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B,) ``log(width + WIDTH_OFFSET)``, the quantity it is trained on."""
        features = self.features(x.float().mean(dim=1, keepdim=True))
        return self.head(features.mean(dim=(2, 3)))[:, 0] + 1.0  # + 1: the mean log-width of the training draws

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B,) blur width in pixels (0 or more)."""
        return (torch.exp(self.log_width(x)) - WIDTH_OFFSET).clamp(min=0.0)

    @torch.no_grad()
    def estimate(self, plane: Tensor) -> float:
        """The blur width of one (C, H, W) plane: from the whole plane, or from crops of a large one.

        Crops of :data:`ESTIMATE_CROP` pixels on an even grid (:data:`CROPS_PER_SIDE` a side at most) keep the
        memory of a plane of any size bounded; their log-widths are averaged.
        """
        height, width = plane.shape[-2:]
        rows, cols = _crop_starts(height), _crop_starts(width)
        crops = [
            plane[None, :, top : top + ESTIMATE_CROP, left : left + ESTIMATE_CROP] for top in rows for left in cols
        ]
        log_width = torch.stack([self.log_width(crop)[0] for crop in crops]).mean()
        return max(float(torch.exp(log_width)) - WIDTH_OFFSET, 0.0)


def widen(width: float | Tensor, factor: float | Tensor) -> float | Tensor:
    """``width`` (pixels) widened by ``factor`` on ``width + WIDTH_OFFSET``, the scale the estimator works on,
    so that a width of 0 is widened too (``MPTConfig.width_margin``, and the over-reads of training)."""
    widened = (width + WIDTH_OFFSET) * factor - WIDTH_OFFSET
    if isinstance(widened, Tensor):
        return widened.clamp(min=0.0)  # NaN (unknown) stays NaN
    return widened if math.isnan(widened) else max(widened, 0.0)


def _normalised_conv(before: int, after: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(before, after, 3, stride=stride, padding=1),
        nn.GroupNorm(4 if after >= 16 else 2, after),
        nn.GELU(),
    ]


def _crop_starts(length: int) -> list[int]:
    """Starts of up to :data:`CROPS_PER_SIDE` crops spread evenly along a side (one when the side fits in a crop)."""
    if length <= ESTIMATE_CROP:
        return [0]
    count = min(CROPS_PER_SIDE, -(-length // ESTIMATE_CROP))
    return [round(i * (length - ESTIMATE_CROP) / (count - 1)) for i in range(count)]


def quantile_loss(log_width: Tensor, true_width: Tensor, quantile: float) -> Tensor:
    """Pinball loss of predicted ``log(width + WIDTH_OFFSET)`` against the true widths (pixels): its minimum is
    the ``quantile`` of the true log-width given the image."""
    error = torch.log(true_width.float() + WIDTH_OFFSET) - log_width
    return torch.maximum(quantile * error, (quantile - 1) * error).mean()

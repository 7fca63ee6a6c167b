"""Overlapping tiles with smooth blending: run a network on planes of any size.

A plane is cut into tiles of (at most) ``tile`` pixels that overlap by
``overlap`` pixels; each tile's output is weighted by a window that rises
smoothly from (almost) zero at the tile's edge to one inside, and the weighted
outputs are divided by the summed weights. Pixels near a tile edge, where the
network saw zero padding, therefore count for almost nothing wherever another
tile covers them, and no seams show.

MPT's ISCA attention is global over whatever map it sees, so a tiled result is
not identical to a whole-plane one; ``docs/architecture.md`` gives the measured
difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Progress = Callable[[int, int], None]


def axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering ``range(length)``, the last tile flush with the end.

    Neighbouring tiles overlap by at least ``overlap`` pixels.
    """
    if tile >= length:
        return [0]
    step = tile - overlap
    count = math.ceil((length - tile) / step) + 1
    # Spread the tiles evenly, so every overlap is at least `overlap` and none is wasted.
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def blend_window(size: int, overlap: int, device: torch.device | None = None) -> Tensor:
    """1-D weights of a tile: a raised-cosine ramp over ``overlap`` pixels at each end, 1 inside.

    Weights are strictly positive, so pixels covered by a single tile (the
    plane's own border) keep their value after normalisation.
    """
    weights = torch.ones(size, device=device)
    ramp = min(overlap, size // 2)
    if ramp > 0:
        position = (torch.arange(ramp, device=device) + 0.5) / ramp  # (0, 1), never 0
        rise = 0.5 - 0.5 * torch.cos(math.pi * position)
        weights[:ramp] = rise
        weights[size - ramp :] = rise.flip(0)
    return weights


def tiled_forward(
    network: Callable[[Tensor], Tensor],
    image: Tensor,
    tile: int = 256,
    overlap: int = 32,
    progress: Progress | None = None,
) -> Tensor:
    """``network(image)`` computed tile by tile and blended.

    Parameters
    ----------
    network
        Maps (1, C, h, w) to (1, C, h, w).
    image
        (1, C, H, W) tensor on the network's device.
    tile
        Tile side in pixels (tiles shrink to the plane where it is smaller).
    overlap
        Pixels shared by neighbouring tiles; the blend ramps over this width.
    progress
        Called as ``progress(done, total)`` after each tile; raising from it
        stops the computation between tiles (cancellation).
    """
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected a (1, C, H, W) tensor, got shape {tuple(image.shape)}")
    if tile < 8 or not 0 <= overlap < tile:
        raise ValueError(f"need tile >= 8 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    height, width = image.shape[-2:]
    tile_h, tile_w = min(tile, height), min(tile, width)
    rows, cols = axis_starts(height, tile_h, overlap), axis_starts(width, tile_w, overlap)
    if len(rows) == 1 and len(cols) == 1:
        result = network(image)
        if progress:
            progress(1, 1)
        return result
    weight = blend_window(tile_h, overlap, image.device)[:, None] * blend_window(tile_w, overlap, image.device)
    total = torch.zeros(image.shape[1], height, width, device=image.device)
    weight_sum = torch.zeros(height, width, device=image.device)
    done, count = 0, len(rows) * len(cols)
    for top in rows:
        for left in cols:
            window = (slice(top, top + tile_h), slice(left, left + tile_w))
            out = network(image[(..., *window)])[0].float()
            total[(slice(None), *window)] += out * weight
            weight_sum[window] += weight
            done += 1
            if progress:
                progress(done, count)
    return (total / weight_sum)[None].to(image.dtype)

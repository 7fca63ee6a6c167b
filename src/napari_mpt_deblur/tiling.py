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
from collections.abc import Callable, Generator

import torch
from torch import Tensor

from .runtime import run_to_end

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


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[tuple[slice, slice]]:
    """The (rows, columns) windows of the tiles covering a plane, row by row; tile 0 means one whole-plane tile."""
    if tile == 0:
        return [(slice(0, height), slice(0, width))]
    tile_h, tile_w = min(tile, height), min(tile, width)
    return [
        (slice(top, top + tile_h), slice(left, left + tile_w))
        for top in axis_starts(height, tile_h, overlap)
        for left in axis_starts(width, tile_w, overlap)
    ]


def iter_tiled_forward(
    network: Callable[[Tensor], Tensor],
    image: Tensor,
    tile: int = 256,
    overlap: int = 32,
    batch: int = 1,
) -> Generator[tuple[int, int], None, Tensor]:
    """``network(image)`` computed tile by tile and blended, yielding ``(tiles done, tiles total)``.

    A generator: it yields after every forward pass and *returns* the result
    (``result = yield from iter_tiled_forward(...)``); closing it stops the work
    between two forward passes. All tiles have the same size, so ``batch`` of
    them run in one forward pass.

    Parameters
    ----------
    network
        Maps (N, C, h, w) to (N, C, h, w).
    image
        (1, C, H, W) tensor on the network's device.
    tile
        Tile side in pixels (tiles shrink to the plane where it is smaller); 0: the whole plane at once.
    overlap
        Pixels shared by neighbouring tiles; the blend ramps over this width.
    batch
        Tiles per forward pass.
    """
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected a (1, C, H, W) tensor, got shape {tuple(image.shape)}")
    if tile != 0 and (tile < 8 or not 0 <= overlap < tile):
        raise ValueError(f"need tile >= 8 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    height, width = image.shape[-2:]
    windows = tile_grid(height, width, tile, overlap)
    if len(windows) == 1:
        result = network(image)
        yield 1, 1
        return result
    tile_h, tile_w = windows[0][0].stop - windows[0][0].start, windows[0][1].stop - windows[0][1].start
    weight = blend_window(tile_h, overlap, image.device)[:, None] * blend_window(tile_w, overlap, image.device)
    total = torch.zeros(image.shape[1], height, width, device=image.device)
    weight_sum = torch.zeros(height, width, device=image.device)
    for first in range(0, len(windows), batch):
        group = windows[first : first + batch]
        outputs = network(torch.cat([image[(0, ..., *window)][None] for window in group])).float()
        for out, window in zip(outputs, group):
            total[(slice(None), *window)] += out * weight
            weight_sum[window] += weight
        yield first + len(group), len(windows)
    return (total / weight_sum)[None].to(image.dtype)


def tiled_forward(
    network: Callable[[Tensor], Tensor],
    image: Tensor,
    tile: int = 256,
    overlap: int = 32,
    progress: Progress | None = None,
    batch: int = 1,
) -> Tensor:
    """``network(image)`` computed tile by tile and blended (see :func:`iter_tiled_forward`).

    ``progress(done, total)`` is called after each forward pass; raising from it
    stops the computation between tiles (cancellation).
    """
    steps = iter_tiled_forward(network, image, tile, overlap, batch)
    return run_to_end(steps, (lambda counts: progress(*counts)) if progress else None)

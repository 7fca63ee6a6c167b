"""Overlapping tiles with smooth blending: run a network on planes of any size.

A plane is covered by equal tiles that overlap by at least ``overlap`` pixels
(:func:`plan_tiles` chooses them); each tile's output is weighted by a window
that rises smoothly from (almost) zero at the tile's edge to one inside, and
the weighted outputs are divided by the summed weights. Pixels near a tile
edge, where the network saw padding, therefore count for almost nothing
wherever another tile covers them, and no seams show.

MPT's ISCA attention is global over whatever map it sees, so a tiled result is
not identical to a whole-plane one; ``docs/inference.md`` gives the measured
difference.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch
from torch import Tensor

from .runtime import map_side_by_side

TILE_GROWTH = 1.5
"""How far a planned tile may outgrow the requested one: its area (as the network computes it, rounded up
to the network's size multiple) is at most ``TILE_GROWTH**2`` times that of the requested square tile
rounded up the same way. Memory per forward pass grows with the tile's area, so it is bounded by
2.25x that of the requested tile; in exchange a plane needs far fewer overlapping pixels."""

SPLIT_MAX_WASTE = 1.3
"""A plane planned as fewer tiles than the CPU has workers is cut into at least that many, so that their forward
passes run side by side, one thread each, only when the tiles then compute at most this many times the plane's
pixels. All threads on one tile end each of the network's many small operations in a thread barrier, and when
another program takes a core every barrier waits for the paused thread: a 660 x 550 plane took 4.8 s instead
of 1.35 s with one busy process on 2 cores, cut in tiles side by side 1.95 s (1.29 s idle; experiment 5)."""


def round_up(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple``."""
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class AxisPlan:
    """``count`` equal tiles of ``size`` pixels along one axis of ``length`` pixels."""

    length: int
    count: int
    size: int

    def starts(self) -> list[int]:
        """Start offsets, spread evenly from 0 to flush with the end, so no overlap is larger than needed."""
        if self.count == 1:
            return [0]
        span = self.length - self.size
        return [round(i * span / (self.count - 1)) for i in range(self.count)]

    def computed(self, multiple: int) -> int:
        """Pixels the network computes along this axis (it pads every tile to its size multiple)."""
        return self.count * round_up(self.size, multiple)


def axis_tile_size(length: int, count: int, overlap: int, multiple: int) -> int:
    """The smallest tile, a multiple of ``multiple``, of which ``count`` cover ``length`` overlapping by ``overlap``.

    One tile is the whole axis, unrounded: the network pads it itself, exactly as
    it pads a whole plane.
    """
    if count == 1:
        return length
    # count tiles of size s, neighbours sharing `overlap`, reach count * s - (count - 1) * overlap pixels
    return round_up(math.ceil((length + (count - 1) * overlap) / count), multiple)


def axis_plans(length: int, overlap: int, multiple: int, min_size: int, max_size: int) -> list[AxisPlan]:
    """Every sensible way to cut one axis into equal tiles of at most ``max_size`` pixels (after padding).

    One tile, then ever more tiles until they are ``min_size`` or shorter:
    thinner tiles only add overlap. Counts whose tile would not be shorter than
    the axis are left out (one tile is cheaper).
    """
    plans = [AxisPlan(length, 1, length)] if round_up(length, multiple) <= max_size else []
    smallest = max(min_size, round_up(overlap + 1, multiple))  # tiles cannot shrink below overlap + 1
    for count in range(2, length + 1):
        size = axis_tile_size(length, count, overlap, multiple)
        if size < length and size <= max_size:
            plans.append(AxisPlan(length, count, size))
        if size <= smallest:
            break
    return plans


@dataclass(frozen=True)
class TilePlan:
    """Equal tiles covering a plane: ``rows`` along Y times ``columns`` along X."""

    rows: AxisPlan
    columns: AxisPlan
    multiple: int

    @property
    def count(self) -> int:
        return self.rows.count * self.columns.count

    @property
    def tile_shape(self) -> tuple[int, int]:
        return self.rows.size, self.columns.size

    @property
    def computed_pixels(self) -> int:
        """Pixels the network computes for the whole plane: every tile, padded to the size multiple."""
        return self.rows.computed(self.multiple) * self.columns.computed(self.multiple)

    def windows(self) -> list[tuple[slice, slice]]:
        """The (rows, columns) windows of the tiles, row by row."""
        height, width = self.tile_shape
        return [
            (slice(top, top + height), slice(left, left + width))
            for top in self.rows.starts()
            for left in self.columns.starts()
        ]


@functools.lru_cache(maxsize=256)
def plan_tiles(
    height: int,
    width: int,
    tile: int,
    overlap: int,
    multiple: int = 1,
    growth: float = TILE_GROWTH,
    min_tiles: int = 1,
) -> TilePlan:
    """The equal, overlapping tiles that cover a plane with the fewest computed pixels.

    The network pads every tile to ``multiple`` (its ``config.size_multiple``),
    so tile sides are multiples of it, except a tile that spans a whole axis,
    which the network pads like a whole plane. Among all tilings whose tile
    area, so padded, is at most ``(growth * round_up(tile, multiple)) ** 2``,
    the one computing the fewest pixels wins; ties go to fewer tiles, then to
    squarer ones. For example, 1024 x 1024 at ``tile=512, overlap=64`` on a
    network that needs multiples of 64 becomes 2 tiles of 1024 x 576 (1.125x
    the plane's pixels), where a grid of 512-pixel tiles needed 9 (2.25x).

    Parameters
    ----------
    height, width
        The plane's size.
    tile
        The requested tile side (> overlap).
    overlap
        Neighbouring tiles share at least this many pixels.
    multiple
        The network's size multiple.
    growth
        Memory bound: how much larger than the requested tile, in side length
        and after rounding, a tile's area may be. ``1`` keeps every tile within
        the requested square; the engine uses :data:`TILE_GROWTH` (tile memory
        at most 2.25x the requested tile's). A plane that fits in this area is
        one tile, exactly the whole-plane forward; a plane thinner than a tile
        (a 1 x 5000 strip) gets long tiles of the same area.
    min_tiles
        Plans of fewer tiles are passed over, unless the plane cannot be cut into
        this many (then the plan is as without it). Above 1, the tiles are for
        that many workers side by side: the plan whose busiest worker computes
        the fewest pixels wins.
    """
    if not 0 <= overlap < tile or multiple < 1 or growth < 1:
        raise ValueError(
            f"need 0 <= overlap < tile, multiple >= 1, growth >= 1; got {tile}, {overlap}, {multiple}, {growth}"
        )
    budget = round_up(tile, multiple) ** 2 * growth**2
    # tiles much thinner than asked only add overlap; the bound keeps the search small
    min_size = round_up(max(1, tile // 2), multiple)
    max_size = int(budget // multiple)  # the other side is at least one multiple
    best: tuple[tuple[int, int, int], TilePlan] | None = None
    for rows in axis_plans(height, overlap, multiple, min_size, max_size):
        for columns in axis_plans(width, overlap, multiple, min_size, max_size):
            padded_h, padded_w = round_up(rows.size, multiple), round_up(columns.size, multiple)
            if padded_h * padded_w > budget:
                continue
            plan = TilePlan(rows, columns, multiple)
            if plan.count < min_tiles:
                continue
            key = (plan.computed_pixels, plan.count, abs(padded_h - padded_w))
            if min_tiles > 1:  # tiles for side-by-side workers: the busiest worker's pixels first
                key = (-(-plan.count // min_tiles) * padded_h * padded_w, *key)
            if best is None or key < best[0]:
                best = (key, plan)
    if best is None and min_tiles > 1:  # too small to cut into that many
        return plan_tiles(height, width, tile, overlap, multiple, growth)
    if best is None:  # unreachable for tile > overlap: tiles of min_size always fit
        raise ValueError(f"no tiling of {height} x {width} with tile={tile}, overlap={overlap}, multiple={multiple}")
    return best[1]


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


def tile_grid(
    height: int,
    width: int,
    tile: int,
    overlap: int,
    multiple: int = 1,
    growth: float = TILE_GROWTH,
    split: int = 1,
) -> list[tuple[slice, slice]]:
    """The (rows, columns) windows of the tiles covering a plane, row by row (see :func:`plan_tiles`).

    ``tile`` 0 means one whole-plane tile. A plane planned as fewer than ``split`` tiles is cut into
    at least ``split`` when they compute at most :data:`SPLIT_MAX_WASTE` times its pixels.
    """
    if tile == 0:
        return [(slice(0, height), slice(0, width))]
    return plan_for_workers(height, width, tile, overlap, multiple, growth, split).windows()


def plan_for_workers(
    height: int,
    width: int,
    tile: int,
    overlap: int,
    multiple: int = 1,
    growth: float = TILE_GROWTH,
    split: int = 1,
) -> TilePlan:
    """:func:`plan_tiles`, with a plane of fewer than ``split`` tiles cut into at least ``split`` when they
    compute at most :data:`SPLIT_MAX_WASTE` times its pixels (the plan :func:`tile_grid` gives windows of)."""
    plan = plan_tiles(height, width, tile, overlap, multiple, growth)
    if plan.count < split:
        cut = plan_tiles(height, width, tile, overlap, multiple, growth, min_tiles=split)
        if cut.count >= split and cut.computed_pixels <= SPLIT_MAX_WASTE * height * width:
            return cut
    return plan


def iter_tiled_forward(
    network: Callable[[Tensor], Tensor],
    image: Tensor,
    tile: int = 256,
    overlap: int = 32,
    batch: int = 1,
    multiple: int = 1,
    growth: float = TILE_GROWTH,
    workers: int = 1,
    split: int = 1,
) -> Generator[tuple[int, int], None, Tensor]:
    """``network(image)`` computed tile by tile and blended, yielding ``(tiles done, tiles total)``.

    A generator: it yields after every forward pass and *returns* the result
    (``result = yield from iter_tiled_forward(...)``); closing it stops the work
    between two forward passes. The tiles are those of :func:`plan_tiles`; all
    have the same size, so ``batch`` of them run in one forward pass.

    Parameters
    ----------
    network
        Maps (N, C, h, w) to (N, C, h, w).
    image
        (1, C, H, W) tensor on the network's device.
    tile
        Requested tile side in pixels; 0: the whole plane at once.
    overlap
        Pixels shared by neighbouring tiles, at least; the blend ramps over this width.
    batch
        Tiles per forward pass.
    multiple
        The network's size multiple (``model.config.size_multiple``): tile sides are rounded up to it.
    growth
        How much larger than ``tile`` a planned tile may be (see :func:`plan_tiles`).
    workers
        Forward passes run side by side, each on its share of torch's threads
        (:func:`~napari_mpt_deblur.runtime.map_side_by_side`); the CPU engine uses
        :func:`~napari_mpt_deblur.runtime.cpu_workers`.
    split
        Cut a plane planned as fewer tiles into at least this many, when that wastes little
        (see :func:`tile_grid`): the CPU engine's workers, so that they have a tile each.
    """
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"expected a (1, C, H, W) tensor, got shape {tuple(image.shape)}")
    if tile != 0 and (tile < 8 or not 0 <= overlap < tile):
        raise ValueError(f"need tile >= 8 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    height, width = image.shape[-2:]
    windows = tile_grid(height, width, tile, overlap, multiple, growth, split)
    if len(windows) == 1:
        result = network(image)
        yield 1, 1
        return result
    tile_h, tile_w = windows[0][0].stop - windows[0][0].start, windows[0][1].stop - windows[0][1].start
    weight = blend_window(tile_h, overlap, image.device)[:, None] * blend_window(tile_w, overlap, image.device)
    total = torch.zeros(image.shape[1], height, width, device=image.device)
    weight_sum = torch.zeros(height, width, device=image.device)
    groups = [windows[first : first + batch] for first in range(0, len(windows), batch)]

    def forward(group: list[tuple[slice, slice]]) -> Tensor:
        return network(torch.cat([image[(0, ..., *window)][None] for window in group])).float()

    done = 0
    with contextlib.closing(map_side_by_side(forward, groups, workers)) as results:  # closed: no tile runs on
        for group, outputs in zip(groups, results):
            for out, window in zip(outputs, group):
                total[(slice(None), *window)] += out * weight
                weight_sum[window] += weight
            done += len(group)
            yield done, len(windows)
    return (total / weight_sum)[None].to(image.dtype)

"""Overlapping tiles with smooth blending."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from helpers import tiny_config
from napari_mpt_deblur import MPT
from napari_mpt_deblur.inference import DEFAULT_TILE, default_overlap
from napari_mpt_deblur.runtime import run_to_end
from napari_mpt_deblur.tiling import (
    SPLIT_MAX_WASTE,
    TILE_GROWTH,
    blend_window,
    iter_tiled_forward,
    plan_for_workers,
    plan_tiles,
    round_up,
    tile_grid,
)

LITE_MULTIPLE = 64  # the default model's config.size_multiple
PLAN_CASES = [
    # height, width, tile, overlap, multiple
    (1024, 1024, 512, 64, 64),
    (660, 550, 512, 32, 64),
    (2048, 1500, 512, 32, 64),
    (4096, 777, 512, 32, 64),
    (1, 5000, 512, 32, 64),
    (3000, 7, 256, 64, 64),
    (400, 300, 96, 32, 1),
    (97, 211, 64, 63, 1),
    (1000, 1000, 256, 0, 16),
    (300, 200, 96, 24, 16),
]


def padded_area(plan) -> int:
    return round_up(plan.rows.size, plan.multiple) * round_up(plan.columns.size, plan.multiple)


@pytest.mark.parametrize("height, width, tile, overlap, multiple", PLAN_CASES)
def test_equal_tiles_cover_every_pixel_with_the_overlap(height, width, tile, overlap, multiple):
    plan = plan_tiles(height, width, tile, overlap, multiple)
    windows = plan.windows()
    assert len(windows) == plan.count
    assert {(w[0].stop - w[0].start, w[1].stop - w[1].start) for w in windows} == {plan.tile_shape}  # equal tiles
    covered = torch.zeros(height, width, dtype=torch.int32)
    for rows, columns in windows:
        assert rows.start >= 0 and columns.start >= 0 and rows.stop <= height and columns.stop <= width
        covered[rows, columns] += 1
    assert (covered > 0).all()
    for axis in (plan.rows, plan.columns):
        starts = axis.starts()
        assert starts[0] == 0 and starts[-1] + axis.size == axis.length  # flush with both ends
        assert all(a + axis.size - b >= overlap for a, b in zip(starts, starts[1:]))  # neighbours share `overlap`
        assert axis.count == 1 or axis.size % multiple == 0  # what the network needs, unless spanning the plane


def brute_force_cost(height: int, width: int, tile: int, overlap: int, multiple: int) -> tuple[int, int]:
    """(computed pixels, tiles) of the best tiling, by trying every tile count and size within the memory bound."""
    budget = (TILE_GROWTH * round_up(tile, multiple)) ** 2

    def axis_options(length: int) -> list[tuple[int, int]]:  # (count, padded size) of every covering tiling
        options = [(1, round_up(length, multiple))]
        for count, size in itertools.product(range(2, length + 1), range(multiple, length, multiple)):
            if count * size - (count - 1) * overlap >= length:
                options.append((count, size))
        return options

    return min(
        (nh * sh * nw * sw, nh * nw)
        for (nh, sh), (nw, sw) in itertools.product(axis_options(height), axis_options(width))
        if sh * sw <= budget
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "height, width, tile, overlap, multiple",
    [(300, 200, 96, 24, 16), (130, 250, 64, 16, 16), (200, 200, 64, 16, 32), (97, 211, 40, 8, 8), (1, 400, 64, 8, 16)],
)
def test_fewest_computed_pixels_then_fewest_tiles(height, width, tile, overlap, multiple):
    plan = plan_tiles(height, width, tile, overlap, multiple)
    assert (plan.computed_pixels, plan.count) == brute_force_cost(height, width, tile, overlap, multiple)


def test_1024_at_tile_512_is_two_tiles_not_nine():
    plan = plan_tiles(1024, 1024, 512, 64, LITE_MULTIPLE)
    assert plan.count == 2 and sorted(plan.tile_shape) == [576, 1024]
    assert plan.computed_pixels / 1024**2 == pytest.approx(1.125)


@pytest.mark.parametrize("height, width", [(512, 512), (660, 550), (768, 768), (1, 5000), (64, 5000), (9, 9)])
def test_a_plane_within_the_tile_area_is_one_tile(height, width):
    assert tile_grid(height, width, 512, 32, LITE_MULTIPLE) == [(slice(0, height), slice(0, width))]


@pytest.mark.parametrize("growth", [1.0, TILE_GROWTH])
@pytest.mark.parametrize("height, width, tile, overlap, multiple", PLAN_CASES)
def test_tiles_stay_within_the_memory_bound(height, width, tile, overlap, multiple, growth):
    plan = plan_tiles(height, width, tile, overlap, multiple, growth)
    assert padded_area(plan) <= (growth * round_up(tile, multiple)) ** 2


def waste(height: int, width: int, split: int = 1) -> float:
    """Pixels the default model computes over the plane's pixels, at default settings, cut for ``split`` workers."""
    plan = plan_for_workers(height, width, DEFAULT_TILE, default_overlap(DEFAULT_TILE), LITE_MULTIPLE, split=split)
    return plan.computed_pixels / (height * width)


ODD_SHAPES = [(660, 550), (513, 4096), (4096, 513), (1025, 777), (3001, 2999), (577, 1153), (4096, 4096)]


@pytest.mark.parametrize("split", [1, 2, 4])
def test_pixels_computed_at_most_1_3x_from_512_to_4096(split):
    sizes = list(range(512, 4097, 97)) + [4096]
    shapes = list(itertools.product(sizes, sizes[::3])) + ODD_SHAPES
    worst = max(shapes, key=lambda shape: waste(*shape, split))
    assert waste(*worst, split) <= 1.3, worst


@pytest.mark.slow
@pytest.mark.parametrize("split", [1, 2])
def test_pixels_computed_at_most_1_3x_for_every_square_size(split):
    worst = max(range(512, 4097), key=lambda side: waste(side, side, split))
    assert waste(worst, worst, split) <= 1.3, worst


@pytest.mark.parametrize(
    "height, width, tiles",
    [
        (550, 660, 2),  # the sample plane: one tile of 550 x 660, or two of 550 x 384 (1.22x its pixels)
        (512, 512, 2),  # two of 512 x 320 (1.25x), not three of 512 x 192: each worker has one
        (768, 768, 2),
        (513, 513, 1),  # two would compute 1.40x its pixels: it stays one tile
        (256, 256, 1),  # 1.5x
        (1024, 1024, 2),  # two tiles already: as planned
    ],
)
def test_a_plane_of_fewer_tiles_than_workers_is_cut_for_them_when_that_wastes_little(height, width, tiles):
    overlap = default_overlap(DEFAULT_TILE)
    windows = tile_grid(height, width, DEFAULT_TILE, overlap, LITE_MULTIPLE, split=2)
    assert len(windows) == tiles and waste(height, width, split=2) <= SPLIT_MAX_WASTE
    covered = torch.zeros(height, width, dtype=torch.int32)
    for rows, columns in windows:
        covered[rows, columns] += 1
    assert (covered > 0).all() and (covered.sum() - height * width) >= overlap * min(height, width) * (tiles - 1)
    assert len(tile_grid(height, width, DEFAULT_TILE, overlap, LITE_MULTIPLE)) == (2 if height == 1024 else 1)
    assert tile_grid(height, width, 0, overlap, LITE_MULTIPLE, split=2) == [(slice(0, height), slice(0, width))]
    assert plan_tiles(9, 9, DEFAULT_TILE, overlap, LITE_MULTIPLE, min_tiles=4).count == 1  # too small to cut


def test_bad_plans_are_refused():
    with pytest.raises(ValueError, match="overlap < tile"):
        plan_tiles(100, 100, 32, 32)
    with pytest.raises(ValueError, match="growth >= 1"):
        plan_tiles(100, 100, 32, 8, growth=0.5)


def test_blend_window_is_positive_symmetric_and_flat_inside():
    weights = blend_window(96, 32)
    assert (weights > 0).all()
    assert torch.allclose(weights, weights.flip(0))
    assert (weights[32:64] == 1).all()
    assert weights[0] < 0.01


def _pattern(height: int, width: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(float(height)), torch.arange(float(width)), indexing="ij")
    noise = torch.rand(height, width, generator=torch.Generator().manual_seed(0))
    return (0.5 + 0.25 * torch.sin(xx / 7) * torch.cos(yy / 11) + 0.1 * noise)[None, None]


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(float(b.max() - b.min()) ** 2 / float((a - b).square().mean()))


def run_tiled(network, image, **options) -> torch.Tensor:
    """The engine's tiled forward pass (:func:`iter_tiled_forward`, as the deblurrer drives it), run to its end."""
    return run_to_end(iter_tiled_forward(network, image, **options))


def test_no_seams_with_a_local_network():
    """A network with a small receptive field gives the whole-plane result up to blending noise."""
    torch.manual_seed(0)
    local = torch.nn.Sequential(*[torch.nn.Conv2d(1, 1, 3, padding=1) for _ in range(3)]).eval()
    image = _pattern(300, 400)
    with torch.no_grad():
        whole, tiled = local(image), run_tiled(local, image, tile=96, overlap=32)
    assert _psnr(tiled, whole) > 60
    # and without blending (overlap 0) the tile borders show
    with torch.no_grad():
        hard = run_tiled(local, image, tile=96, overlap=0)
    assert _psnr(hard, whole) < _psnr(tiled, whole) - 10


@pytest.mark.parametrize(
    "height, width, tile, overlap, multiple", [(300, 400, 96, 32, 16), (150, 170, 64, 16, 64), (1, 1000, 64, 8, 16)]
)
def test_blend_weights_of_overlapping_tiles_sum_to_one(height, width, tile, overlap, multiple):
    """The identity network comes back unchanged however the tiles overlap: the weights are normalised."""
    image = _pattern(height, width)
    assert len(tile_grid(height, width, tile, overlap, multiple)) > 1
    out = run_tiled(lambda x: x, image, tile=tile, overlap=overlap, multiple=multiple)
    torch.testing.assert_close(out, image, atol=1e-6, rtol=0)


def test_tiled_output_agrees_with_the_whole_plane_on_a_random_mpt():
    """End to end on a real (random) MPT with the engine's planner: enlarged, rounded tiles still blend closely.

    A random network is a worst case (its global channel attention is arbitrary); the default
    model's figure (docs/inference.md) is far higher.
    """
    torch.manual_seed(0)
    model = MPT(tiny_config()).eval()
    image = _pattern(256, 352)
    multiple = model.config.size_multiple
    assert len(tile_grid(256, 352, 192, 32, multiple)) == 2  # two tiles of 256 x 192 (the old planner: four of 192)
    with torch.no_grad():
        whole = model(image)
        tiled = run_tiled(model, image, tile=192, overlap=32, multiple=multiple, batch=2)
    assert _psnr(tiled, whole) > 38  # 42.3 dB (the old planner's four tiles: 41.9 dB)


def test_one_tile_is_the_plain_forward():
    model = MPT(tiny_config()).eval()
    image = _pattern(100, 120)
    with torch.no_grad():
        assert torch.equal(run_tiled(model, image, tile=256), model(image))


def test_progress_counts_tiles_and_can_cancel():
    model = MPT(tiny_config()).eval()
    image = _pattern(150, 150)
    seen = []
    with torch.no_grad():
        out = run_to_end(iter_tiled_forward(model, image, tile=64, overlap=16), seen.append)
    total = len(tile_grid(150, 150, 64, 16))
    assert out.shape == image.shape and total > 1
    assert seen == [(i + 1, total) for i in range(total)]

    class Cancelled(Exception):
        pass

    def cancel_after_two(counts):
        if counts[0] == 2:
            raise Cancelled

    steps = iter_tiled_forward(model, image, tile=64, overlap=16)
    with torch.no_grad(), pytest.raises(Cancelled):
        run_to_end(steps, cancel_after_two)
    assert steps.gi_frame is None  # closed between two tiles: no more forward passes


def test_bad_tile_settings_are_refused():
    model = MPT(tiny_config()).eval()
    with pytest.raises(ValueError, match="overlap < tile"):
        run_tiled(model, _pattern(64, 64), tile=32, overlap=32)

"""Overlapping tiles with smooth blending."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_config
from napari_mpt_deblur import MPT
from napari_mpt_deblur.tiling import axis_starts, blend_window, tiled_forward


@pytest.mark.parametrize(
    "length, tile, overlap", [(400, 96, 32), (256, 256, 32), (100, 256, 32), (1000, 256, 0), (97, 64, 63)]
)
def test_tiles_cover_the_axis_with_the_overlap(length, tile, overlap):
    starts = axis_starts(length, tile, overlap)
    size = min(tile, length)
    assert starts[0] == 0 and starts[-1] + size == length
    covered = torch.zeros(length, dtype=torch.bool)
    for start in starts:
        covered[start : start + size] = True
    assert covered.all()
    for a, b in zip(starts, starts[1:]):
        assert a + size - b >= overlap  # neighbours share at least `overlap` pixels


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


def test_no_seams_with_a_local_network():
    """A network with a small receptive field gives the whole-plane result up to blending noise."""
    torch.manual_seed(0)
    local = torch.nn.Sequential(*[torch.nn.Conv2d(1, 1, 3, padding=1) for _ in range(3)]).eval()
    image = _pattern(300, 400)
    with torch.no_grad():
        whole, tiled = local(image), tiled_forward(local, image, tile=96, overlap=32)
    assert _psnr(tiled, whole) > 60
    # and without blending (overlap 0) the tile borders show
    with torch.no_grad():
        hard = tiled_forward(local, image, tile=96, overlap=0)
    assert _psnr(hard, whole) < _psnr(tiled, whole) - 10


def test_one_tile_is_the_plain_forward():
    model = MPT(tiny_config()).eval()
    image = _pattern(100, 120)
    with torch.no_grad():
        assert torch.equal(tiled_forward(model, image, tile=256), model(image))


def test_progress_counts_tiles_and_can_cancel():
    model = MPT(tiny_config()).eval()
    image = _pattern(150, 150)
    seen = []
    with torch.no_grad():
        out = tiled_forward(model, image, tile=64, overlap=16, progress=lambda d, t: seen.append((d, t)))
    assert out.shape == image.shape
    assert seen == [(i + 1, 9) for i in range(9)]

    class Cancelled(Exception):
        pass

    def cancel_after_two(done, total):
        if done == 2:
            raise Cancelled

    with torch.no_grad(), pytest.raises(Cancelled):
        tiled_forward(model, image, tile=64, overlap=16, progress=cancel_after_two)


def test_bad_tile_settings_are_refused():
    model = MPT(tiny_config()).eval()
    with pytest.raises(ValueError, match="overlap < tile"):
        tiled_forward(model, _pattern(64, 64), tile=32, overlap=32)

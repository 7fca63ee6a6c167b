"""Plane-by-plane deblurring of arrays and TIFF files (the interim `mpt-deblur deblur`)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from conftest import tiny_config
from napari_mpt_deblur import MPT, save_model
from napari_mpt_deblur.cli import main
from napari_mpt_deblur.inference import InputError, deblur_array


@pytest.fixture
def model() -> MPT:
    torch.manual_seed(0)
    return MPT(tiny_config()).eval()


@pytest.fixture
def model_file(tmp_path, model):
    return save_model(model, tmp_path / "tiny.safetensors")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_stack_keeps_shape_dtype_and_range(model, dtype):
    rng = np.random.default_rng(0)
    top = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1.0
    stack = (rng.random((2, 3, 40, 50)) * top).astype(dtype)
    out = deblur_array(model, stack)
    assert out.shape == stack.shape and out.dtype == stack.dtype
    if np.issubdtype(dtype, np.integer):
        assert out.min() >= 0 and out.max() <= top  # clipped, no wrap-around
    # planes are independent: the second plane alone gives the same result
    np.testing.assert_array_equal(deblur_array(model, stack[1, 2]), out[1, 2])


def test_bad_arrays_are_refused(model):
    with pytest.raises(InputError, match="NaN"):
        deblur_array(model, np.full((8, 8), np.nan, dtype=np.float32))
    with pytest.raises(InputError, match="empty"):
        deblur_array(model, np.zeros((0, 8), dtype=np.uint16))
    with pytest.raises(InputError, match="at least 2"):
        deblur_array(model, np.zeros(8, dtype=np.uint16))


def test_cli_deblurs_a_tiff_and_keeps_axes(tmp_path, model_file):
    source = tmp_path / "cells.tif"
    stack = (np.random.default_rng(1).random((3, 70, 90)) * 4000).astype(np.uint16)
    tifffile.imwrite(source, stack, photometric="minisblack", metadata={"axes": "ZYX"}, resolution=(2.0, 2.0))
    before = source.read_bytes()
    target = tmp_path / "out" / "cells-deblurred.tif"
    assert main(["deblur", str(source), "-o", str(target), "--model", str(model_file), "--quiet"]) == 0
    with tifffile.TiffFile(target) as tif:
        assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.MINISBLACK  # 3 planes, not one RGB image
        assert len(tif.pages) == 3
        assert tif.series[0].axes == "ZYX"
        assert tif.series[0].shape == stack.shape and tif.series[0].dtype == np.uint16
        assert tif.pages[0].tags["XResolution"].value == (2, 1)
    assert source.read_bytes() == before  # the input is never modified
    assert not list(target.parent.glob("*.part"))


def test_cli_deblur_errors(tmp_path, model_file, capsys):
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((32, 32, 3), np.uint8), photometric="rgb")
    assert main(["deblur", str(rgb), "-o", str(tmp_path / "o.tif"), "--model", str(model_file)]) == 2
    assert "3-channel model" in capsys.readouterr().err

    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00 not really a tiff")
    assert main(["deblur", str(broken), "-o", str(tmp_path / "o.tif"), "--model", str(model_file)]) == 2
    assert "cannot read as TIFF" in capsys.readouterr().err
    assert not (tmp_path / "o.tif").exists()

    assert main(["deblur", str(broken), "-o", str(tmp_path / "o.tif")]) == 2
    assert "no trained default model" in capsys.readouterr().err


def test_cli_tiles_large_planes_and_checks_tile_settings(tmp_path, model_file, capsys):
    source = tmp_path / "plane.tif"
    tifffile.imwrite(source, (np.random.default_rng(2).random((150, 170)) * 255).astype(np.uint8))
    target = tmp_path / "tiled.tif"
    args = ["deblur", str(source), "-o", str(target), "--model", str(model_file), "--quiet"]
    assert main([*args, "--tile", "64", "--overlap", "16"]) == 0
    assert tifffile.imread(target).shape == (150, 170)

    assert main([*args, "--tile", "4", "--overwrite"]) == 2
    assert "--tile must be" in capsys.readouterr().err
    assert main([*args, "--tile", "64", "--overlap", "64", "--overwrite"]) == 2
    assert "--overlap must be" in capsys.readouterr().err


def test_tiled_and_whole_plane_agree_exactly_for_one_tile(model):
    plane = (np.random.default_rng(3).random((90, 110)) * 1000).astype(np.uint16)
    np.testing.assert_array_equal(deblur_array(model, plane, tile=256), deblur_array(model, plane, tile=0))


def test_fixed_normalization_maps_low_and_high_to_0_and_1(tmp_path):
    """An identity network shows the intensity mapping and its inverse are exact."""
    from napari_mpt_deblur.config import IntensityNormalization, ModelCard
    from napari_mpt_deblur.inference import normalization_range

    fixed = IntensityNormalization(mode="fixed", low=0.0, high=255.0)
    plane = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert normalization_range(plane, fixed) == (0.0, 255.0)

    model = MPT(tiny_config()).eval()
    torch.nn.init.zeros_(model.head.weight)  # output = input (global residual)
    model.card = ModelCard(model.config, fixed)
    np.testing.assert_array_equal(deblur_array(model, plane), plane)
    with pytest.raises(ValueError, match="C-contiguous"):
        from napari_mpt_deblur.inference import iter_deblur

        next(iter_deblur(model, plane, np.empty((16, 16), np.uint8)[:, ::2]))

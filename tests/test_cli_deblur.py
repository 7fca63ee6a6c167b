"""`mpt-deblur deblur`: files and folders in and out, and one clear line for every bad input."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from helpers import tiny_config
from napari_mpt_deblur import MPT, save_model
from napari_mpt_deblur.cli import main
from napari_mpt_deblur.images import open_image


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(MPT(tiny_config()).eval(), tmp_path_factory.mktemp("models") / "tiny.safetensors")


@pytest.fixture(scope="module")
def rgb_model_file(tmp_path_factory):
    torch.manual_seed(0)
    model = MPT(tiny_config(in_channels=3, out_channels=3)).eval()
    return save_model(model, tmp_path_factory.mktemp("models") / "tiny-rgb.safetensors")


def write_stack(path, shape=(3, 70, 90), axes="ZYX", seed=1):
    stack = (np.random.default_rng(seed).random(shape) * 4000).astype(np.uint16)
    tifffile.imwrite(path, stack, photometric="minisblack", metadata={"axes": axes}, resolution=(2.0, 2.0))
    return stack


@pytest.mark.slow
def test_one_file_to_tiff_and_to_ome_zarr(tmp_path, model_file, capsys):
    source = tmp_path / "cells.tif"
    write_stack(source)
    before = source.read_bytes()
    target = tmp_path / "out" / "cells-deblurred.tif"
    assert main(["deblur", str(source), "-o", str(target), "--model", str(model_file), "--tile", "64"]) == 0
    assert f"wrote {target}" in capsys.readouterr().out
    with tifffile.TiffFile(target) as tif:
        assert tif.series[0].axes == "ZYX" and len(tif.pages) == 3
        assert tif.pages[0].tags["XResolution"].value == (2, 1)
    assert source.read_bytes() == before

    zarr_target = tmp_path / "cells.ome.zarr"
    args = ["deblur", str(source), "-o", str(zarr_target), "--model", str(model_file), "--quiet", "--per", "stack"]
    assert main(args) == 0
    assert open_image(zarr_target).shape == (3, 70, 90)


@pytest.mark.slow
def test_folder_in_folder_out_and_axes_override(tmp_path, model_file):
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_stack(inputs / "a.tif")
    write_stack(inputs / "b.tiff", shape=(2, 3, 40, 50), axes="TZYX")
    (inputs / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert main(["deblur", str(inputs), "-o", str(out), "--model", str(model_file), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.tif", "b.tiff"]
    assert tifffile.imread(out / "b.tiff").shape == (2, 3, 40, 50)

    # 'ZYX' read as 'YXS'-free 'CYX': the same planes, now labelled as channels
    target = tmp_path / "as-channels.tif"
    args = ["deblur", str(inputs / "a.tif"), "-o", str(target), "--model", str(model_file), "--quiet"]
    assert main([*args, "--axes", "CYX"]) == 0
    assert tifffile.TiffFile(target).series[0].axes == "CYX"


def test_rgb_with_a_three_channel_model(tmp_path, rgb_model_file):
    source = tmp_path / "he.tif"
    tifffile.imwrite(source, (np.random.default_rng(3).random((60, 70, 3)) * 255).astype(np.uint8), photometric="rgb")
    target = tmp_path / "he-out.tif"
    assert main(["deblur", str(source), "-o", str(target), "--model", str(rgb_model_file), "--quiet"]) == 0
    with tifffile.TiffFile(target) as tif:
        assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.RGB and tif.series[0].shape == (60, 70, 3)


def page_layout(path) -> tuple:
    """How a TIFF stores its pixels: the series' shape and dtype, pages, and each page's shape and sample layout."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        layout = (page.shape, page.photometric, page.planarconfig, tuple(page.extrasamples))
        return tif.series[0].shape, tif.series[0].dtype, len(tif.pages), layout


# Every layout plain tifffile.imwrite(path, array) gives a uint16 array: 3 or 4 x H x W are planar RGB(A)
# (one page, samples as separate planes), H x W x 3 or 4 interleaved RGB(A), others grey pages.
DEFAULT_LAYOUTS = {
    "planar RGB": (3, 36, 44),
    "planar RGBA": (4, 36, 44),
    "interleaved RGB": (36, 44, 3),
    "interleaved RGBA": (36, 44, 4),
    "2-D": (36, 44),
    "grey pages": (5, 36, 44),
    "pages of planar RGB": (2, 3, 36, 44),
    "pages of interleaved RGB": (2, 36, 44, 3),
}


@pytest.mark.parametrize("shape", DEFAULT_LAYOUTS.values(), ids=DEFAULT_LAYOUTS.keys())
@pytest.mark.filterwarnings("ignore:.*stored as RGB with separate component planes")
def test_output_keeps_the_shape_and_page_layout_tifffile_wrote_by_default(tmp_path, model_file, shape):
    source = tmp_path / "plain.tif"
    tifffile.imwrite(source, (np.random.default_rng(5).random(shape) * 4000).astype(np.uint16))
    for name in ("out.tif", "out.ome.tif"):
        target = tmp_path / name
        assert main(["deblur", str(source), "-o", str(target), "--model", str(model_file), "--quiet"]) == 0
        assert tifffile.imread(target).shape == shape, name
        assert page_layout(target) == page_layout(source), name


@pytest.mark.filterwarnings("ignore:.*stored as RGB with separate component planes")
def test_planar_rgb_with_a_three_channel_model_stays_planar(tmp_path, rgb_model_file):
    source = tmp_path / "planar.tif"
    tifffile.imwrite(source, (np.random.default_rng(6).random((3, 40, 48)) * 4000).astype(np.uint16))
    target = tmp_path / "planar-out.tif"
    assert main(["deblur", str(source), "-o", str(target), "--model", str(rgb_model_file), "--quiet"]) == 0
    assert page_layout(target) == page_layout(source)
    assert tifffile.TiffFile(target).pages.first.planarconfig == tifffile.PLANARCONFIG.SEPARATE


def test_a_zarr_store_is_zarr_by_its_content_as_input_and_as_output(tmp_path, model_file, capsys):
    from napari_mpt_deblur.images import write_ome_zarr

    stack = write_stack(tmp_path / "seed.tif", shape=(2, 40, 48))
    plate = tmp_path / "plate"  # an OME-Zarr folder named without .zarr, as other tools write them
    write_ome_zarr(plate, [((slice(None),) * 3, stack)], stack.shape, stack.dtype, "ZYX")
    model = ["--model", str(model_file), "--quiet"]
    for typed in (f"{plate}/", str(plate)):
        target = tmp_path / "out.zarr"
        assert main(["deblur", typed, "-o", str(target), *model, "--overwrite"]) == 0, capsys.readouterr().err
        assert open_image(target).shape == stack.shape

    # an existing store named without .zarr is an output Zarr store too: refused without --overwrite, else replaced
    assert "--overwrite" in run_error(capsys, ["deblur", str(tmp_path / "seed.tif"), "-o", str(plate), *model])
    assert main(["deblur", str(tmp_path / "seed.tif"), "-o", str(plate), *model, "--overwrite"]) == 0
    replaced = open_image(plate)
    assert replaced.shape == stack.shape and not np.array_equal(replaced.data.compute(), stack)


def run_error(capsys, args):
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    return err


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*zero-size array")
def test_every_bad_input_is_one_clear_line(tmp_path, model_file, rgb_model_file, capsys):
    good = tmp_path / "good.tif"
    write_stack(good)
    out = str(tmp_path / "o.tif")
    model = ["--model", str(model_file)]

    assert "unknown axes 'W'" in run_error(capsys, ["deblur", str(good), "-o", out, *model, "--axes", "ZYW"])
    plain = tmp_path / "plain.tif"
    write_stack(plain, shape=(40, 50), axes="YX")
    assert "3-channel model needs RGB" in run_error(
        capsys, ["deblur", str(plain), "-o", out, "--model", str(rgb_model_file)]
    )
    nan = tmp_path / "nan.tif"
    tifffile.imwrite(nan, np.full((2, 40, 40), np.nan, np.float32))
    assert "NaN" in run_error(capsys, ["deblur", str(nan), "-o", out, *model])
    empty = tmp_path / "empty.tif"
    tifffile.imwrite(empty, np.zeros((0, 10), np.uint16))
    assert "empty" in run_error(capsys, ["deblur", str(empty), "-o", out, *model])
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00 not really a tiff")
    assert "cannot read as TIFF" in run_error(capsys, ["deblur", str(broken), "-o", out, *model])
    assert "no such file" in run_error(capsys, ["deblur", str(tmp_path / "missing.tif"), "-o", out, *model])
    assert not (tmp_path / "o.tif").exists()

    existing = tmp_path / "existing.tif"
    existing.write_bytes(b"keep me")
    assert "--overwrite" in run_error(capsys, ["deblur", str(good), "-o", str(existing), *model])
    assert existing.read_bytes() == b"keep me"
    assert "replace the input" in run_error(capsys, ["deblur", str(good), "-o", str(good), *model, "--overwrite"])
    assert "unknown output format" in run_error(capsys, ["deblur", str(good), "-o", str(tmp_path / "o.png"), *model])
    assert "tile must be" in run_error(capsys, ["deblur", str(good), "-o", out, *model, "--tile", "4"])
    assert "overlap" in run_error(capsys, ["deblur", str(good), "-o", out, *model, "--tile", "64", "--overlap", "40"])
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in run_error(capsys, ["deblur", str(good), "-o", out, *model, "--device", "cuda"])
    assert "not a bundled model name (bundled: default)" in run_error(
        capsys, ["deblur", str(good), "-o", out, "--model", "defualt"]
    )
    assert "cannot connect" in run_error(
        capsys, ["deblur", str(good), "-o", out, *model, "--scheduler", "tcp://127.0.0.1:9"]
    )
    assert not (tmp_path / "o.tif").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_zyx_imagej_stack_keeps_its_z_spacing_through_every_output(tmp_path, model_file):
    source = tmp_path / "stack.tif"
    stack = (np.random.default_rng(4).random((3, 40, 50)) * 4000).astype(np.uint16)
    tifffile.imwrite(
        source, stack, imagej=True, resolution=(5.0, 4.0), metadata={"axes": "ZYX", "spacing": 0.75, "unit": "micron"}
    )
    model = ["--model", str(model_file), "--quiet"]
    for name in ("out.tif", "out.ome.tif", "out.ome.zarr"):
        assert main(["deblur", str(source), "-o", str(tmp_path / name), *model]) == 0
        image = open_image(tmp_path / name)
        assert image.axes == "ZYX" and image.shape == stack.shape, name
        assert image.z_spacing == pytest.approx(0.75), name
        assert image.pixel_size == pytest.approx((0.25, 0.2)), name
        assert image.unit in ("micron", "\u00b5m", "micrometer"), name
    with tifffile.TiffFile(tmp_path / "out.tif") as tif:  # still an ImageJ hyperstack Fiji calibrates
        assert tif.is_imagej and tif.imagej_metadata["spacing"] == 0.75 and tif.imagej_metadata["unit"] == "micron"
        assert tif.pages.first.tags["ResolutionUnit"].value == tifffile.RESUNIT.NONE

"""OME-Zarr through ome-zarr-py: multiscale pyramids for large outputs, written plane by plane in flat memory,
read back as napari multiscale layers; and stores that ome-zarr-py itself wrote read by the package."""

from __future__ import annotations

import json
import tracemalloc
import warnings

import dask.array as da
import numpy as np
import pytest
import tifffile
import torch
import zarr

from helpers import tiny_config
from napari_mpt_deblur import MPT
from napari_mpt_deblur.config import DeblurSettings
from napari_mpt_deblur.images import (
    PYRAMID_ABOVE,
    Image,
    half_plane,
    open_image,
    pyramid_shapes,
    write_ome_zarr,
)
from napari_mpt_deblur.inference import Cancelled, deblur_array, deblur_file
from napari_mpt_deblur.plugin.io import read_images

PLUGIN = "napari-mpt-deblur"


def planes(stack: np.ndarray):
    """One block per plane, as the engine streams them."""
    for z in range(stack.shape[0]):
        yield (slice(z, z + 1), slice(None), slice(None)), stack[z : z + 1]


def mean_2x2(plane: np.ndarray) -> np.ndarray:
    """The 2 x 2 block means of a (Y, X) plane, written out the long way (odd sides repeat their edge)."""
    height, width = plane.shape
    out = np.empty(((height + 1) // 2, (width + 1) // 2))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            rows = [min(2 * i, height - 1), min(2 * i + 1, height - 1)]
            cols = [min(2 * j, width - 1), min(2 * j + 1, width - 1)]
            out[i, j] = plane[np.ix_(rows, cols)].astype(float).mean()
    return out


def test_pyramid_levels_halve_the_plane_until_it_is_small():
    assert pyramid_shapes(660, 550) == [(660, 550)]
    assert pyramid_shapes(2048, 2048) == [(2048, 2048)]  # not above the threshold: one level
    assert pyramid_shapes(2049, 100) == [(2049, 100), (1025, 50), (513, 25)]
    assert pyramid_shapes(4096, 3000) == [(4096, 3000), (2048, 1500), (1024, 750)]
    assert PYRAMID_ABOVE == 2048

    rng = np.random.default_rng(0)
    for shape, dtype in [((5, 7), np.uint16), ((6, 9), np.float32), ((1, 3), np.uint8), ((4, 4), np.int16)]:
        plane = (rng.random(shape) * 200 - (50 if dtype == np.int16 else 0)).astype(dtype)
        half = half_plane(plane)
        assert half.dtype == dtype
        expected = mean_2x2(plane)
        if np.dtype(dtype).kind in "iu":
            np.testing.assert_array_equal(half, np.rint(expected).astype(dtype))
        else:
            np.testing.assert_allclose(half, expected, rtol=1e-6)


def test_a_wide_stack_is_written_as_a_valid_ngff_pyramid(tmp_path):
    stack = (np.random.default_rng(1).random((3, 40, 2101)) * 4000).astype(np.uint16)
    like = Image(da.from_array(stack), "ZYX", "wide", pixel_size=(0.25, 0.2), unit="micron", z_spacing=0.75)
    store = write_ome_zarr(tmp_path / "wide.ome.zarr", planes(stack), stack.shape, stack.dtype, "ZYX", like)

    # the metadata, as another NGFF reader finds them: ome-zarr-py's own reader validates axes and transforms
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    [node, *_] = Reader(parse_url(str(store)))()
    assert [level.shape for level in node.data] == [(3, 40, 2101), (3, 20, 1051), (3, 10, 526)]
    assert node.metadata["axes"] == [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
    assert scales == [[0.75, 0.25, 0.2], [0.75, 0.5, 0.4], [0.75, 1.0, 0.8]]
    group = zarr.open_group(str(store), mode="r")
    assert group.attrs["multiscales"][0]["version"] == "0.4" and group.attrs["multiscales"][0]["name"] == "wide"
    zarray = json.loads((store / "0" / ".zarray").read_text())
    assert zarray["dimension_separator"] == "/" and zarray["chunks"] == [1, 40, 1024]  # NGFF's keys; tiled planes

    # level 0 is the data; each level is the 2 x 2 mean of the one before
    np.testing.assert_array_equal(np.asarray(node.data[0]), stack)
    level1 = np.asarray(node.data[1])
    np.testing.assert_array_equal(level1[2], np.rint(mean_2x2(stack[2])).astype(np.uint16))
    np.testing.assert_array_equal(np.asarray(node.data[2])[0], half_plane(level1[0]))

    image = open_image(store)
    assert image.axes == "ZYX" and image.shape == stack.shape and image.name == "wide"
    assert (image.pixel_size, image.unit, image.z_spacing) == ((0.25, 0.2), "micrometer", 0.75)
    assert [level.shape for level in image.pyramid] == [(3, 20, 1051), (3, 10, 526)]
    assert image.data.chunksize == (1, 40, 2101)  # one plane per chunk for the engine

    # small outputs stay one level
    small = write_ome_zarr(tmp_path / "small.zarr", planes(stack[:, :, :600]), (3, 40, 600), stack.dtype, "ZYX")
    assert list(zarr.open_group(str(small), mode="r").array_keys()) == ["0"] and open_image(small).pyramid == ()


def test_an_rgb_pyramid_keeps_its_colours_apart(tmp_path):
    rgb = (np.random.default_rng(2).random((24, 2050, 3)) * 255).astype(np.uint8)
    store = write_ome_zarr(tmp_path / "rgb.zarr", [((slice(None),) * 3, rgb)], rgb.shape, rgb.dtype, "YXS")
    image = open_image(store)
    assert image.axes == "CYX" and [level.shape for level in image.pyramid] == [(3, 12, 1025), (3, 6, 513)]
    for colour in range(3):
        np.testing.assert_array_equal(image.pyramid[0][colour].compute(), half_plane(rgb[:, :, colour]))


@pytest.mark.slow
def test_deblurring_into_ome_zarr_writes_the_pyramid(tmp_path):
    torch.manual_seed(0)
    model = MPT(tiny_config()).eval()
    stack = (np.random.default_rng(3).random((2, 64, 2112)) * 4000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "wide.tif", stack, photometric="minisblack", metadata={"axes": "ZYX"})
    target = tmp_path / "wide.ome.zarr"
    settings = DeblurSettings(tile=256, device="cpu")
    deblur_file(model, tmp_path / "wide.tif", target, settings=settings)

    image = open_image(target)
    expected = deblur_array(model, stack, settings=settings)
    np.testing.assert_array_equal(image.data.compute(), expected)
    assert [level.shape for level in image.pyramid] == [(2, 32, 1056), (2, 16, 528)]
    np.testing.assert_array_equal(image.pyramid[0].compute(), half_plane(expected))
    np.testing.assert_array_equal(image.pyramid[1].compute(), half_plane(half_plane(expected)))

    # cancelled half-way: nothing under the name, no partial folder, the previous result untouched
    def cancel_after_one_plane(event):
        if event.planes_done == 1:
            raise Cancelled

    with pytest.raises(Cancelled):
        deblur_file(model, tmp_path / "wide.tif", target, settings=settings, progress=cancel_after_one_plane)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide.ome.zarr", "wide.tif"]
    np.testing.assert_array_equal(open_image(target).pyramid[1].compute(), half_plane(half_plane(expected)))


def peak_memory_writing(target, depth: int, side: int) -> tuple[int, list[int]]:
    """Peak traced memory while a pyramid of ``depth`` random planes is written from a generator."""
    made = []

    def lazily_made_planes():
        rng = np.random.default_rng(4)
        for z in range(depth):
            made.append(z)
            yield (slice(z, z + 1), slice(None), slice(None)), rng.integers(0, 4000, (1, side, side), np.uint16)

    tracemalloc.start()
    try:
        write_ome_zarr(target, lazily_made_planes(), (depth, side, side), np.uint16, "ZYX")
        return tracemalloc.get_traced_memory()[1], made
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_a_pyramid_is_written_plane_by_plane_in_flat_memory(tmp_path):
    side = 2200  # a pyramid of 3 levels; 9.2 MiB a plane
    plane_bytes = side * side * 2
    shallow, _ = peak_memory_writing(tmp_path / "shallow.zarr", 3, side)
    deep, made = peak_memory_writing(tmp_path / "deep.zarr", 15, side)
    assert made == list(range(15))
    # five times the planes, the same memory: a few planes' worth, never the stack's
    assert deep < 1.25 * shallow and deep < 4 * plane_bytes, (shallow / plane_bytes, deep / plane_bytes)
    assert [level.shape for level in open_image(tmp_path / "deep.zarr").pyramid] == [(15, 1100, 1100), (15, 550, 550)]


def test_the_reader_opens_a_pyramid_as_a_napari_multiscale_layer(make_napari_viewer, tmp_path):
    stack = (np.random.default_rng(5).random((2, 30, 2100)) * 60000).astype(np.uint16)
    like = Image(da.from_array(stack), "ZYX", "cells", pixel_size=(0.3, 0.3), unit="um", z_spacing=1.5)
    store = write_ome_zarr(tmp_path / "cells.ome.zarr", planes(stack), stack.shape, stack.dtype, "ZYX", like)

    [(data, meta, _)] = read_images(store)
    assert meta["multiscale"] is True and [level.shape for level in data] == [(2, 30, 2100), (2, 15, 1050), (2, 8, 525)]
    assert all(isinstance(level, da.Array) for level in data)  # nothing read: napari reads what it shows

    viewer = make_napari_viewer()
    [layer] = viewer.open(str(store), plugin=PLUGIN)
    assert layer.multiscale and len(layer.data) == 3
    assert layer.data[0].shape == stack.shape and layer.data[2].shape == (2, 8, 525)
    np.testing.assert_allclose(layer.scale, (1.5, 0.3, 0.3))
    assert tuple(layer.axis_labels) == ("z", "y", "x") and str(layer.units[-1]) == "micrometer"
    np.testing.assert_array_equal(np.asarray(layer.data[0][1]), stack[1])

    # without a pyramid: one array, as before
    small = write_ome_zarr(tmp_path / "small.zarr", planes(stack[:, :, :100]), (2, 30, 100), stack.dtype, "ZYX")
    [layer] = viewer.open(str(small), plugin=PLUGIN)
    assert not layer.multiscale and layer.data.shape == (2, 30, 100)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_a_pyramid_written_by_ome_zarr_py_itself_is_read(tmp_path, version):
    from ome_zarr.format import format_from_version

    with warnings.catch_warnings():  # its module makes a deprecated Scaler on import (ome-zarr >= 0.14)
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr.writer import write_image

    stack = (np.random.default_rng(6).random((2, 64, 96)) * 1000).astype(np.uint16)
    fmt = format_from_version(version)
    group = zarr.open_group(str(tmp_path / "theirs.zarr"), mode="w", zarr_format=fmt.zarr_format)
    write_image(
        stack,
        group,
        axes="zyx",
        scale_factors=(2, 4),
        fmt=fmt,
        scale={"z": 2.0, "y": 0.5, "x": 0.5},
        axes_units={"z": "micrometer", "y": "micrometer", "x": "micrometer"},
    )
    image = open_image(tmp_path / "theirs.zarr")
    assert image.axes == "ZYX" and [level.shape for level in image.pyramid] == [(2, 32, 48), (2, 16, 24)]
    assert (image.pixel_size, image.unit, image.z_spacing) == ((0.5, 0.5), "micrometer", 2.0)
    np.testing.assert_array_equal(image.data.compute(), stack)

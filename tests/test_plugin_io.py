"""The napari plugin's reader, writer and sample data: real files, npe2's discovery and a real napari viewer."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr

from napari_mpt_deblur import images
from napari_mpt_deblur.data.focus import focus_score
from napari_mpt_deblur.images import Image, ImageError
from napari_mpt_deblur.plugin import io as plugin_io
from napari_mpt_deblur.plugin.io import SaveError, get_reader, read_images, write_tiff_layer
from napari_mpt_deblur.plugin.samples import DEFOCUS_UM, defocused_cell_stack

PLUGIN = "napari-mpt-deblur"


# --- helpers -----------------------------------------------------------------------------------------------------


def write_imagej_zyx(path: Path, seed: int = 0) -> np.ndarray:
    """An ImageJ hyperstack: Z spacing 0.5 micron, pixels 0.25 (Y) x 0.2 (X) micron."""
    stack = (np.random.default_rng(seed).random((4, 30, 40)) * 4000).astype(np.uint16)
    tifffile.imwrite(
        path, stack, imagej=True, resolution=(5.0, 4.0), metadata={"axes": "ZYX", "spacing": 0.5, "unit": "micron"}
    )
    return stack


def write_ome_czyx(path: Path) -> np.ndarray:
    """An OME-TIFF with two channels: Z 0.6, Y/X 0.3 micrometres."""
    stack = (np.random.default_rng(1).random((2, 3, 20, 24)) * 1000).astype(np.uint16)
    sizes = {f"PhysicalSize{a}": v for a, v in (("X", 0.3), ("Y", 0.3), ("Z", 0.6))}
    tifffile.imwrite(path, stack, ome=True, metadata={"axes": "CZYX", **sizes})
    return stack


def whole(array: np.ndarray) -> list[images.Block]:
    """The whole array as one block, for the package's writers."""
    return [((slice(None),) * array.ndim, array)]


def tiff_flavour(path: Path) -> str:
    with tifffile.TiffFile(path) as tif:
        return "imagej" if tif.is_imagej else "ome" if tif.is_ome else "shaped" if tif.is_shaped else "plain"


def coarse_focus(plane: np.ndarray, factor: int = 8) -> float:
    """focus_score of the plane binned factor x factor: at the scale of the defocus blur (a few micrometres).

    At single pixels the Laplacian of the smooth cell image is dominated by camera noise (and 8-bit steps).
    """
    h, w = (plane.shape[0] // factor) * factor, (plane.shape[1] // factor) * factor
    binned = plane[:h, :w].astype(np.float64).reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))
    return focus_score(binned)


def units_of(meta: dict[str, Any]) -> tuple[str, ...] | None:
    return tuple(str(u) for u in meta["units"]) if "units" in meta else None


@pytest.fixture
def discovered_npe2():
    """npe2's global plugin manager, as napari fills it: the installed plugins discovered."""
    from npe2 import PluginManager

    manager = PluginManager.instance()
    manager.discover()
    return manager


# --- reader ------------------------------------------------------------------------------------------------------


def test_get_reader_refuses_what_it_cannot_read(tmp_path):
    tif = tmp_path / "cells.tif"
    write_imagej_zyx(tif)
    upper = tmp_path / "CELLS.TIFF"
    upper.write_bytes(tif.read_bytes())
    png = tmp_path / "cells.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "notes.txt").write_text("hello")
    folder = tmp_path / "plain-folder"
    folder.mkdir()
    (folder / "inside.tif").write_bytes(tif.read_bytes())
    store = images.write_ome_zarr(tmp_path / "cells.zarr", whole(np.zeros((8, 8), np.uint8)), (8, 8), np.uint8, "YX")
    unnamed = tmp_path / "store-without-suffix"
    os.replace(store, unnamed)
    images.write_ome_zarr(store, whole(np.zeros((8, 8), np.uint8)), (8, 8), np.uint8, "YX")

    for path in [png, tmp_path / "notes.txt", folder, "https://example.org/cells.tif", [tif, png], []]:
        assert get_reader(path) is None, path
    for path in [tif, str(upper), store, unnamed, [tif, str(upper)]]:
        assert callable(get_reader(path)), path


def test_reads_2d_tiff_with_its_resolution(tmp_path):
    plane = (np.random.default_rng(2).random((30, 40)) * 60000).astype(np.uint16)
    path = tmp_path / "plane.tif"
    tifffile.imwrite(path, plane, resolution=(1e4, 2e4), resolutionunit="CENTIMETER")  # X 1 um, Y 0.5 um

    [(data, meta, kind)] = get_reader(str(path))(str(path))
    assert kind == "image" and isinstance(data, np.ndarray) and data.dtype == np.uint16
    np.testing.assert_array_equal(data, plane)
    assert meta["name"] == "plane" and meta["axis_labels"] == ("y", "x") and meta["rgb"] is False
    np.testing.assert_allclose(meta["scale"], (0.5e-4, 1e-4))  # (Y, X), in cm
    assert units_of(meta) == ("centimeter", "centimeter")
    assert meta["metadata"]["axes"] == "YX" and meta["metadata"]["source"] == str(path)
    assert "channel_axis" not in meta


def test_reads_imagej_stack_with_z_spacing_and_unit(tmp_path):
    path = tmp_path / "stack.tif"
    stack = write_imagej_zyx(path)
    [(data, meta, _)] = read_images(path)
    np.testing.assert_array_equal(data, stack)
    np.testing.assert_allclose(meta["scale"], (0.5, 0.25, 0.2))
    assert meta["axis_labels"] == ("z", "y", "x")
    assert units_of(meta) == ("micrometer",) * 3
    assert meta["metadata"]["z_spacing"] == 0.5 and meta["metadata"]["unit"] == "micron"


def test_reads_rgb_as_one_rgb_layer(tmp_path):
    rgb = (np.random.default_rng(3).random((30, 40, 3)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "colour.tif", rgb, photometric="rgb")
    [(data, meta, _)] = read_images(tmp_path / "colour.tif")
    assert meta["rgb"] is True and data.shape == (30, 40, 3)
    assert meta["axis_labels"] == ("y", "x") and len(meta["scale"]) == 2
    assert meta["metadata"]["axes"] == "YXS"


def test_channels_become_a_channel_axis(tmp_path):
    stack = write_ome_czyx(tmp_path / "two.ome.tif")
    [(data, meta, _)] = read_images(tmp_path / "two.ome.tif")
    np.testing.assert_array_equal(data, stack)
    assert meta["channel_axis"] == 0
    # per axis of each channel's layer (napari gives them to every channel); a name and metadata per channel
    assert meta["axis_labels"] == ("z", "y", "x")
    np.testing.assert_allclose(meta["scale"], (0.6, 0.3, 0.3))
    assert [m["channel"] for m in meta["metadata"]] == [0, 1]
    assert {m["axes"] for m in meta["metadata"]} == {"ZYX"} and meta["name"] == ["two ch0", "two ch1"]

    single = np.zeros((1, 20, 24), np.uint8)  # (tifffile drops a TIFF's length-1 axes; OME-Zarr keeps them)
    store = images.write_ome_zarr(tmp_path / "one.zarr", whole(single), single.shape, single.dtype, "CYX")
    [(data, meta, _)] = read_images(store)
    assert "channel_axis" not in meta and meta["axis_labels"] == ("c", "y", "x") and data.shape == (1, 20, 24)


def test_reads_ome_zarr_written_by_the_package(tmp_path):
    stack = (np.random.default_rng(4).random((3, 20, 24)) * 1000).astype(np.uint16)
    like = Image(da.from_array(stack), "ZYX", "cells", pixel_size=(0.3, 0.3), unit="micron")
    store = images.write_ome_zarr(tmp_path / "cells.ome.zarr", whole(stack), stack.shape, stack.dtype, "ZYX", like)
    reader = get_reader(str(store))
    [(data, meta, _)] = reader(str(store))
    np.testing.assert_array_equal(np.asarray(data), stack)
    assert meta["name"] == "cells" and meta["axis_labels"] == ("z", "y", "x")
    # no Z spacing known: the package writes Z scale 1 without a unit, which is not a known length
    np.testing.assert_allclose(meta["scale"], (1.0, 0.3, 0.3))
    assert units_of(meta) == ("pixel", "micrometer", "micrometer")

    # with a Z spacing, the package writes it with the unit of X
    like.z_spacing = 0.9
    images.write_ome_zarr(store, whole(stack), stack.shape, stack.dtype, "ZYX", like)
    [(_, meta, _)] = read_images(store)
    np.testing.assert_allclose(meta["scale"], (0.9, 0.3, 0.3))
    assert units_of(meta) == ("micrometer",) * 3 and meta["metadata"]["z_spacing"] == 0.9

    # NGFF with a Z spacing in the same unit as X: the reader takes it
    group = zarr.open_group(str(store), mode="r+")
    multiscales = group.attrs["multiscales"]
    multiscales[0]["axes"][0]["unit"] = "micrometer"
    multiscales[0]["datasets"][0]["coordinateTransformations"][0]["scale"][0] = 0.8
    group.attrs["multiscales"] = multiscales
    [(_, meta, _)] = read_images(store)
    np.testing.assert_allclose(meta["scale"], (0.8, 0.3, 0.3))
    assert meta["metadata"]["z_spacing"] == 0.8


def test_reader_takes_scale_and_units_from_the_image(monkeypatch):
    """The reader finds nothing itself: pixel size, Z spacing and unit are the IO layer's Image's."""
    stack = np.zeros((3, 20, 24), np.uint16)
    image = Image(da.from_array(stack), "ZYX", "made", pixel_size=(0.5, 0.4), unit="nm", z_spacing=1.25)
    monkeypatch.setattr(images, "open_image", lambda path: image)
    [(_, meta, _)] = read_images("nowhere/made.tif")
    np.testing.assert_allclose(meta["scale"], (1.25, 0.5, 0.4))
    assert units_of(meta) == ("nanometer",) * 3 and meta["metadata"]["z_spacing"] == 1.25


def test_a_folder_that_is_not_a_zarr_store_is_refused(tmp_path):
    folder = tmp_path / "plain-folder"
    folder.mkdir()
    tifffile.imwrite(folder / "inside.tif", np.zeros((8, 8), np.uint8))
    assert get_reader(str(folder)) is None
    with pytest.raises(ImageError, match="plain-folder: a folder that is not a Zarr store"):
        read_images(folder)


def test_large_images_stay_lazy_small_ones_are_loaded(tmp_path, monkeypatch):
    path = tmp_path / "stack.tif"
    stack = write_imagej_zyx(path)
    [(small, _, _)] = read_images(path)
    assert isinstance(small, np.ndarray)

    monkeypatch.setattr(plugin_io, "SMALL_BYTES", stack.nbytes - 1)
    [(lazy, meta, _)] = read_images(path)
    assert isinstance(lazy, da.Array) and lazy.chunksize == (1, 30, 40)  # one plane per chunk
    np.testing.assert_array_equal(lazy[2].compute(), stack[2])
    np.testing.assert_allclose(meta["scale"], (0.5, 0.25, 0.2))


def test_several_paths_give_one_layer_each(tmp_path):
    first, second = write_imagej_zyx(tmp_path / "a.tif", 0), write_imagej_zyx(tmp_path / "b.tif", 1)
    layers = get_reader([str(tmp_path / "a.tif"), str(tmp_path / "b.tif")])([tmp_path / "a.tif", tmp_path / "b.tif"])
    assert [meta["name"] for _, meta, _ in layers] == ["a", "b"]
    np.testing.assert_array_equal(layers[0][0], first)
    np.testing.assert_array_equal(layers[1][0], second)


def test_read_errors_propagate_with_their_message(tmp_path, discovered_npe2):
    import npe2

    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"this is not a TIFF file at all")
    reader = get_reader(str(broken))
    assert reader is not None  # the name fits; the reader itself says what is wrong
    with pytest.raises(ImageError, match="broken.tif: cannot read as TIFF"):
        reader(str(broken))
    with pytest.raises(ImageError, match="broken.tif: cannot read as TIFF"):
        npe2.read([str(broken)], stack=False, plugin_name=PLUGIN)

    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    with pytest.raises(ImageError, match="empty.zarr"):
        get_reader(str(empty))(str(empty))


# --- npe2 ----------------------------------------------------------------------------------------------------------


def test_npe2_finds_the_reader_writer_and_sample(tmp_path):
    from npe2 import PluginManager
    from npe2.manifest.utils import import_python_name

    manager = PluginManager()
    manager.discover()
    tif = tmp_path / "stack.tif"
    write_imagej_zyx(tif)
    store = images.write_ome_zarr(tmp_path / "s.zarr", whole(np.zeros((8, 8), np.uint8)), (8, 8), np.uint8, "YX")

    for path in (tif, store):
        readers = [r.command for r in manager.iter_compatible_readers([str(path)])]
        assert f"{PLUGIN}.get_reader" in readers, (path, readers)
    assert f"{PLUGIN}.get_reader" not in [r.command for r in manager.iter_compatible_readers([str(tmp_path / "a.png")])]
    writer, path = manager.get_writer(str(tmp_path / "out.tiff"), ["image"], plugin_name=PLUGIN)
    assert writer is not None and writer.command == f"{PLUGIN}.write_tiff" and path.endswith("out.tiff")
    assert manager.get_writer(str(tmp_path / "out.tif"), ["labels"], plugin_name=PLUGIN)[0] is None
    samples = dict(manager.iter_sample_data())[PLUGIN]
    assert [s.key for s in samples] == ["defocused_cells"]
    # the commands name the functions in this package
    for command, function in [
        ("get_reader", get_reader),
        ("write_tiff", write_tiff_layer),
        ("sample_defocused_cells", defocused_cell_stack),
    ]:
        assert import_python_name(manager.get_command(f"{PLUGIN}.{command}").python_name) is function


def test_npe2_read_then_write_round_trip(tmp_path, discovered_npe2):
    import npe2

    source = tmp_path / "stack.tif"
    stack = write_imagej_zyx(source)
    [layer] = npe2.read([str(source)], stack=False, plugin_name=PLUGIN)
    written = npe2.write(str(tmp_path / "copy.tif"), [layer], plugin_name=PLUGIN)
    assert written == [str(tmp_path / "copy.tif")]
    [(data, meta, _)] = read_images(tmp_path / "copy.tif")
    np.testing.assert_array_equal(data, stack)
    np.testing.assert_allclose(meta["scale"], (0.5, 0.25, 0.2))
    assert meta["axis_labels"] == ("z", "y", "x") and units_of(meta) == ("micrometer",) * 3


# --- writer ------------------------------------------------------------------------------------------------------

_RNG = np.random.default_rng(5)
ROUND_TRIPS = {
    # name: (file name, data, layer meta, expected TIFF flavour, expected axis labels)
    "2d-uint16": (
        "plane.tif",
        (_RNG.random((20, 30)) * 60000).astype(np.uint16),
        {"scale": (0.25, 0.2), "units": ("micrometer", "micrometer"), "axis_labels": ("y", "x")},
        "imagej",
        ("y", "x"),
    ),
    "zyx-float32": (
        "stack.tiff",
        _RNG.standard_normal((3, 20, 30)).astype(np.float32),
        {"scale": (0.7, 0.3, 0.3), "units": ("micrometer",) * 3, "axis_labels": ("z", "y", "x")},
        "imagej",
        ("z", "y", "x"),
    ),
    "tzyx-int64-default-labels": (
        "big-ints.tif",
        _RNG.integers(-(2**40), 2**40, (2, 3, 20, 30)),
        {"scale": (1.0, 2.0, 0.1, 0.1), "units": ("pixel", "nanometer", "nanometer", "nanometer")},
        "shaped",
        ("t", "z", "y", "x"),
    ),
    "zyx-float64-ome": (
        "stack.ome.tif",
        _RNG.standard_normal((3, 20, 30)),
        {"scale": (0.5, 0.2, 0.2), "axis_labels": ("z", "y", "x"), "metadata": {"unit": "micron"}},
        "ome",
        ("z", "y", "x"),
    ),
    "tyx-uint8-no-unit": (
        "frames.tif",
        (_RNG.random((4, 20, 30)) * 255).astype(np.uint8),
        {"scale": (1.0, 3.0, 3.0), "axis_labels": ("t", "y", "x")},
        "imagej",
        ("t", "y", "x"),
    ),
    "zyx-uint16-centimeter": (
        "cm.tif",
        (_RNG.random((2, 20, 30)) * 60000).astype(np.uint16),
        {"scale": (0.5, 0.01, 0.02), "units": ("centimeter",) * 3, "axis_labels": ("z", "y", "x")},
        "imagej",
        ("z", "y", "x"),
    ),
    "zyx-int32-no-unit": (
        "ints.tif",
        _RNG.integers(-1000, 1000, (2, 20, 30)).astype(np.int32),
        {"scale": (4.0, 2.0, 2.0), "axis_labels": ("z", "y", "x")},
        "shaped",
        ("z", "y", "x"),
    ),
    "rgb-uint8": (
        "colour.tif",
        (_RNG.random((20, 30, 3)) * 255).astype(np.uint8),
        {"rgb": True, "scale": (0.5, 0.5), "units": ("micrometer", "micrometer")},
        "imagej",
        ("y", "x"),
    ),
    "rgba-uint16": (
        "rgba.tif",
        (_RNG.random((20, 30, 4)) * 60000).astype(np.uint16),
        {"rgb": True, "scale": (1.0, 1.0)},
        "shaped",
        ("y", "x"),
    ),
}


@pytest.mark.parametrize("case", ROUND_TRIPS)
def test_writer_then_reader_round_trip(tmp_path, case):
    name, data, meta, flavour, labels = ROUND_TRIPS[case]
    target = tmp_path / name
    assert write_tiff_layer(str(target), data, meta) == [str(target)]
    assert tiff_flavour(target) == flavour

    [(back, back_meta, _)] = read_images(target)
    assert back.dtype == data.dtype
    np.testing.assert_array_equal(back, data)
    np.testing.assert_allclose(back_meta["scale"], meta["scale"], rtol=1e-6)
    assert back_meta["rgb"] is bool(meta.get("rgb", False))
    assert back_meta["axis_labels"] == labels
    assert units_of(back_meta) == meta.get("units", None if "metadata" not in meta else ("micrometer",) * 3)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left
    with tifffile.TiffFile(target) as tif:  # the resolution tags never claim inches
        centimetres = units_of(meta) is not None and units_of(meta)[-1] == "centimeter"
        expected = tifffile.RESUNIT.CENTIMETER if centimetres else tifffile.RESUNIT.NONE
        assert tif.pages.first.tags["ResolutionUnit"].value == expected


def test_writer_goes_through_the_io_layer(tmp_path, monkeypatch):
    """One TIFF writer: the layer becomes an Image that images.write_tiff writes."""
    calls: list[Image] = []
    real = images.write_tiff

    def spy(target, blocks, shape, dtype, axes, like=None):
        calls.append(like)
        return real(target, blocks, shape, dtype, axes, like)

    monkeypatch.setattr(images, "write_tiff", spy)
    stack = np.ones((3, 20, 30), np.float32)
    meta = {"name": "cells", "scale": (0.7, 0.3, 0.2), "units": ("micrometer",) * 3, "axis_labels": ("z", "y", "x")}
    write_tiff_layer(str(tmp_path / "cells.tif"), stack, meta)
    [like] = calls
    assert like.axes == "ZYX" and like.name == "cells" and like.tiff == {"imagej": True}
    assert (like.pixel_size, like.z_spacing, like.unit) == ((0.3, 0.2), 0.7, "micrometer")
    image = images.open_image(tmp_path / "cells.tif")
    assert (image.z_spacing, image.unit) == (0.7, "micron")


def test_writer_converts_a_z_scale_in_other_units_to_those_of_x(tmp_path):
    stack = np.zeros((2, 20, 30), np.uint16)
    meta = {
        "scale": (500.0, 0.2, 0.2),
        "units": ("nanometer", "micrometer", "micrometer"),
        "axis_labels": ("z", "y", "x"),
    }
    write_tiff_layer(str(tmp_path / "mixed.tif"), stack, meta)
    [(_, back, _)] = read_images(tmp_path / "mixed.tif")
    np.testing.assert_allclose(back["scale"], (0.5, 0.2, 0.2))
    assert units_of(back) == ("micrometer",) * 3


def test_writer_keeps_lazy_data_and_multiscale_first_level(tmp_path):
    stack = (np.random.default_rng(6).random((5, 20, 30)) * 1000).astype(np.uint16)
    lazy = da.from_array(stack, chunks=(2, 20, 30))
    write_tiff_layer(str(tmp_path / "lazy.tif"), lazy, {"scale": (1.5, 0.5, 0.5), "axis_labels": ("z", "y", "x")})
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "lazy.tif"), stack)

    levels = [stack, stack[:, ::2, ::2]]
    write_tiff_layer(str(tmp_path / "multi.tif"), levels, {"multiscale": True, "axis_labels": ("z", "y", "x")})
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "multi.tif"), stack)


def test_writer_takes_axes_from_labels_then_metadata_then_dimensions(tmp_path):
    data = np.zeros((2, 10, 12), np.uint16)

    def axes_written(meta: dict[str, Any], name: str) -> str:
        write_tiff_layer(str(tmp_path / name), data, meta)
        with tifffile.TiffFile(tmp_path / name) as tif:
            return tif.series[0].axes

    assert axes_written({"axis_labels": ("T", "y", "x"), "metadata": {"axes": "CYX"}}, "labels.tif") == "TYX"
    assert axes_written({"axis_labels": ("-3", "-2", "-1"), "metadata": {"axes": "CYX"}}, "meta.tif") == "CYX"
    assert axes_written({"axis_labels": ("time", "y", "x"), "metadata": {"axes": "ZZX"}}, "default.tif") == "ZYX"
    with pytest.raises(SaveError, match="six.tif: cannot tell the axes"):
        write_tiff_layer(str(tmp_path / "six.tif"), np.zeros((2,) * 4 + (4, 4), np.uint8), {})
    assert not (tmp_path / "six.tif").exists()


def _fails_on_plane(shape: tuple[int, ...], bad: int = 3) -> tuple[da.Array, list[int]]:
    """A lazy stack whose plane ``bad`` cannot be read (as when its source file disappears mid-save)."""
    computed: list[int] = []
    lock = threading.Lock()

    def plane(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        index = block_info[0]["chunk-location"][0]
        if index == bad:
            raise OSError(f"the source of plane {index} is gone")
        with lock:
            computed.append(index)
        return block + 1

    lazy = da.zeros(shape, dtype=np.uint16, chunks=(1, *shape[1:])).map_blocks(plane, dtype=np.uint16)
    return lazy, computed


@pytest.mark.parametrize("failure", ["read error mid-write", "data type", "ome int64", "under a file", "suffix"])
def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, failure):
    old = tmp_path / ("old.ome.tif" if failure == "ome int64" else "old.tif")
    old.write_bytes(b"the previous file")
    target = old
    computed: list[int] = []
    if failure == "read error mid-write":
        data, computed = _fails_on_plane((5, 16, 16))
        match = "could not save the layer.*source of plane 3 is gone"
    elif failure == "data type":
        data, match = np.full((2, 4, 4), "x"), "cannot save data of type <U1"
    elif failure == "ome int64":
        data, match = np.zeros((2, 4, 4), np.int64), "OME-TIFF cannot hold int64"
    elif failure == "under a file":
        target = old / "new.tif"  # its folder would be a file
        data, match = np.zeros((2, 4, 4), np.uint8), "could not save the layer"
    else:
        target = tmp_path / "new.png"
        data, match = np.zeros((2, 4, 4), np.uint8), "name it .tif or .tiff"

    with pytest.raises(SaveError, match=match):
        write_tiff_layer(str(target), data, {"axis_labels": ("z", "y", "x")})
    if failure == "read error mid-write":
        assert computed == [0, 1, 2]  # the writing had started: three planes were in the temporary file
    assert [p.name for p in tmp_path.iterdir()] == [old.name]
    assert old.read_bytes() == b"the previous file"


# --- sample data ---------------------------------------------------------------------------------------------------


def test_sample_is_a_defocused_stack_of_real_cells_with_its_sharp_truth():
    layers = defocused_cell_stack()
    by_name = {meta["name"]: (data, meta, kind) for data, meta, kind in layers}
    assert sorted(by_name) == ["defocused cells", "sharp cells"] and len(layers) == 2
    blurry, blurry_meta, _ = by_name["defocused cells"]
    sharp, sharp_meta, _ = by_name["sharp cells"]
    assert blurry.shape == sharp.shape == (len(DEFOCUS_UM), 660, 550)
    assert blurry.dtype == sharp.dtype == np.uint16
    for meta in (blurry_meta, sharp_meta):
        assert meta["axis_labels"] == ("z", "y", "x")
        np.testing.assert_allclose(meta["scale"], (0.75, 0.2, 0.2))
        assert meta["contrast_limits"] == sharp_meta["contrast_limits"]
    assert blurry_meta["metadata"]["defocus_um"] == list(DEFOCUS_UM) and blurry_meta["metadata"]["seed"] == 0

    sharp_score = coarse_focus(sharp[0])
    scores = [coarse_focus(plane) for plane in blurry]
    assert max(scores) < sharp_score  # every plane is blurrier than the truth, even the one in focus
    middle = len(scores) // 2
    assert DEFOCUS_UM[middle] == 0 and int(np.argmax(scores)) == middle
    assert all(a < b for a, b in zip(scores[:middle], scores[1 : middle + 1]))  # sharper towards focus
    assert all(a > b for a, b in zip(scores[middle:], scores[middle + 1 :]))  # and blurrier past it
    # the same plane everywhere in the truth, and the same noise every time
    assert (sharp == sharp[0]).all()
    np.testing.assert_array_equal(defocused_cell_stack()[1][0], by_name["defocused cells"][0])


def test_sample_saves_and_reopens_with_its_scale(tmp_path):
    _, (blurry, meta, _) = defocused_cell_stack()
    write_tiff_layer(str(tmp_path / "defocused.tif"), blurry, meta)
    [(data, back, _)] = read_images(tmp_path / "defocused.tif")
    np.testing.assert_array_equal(data, blurry)
    np.testing.assert_allclose(back["scale"], (0.75, 0.2, 0.2))
    assert units_of(back) == ("micrometer",) * 3


@pytest.mark.slow
def test_plugin_modules_import_neither_qt_nor_napari():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from napari_mpt_deblur.plugin import compare_job, deblur_job, errors, finetune_job, io, layer_info, samples\n"
        "from napari_mpt_deblur.plugin import session\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide6'))\n"
        "print(bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- a real napari viewer ---------------------------------------------------------------------------------------


def test_viewer_opens_files_with_scale_and_axis_labels(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    write_imagej_zyx(tmp_path / "stack.tif")
    [layer] = viewer.open(str(tmp_path / "stack.tif"), plugin=PLUGIN)
    assert layer.name == "stack" and layer.data.shape == (4, 30, 40)
    np.testing.assert_allclose(layer.scale, (0.5, 0.25, 0.2))
    assert tuple(layer.axis_labels) == ("z", "y", "x")
    assert [str(u) for u in layer.units] == ["micrometer"] * 3

    write_ome_czyx(tmp_path / "two.ome.tif")
    channels = viewer.open(str(tmp_path / "two.ome.tif"), plugin=PLUGIN)
    assert [c.name for c in channels] == ["two ch0", "two ch1"]
    for channel in channels:
        assert channel.data.shape == (3, 20, 24) and tuple(channel.axis_labels) == ("z", "y", "x")
        np.testing.assert_allclose(channel.scale, (0.6, 0.3, 0.3))

    rgb = (np.random.default_rng(7).random((30, 40, 3)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "colour.tif", rgb, photometric="rgb")
    [colour] = viewer.open(str(tmp_path / "colour.tif"), plugin=PLUGIN)
    assert colour.rgb and colour.ndim == 2

    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"this is not a TIFF file at all")
    with pytest.raises(ImageError, match="broken.tif: cannot read as TIFF"):  # napari shows this message
        viewer.open(str(broken), plugin=PLUGIN)
    assert len(viewer.layers) == 4


def test_viewer_saves_layers_that_reopen_the_same(make_napari_viewer, tmp_path):
    import napari

    viewer = make_napari_viewer()
    stack = write_imagej_zyx(tmp_path / "stack.tif")
    [layer] = viewer.open(str(tmp_path / "stack.tif"), plugin=PLUGIN)
    viewer.layers.selection = {layer}
    assert viewer.layers.save(str(tmp_path / "saved.tif"), selected=True, plugin=PLUGIN) == [
        str(tmp_path / "saved.tif")
    ]

    frames = (np.random.default_rng(8).random((3, 20, 30)) * 1000).astype(np.float32)
    made = viewer.add_image(frames, scale=(2.0, 0.4, 0.4), axis_labels=("z", "y", "x"), name="made here")
    napari.save_layers(str(tmp_path / "made.tif"), [made], plugin=PLUGIN)

    reopened = viewer.open(str(tmp_path / "saved.tif"), plugin=PLUGIN)[0]
    np.testing.assert_array_equal(np.asarray(reopened.data), stack)
    np.testing.assert_allclose(reopened.scale, (0.5, 0.25, 0.2))
    assert tuple(reopened.axis_labels) == ("z", "y", "x") and [str(u) for u in reopened.units] == ["micrometer"] * 3
    again = viewer.open(str(tmp_path / "made.tif"), plugin=PLUGIN)[0]
    np.testing.assert_array_equal(np.asarray(again.data), frames)
    np.testing.assert_allclose(again.scale, (2.0, 0.4, 0.4))
    assert tuple(again.axis_labels) == ("z", "y", "x") and again.name == "made"


def test_viewer_save_error_is_raised_and_the_old_file_kept(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    target = tmp_path / "old.tif"
    target.write_bytes(b"the previous file")
    data, computed = _fails_on_plane((5, 16, 16), bad=4)
    layer = viewer.add_image(data, contrast_limits=(0, 2), axis_labels=("z", "y", "x"))  # shows one good plane
    # a SaveError, not a ValueError: napari would take that for "no writer found" and hide the message
    with pytest.raises(SaveError, match="source of plane 4 is gone"):
        viewer.layers.save(str(target), selected=False, plugin=PLUGIN)
    assert layer in viewer.layers and computed
    assert target.read_bytes() == b"the previous file" and [p.name for p in tmp_path.iterdir()] == ["old.tif"]


def test_viewer_opens_the_sample(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "defocused_cells")
    assert [layer.name for layer in viewer.layers] == ["sharp cells", "defocused cells"]
    sharp, blurry = viewer.layers
    assert sharp.data.shape == blurry.data.shape and blurry.ndim == 3
    np.testing.assert_allclose(blurry.scale, (0.75, 0.2, 0.2))
    assert tuple(blurry.axis_labels) == ("z", "y", "x")
    assert viewer.layers.selection.active is blurry  # on top, ready to deblur
    plane = viewer.dims.current_step[0]
    assert coarse_focus(np.asarray(blurry.data[plane])) < coarse_focus(np.asarray(sharp.data[plane]))

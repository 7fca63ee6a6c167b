"""The inference engine: N-D arrays and files, lazily or eagerly, on real dask schedulers."""

from __future__ import annotations

import time

import dask
import dask.array as da
import numpy as np
import pytest
import tifffile
import torch
import zarr

from helpers import tiny_config
from napari_mpt_deblur import MPT, save_model
from napari_mpt_deblur.config import ConfigError, DeblurSettings, IntensityNormalization, ModelCard
from napari_mpt_deblur.images import Image, ImageError, length_unit, open_image, write_ome_zarr, write_tiff
from napari_mpt_deblur.inference import (
    Cancelled,
    Deblurrer,
    InputError,
    deblur_array,
    deblur_file,
    deblur_lazy,
    iter_deblur,
)
from napari_mpt_deblur.normalization import intensity_range
from napari_mpt_deblur.runtime import torch_threads


@pytest.fixture(scope="module")
def model() -> MPT:
    torch.manual_seed(0)
    return MPT(tiny_config()).eval()


@pytest.fixture(scope="module")
def rgb_model() -> MPT:
    torch.manual_seed(1)
    return MPT(tiny_config(in_channels=3, out_channels=3)).eval()


def identity_model(normalization: IntensityNormalization | None = None) -> MPT:
    """A real MPT whose head is zero: the global residual makes it the identity."""
    model = MPT(tiny_config()).eval()
    torch.nn.init.zeros_(model.head.weight)
    model.card = ModelCard(model.config, normalization or IntensityNormalization())
    return model


def count_forwards(model: MPT) -> list[int]:
    calls: list[int] = []
    model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    return calls


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_stack_keeps_shape_dtype_and_range(model, dtype):
    rng = np.random.default_rng(0)
    top = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1.0
    stack = (rng.random((2, 3, 41, 53)) * top).astype(dtype)  # odd sizes
    out = deblur_array(model, stack)
    assert out.shape == stack.shape and out.dtype == stack.dtype
    if np.issubdtype(dtype, np.integer):
        assert out.min() >= 0 and out.max() <= top  # clipped, no wrap-around
    # planes are independent: the second plane alone gives the same result (to rounding: a stack's planes
    # run side by side on one thread each, a single plane on every thread, which sums in another order)
    alone = deblur_array(model, stack[1, 2]).astype(np.float64)
    np.testing.assert_allclose(alone, out[1, 2], rtol=0, atol=1 if np.issubdtype(dtype, np.integer) else 1e-5)


def test_intensities_map_back_exactly_through_an_identity_network():
    plane = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 7
    for normalization in (
        IntensityNormalization(),
        IntensityNormalization(mode="minmax"),
        IntensityNormalization(mode="fixed", low=0, high=40000),
    ):
        out = deblur_array(identity_model(normalization), plane)
        assert np.abs(out.astype(int) - plane).max() <= 1


def test_integer_output_is_clipped_not_wrapped():
    """Outputs beyond the dtype's range saturate instead of wrapping around."""
    model = MPT(tiny_config()).eval()
    with torch.no_grad():
        model.head.weight.mul_(200)  # wild outputs, far outside 0..1
    model.card = ModelCard(model.config, IntensityNormalization(mode="fixed", low=0, high=255))
    plane = (np.random.default_rng(0).random((48, 48)) * 255).astype(np.uint8)
    unclipped = deblur_array(model, plane.astype(np.float32))  # float in, float out: nothing clipped
    assert unclipped.min() < -50 and unclipped.max() > 300
    np.testing.assert_array_equal(deblur_array(model, plane), np.clip(np.rint(unclipped), 0, 255))


def test_lazy_result_is_a_dask_array_computed_plane_by_plane(model):
    stack = (np.random.default_rng(1).random((3, 4, 40, 48)) * 1000).astype(np.uint16)
    calls = count_forwards(model)
    lazy = deblur_lazy(model, stack)
    assert isinstance(lazy, da.Array) and lazy.shape == stack.shape and lazy.dtype == stack.dtype
    assert lazy.chunksize == (1, 1, 40, 48)
    assert calls == []  # nothing computed yet
    plane = lazy[2, 1].compute()
    assert len(calls) == 1  # one plane, one tile: only what was read
    np.testing.assert_array_equal(plane, deblur_array(model, stack[2, 1]))
    calls.clear()
    everything = lazy.compute(scheduler="threads")
    assert len(calls) == 12
    # to rounding: the eager engine runs planes side by side on one thread each (another summation order)
    np.testing.assert_allclose(everything, deblur_array(model, stack), rtol=0, atol=1)


def test_lazy_input_stays_lazy_and_zarr_input_works(model, tmp_path):
    from dask.callbacks import Callback

    source = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=(3, 40, 48), chunks=(1, 40, 48), dtype="u2")
    source[:] = (np.random.default_rng(2).random((3, 40, 48)) * 1000).astype(np.uint16)
    planes = source[:]
    np.testing.assert_array_equal(deblur_lazy(model, source).compute(), deblur_array(model, planes))
    # a dask input in chunks that are not planes, each chunk's reading recorded by the task that reads it
    chunks_read: list[tuple[int, ...]] = []

    def read_chunk(block: np.ndarray, block_info=None) -> np.ndarray:
        chunks_read.append(tuple(block_info[0]["chunk-location"]))
        return block

    dask_input = da.from_array(planes, chunks=(2, 20, 48)).map_blocks(read_chunk, meta=np.empty((0, 0, 0), "u2"))
    tasks_run: list[object] = []
    stack_wide = DeblurSettings(normalization=IntensityNormalization(per="stack"))
    with Callback(pretask=lambda key, graph, state: tasks_run.append(key)):  # any dask computation at all
        lazy = deblur_lazy(model, dask_input)
        deblur_lazy(model, dask_input, settings=stack_wide)  # its statistics wait for the first read too
    assert tasks_run == [] and chunks_read == []  # nothing computed before a result is asked for
    assert isinstance(lazy, da.Array) and lazy.shape == planes.shape and lazy.dtype == planes.dtype
    plane = lazy[1].compute(scheduler="sync")
    assert sorted(chunks_read) == [(0, 0, 0), (0, 1, 0)]  # plane 1 reads the two chunks that hold it, no others
    np.testing.assert_array_equal(plane, deblur_array(model, planes[1]))
    np.testing.assert_array_equal(deblur_array(model, dask_input), deblur_array(model, planes))


@pytest.mark.slow
def test_processes_scheduler_sends_the_model_once(model):
    stack = (np.random.default_rng(3).random((4, 40, 48)) * 255).astype(np.uint8)
    lazy = deblur_lazy(model, stack)
    graph = dict(lazy.__dask_graph__())
    assert len([key for key in graph if str(key).startswith("ModelHandle")]) == 1  # one copy, shared by every plane
    with dask.config.set(scheduler="processes", num_workers=2):
        result = lazy.compute()
    # worker processes may run torch with other thread counts: a sum can round one grey level differently
    np.testing.assert_allclose(result, deblur_array(model, stack), atol=1)


@pytest.mark.parametrize(
    ("shape", "axes", "planes"),
    [
        ((40, 48), None, 1),
        ((3, 40, 48), None, 3),  # Z
        ((2, 3, 40, 48), None, 6),  # T, Z
        ((2, 2, 3, 40, 48), None, 12),  # T, Z, C
        ((40, 48, 3), None, 3),  # RGB: each sample on its own with a 1-channel model
        ((3, 40, 48), "CYX", 3),
        ((40, 48, 2), "YXC", None),  # C after X: refused
    ],
)
def test_dimensions_and_axes(model, shape, axes, planes):
    data = (np.random.default_rng(4).random(shape) * 255).astype(np.uint8)
    if planes is None:
        with pytest.raises(InputError, match="only S"):
            deblur_array(model, data, axes=axes)
        return
    calls = count_forwards(model)
    out = deblur_array(model, data, axes=axes)
    assert out.shape == data.shape and len(calls) == planes


@pytest.mark.slow
def test_axes_override_changes_what_a_plane_is(model):
    """(40, 48, 3) is RGB by default; as 'ZYX' it is 40 planes of 48 x 3."""
    data = (np.random.default_rng(5).random((40, 48, 3)) * 255).astype(np.uint8)
    calls = count_forwards(model)
    deblur_array(model, data, axes="ZYX")
    assert len(calls) == 40
    with pytest.raises(InputError, match="unknown axes 'W'"):
        deblur_array(model, data, axes="WYX")
    with pytest.raises(InputError, match="name 2 axes"):
        deblur_array(model, data, axes="YX")


def test_three_channel_model_takes_rgb_and_passes_alpha(rgb_model, model):
    rng = np.random.default_rng(6)
    rgba = (rng.random((40, 48, 4)) * 255).astype(np.uint8)
    out = deblur_array(rgb_model, rgba)
    assert out.shape == rgba.shape
    np.testing.assert_array_equal(out[..., 3], rgba[..., 3])
    np.testing.assert_array_equal(out[..., :3], deblur_array(rgb_model, rgba[..., :3]))
    planar = np.moveaxis(rgba[..., :3], -1, 0).copy()  # colours first, called C
    np.testing.assert_array_equal(np.moveaxis(deblur_array(rgb_model, planar, axes="CYX"), 0, -1), out[..., :3])
    with pytest.raises(InputError, match="3-channel model needs RGB"):
        deblur_array(rgb_model, rgba[..., 0])


def test_bad_arrays_are_refused(model):
    with pytest.raises(InputError, match="NaN"):
        deblur_array(model, np.full((8, 8), np.nan, dtype=np.float32))
    with pytest.raises(InputError, match="empty"):
        deblur_array(model, np.zeros((0, 8), dtype=np.uint16))
    with pytest.raises(InputError, match="cannot guess"):
        deblur_array(model, np.zeros(8, dtype=np.uint16))
    with pytest.raises(InputError, match="pixel type"):
        deblur_array(model, np.zeros((8, 8), dtype=bool))
    with pytest.raises(ConfigError, match="overlap"):
        DeblurSettings(tile=64, overlap=64)
    with pytest.raises(InputError, match="no CUDA GPU" if not torch.cuda.is_available() else "only"):
        Deblurrer(model, DeblurSettings(device="cuda:99"))


def test_stack_normalization_uses_one_range_for_all_planes():
    model = identity_model(IntensityNormalization(mode="minmax", per="stack"))
    stack = np.stack([np.full((32, 32), 10, np.uint16), np.full((32, 32), 1000, np.uint16)])
    stack[0, 0, 0] = 0  # plane statistics would differ per plane; stack statistics span 0..1000
    np.testing.assert_array_equal(deblur_array(model, stack), stack)
    np.testing.assert_array_equal(deblur_lazy(model, stack).compute(), stack)
    assert intensity_range(stack, IntensityNormalization(mode="minmax")) == (0.0, 1000.0)


def seam_strength(tiled: np.ndarray, whole: np.ndarray, margin: int = 8) -> float:
    """How much steeper the tiled output is than the whole-plane one across its steepest row or column.

    In units of the typical whole-plane gradient; lines near the plane's border
    (where padding differs) are left out. About 0 means no seam.
    """
    excess = []
    for axis in (0, 1):
        tiled_steps = np.abs(np.diff(tiled, axis=axis)).mean(1 - axis)[margin:-margin]
        whole_steps = np.abs(np.diff(whole, axis=axis)).mean(1 - axis)[margin:-margin]
        excess.append(((tiled_steps - whole_steps) / np.median(whole_steps)).max())
    return float(max(excess))


@pytest.mark.slow
def test_tiles_blend_without_seams(model):
    # 256 wide: with overlap 0 the planner cuts two tiles of 128 that abut exactly (no rounding overlap)
    y, x = np.mgrid[0:192, 0:256]
    plane = (0.5 + 0.25 * np.sin(x / 9.0) * np.cos(y / 13.0)).astype(np.float32)
    whole = deblur_array(model, plane, settings=DeblurSettings(tile=0))
    tiled = deblur_array(model, plane, settings=DeblurSettings(tile=96, overlap=24))
    psnr = 10 * np.log10((whole.max() - whole.min()) ** 2 / np.mean((tiled - whole) ** 2))
    assert psnr > 35, psnr
    assert seam_strength(tiled, whole) < 0.2
    abutting = deblur_array(model, plane, settings=DeblurSettings(tile=96, overlap=0))
    assert seam_strength(abutting, whole) > 0.4  # without blending the seams show


def test_one_tile_equals_the_whole_plane(model):
    plane = (np.random.default_rng(3).random((90, 110)) * 1000).astype(np.uint16)
    one_tile = deblur_array(model, plane, settings=DeblurSettings(tile=256))
    np.testing.assert_array_equal(one_tile, deblur_array(model, plane, settings=DeblurSettings(tile=0)))


def test_batches_of_tiles_give_the_same_result(model):
    plane = np.random.default_rng(7).random((150, 170)).astype(np.float32)
    one = deblur_array(model, plane, settings=DeblurSettings(tile=64, overlap=16, batch=1))
    calls = count_forwards(model)
    four = deblur_array(model, plane, settings=DeblurSettings(tile=64, overlap=16, batch=4))
    np.testing.assert_allclose(four, one, atol=1e-5)
    assert max(calls) == 4


def test_progress_reports_every_tile_and_closing_cancels(model):
    stack = np.random.default_rng(8).random((3, 100, 100)).astype(np.float32)
    settings = DeblurSettings(tile=64, overlap=16)
    with torch_threads(1):  # one plane after another: one event per tile
        events = list(iter_deblur(model, stack, settings=settings))
    per_plane = Deblurrer(model, settings).tiles_per_plane(100, 100)
    assert per_plane == 2  # 100 x 100 at tile 64: two tiles of 100 x 64 (enlarged tiles, rounded to 64)
    assert events[-1].tiles_done == events[-1].tiles_total == 3 * per_plane
    assert events[-1].planes_done == 3 and events[-1].fraction == 1.0
    assert [e.tiles_done for e in events[:-1]] == list(range(1, 3 * per_plane + 1))
    with torch_threads(2):  # planes side by side: events as tiles and planes finish, in order
        events = list(iter_deblur(model, stack, settings=settings))
    done = [(e.planes_done, e.tiles_done) for e in events]
    assert done == sorted(done) and done[-1] == (3, 3 * per_plane)
    assert all(e.tiles_done >= e.planes_done * per_plane for e in events)

    calls = count_forwards(model)
    longer = np.concatenate([stack, stack])  # 12 tiles
    steps = iter_deblur(model, longer, settings=settings)
    for _ in range(5):
        next(steps)
    steps.close()  # between tiles: planes running side by side finish the tile they are on, and start no more
    stopped_at = len(calls)
    assert 5 <= stopped_at < 12
    time.sleep(0.2)
    assert len(calls) == stopped_at


@pytest.mark.slow
def test_out_of_memory_retries_with_smaller_batches_and_tiles(model):
    """A device that refuses big passes (as a GPU out of memory does): the engine shrinks and goes on."""
    deblurrer = Deblurrer(model, DeblurSettings(tile=128, overlap=16, batch=4))
    real_network = deblurrer._network

    def small_passes_only(x, width=None):
        if x.shape[0] > 1 or x.shape[-1] > 64:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_network(x, width)

    deblurrer._network = small_passes_only
    plane = np.random.default_rng(9).random((150, 170)).astype(np.float32)
    events = list(iter_deblur(deblurrer, plane))
    messages = [e.message for e in events if e.message]
    assert any("1 tile(s) per batch" in m for m in messages) and any("64-pixel tiles" in m for m in messages)
    assert any("tiles of at most 128 pixels" in m for m in messages)  # enlarged tiles are given up first
    assert (deblurrer.batch, deblurrer.tile, deblurrer.tile_growth) == (1, 64, 1.0)
    strict = Deblurrer(model, DeblurSettings(tile=64, overlap=16))
    strict.tile_growth = 1.0  # as the back-off left it
    np.testing.assert_allclose(deblur_array(deblurrer, plane), deblur_array(strict, plane), atol=1e-6)

    def never(x, width=None):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    deblurrer._network = never
    with pytest.raises(InputError, match="out of memory"):
        deblur_array(deblurrer, plane)


# --- files --------------------------------------------------------------------------------------------------------


def test_tiff_to_tiff_keeps_axes_resolution_and_input(tmp_path, model):
    source = tmp_path / "cells.tif"
    stack = (np.random.default_rng(1).random((2, 3, 70, 90)) * 4000).astype(np.uint16)
    tifffile.imwrite(source, stack, photometric="minisblack", metadata={"axes": "TZYX"}, resolution=(2.0, 2.0))
    before = source.read_bytes()
    target = tmp_path / "out" / "cells.tif"
    deblur_file(model, source, target)
    with tifffile.TiffFile(target) as tif:
        assert tif.series[0].axes == "TZYX" and tif.series[0].shape == stack.shape
        assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.MINISBLACK
        assert tif.pages[0].tags["XResolution"].value == (2, 1)
        np.testing.assert_array_equal(tif.asarray(), deblur_array(model, stack))
    assert source.read_bytes() == before  # the input is never modified
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_imagej_ome_tiff_rgb_and_ome_zarr_round_trips(tmp_path, model):
    rng = np.random.default_rng(2)
    hyperstack = (rng.random((2, 3, 2, 40, 48)) * 255).astype(np.uint8)
    tifffile.imwrite(
        tmp_path / "ij.tif", hyperstack, imagej=True, metadata={"axes": "TZCYX", "unit": "um"}, resolution=(4.0, 4.0)
    )
    deblur_file(model, tmp_path / "ij.tif", tmp_path / "ij-out.tif")
    with tifffile.TiffFile(tmp_path / "ij-out.tif") as tif:
        assert tif.is_imagej and tif.series[0].axes == "TZCYX" and tif.imagej_metadata["unit"] == "um"

    ome = (rng.random((3, 40, 48)) * 1000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.ome.tif", ome, metadata={"axes": "ZYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    deblur_file(model, tmp_path / "a.ome.tif", tmp_path / "a-out.ome.tif")
    image = open_image(tmp_path / "a-out.ome.tif")
    assert image.axes == "ZYX" and image.pixel_size == (0.5, 0.5)

    deblur_file(model, tmp_path / "a.ome.tif", tmp_path / "a-out.ome.zarr")
    group = zarr.open_group(str(tmp_path / "a-out.ome.zarr"), mode="r")
    meta = group.attrs["multiscales"][0]
    assert [a["name"] for a in meta["axes"]] == ["z", "y", "x"]
    assert meta["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 0.5, 0.5]
    zarr_image = open_image(tmp_path / "a-out.ome.zarr")
    np.testing.assert_array_equal(zarr_image.data.compute(), deblur_array(model, ome))

    rgb = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    deblur_file(model, tmp_path / "rgb.tif", tmp_path / "rgb-out.tif")
    with tifffile.TiffFile(tmp_path / "rgb-out.tif") as tif:
        assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.RGB and tif.series[0].shape == rgb.shape
    deblur_file(model, tmp_path / "rgb.tif", tmp_path / "rgb.ome.zarr")  # S is stored as NGFF's c axis
    assert open_image(tmp_path / "rgb.ome.zarr").shape == (3, 40, 48)


@pytest.mark.parametrize("suffix", [".tif", ".ome.zarr"])
def test_interrupted_write_leaves_no_file(tmp_path, model, suffix):
    source = tmp_path / "in.tif"
    tifffile.imwrite(source, np.zeros((4, 40, 48), np.uint16), photometric="minisblack")
    target = tmp_path / f"out{suffix}"

    def cancel_in_plane_three(event):
        if event.planes_done == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        deblur_file(model, source, target, progress=cancel_in_plane_three)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]

    # an existing output is replaced only by a complete one
    deblur_file(model, source, target)
    with pytest.raises(Cancelled):
        deblur_file(model, source, target, progress=cancel_in_plane_three)
    assert open_image(target).shape == (4, 40, 48)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.tif", target.name])


@pytest.mark.slow
def test_saved_model_file_drives_the_engine(tmp_path, model):
    path = save_model(model, tmp_path / "m.safetensors", tile_size=64)
    from napari_mpt_deblur import load_model

    deblurrer = Deblurrer(load_model(path))
    assert deblurrer.tile == 64  # the model file's preferred tile size
    assert Deblurrer(load_model(path), DeblurSettings(tile=0)).tile == 0


def test_large_outputs_are_bigtiff(tmp_path, model):
    from napari_mpt_deblur.images import needs_bigtiff

    assert not needs_bigtiff(20 * 2048 * 2048 * 2) and needs_bigtiff(300 * 2048 * 2048 * 2)  # 160 MB, 2.4 GB
    # a TIFF reader sees the format the writer chose
    from napari_mpt_deblur.images import write_tiff

    target = tmp_path / "small.tif"
    write_tiff(target, [((slice(None),) * 2, np.zeros((8, 8), np.uint8))], (8, 8), np.uint8, "YX")
    with tifffile.TiffFile(target) as tif:
        assert not tif.is_bigtiff


# --- physical sizes: pixel size, Z spacing and units through every format -------------------------------------------


def whole(array: np.ndarray) -> list:
    """The whole array as one block, for the package's writers."""
    return [((slice(None),) * array.ndim, array)]


def like_image(stack: np.ndarray, axes: str = "ZYX", **physical) -> Image:
    """An Image of ``stack`` carrying ``pixel_size``, ``unit``, ``z_spacing`` and ``tiff`` as given."""
    return Image(da.from_array(stack), axes, "cells", **physical)


def resolution_unit(path) -> int:
    with tifffile.TiffFile(path) as tif:
        return int(tif.pages.first.tags["ResolutionUnit"].value)


def test_open_image_reads_the_z_spacing_of_every_format(tmp_path):
    stack = (np.random.default_rng(3).random((3, 20, 24)) * 1000).astype(np.uint16)
    tifffile.imwrite(
        tmp_path / "ij.tif",
        stack,
        imagej=True,
        resolution=(5.0, 4.0),
        metadata={"axes": "ZYX", "spacing": 0.5, "unit": "micron"},
    )
    image = open_image(tmp_path / "ij.tif")
    assert (image.pixel_size, image.unit, image.z_spacing) == ((0.25, 0.2), "micron", 0.5)

    # OME: Z in nanometres, X and Y in micrometres: the Z spacing comes in the X unit
    sizes = {"PhysicalSizeX": 0.3, "PhysicalSizeY": 0.3, "PhysicalSizeZ": 600, "PhysicalSizeZUnit": "nm"}
    tifffile.imwrite(tmp_path / "a.ome.tif", stack, photometric="minisblack", metadata={"axes": "ZYX", **sizes})
    image = open_image(tmp_path / "a.ome.tif")
    assert image.pixel_size == (0.3, 0.3) and image.unit == "\u00b5m"
    assert image.z_spacing == pytest.approx(0.6)

    # tifffile's JSON description
    tifffile.imwrite(
        tmp_path / "plain.tif",
        stack,
        photometric="minisblack",
        resolution=(10.0, 10.0),
        resolutionunit="NONE",
        metadata={"axes": "ZYX", "spacing": 2.5, "unit": "nm"},
    )
    image = open_image(tmp_path / "plain.tif")
    assert (image.pixel_size, image.unit, image.z_spacing) == ((0.1, 0.1), "nm", 2.5)

    # OME-Zarr: Z scale in nanometres, X in micrometres; a Z without a unit cannot be related to X
    group = zarr.open_group(str(tmp_path / "s.ome.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=stack.shape, dtype=stack.dtype)[...] = stack
    axes = [{"name": "z", "type": "space", "unit": "nanometer"}]
    axes += [{"name": a, "type": "space", "unit": "micrometer"} for a in "yx"]
    transform = [{"type": "scale", "scale": [800.0, 0.3, 0.3]}]
    multiscales = [
        {"version": "0.4", "axes": axes, "datasets": [{"path": "0", "coordinateTransformations": transform}]}
    ]
    group.attrs["multiscales"] = multiscales
    image = open_image(tmp_path / "s.ome.zarr")
    assert image.pixel_size == (0.3, 0.3) and image.unit == "micrometer"
    assert image.z_spacing == pytest.approx(0.8)
    del multiscales[0]["axes"][0]["unit"]
    group.attrs["multiscales"] = multiscales
    assert open_image(tmp_path / "s.ome.zarr").z_spacing is None


def test_write_tiff_keeps_the_z_spacing_in_every_flavour(tmp_path):
    stack = (np.random.default_rng(4).random((3, 20, 24)) * 1000).astype(np.uint16)
    physical = {"pixel_size": (0.25, 0.2), "unit": "micron", "z_spacing": 0.75}

    write_tiff(
        tmp_path / "ij.tif",
        whole(stack),
        stack.shape,
        stack.dtype,
        "ZYX",
        like_image(stack, **physical, tiff={"imagej": True}),
    )
    write_tiff(tmp_path / "a.ome.tif", whole(stack), stack.shape, stack.dtype, "ZYX", like_image(stack, **physical))
    write_tiff(tmp_path / "plain.tif", whole(stack), stack.shape, stack.dtype, "ZYX", like_image(stack, **physical))
    with tifffile.TiffFile(tmp_path / "ij.tif") as tif:
        assert tif.is_imagej and tif.imagej_metadata["spacing"] == 0.75 and tif.imagej_metadata["unit"] == "micron"
    with tifffile.TiffFile(tmp_path / "a.ome.tif") as tif:
        assert tif.is_ome and 'PhysicalSizeZ="0.75"' in tif.ome_metadata
    with tifffile.TiffFile(tmp_path / "plain.tif") as tif:
        assert not tif.is_imagej and tif.shaped_metadata[0]["spacing"] == 0.75
        assert tif.shaped_metadata[0]["unit"] == "micron"
    for name in ("ij.tif", "a.ome.tif", "plain.tif"):
        image = open_image(tmp_path / name)
        assert image.axes == "ZYX" and image.z_spacing == pytest.approx(0.75), name
        assert image.pixel_size == pytest.approx((0.25, 0.2)), name
        assert image.unit in ("micron", "\u00b5m"), name
        assert resolution_unit(tmp_path / name) == tifffile.RESUNIT.NONE, name
        np.testing.assert_array_equal(image.data.compute(), stack)

    # no Z axis, no Z spacing written
    write_tiff(
        tmp_path / "plane.tif",
        whole(stack[0]),
        stack.shape[1:],
        stack.dtype,
        "YX",
        like_image(stack[0], "YX", **physical),
    )
    assert "spacing" not in tifffile.TiffFile(tmp_path / "plane.tif").shaped_metadata[0]


@pytest.mark.parametrize(
    "unit, tag",
    [(None, "NONE"), ("micron", "NONE"), ("nm", "NONE"), ("centimeter", "CENTIMETER"), ("inch", "INCH")],
)
def test_resolution_tags_never_claim_inches_they_do_not_have(tmp_path, unit, tag):
    plane = np.zeros((20, 24), np.uint8)
    for name, tiff in (("plain.tif", {}), ("ij.tif", {"imagej": True}), ("a.ome.tif", {})):
        like = like_image(plane, "YX", pixel_size=(0.5, 0.25), unit=unit, tiff=tiff)
        write_tiff(tmp_path / name, whole(plane), plane.shape, plane.dtype, "YX", like)
        assert resolution_unit(tmp_path / name) == tifffile.RESUNIT[tag], name
        with tifffile.TiffFile(tmp_path / name) as tif:
            assert tif.pages.first.tags["XResolution"].value == (4, 1), name  # pixels per unit
        image = open_image(tmp_path / name)
        assert image.pixel_size == (0.5, 0.25), name
        assert length_unit(image.unit) == length_unit(unit) and (image.unit is None) == (unit is None), name


def test_a_file_without_a_unit_reads_without_one(tmp_path):
    plane = np.zeros((20, 24), np.uint16)
    tifffile.imwrite(tmp_path / "none.tif", plane, resolution=(2.0, 2.0), resolutionunit="NONE")
    image = open_image(tmp_path / "none.tif")
    assert image.pixel_size == (0.5, 0.5) and image.unit is None and image.z_spacing is None
    # an ImageJ file without a unit, or with ImageJ's "pixel", has none either
    tifffile.imwrite(tmp_path / "ij.tif", plane, imagej=True, resolution=(2.0, 2.0), metadata={"unit": "pixel"})
    assert open_image(tmp_path / "ij.tif").unit is None
    # tifffile's default is inches: that file says inches, and is read so
    tifffile.imwrite(tmp_path / "inch.tif", plane, resolution=(2.0, 2.0))
    assert open_image(tmp_path / "inch.tif").unit == "inch"


def test_imagej_units_are_written_as_imagej_spells_them(tmp_path):
    plane = np.zeros((2, 20, 24), np.uint8)
    for unit, written, back in [
        ("µm", "micron", "micron"),
        ("micrometer", "micron", "micron"),
        ("um", "um", "um"),
        ("Å", "\\u00c5", "Å"),
    ]:
        like = like_image(plane, pixel_size=(0.5, 0.5), unit=unit, z_spacing=1.5, tiff={"imagej": True})
        write_tiff(tmp_path / "ij.tif", whole(plane), plane.shape, plane.dtype, "ZYX", like)
        with tifffile.TiffFile(tmp_path / "ij.tif") as tif:
            assert tif.is_imagej and tif.imagej_metadata["unit"] == written, unit
        image = open_image(tmp_path / "ij.tif")
        assert (image.unit, image.z_spacing) == (back, 1.5), unit


def test_ome_tiff_sizes_need_a_length_unit(tmp_path):
    stack = np.zeros((2, 20, 24), np.uint16)
    like = like_image(stack, pixel_size=(0.5, 0.5), z_spacing=3.0)  # no unit
    write_tiff(tmp_path / "a.ome.tif", whole(stack), stack.shape, stack.dtype, "ZYX", like)
    with tifffile.TiffFile(tmp_path / "a.ome.tif") as tif:
        assert "PhysicalSize" not in tif.ome_metadata  # OME would read a bare size as micrometres
    image = open_image(tmp_path / "a.ome.tif")
    assert image.pixel_size == (0.5, 0.5) and image.unit is None  # from the resolution tags

    with pytest.raises(ImageError, match="OME-TIFF cannot hold int64"):
        write_tiff(tmp_path / "b.ome.tif", whole(stack.astype(np.int64)), stack.shape, np.int64, "ZYX")
    assert not (tmp_path / "b.ome.tif").exists()


def test_write_ome_zarr_writes_the_z_scale_and_units(tmp_path):
    stack = (np.random.default_rng(5).random((3, 20, 24)) * 1000).astype(np.uint16)
    like = like_image(stack, pixel_size=(0.25, 0.2), unit="micron", z_spacing=0.75)
    write_ome_zarr(tmp_path / "s.ome.zarr", whole(stack), stack.shape, stack.dtype, "ZYX", like)
    meta = zarr.open_group(str(tmp_path / "s.ome.zarr"), mode="r").attrs["multiscales"][0]
    assert meta["datasets"][0]["coordinateTransformations"][0]["scale"] == [0.75, 0.25, 0.2]
    assert [a.get("unit") for a in meta["axes"]] == ["micrometer"] * 3
    image = open_image(tmp_path / "s.ome.zarr")
    assert (image.pixel_size, image.unit, image.z_spacing) == ((0.25, 0.2), "micrometer", 0.75)

    # an unknown Z spacing stays unknown: scale 1 without a unit
    write_ome_zarr(
        tmp_path / "t.ome.zarr",
        whole(stack),
        stack.shape,
        stack.dtype,
        "ZYX",
        like_image(stack, pixel_size=(0.25, 0.2), unit="micron"),
    )
    meta = zarr.open_group(str(tmp_path / "t.ome.zarr"), mode="r").attrs["multiscales"][0]
    assert meta["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 0.25, 0.2]
    assert [a.get("unit") for a in meta["axes"]] == [None, "micrometer", "micrometer"]
    assert open_image(tmp_path / "t.ome.zarr").z_spacing is None


def test_physical_sizes_survive_tiff_to_zarr_to_tiff(tmp_path, model):
    stack = (np.random.default_rng(6).random((3, 40, 48)) * 4000).astype(np.uint16)
    tifffile.imwrite(
        tmp_path / "ij.tif",
        stack,
        imagej=True,
        resolution=(5.0, 4.0),
        metadata={"axes": "ZYX", "spacing": 0.5, "unit": "micron"},
    )
    deblur_file(model, tmp_path / "ij.tif", tmp_path / "mid.ome.zarr")
    deblur_file(model, tmp_path / "mid.ome.zarr", tmp_path / "out.tif")  # from Zarr: nothing TIFF to copy
    image = open_image(tmp_path / "out.tif")
    assert image.pixel_size == pytest.approx((0.25, 0.2)) and image.z_spacing == pytest.approx(0.5)
    assert image.unit == "micrometer" and resolution_unit(tmp_path / "out.tif") == tifffile.RESUNIT.NONE


def test_open_image_refuses_a_folder_that_is_not_a_zarr_store(tmp_path):
    folder = tmp_path / "plain-folder"
    folder.mkdir()
    tifffile.imwrite(folder / "inside.tif", np.zeros((8, 8), np.uint8))
    with pytest.raises(ImageError, match="plain-folder: a folder that is not a Zarr store"):
        open_image(folder)
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    with pytest.raises(ImageError, match="empty.zarr: a folder that is not a Zarr store"):
        open_image(empty)
    # a Zarr store opens whatever its name
    write_ome_zarr(tmp_path / "store", whole(np.ones((8, 8), np.uint8)), (8, 8), np.uint8, "YX")
    assert open_image(tmp_path / "store").shape == (8, 8)

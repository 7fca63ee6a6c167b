"""The inference engine: N-D arrays and files, lazily or eagerly, on real dask schedulers."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import tifffile
import torch
import zarr

from conftest import tiny_config
from napari_mpt_deblur import MPT, save_model
from napari_mpt_deblur.config import ConfigError, DeblurSettings, IntensityNormalization, ModelCard
from napari_mpt_deblur.images import open_image
from napari_mpt_deblur.inference import (
    Cancelled,
    Deblurrer,
    InputError,
    deblur_array,
    deblur_file,
    deblur_lazy,
    iter_deblur,
    normalization_range,
)


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
    # planes are independent: the second plane alone gives the same result
    np.testing.assert_array_equal(deblur_array(model, stack[1, 2]), out[1, 2])


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
    np.testing.assert_array_equal(everything, deblur_array(model, stack))


def test_lazy_input_stays_lazy_and_zarr_input_works(model, tmp_path):
    source = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=(3, 40, 48), chunks=(1, 40, 48), dtype="u2")
    source[:] = (np.random.default_rng(2).random((3, 40, 48)) * 1000).astype(np.uint16)
    np.testing.assert_array_equal(deblur_lazy(model, source).compute(), deblur_array(model, source[:]))
    dask_input = da.from_array(source[:], chunks=(2, 20, 48))  # chunks that are not planes
    np.testing.assert_array_equal(deblur_array(model, dask_input), deblur_array(model, source[:]))


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
    assert normalization_range(stack, IntensityNormalization(mode="minmax")) == (0.0, 1000.0)


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


def test_tiles_blend_without_seams(model):
    y, x = np.mgrid[0:192, 0:224]
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
    events = list(iter_deblur(model, stack, settings=settings))
    assert events[-1].tiles_done == events[-1].tiles_total == 3 * 4
    assert events[-1].planes_done == 3 and events[-1].fraction == 1.0
    assert [e.tiles_done for e in events[:-1]] == list(range(1, 13))

    calls = count_forwards(model)
    steps = iter_deblur(model, stack, settings=settings)
    for _ in range(5):
        next(steps)
    steps.close()  # between tiles
    assert len(calls) == 5


def test_out_of_memory_retries_with_smaller_batches_and_tiles(model):
    """A device that refuses big passes (as a GPU out of memory does): the engine shrinks and goes on."""
    deblurrer = Deblurrer(model, DeblurSettings(tile=128, overlap=16, batch=4))
    real_network = deblurrer._network

    def small_passes_only(x):
        if x.shape[0] > 1 or x.shape[-1] > 64:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_network(x)

    deblurrer._network = small_passes_only
    plane = np.random.default_rng(9).random((150, 170)).astype(np.float32)
    events = list(iter_deblur(deblurrer, plane))
    messages = [e.message for e in events if e.message]
    assert any("1 tile(s) per batch" in m for m in messages) and any("64-pixel tiles" in m for m in messages)
    assert (deblurrer.batch, deblurrer.tile) == (1, 64)
    expected = deblur_array(model, plane, settings=DeblurSettings(tile=64, overlap=16))
    np.testing.assert_allclose(deblur_array(deblurrer, plane), expected, atol=1e-6)

    def never(x):
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

"""The Deblur dock widget: headless job checks, then the widget in a real viewer with tiny models."""

from __future__ import annotations

import copy
import functools
import gc
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pytest

from helpers import tiny_config
from napari_mpt_deblur import build_model, load_model, save_model
from napari_mpt_deblur.config import DeblurSettings, IntensityNormalization
from napari_mpt_deblur.data.focus import focus_score
from napari_mpt_deblur.images import ImageError
from napari_mpt_deblur.inference import DEFAULT_TILE, InputError, deblur_array, default_overlap
from napari_mpt_deblur.plugin.deblur_job import DeblurJob, LazyResult, focus_profile, result_layer_kwargs
from napari_mpt_deblur.plugin.layer_info import RECORD_KEY, LayerInfo, layer_axes
from napari_mpt_deblur.tiling import plan_tiles

CPU = DeblurSettings(device="cpu")


@pytest.fixture(scope="module")
def grey_model_file(tmp_path_factory) -> Path:
    import torch

    torch.manual_seed(1)
    return save_model(build_model(tiny_config()), tmp_path_factory.mktemp("models") / "grey.safetensors")


@pytest.fixture(scope="module")
def rgb_model_file(tmp_path_factory) -> Path:
    import torch

    torch.manual_seed(2)
    model = build_model(tiny_config(in_channels=3, out_channels=3))
    return save_model(model, tmp_path_factory.mktemp("models") / "rgb.safetensors")


def stack(shape: tuple[int, ...], dtype=np.uint16, seed: int = 0) -> np.ndarray:
    """A blurry-ish random image: smooth blobs plus noise, in the dtype's range."""
    rng = np.random.default_rng(seed)
    values = rng.random(shape)
    values = (values + np.roll(values, 1, -1) + np.roll(values, 1, -2)) / 3
    top = 255 if np.dtype(dtype) == np.uint8 else 4000
    return (values * top).astype(dtype)


# --- headless: deblur_job ---------------------------------------------------------------------------------------------


def test_layer_axes_use_letter_labels_then_the_recorded_axes_else_guess():
    assert layer_axes((2, 8, 8), False, ("z", "y", "x")) == "ZYX"
    assert layer_axes((2, 3, 8, 8), False, ("T", "c", "y", "x")) == "TCYX"
    assert layer_axes((2, 8, 8), False, ("-3", "-2", "-1")) == "ZYX"  # napari's default labels
    assert layer_axes((2, 8, 8), False, ("z", "z", "x")) == "ZYX"  # repeated letters name nothing
    assert layer_axes((8, 8), False, None) == "YX"
    assert layer_axes((2, 2, 8, 8), False, None) == "TZYX"
    assert layer_axes((2, 2, 2, 8, 8), False, ("0", "1", "2", "3", "4")) == "TZCYX"
    assert layer_axes((8, 8, 3), True, ("y", "x")) == "YXS"
    assert layer_axes((2, 8, 8, 3), True, None) == "ZYXS"
    # the axes the reader recorded, when the labels name none: as the writer reads them
    assert layer_axes((2, 8, 8), False, ("-3", "-2", "-1"), "CYX") == "CYX"
    assert layer_axes((2, 8, 8), False, ("t", "y", "x"), "CYX") == "TYX"
    with pytest.raises(ImageError, match="axis labels"):
        layer_axes((2, 2, 2, 2, 8, 8), False, None)


def test_job_refuses_what_the_model_cannot_process(grey_model_file, rgb_model_file):
    grey, rgb = load_model(grey_model_file), load_model(rgb_model_file)
    good = stack((2, 32, 32))

    def job(kind="image", data=good, model=grey, labels=None, rgb_flag=False, settings=CPU):
        return DeblurJob.from_layer(LayerInfo("cells", kind, data, rgb_flag, labels), model, settings, False)

    with pytest.raises(InputError, match="choose an image layer; labels layers hold annotations, not intensities"):
        job(kind="labels")
    with pytest.raises(InputError, match=r"'cells': the image is empty \(shape \(0, 32, 32\)\)"):
        job(data=np.zeros((0, 32, 32), np.uint16))
    with pytest.raises(InputError, match="unsupported pixel type bool"):
        job(data=np.zeros((2, 32, 32), bool))
    with pytest.raises(InputError, match="3-channel model needs RGB data"):
        job(model=rgb)
    with pytest.raises(InputError, match="only S .* may follow Y and X"):
        job(labels=("y", "x", "z"))
    with pytest.raises(InputError, match="no model chosen"):
        job(model=None)
    with pytest.raises(InputError, match="cuda:99"):
        job(settings=DeblurSettings(device="cuda:99"))
    # an RGB layer with a 3-channel model, and C of 3 named by the labels, are fine
    assert job(data=stack((32, 32, 3), np.uint8), model=rgb, rgb_flag=True).axes == "YXS"
    assert job(data=stack((3, 32, 32)), model=rgb, labels=("c", "y", "x")).axes == "CYX"
    # a multiscale layer: its full-resolution level
    pyramid = [stack((2, 32, 32)), stack((2, 16, 16))]
    full = DeblurJob.from_layer(
        LayerInfo.from_layer_data(pyramid, {"name": "big", "multiscale": True}), grey, CPU, True
    )
    assert full.data is pyramid[0] and full.axes == "ZYX"


def test_job_records_how_the_result_was_made(grey_model_file):
    model = load_model(grey_model_file)
    settings = DeblurSettings(tile=64, overlap=8, device="cpu")
    cells = LayerInfo("cells", "image", stack((2, 32, 32)))
    job = DeblurJob.from_layer(cells, model, settings, True, model_name=str(grey_model_file))
    assert job.model is model  # already on the CPU: shared, not copied
    record = job.provenance()
    assert record["source"] == "cells" and record["model"] == str(grey_model_file)
    assert record["mode"] == "lazy" and record["axes"] == "ZYX" and record["tile"] == 64
    assert record["settings"]["overlap"] == 8
    assert record["normalization"] == {"mode": "percentile", "low": 1.0, "high": 99.8, "per": "plane"}
    assert record["model_provenance"]["software"].startswith("napari-mpt-deblur")
    # what the settings leave to the model and the device is recorded as the engine resolved it
    used = DeblurJob.from_layer(cells, model, CPU, False).provenance()
    tile = model.card.tile_size or DEFAULT_TILE
    assert used["tile"] == tile and used["settings"]["overlap"] == default_overlap(tile)
    assert used["settings"]["batch"] == 1 and used["settings"]["precision"] == "fp32"
    assert used["settings"]["device"] == "cpu" and used["mode"] == "eager"


def test_result_layer_kwargs_keep_placement_and_display():
    source = {
        "name": "cells",
        "scale": [2.0, 0.5, 0.5],
        "translate": [1.0, 2.0, 3.0],
        "axis_labels": ("z", "y", "x"),
        "units": ("um", "um", "um"),
        "contrast_limits": [10.0, 900.0],
        "rgb": False,
        "colormap": "magma",
        "blending": "additive",
        "metadata": {"origin": "microscope"},
    }
    kwargs = result_layer_kwargs(source, {"model": "/models/m.safetensors"})
    assert kwargs["name"] == "cells deblurred (m)"  # which model made it
    for key in ("scale", "translate", "axis_labels", "units", "colormap", "blending"):
        assert kwargs[key] == source[key]
    assert kwargs["contrast_limits"] == [10.0, 900.0]
    assert kwargs["metadata"] == {"origin": "microscope", RECORD_KEY: {"model": "/models/m.safetensors"}}
    assert result_layer_kwargs(source)["name"] == "cells deblurred"  # no record: no model to name
    rgb = result_layer_kwargs({**source, "rgb": True, "colormap": "gray"})
    assert rgb["rgb"] is True and "colormap" not in rgb


def test_focus_profile_per_plane_numpy_and_dask():
    sharp = stack((32, 32), np.float32, seed=1)
    flat = np.full((32, 32), 100.0, np.float32)
    data = np.stack([np.stack([sharp, flat]), np.stack([flat, sharp])])  # T=2, Z=2
    scores = focus_profile(data, "TZYX")
    assert scores.shape == (4,)
    assert scores[0] == pytest.approx(focus_score(sharp)) and scores[3] == scores[0]
    assert scores[1] < scores[0] / 100
    lazy = da.from_array(data, chunks=(1, 1, 32, 32))
    np.testing.assert_allclose(focus_profile(lazy, "TZYX"), scores)
    rgb = stack((2, 32, 32, 3), np.uint8)
    np.testing.assert_allclose(focus_profile(rgb, "ZYXS"), [focus_score(p.mean(axis=-1)) for p in rgb])


# --- the widget in a viewer -------------------------------------------------------------------------------------------


@pytest.fixture
def registry(monkeypatch):
    """A fresh session for the docks (the one the plugin's docks share), empty: no bundled models either."""
    from napari_mpt_deblur.models import files
    from napari_mpt_deblur.plugin import session

    for name in list(files.BUNDLED_MODELS):
        monkeypatch.delitem(files.BUNDLED_MODELS, name)
    fresh = session.Session()
    monkeypatch.setattr(session, "SESSION", fresh)
    return fresh


@pytest.fixture
def records():
    """The notifications napari receives during the test."""
    from napari.utils.notifications import notification_manager

    start = len(notification_manager.records)
    return lambda: notification_manager.records[start:]


def errors(records) -> list[str]:
    return [str(n.message) for n in records() if str(n.severity).lower().endswith("error")]


@pytest.fixture
def viewer_and_widget(make_napari_viewer, registry, grey_model_file):
    from napari_mpt_deblur.plugin.deblur_widget import DeblurWidget

    registry.add_model_file(grey_model_file)
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-mpt-deblur", "Deblur")
    assert isinstance(widget, DeblurWidget)
    widget.device.value = "cpu"
    return viewer, widget


def wait_idle(qtbot, widget, timeout=60_000):
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)


def test_widget_opens_through_the_manifest(viewer_and_widget, grey_model_file):
    viewer, widget = viewer_and_widget
    assert widget.model.value == str(grey_model_file.resolve())
    assert widget.model.current_choice == "grey.safetensors"
    assert widget.layer.value is None and widget.run_button.enabled and not widget.cancel_button.enabled
    assert widget.tile.value == 512 and widget.overlap.value == 32  # no tile size in the model card
    assert (widget.low.value, widget.high.value) == (1.0, 99.8)
    assert widget.device.choices[0] == "auto" and "cpu" in widget.device.choices
    assert widget.device.current_choice == "cpu (CPU)"
    assert widget.native.isAncestorOf(widget.focus_plot)  # in the dock (in its scroll area)
    # the image list follows the viewer: added, renamed, removed; labels are not offered
    viewer.add_labels(np.zeros((8, 8), np.uint8), name="masks")
    layer = viewer.add_image(stack((8, 8)), name="cells")
    assert widget.layer.choices == (layer,)
    layer.name = "nuclei"
    assert widget.layer.current_choice == "nuclei"
    viewer.layers.remove(layer)
    assert widget.layer.choices == ()


def test_eager_deblur_adds_a_matching_layer(qtbot, viewer_and_widget, grey_model_file, records):
    viewer, widget = viewer_and_widget
    data = stack((3, 48, 48))
    source = viewer.add_image(
        data, name="cells", scale=(2.0, 0.5, 0.5), translate=(1.0, 2.0, 3.0), axis_labels=("z", "y", "x")
    )
    widget.layer.value = source
    widget.run_button.native.click()
    assert widget.running and not widget.run_button.enabled and widget.cancel_button.enabled
    wait_idle(qtbot, widget)
    assert errors(records) == []
    assert len(viewer.layers) == 2
    result = viewer.layers["cells deblurred (grey)"]  # named for the model that made it
    assert result.data.shape == data.shape and result.data.dtype == data.dtype
    np.testing.assert_array_equal(result.scale, source.scale)
    np.testing.assert_array_equal(result.translate, source.translate)
    assert result.axis_labels == source.axis_labels
    assert result.contrast_limits == source.contrast_limits
    expected = deblur_array(load_model(grey_model_file), data, "ZYX", widget.settings())
    np.testing.assert_array_equal(result.data, expected)
    assert not np.array_equal(expected, data)
    assert result.metadata[RECORD_KEY]["model"] == str(grey_model_file.resolve())
    assert result.metadata[RECORD_KEY]["mode"] == "eager"
    assert widget.progress_bar.value == widget.progress_bar.max == 3  # one tile per plane
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    assert "done" in widget.status.value
    assert [len(widget.focus_plot.series[name]) for name in ("input", "output")] == [3, 3]


def test_a_model_that_judges_the_width_says_what_it_judged(qtbot, viewer_and_widget, registry, tmp_path, records):
    import torch

    from napari_mpt_deblur.inference import estimate_blur_width

    torch.manual_seed(0)
    model = build_model(tiny_config(blur_conditioned=True, blur_estimator=True))
    with torch.no_grad():
        for parameter in model.blur_estimator.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))  # an untrained estimator says the same for anything
    registry.add_model_file(save_model(model, tmp_path / "judges.safetensors"))
    viewer, widget = viewer_and_widget
    data = stack((2, 48, 48), seed=5)
    data[1] = stack((48, 48), seed=6) // 4
    widget.layer.value = viewer.add_image(data, name="cells")
    widget.run_button.native.click()
    wait_idle(qtbot, widget)
    assert errors(records) == []
    widths = [estimate_blur_width(load_model(tmp_path / "judges.safetensors"), plane) for plane in data]
    assert widget.status.value.endswith(
        f"blur width estimated at {min(widths):.1f}-{max(widths):.1f} px (median {np.median(widths):.1f}) over 2 planes"
    )
    record = viewer.layers["cells deblurred (judges)"].metadata[RECORD_KEY]["estimated_blur_width"]
    assert record["planes"] == 2 and record["max_px"] == pytest.approx(max(widths), abs=1e-3)
    # a lazy result says each plane's when it is computed
    widget.lazy.value = True
    widget.run()
    qtbot.waitUntil(lambda: " s; blur width" in widget.status.value, timeout=60_000)
    shown = viewer.dims.current_step[0]
    assert " computed in " in widget.status.value
    assert widget.status.value.endswith(f"; blur width estimated at {widths[shown]:.1f} px")


@pytest.mark.slow
def test_lazy_deblur_shows_each_plane_when_computed_and_equals_eager(
    qtbot, viewer_and_widget, grey_model_file, records
):
    viewer, widget = viewer_and_widget
    data = stack((3, 48, 48), seed=3)
    source = viewer.add_image(data, name="cells", scale=(3.0, 1.0, 1.0))
    widget.layer.value = source
    widget.lazy.value = True
    widget.run_button.native.click()
    assert not widget.running  # added at once; the shown plane is computed in the background
    result = viewer.layers["cells deblurred (grey)"]
    assert isinstance(result.data, LazyResult) and result.data.shape == data.shape
    assert result.data.dtype == data.dtype and result.data.computed() == 0  # nothing computed by Run itself
    np.testing.assert_array_equal(result.scale, source.scale)
    assert result.metadata[RECORD_KEY]["mode"] == "lazy"
    expected = deblur_array(load_model(grey_model_file), data, "ZYX", widget.settings())
    qtbot.waitUntil(lambda: shows(viewer, result, expected), timeout=60_000)  # the middle plane, once computed
    assert result.data.computed() == 1 and "computed in" in widget.status.value
    viewer.dims.set_current_step(0, 2)
    qtbot.waitUntil(lambda: shows(viewer, result, expected), timeout=60_000)
    qtbot.waitUntil(lambda: "input" in widget.focus_plot.series, timeout=30_000)
    assert "output" not in widget.focus_plot.series and "every plane" in widget.status.value
    # read by anyone but napari's drawing, the data are the deblurred values, computed as needed
    np.testing.assert_array_equal(result.data[0, 5:9], expected[0, 5:9])
    np.testing.assert_array_equal(da.from_array(result.data, chunks=(1, 48, 48)).compute(), expected)
    lazy = np.asarray(result.data)
    widget.lazy.value = False
    assert widget.layer.value is source  # the result was selected: the dock stays on its source
    widget.run()
    wait_idle(qtbot, widget)
    eager = viewer.layers["cells deblurred (grey) [1]"].data
    np.testing.assert_array_equal(lazy, eager)
    np.testing.assert_array_equal(lazy, deblur_array(load_model(grey_model_file), data, "ZYX", widget.settings()))
    assert errors(records) == []


def shows(viewer, layer, expected: np.ndarray) -> bool:
    """Whether napari draws the plane of ``expected`` at the viewer's current step (a few pixels' values)."""
    plane = expected[viewer.dims.current_step[: expected.ndim - 2]]
    points = [(y, x) for y in (3, plane.shape[0] // 2, plane.shape[0] - 4) for x in (2, plane.shape[1] // 3)]
    step = tuple(viewer.dims.current_step[: expected.ndim - 2])
    return all(layer.get_value((*step, y, x)) == plane[y, x] for y, x in points)


@pytest.mark.slow
def test_lazy_mode_never_blocks_the_event_loop(qtbot, viewer_and_widget, grey_model_file):
    """The longest event-loop stall while the result layer computes planes, with a 10 ms timer (issue 19)."""
    from qtpy.QtCore import QTimer

    viewer, widget = viewer_and_widget
    data = stack((3, 256, 256), seed=5)
    widget.layer.value = viewer.add_image(data, name="cells")
    widget.tile.value = 0  # whole planes: computed in the GUI thread, each would stall it for over 0.5 s here
    widget.lazy.value = True
    expected = deblur_array(load_model(grey_model_file), data, "ZYX", widget.settings())
    gaps, last = [], [0.0]

    def tick() -> None:
        now = time.perf_counter()
        gaps.append(now - last[0])
        last[0] = now

    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(tick)
    widget.run_button.native.click()
    result = viewer.layers["cells deblurred (grey)"]
    assert result.data.computed() == 0 and result.get_value((1, 10, 10)) == 0  # drawn black, computed later
    # once the dock has drawn its focus plot (a one-off of Run, whatever the mode), browse two planes
    qtbot.waitUntil(lambda: "input" in widget.focus_plot.series and shows(viewer, result, expected), timeout=120_000)
    last[0] = time.perf_counter()
    timer.start()
    try:
        for plane in (2, 0):  # the user moves on: each plane is computed while the timer ticks
            viewer.dims.set_current_step(0, plane)
            assert result.get_value((plane, 10, 10)) == 0
            qtbot.waitUntil(lambda: shows(viewer, result, expected), timeout=120_000)
        qtbot.wait(50)  # the tick due now records the time since the last one, however long it was
    finally:
        timer.stop()
    assert result.data.computed() == 3 and len(gaps) > 10
    assert max(gaps) < 0.25, f"the event loop stalled for {max(gaps):.2f} s"


@pytest.mark.slow
def test_moving_to_another_plane_stops_the_one_being_computed(qtbot, viewer_and_widget, grey_model_file, records):
    from napari.utils import progress

    from napari_mpt_deblur.plugin import session

    viewer, widget = viewer_and_widget
    data = stack((3, 256, 256), seed=6)
    widget.layer.value = viewer.add_image(data, name="cells")
    widget.tile.value = 32  # many tiles per plane
    widget.lazy.value = True
    model = session.SESSION.load_model(widget.model.value)  # what the lazy layer runs (on the CPU: not copied)
    per_plane = plan_tiles(256, 256, 32, 8, model.config.size_multiple).count
    expected = deblur_array(load_model(grey_model_file), data, "ZYX", widget.settings())
    forwards: list[int] = []
    hook = model.register_forward_hook(lambda module, args, output: forwards.append(args[0].shape[0]))
    try:
        widget.run()
        result = viewer.layers["cells deblurred (grey)"]
        # the dock and napari's activity dock say which plane is computed, and the time left once measured
        qtbot.waitUntil(lambda: "left" in widget.status.value, timeout=60_000)
        assert "computing plane Z=1 of 'cells deblurred (grey)': tile" in widget.status.value
        (bar,) = [bar for bar in progress._all_instances if bar.desc.startswith("Deblurring cells deblurred")]
        assert bar.desc == "Deblurring cells deblurred (grey), plane Z=1" and bar.total == per_plane
        viewer.dims.set_current_step(0, 0)  # moved on: plane 1 is dropped between two tiles
        qtbot.waitUntil(lambda: shows(viewer, result, expected), timeout=60_000)
        assert not result.data.is_computed((1,)) and result.data.is_computed((0,))
        assert len(forwards) < 2 * per_plane and per_plane > 20  # plane 1 stopped long before its end
        viewer.dims.set_current_step(0, 1)  # back: computed now
        qtbot.waitUntil(lambda: shows(viewer, result, expected), timeout=60_000)
    finally:
        hook.remove()
    qtbot.waitUntil(lambda: not any(bar.desc.startswith("Deblurring cells") for bar in progress._all_instances))
    viewer.window.remove_dock_widget(widget.native)  # the layer outlives the dock that made it
    gc.collect()
    viewer.dims.set_current_step(0, 2)
    qtbot.waitUntil(lambda: shows(viewer, result, expected), timeout=60_000)
    viewer.layers.remove(result)  # nothing shows it: nothing is computed for it any more
    assert result.data.wanted() == [] and errors(records) == []


def test_an_eager_run_says_how_long_is_left(qtbot, viewer_and_widget):
    from napari.utils import progress

    viewer, widget = viewer_and_widget
    widget.layer.value = viewer.add_image(stack((4, 160, 160)), name="cells")
    widget.tile.value = 32
    widget.run()
    qtbot.waitUntil(lambda: "left" in widget.status.value, timeout=60_000)  # from the tiles' measured pace
    assert widget.status.value.startswith("plane 1/4, tile ") and ", about " in widget.status.value
    (bar,) = [bar for bar in progress._all_instances if bar.desc == "Deblurring cells"]
    qtbot.waitUntil(lambda: "<00:" in eta(bar))  # napari's activity dock: its bar's time left, once measured
    widget.cancel()
    wait_idle(qtbot, widget)


def eta(bar) -> str:
    """What napari's activity dock shows right of a bar: tqdm's ``done/total [elapsed<left, rate]``."""
    return str(bar).split("|")[-1] if bar.total else ""


def test_time_left_comes_from_the_pace_measured_since_the_first_report():
    from napari_mpt_deblur.plugin.timing import TimeLeft, format_seconds

    now = [100.0]
    left = TimeLeft(clock=lambda: now[0])
    assert left.update(1, 10) is None  # one report: no pace yet (the set-up before it does not count)
    now[0] += 4.0
    assert left.update(3, 10) == pytest.approx(14.0)  # 2 tiles in 4 s, 7 to go
    now[0] += 2.0
    assert left.describe(4, 10) == "about 12 s left"
    assert left.update(0, 10) is None  # a new job: measured again
    assert [format_seconds(s) for s in (42, 185, 3720, float("nan"))] == ["42 s", "3 min 05 s", "1 h 02 min", "?"]


def test_a_lazy_result_reads_as_the_eager_result_and_keeps_a_bounded_cache(grey_model_file):
    from napari_mpt_deblur.inference import Cancelled, PlaneByPlane
    from napari_mpt_deblur.plugin.deblur_job import SavedPlanes

    model = load_model(grey_model_file)
    data = stack((2, 3, 40, 48), seed=4)
    expected = deblur_array(model, data, "TZYX", CPU)
    # to rounding: the eager engine runs planes side by side on one thread each, a lazy plane on every thread
    same = functools.partial(np.testing.assert_allclose, rtol=0, atol=1)
    result = LazyResult(PlaneByPlane(model, data, "TZYX", CPU), cache_bytes=2 * 40 * 48 * 2)
    assert (result.shape, result.dtype, result.ndim, len(result), result.blocks) == (data.shape, data.dtype, 4, 2, 6)
    for index in [(1, 2), (Ellipsis, slice(3, 9)), (slice(None), [0, 2]), (-1, slice(None, None, 2), 5), (None, 0)]:
        same(result[index], expected[index])
    assert result.computed() <= 2  # planes beyond the cache's size are dropped (and computed again if read)
    same(np.asarray(result), expected)
    with pytest.raises(IndexError):
        result[2]
    assert copy.deepcopy(result) is result  # read-only (napari's Duplicate Layer deep-copies the data)
    # a writer's reads: each plane reported, and stopped between two tiles once cancelled
    reports: list[tuple[int, int]] = []
    reads = SavedPlanes(result, 6, lambda done, total: reports.append((done, total)), lambda: len(reports) >= 2)
    same(reads[0, 1], expected[0, 1])
    same(reads[1, 2], expected[1, 2])
    assert reports == [(1, 6), (2, 6)]
    with pytest.raises(Cancelled):
        reads[0, 0]


def test_float_results_keep_the_values_beyond_the_inputs_range(qtbot, viewer_and_widget, grey_model_file):
    """Float output is not clipped to the input's range (docs/napari.md says why); integers are, to their type."""
    viewer, widget = viewer_and_widget
    data = stack((2, 48, 48), np.float32) / np.float32(4000)  # intensities in 0..1
    widget.layer.value = viewer.add_image(data, name="cells", contrast_limits=(0, 1))
    widget.run()
    wait_idle(qtbot, widget)
    result = viewer.layers["cells deblurred (grey)"].data
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, deblur_array(load_model(grey_model_file), data, "ZYX", widget.settings()))
    assert result.min() < data.min() or result.max() > data.max()  # the network's output, as it came


def test_save_result_writes_the_plugins_tiff_and_keeps_the_calibration(
    qtbot, viewer_and_widget, tmp_path, monkeypatch, records
):
    from napari_mpt_deblur.plugin import deblur_widget
    from napari_mpt_deblur.plugin.io import write_tiff_layer

    viewer, widget = viewer_and_widget
    calibration = {"scale": (0.75, 0.2, 0.2), "units": ("micrometer",) * 3, "axis_labels": ("z", "y", "x")}
    source = tmp_path / "cells.tif"
    write_tiff_layer(str(source), stack((3, 48, 48)), {"name": "cells", **calibration})
    (layer,) = viewer.open(source, plugin="napari-mpt-deblur")  # as a user opens a file
    widget.layer.value = layer
    assert not widget.save_button.enabled  # nothing to save yet
    widget.run()
    wait_idle(qtbot, widget)
    result = viewer.layers["cells deblurred (grey)"]
    assert widget.save_button.enabled and widget.result_layer() == result  # (napari hands docks proxies)
    target = tmp_path / "results" / "cells deblurred.tif"
    target.parent.mkdir()
    asked = []

    def save_dialog(parent, caption, proposed, filters):
        asked.append((proposed, filters))
        return str(target), filters

    monkeypatch.setattr(deblur_widget.QFileDialog, "getSaveFileName", save_dialog)
    widget.save_button.native.click()
    assert widget.running and not widget.run_button.enabled  # saving in the background
    wait_idle(qtbot, widget)
    assert errors(records) == []
    assert asked == [(str(tmp_path / "cells deblurred (grey).tif"), "TIFF (*.tif *.tiff)")]  # the input's folder
    assert [path.name for path in target.parent.iterdir()] == [target.name]  # renamed into place, nothing else
    assert widget.status.value.startswith(f"saved to {target}")
    (reopened,) = viewer.open(target, plugin="napari-mpt-deblur")
    np.testing.assert_array_equal(reopened.data, result.data)
    np.testing.assert_allclose(reopened.scale, result.scale)
    np.testing.assert_allclose(reopened.scale, calibration["scale"])
    assert tuple(map(str, reopened.units)) == tuple(map(str, result.units)) == ("micrometer",) * 3
    assert reopened.axis_labels == result.axis_labels == ("z", "y", "x")
    # the input file is never replaced
    before = source.read_bytes()
    widget.save_result(source)
    assert "is the input of 'cells deblurred (grey)'" in errors(records)[-1] and source.read_bytes() == before


@pytest.mark.slow
def test_saving_a_lazy_result_computes_its_planes_and_cancel_writes_nothing(
    qtbot, viewer_and_widget, grey_model_file, tmp_path, records
):
    from napari_mpt_deblur.plugin.io import read_images

    viewer, widget = viewer_and_widget
    data = stack((3, 160, 160), seed=7)
    widget.layer.value = viewer.add_image(data, name="cells")
    widget.tile.value = 32
    widget.lazy.value = True
    widget.run()
    result = viewer.layers["cells deblurred (grey)"]
    widget.save_result(tmp_path / "cancelled")  # named without a suffix: .tif is added
    qtbot.waitUntil(lambda: widget.progress_bar.value >= 1, timeout=120_000)  # a plane written
    widget.cancel_button.native.click()
    wait_idle(qtbot, widget)
    assert widget.status.value == "cancelled: nothing was written" and list(tmp_path.iterdir()) == []
    widget.save_result(tmp_path / "all.tif")
    wait_idle(qtbot, widget, timeout=300_000)
    assert errors(records) == []
    ((saved, meta, _),) = read_images(tmp_path / "all.tif")
    np.testing.assert_array_equal(saved, deblur_array(load_model(grey_model_file), data, "ZYX", widget.settings()))
    assert result.data.is_computed((2,))  # the planes it computed stay for the viewer


def test_rgb_layer_with_a_grey_model(qtbot, viewer_and_widget, grey_model_file, records):
    viewer, widget = viewer_and_widget
    data = stack((48, 48, 3), np.uint8)
    widget.layer.value = viewer.add_image(data, name="slide", rgb=True)
    widget.run()
    wait_idle(qtbot, widget)
    assert errors(records) == []
    infos = [str(n.message) for n in records() if str(n.severity).lower().endswith("info")]
    assert any("'slide' is RGB and the model is grey" in info and "one by one" in info for info in infos)
    result = viewer.layers["slide deblurred (grey)"]
    assert result.rgb and result.data.shape == data.shape and result.data.dtype == np.uint8
    np.testing.assert_array_equal(result.data, deblur_array(load_model(grey_model_file), data, "YXS", CPU))


def test_cancel_mid_run_adds_nothing(qtbot, viewer_and_widget, records, grey_model_file):
    from napari.utils import progress

    viewer, widget = viewer_and_widget
    widget.layer.value = viewer.add_image(stack((6, 160, 160)), name="cells")
    widget.tile.value = 32  # many tiles per plane: the run is cancelled long before its end
    assert widget.overlap.value == 8
    model = load_model(grey_model_file)  # the dock's model: the newest file
    tiles = 6 * plan_tiles(160, 160, 32, 8, model.config.size_multiple).count
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: widget.progress_bar.value > 0, timeout=30_000)
    (bar,) = [bar for bar in progress._all_instances if bar.desc == "Deblurring cells"]  # napari's activity dock
    widget.cancel_button.native.click()
    wait_idle(qtbot, widget)
    assert bar.total == tiles and tiles > 30 and bar.n < 10  # stopped within a tile or two, not run to the end
    assert widget.progress_bar.value == 0 and widget.status.value == "cancelled"
    assert [layer.name for layer in viewer.layers] == ["cells"]
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    assert not any(bar.desc == "Deblurring cells" for bar in progress._all_instances)
    assert errors(records) == []


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # napari, empty layer
def test_bad_layers_notify_and_leave_the_viewer_alone(viewer_and_widget, rgb_model_file, registry, records):
    viewer, widget = viewer_and_widget
    labels = viewer.add_labels(np.zeros((3, 48, 48), np.uint8), name="masks")
    empty = viewer.add_image(np.zeros((0, 48, 48), np.uint16), name="empty", contrast_limits=(0, 1))
    grey = viewer.add_image(stack((3, 48, 48)), name="grey")
    names = [layer.name for layer in viewer.layers]
    widget.run(labels)
    widget.run(empty)
    registry.add_model_file(rgb_model_file)
    assert widget.model.value == str(rgb_model_file.resolve())  # a model just added is chosen
    widget.run(grey)
    messages = errors(records)
    assert len(messages) == 3
    assert "choose an image layer; labels layers hold annotations, not intensities" in messages[0]
    assert "the image is empty" in messages[1]
    assert "3-channel model needs RGB data" in messages[2]
    assert all(type(n).__name__ == "Notification" for n in records())  # a message, not a traceback
    assert [layer.name for layer in viewer.layers] == names and not widget.running
    assert widget.status.value == messages[2]


def test_errors_in_the_worker_notify_and_return_to_idle(qtbot, viewer_and_widget, records):
    viewer, widget = viewer_and_widget
    data = np.ones((2, 48, 48), np.float32)
    data[1, 3, 3] = np.nan
    widget.layer.value = viewer.add_image(data, name="holes", contrast_limits=(0, 1))
    widget.run()
    wait_idle(qtbot, widget)
    assert any("NaN" in message for message in errors(records))
    assert [layer.name for layer in viewer.layers] == ["holes"]
    assert widget.run_button.enabled and "NaN" in widget.status.value


def test_registry_and_model_file_feed_the_model_list(qtbot, make_napari_viewer, registry, tmp_path, records):
    from napari_mpt_deblur.plugin.deblur_widget import DeblurWidget

    widget = DeblurWidget(make_napari_viewer())
    assert widget.model.choices == () and "pick a model file" in widget.status.value
    widget.run(widget.viewer.add_image(stack((32, 32)), name="cells"))
    assert "no model chosen" in errors(records)[-1]
    # a model saved elsewhere (the Fine-tune dock) appears in the list, with its defaults
    model = build_model(tiny_config())
    saved = save_model(
        model,
        tmp_path / "finetuned.safetensors",
        tile_size=128,
        normalization=IntensityNormalization(low=2.0, high=99.0),
    )
    registry.add_model_file(saved)
    assert widget.model.choices == (str(saved.resolve()),)
    assert widget.model.current_choice == "finetuned.safetensors"
    assert (widget.tile.value, widget.overlap.value, widget.low.value, widget.high.value) == (128, 32, 2.0, 99.0)
    # the overlap follows the tile until the user sets it
    widget.tile.value = 64
    assert widget.overlap.value == 16  # a quarter of the tile, at most 32
    widget.overlap.value = 10
    widget.tile.value = 256
    assert widget.overlap.value == 10 and widget.settings().overlap == 10
    # a file picked in the widget is added and chosen; a broken one is refused
    other = save_model(model, tmp_path / "other" / "finetuned.safetensors")
    widget.model_file.value = other
    assert widget.model.value == str(other.resolve())
    assert set(widget.model.choices) == {str(saved.resolve()), str(other.resolve())}
    assert str(other.resolve()) in widget.model.current_choice  # same file names: full paths shown
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a model")
    widget.model_file.value = broken
    assert "broken.safetensors" in errors(records)[-1] and len(widget.model.choices) == 2
    # changed percentiles override the model's normalisation, the defaults do not
    widget.model.value = str(saved.resolve())
    assert widget.settings().normalization is None
    widget.low.value = 5.0
    assert widget.settings().normalization == IntensityNormalization(low=5.0, high=99.0)


def test_a_model_just_opened_comes_first_and_is_chosen_in_every_picker(
    make_napari_viewer, registry, grey_model_file, rgb_model_file, monkeypatch
):
    from napari_mpt_deblur.models import files

    monkeypatch.setitem(files.BUNDLED_MODELS, "default", "default.safetensors")  # a bundled model is listed too
    viewer = make_napari_viewer()
    _, deblur = viewer.window.add_plugin_dock_widget("napari-mpt-deblur", "Deblur")
    _, finetune = viewer.window.add_plugin_dock_widget("napari-mpt-deblur", "Fine-tune (EFCR_ex)")
    grey, rgb = str(grey_model_file.resolve()), str(rgb_model_file.resolve())
    assert deblur.model.value == finetune.model.value == "default"
    assert deblur.model_file.value is None  # a bundled model has no file to show

    finetune.model_file.value = grey_model_file  # "open..." in one dock
    assert deblur.model.choices == finetune.model.choices == (grey, "default")
    assert deblur.model.value == finetune.model.value == grey
    assert deblur.model_file.value == finetune.model_file.value == Path(grey)
    registry.add_model_file(rgb_model_file)  # as the Fine-tune dock's Save does
    assert deblur.model.choices == finetune.model.choices == (rgb, grey, "default")
    assert deblur.model.value == finetune.model.value == rgb
    assert deblur.model_file.value == finetune.model_file.value == Path(rgb)
    deblur.model_file.value = grey_model_file  # opened again: first again
    assert deblur.model.choices == finetune.model.choices == (grey, rgb, "default")
    assert finetune.model.value == grey


def test_the_model_file_box_shows_the_chosen_model(
    make_napari_viewer, registry, grey_model_file, rgb_model_file, monkeypatch
):
    from napari_mpt_deblur.models import files

    monkeypatch.setitem(files.BUNDLED_MODELS, "default", "default.safetensors")
    viewer = make_napari_viewer()
    _, deblur = viewer.window.add_plugin_dock_widget("napari-mpt-deblur", "Deblur")
    _, finetune = viewer.window.add_plugin_dock_widget("napari-mpt-deblur", "Fine-tune (EFCR_ex)")
    registry.add_model_file(rgb_model_file)
    deblur.model_file.value = grey_model_file
    grey, rgb = str(grey_model_file.resolve()), str(rgb_model_file.resolve())
    assert deblur.model.value == grey and deblur.model_file.value == Path(grey)

    deblur.model.value = rgb  # chosen in the menu: the box follows, in that dock only
    assert deblur.model_file.value == Path(rgb) and finetune.model_file.value != Path(rgb)
    deblur.model.value = "default"
    assert deblur.model_file.value is None  # a bundled model has no file
    assert deblur.model.value == "default" and deblur._models.problem is None
    finetune.model.value = rgb
    assert finetune.model_file.value == Path(rgb) and deblur.model_file.value is None


@pytest.mark.slow
def test_the_dock_starts_on_the_selected_layer_and_follows_it_until_picked(make_napari_viewer, registry):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-mpt-deblur", "defocused_cells")
    sharp, defocused = viewer.layers["sharp cells"], viewer.layers["defocused cells"]
    viewer.layers.selection.active = defocused
    _, widget = viewer.window.add_plugin_dock_widget("napari-mpt-deblur", "Deblur")
    assert widget.layer.value is defocused  # the selected layer, not the first in the list
    viewer.layers.selection.active = sharp
    assert widget.layer.value is sharp
    viewer.add_labels(np.zeros((8, 8), np.uint8), name="masks")  # not an image: the dock stays
    assert widget.layer.value is sharp
    result = viewer.add_image(
        stack((8, 8)), name="defocused cells deblurred (default)", metadata={RECORD_KEY: {"source": defocused.name}}
    )
    assert widget.layer.value is defocused  # a deblurred result selected: its source, not the result again
    widget.layer.value = sharp  # picked by hand: the selection no longer moves it
    viewer.layers.selection.active = defocused
    assert widget.layer.value is sharp and widget.layer.choices == (sharp, defocused, result)
    viewer.layers.remove(sharp)  # the layer picked is gone: the dock follows the selection again
    viewer.layers.selection.active = result
    assert widget.layer.value is defocused


def test_a_refused_model_file_leaves_every_valid_choice_working(
    qtbot, viewer_and_widget, grey_model_file, tmp_path, records
):
    viewer, widget = viewer_and_widget
    grey = str(grey_model_file.resolve())
    viewer.add_image(stack((32, 32)), name="cells")
    import torch

    not_a_model = tmp_path / "weights.pth"
    torch.save({"epoch": 3}, not_a_model)  # a PyTorch file, not an MPT checkpoint

    def refused() -> None:
        widget.model_file.value = not_a_model
        assert "weights.pth" in errors(records)[-1] and "weights.pth" in widget.status.value
        count = len(errors(records))
        widget.run()
        assert len(errors(records)) == count + 1 and not widget.running  # refused, and said so
        assert widget.model.value == grey  # the file did not join the menu

    def runs(result: str) -> None:
        assert "weights.pth" not in widget.status.value
        widget.run()
        wait_idle(qtbot, widget)
        assert result in viewer.layers

    refused()
    widget.model.native.activated.emit(widget.model.native.currentIndex())  # the model already chosen, again
    assert widget.model_file.value == Path(grey) and widget.status.value.startswith("model: grey.safetensors")
    runs("cells deblurred (grey)")
    refused()
    widget.model_file.value = None  # the box cleared
    assert widget.model.value == grey
    runs("cells deblurred (grey) [1]")
    refused()
    widget.model_file.value = grey_model_file  # a good file
    runs("cells deblurred (grey) [2]")


def test_closing_the_dock_mid_run_stops_quietly(qtbot, viewer_and_widget, records):
    from napari.utils import progress

    viewer, widget = viewer_and_widget
    widget.layer.value = viewer.add_image(stack((6, 64, 64)), name="cells")
    widget.tile.value = 32
    widget.run()
    qtbot.waitUntil(lambda: widget.progress_bar.value > 0, timeout=30_000)
    (bar,) = [bar for bar in progress._all_instances if bar.desc == "Deblurring cells"]
    viewer.window.remove_dock_widget(widget.native)
    wait_idle(qtbot, widget)
    assert bar.n < 10  # the work stopped with the dock
    qtbot.wait(50)
    assert [layer.name for layer in viewer.layers] == ["cells"]
    assert errors(records) == []
    assert not widget.run_button.enabled  # taken out of the viewer: it runs nothing more
    widget.native.deleteLater()
    qtbot.wait(50)


def test_deleting_the_widget_mid_run_stops_quietly(qtbot, make_napari_viewer, registry, grey_model_file, records):
    from napari_mpt_deblur.plugin.deblur_widget import DeblurWidget

    registry.add_model_file(grey_model_file)
    viewer = make_napari_viewer()
    widget = DeblurWidget(viewer)
    widget.device.value = "cpu"
    widget.tile.value = 32
    widget.run(viewer.add_image(stack((6, 64, 64)), name="cells"))
    qtbot.waitUntil(lambda: widget.progress_bar.value > 0, timeout=30_000)
    widget.native.deleteLater()  # e.g. the viewer closing with the dock
    wait_idle(qtbot, widget)
    qtbot.wait(50)
    assert [layer.name for layer in viewer.layers] == ["cells"]
    assert errors(records) == []
    registry.add_model_file(grey_model_file)  # the registry no longer calls into the deleted widget


def test_engine_messages_and_out_of_memory_reach_the_user(qtbot, viewer_and_widget, monkeypatch, records):
    import torch
    from napari.utils.notifications import notification_manager

    from napari_mpt_deblur.inference import DeblurProgress
    from napari_mpt_deblur.plugin import deblur_job

    def out_of_memory(*args, **kwargs):
        yield DeblurProgress(0, 2, 1, 4, "out of GPU memory: retrying with 2 tile(s) per batch")
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(deblur_job, "iter_deblur", out_of_memory)
    viewer, widget = viewer_and_widget
    widget.run(viewer.add_image(stack((2, 48, 48)), name="cells"))
    wait_idle(qtbot, widget)
    infos = [str(n.message) for n in notification_manager.records if str(n.severity).lower().endswith("info")]
    assert "out of GPU memory: retrying with 2 tile(s) per batch" in infos
    (message,) = errors(records)
    assert "try smaller tiles or the CPU" in message and "Tried to allocate" in message
    assert [layer.name for layer in viewer.layers] == ["cells"] and widget.run_button.enabled


# --- helpers shared with the Fine-tune dock (widgets_common) ----------------------------------------------------------


def test_worker_errors_reach_on_error_and_the_dock_returns_to_idle(qtbot):
    from napari.utils import progress

    from napari_mpt_deblur.plugin.widgets_common import DockState, start_worker

    failure = RuntimeError("CUDA error: an illegal memory access")  # superqt alone would swallow it

    def work():
        yield 1
        raise failure

    calls = []
    state = DockState()
    state.start(
        work(),
        "failing work",
        on_yield=lambda value: calls.append(("yield", value)),
        on_return=lambda value: calls.append(("return", value)),
        on_error=lambda error: calls.append(("error", error)),
        on_finished=lambda: calls.append(("finished", state.running)),
    )
    assert state.running
    qtbot.waitUntil(lambda: ("finished", False) in calls, timeout=10_000)
    assert calls == [("yield", 1), ("error", failure), ("finished", False)]  # the error as raised, not wrapped
    assert state.worker is None and state.pbar is None
    assert not any(bar.desc == "failing work" for bar in progress._all_instances)

    # a plain function, and an error other than a RuntimeError
    calls.clear()
    start_worker(lambda: 1 / 0, on_return=calls.append, on_error=calls.append, on_finished=lambda: calls.append("end"))
    qtbot.waitUntil(lambda: "end" in calls, timeout=10_000)
    assert [type(x) for x in calls] == [ZeroDivisionError, str]


def test_quitting_a_worker_closes_its_generator_in_the_worker_thread(qtbot):
    import threading

    from napari_mpt_deblur.plugin.widgets_common import start_worker

    closed_in = []

    def endless():
        try:
            while True:
                yield
        finally:  # e.g. the engine leaving torch.inference_mode, which is per thread
            closed_in.append(threading.get_ident())

    calls = []
    worker = start_worker(
        endless(),
        on_yield=lambda _: worker.quit(),
        on_return=calls.append,
        on_error=calls.append,
        on_finished=lambda: calls.append("end"),
    )
    qtbot.waitUntil(lambda: "end" in calls, timeout=10_000)
    assert calls == ["end"] and len(closed_in) == 1 and closed_in[0] != threading.get_ident()

    class Sink:  # a worker holds a bound method's object weakly: a gone widget is not called
        def take(self, value):
            calls.append(value)

    sink = Sink()
    start_worker(lambda: "late", on_return=sink.take, on_finished=lambda: calls.append("end 2"))
    del sink
    qtbot.waitUntil(lambda: "end 2" in calls, timeout=10_000)
    assert "late" not in calls


def test_the_dock_state_closes_when_the_dock_closes_or_the_widget_dies(qtbot):
    from magicgui.widgets import Container
    from qtpy.QtWidgets import QWidget

    from napari_mpt_deblur.plugin.widgets_common import DockState, stop_when_closed

    def endless():
        while True:
            yield

    widget, dock, state = Container(), QWidget(), DockState()
    stop_when_closed(widget, state)
    disconnected = []
    state.disconnects.append(lambda: disconnected.append(True))
    widget.native.setParent(None)  # not docked yet: nothing happens
    assert not state.closed
    widget.native.setParent(dock)
    worker = state.start(endless(), "endless")
    widget.native.setParent(None)  # napari closing the dock
    assert state.closed and not state.deleted and worker.abort_requested and disconnected == [True]
    qtbot.waitUntil(lambda: not state.running, timeout=10_000)

    other, other_state = Container(), DockState()
    stop_when_closed(other, other_state)
    worker = other_state.start(endless(), "endless")
    other.native.deleteLater()  # the viewer closing with the dock
    qtbot.waitUntil(lambda: other_state.deleted, timeout=10_000)
    assert other_state.closed and worker.abort_requested
    qtbot.waitUntil(lambda: not other_state.running, timeout=10_000)
    dock.deleteLater()


def test_model_picker_follows_the_registry_weakly_and_refuses_broken_files(registry, grey_model_file, tmp_path):
    import gc

    from magicgui.widgets import Label

    from napari_mpt_deblur.plugin.widgets_common import ModelPicker

    status = Label()
    picker = ModelPicker(status, label="model", tooltip="")
    registry.add_model_file(grey_model_file)
    assert picker.combo.value == str(grey_model_file.resolve())
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a model")
    picker.file.value = broken
    assert "broken.safetensors" in picker.problem and "Pick another model file" in picker.problem
    assert status.value == picker.problem and picker.combo.choices == (str(grey_model_file.resolve()),)
    picker.file.value = grey_model_file
    assert picker.problem is None
    del picker
    gc.collect()
    registry.add_model_file(grey_model_file)  # the registry kept no picker alive, and drops its listener
    assert registry._listeners == []


# --- fitting a laptop screen ------------------------------------------------------------------------------------------

LAPTOP = (1366, 768)
"""A common laptop screen (pixels): every dock must work there with another dock open."""
DOCK_MIN_HEIGHT = 200
"""The most a dock may ask for (its minimum size hint): two of them and napari's own docks fit LAPTOP."""
DOCK_MIN_WIDTH = 360
"""The widest a dock may insist on being (its minimum size hint): napari's layer docks and one of ours leave the
canvas more than half of LAPTOP's width."""


def fully_shown(widget, window) -> bool:
    """Whether a Qt widget is shown whole: not hidden, not clipped by its scroll area, inside the window."""
    from qtpy.QtCore import QPoint, QRect

    if not widget.isVisible() or widget.visibleRegion().boundingRect().size() != widget.size():
        return False
    return window.rect().contains(QRect(widget.mapTo(window, QPoint(0, 0)), widget.size()))


def check_fits_a_laptop(qtbot, viewer, docks) -> None:
    """Two docks open in a window the size of a laptop screen: the window can be that small, each dock asks for
    at most DOCK_MIN_HEIGHT and DOCK_MIN_WIDTH, and each of its key buttons is shown whole once scrolled to.

    ``docks``: ``[(the dock widget napari made, the plugin's widget, [its key buttons, or plots]), ...]``.
    """
    window = viewer.window._qt_window
    window.show()
    window.resize(*LAPTOP)
    qtbot.waitUntil(lambda: (window.width(), window.height()) == LAPTOP)
    assert window.minimumSizeHint().height() <= LAPTOP[1]
    # a layer's long name, in every layer menu, does not widen a dock
    viewer.add_image(np.ones((16, 16), np.float32), name="a layer whose name is far longer than any dock is wide " * 2)
    for dock, widget, buttons in docks:
        assert dock.minimumSizeHint().height() <= DOCK_MIN_HEIGHT
        assert dock.minimumSizeHint().width() <= DOCK_MIN_WIDTH, widget
        assert dock.isVisible() and widget.scroll_area.viewport().height() > 0
        for button in buttons:
            widget.reveal(button)
            native = getattr(button, "native", button)  # a magicgui widget, or a plot
            qtbot.waitUntil(lambda native=native: fully_shown(native, window), timeout=5_000)
    check_labels_whole_at_the_narrowest(qtbot, window, [(dock, widget) for dock, widget, _ in docks])


def check_labels_whole_at_the_narrowest(qtbot, window, docks) -> None:
    """With the docks as narrow as they go, each still shows its fields' labels whole, in one column per dock, its
    folded sections' too.

    ``docks``: ``[(the dock widget napari made, the plugin's widget), ...]``, side by side in one dock area.
    """
    from qtpy.QtCore import Qt

    for _, widget in docks:
        for section in widget.sections:  # folded when the dock was shown: their labels were measured then too
            if not section.is_expanded():
                section.toggle.click()
    narrowest = max(dock.minimumSizeHint().width() for dock, _ in docks)  # one area: as narrow as its widest
    window.resizeDocks([dock for dock, _ in docks], [narrowest] * len(docks), Qt.Orientation.Horizontal)
    qtbot.waitUntil(lambda: all(dock.width() <= narrowest + 2 for dock, _ in docks))
    for _, widget in docks:
        labels = [(row._label_widget.value, row._label_widget.native) for row in widget.labelled_rows()]
        assert labels
        for text, label in labels:
            if label.isVisible():
                needed = max(label.fontMetrics().horizontalAdvance(line) for line in text.splitlines())
                assert label.width() >= needed, text
        assert len({label.minimumWidth() for _, label in labels}) == 1  # one column of labels
        # ... as wide as each other, padding and all, so that the fields line up (the widest label's field once
        # started 11 pixels right of the others)
        assert len({label.width() for _, label in labels if label.isVisible()}) == 1, [
            (text, label.width()) for text, label in labels if label.isVisible()
        ]


@pytest.mark.slow
def test_the_dock_fits_a_laptop_screen_beside_the_fine_tune_dock(
    make_napari_viewer, qtbot, registry, grey_model_file, tmp_path
):
    import shutil

    # a model file's long path, in both docks' model menus, does not widen them (it widened both to 602 pixels)
    folder = tmp_path / ("a-folder-with-a-long-name-" * 6)
    folder.mkdir()
    long_path = folder / "a-model-with-an-equally-long-name.safetensors"
    registry.add_model_file(Path(shutil.copy(grey_model_file, long_path)))
    viewer = make_napari_viewer()
    viewer.open_sample("napari-mpt-deblur", "defocused_cells")
    dock, widget = viewer.window.add_plugin_dock_widget("napari-mpt-deblur", "Deblur")
    # the rarely changed settings fold away, and come back at a click
    (advanced,) = widget.sections
    assert not advanced.is_expanded() and not widget.tile.native.isVisibleTo(widget.native)
    advanced.toggle.click()
    assert advanced.is_expanded() and widget.tile.native.isVisibleTo(widget.native)
    advanced.toggle.click()
    assert not widget.device.native.isVisibleTo(widget.native)
    tune_dock, tune = viewer.window.add_plugin_dock_widget("napari-mpt-deblur", "Fine-tune (EFCR_ex)")
    check_fits_a_laptop(
        qtbot,
        viewer,
        [
            (dock, widget, [widget.run_button, widget.save_button, widget.tile]),  # the tile: in the advanced part
            (tune_dock, tune, [tune.start_button, tune.save_button, tune.export_button]),
        ],
    )
    assert advanced.is_expanded()  # revealing the tile box opened its section


@pytest.mark.slow
def test_a_long_status_line_wraps_inside_every_dock_and_shows_whole(make_napari_viewer, qtbot, registry):
    """A finished lazy run's status (what it estimated, then how far the browsing got) runs to several lines: each
    dock wraps it to its own width, shows all of it, and keeps the status line's name."""
    viewer = make_napari_viewer()
    viewer.open_sample("napari-mpt-deblur", "defocused_cells")
    window = viewer.window._qt_window
    window.show()
    window.resize(*LAPTOP)
    qtbot.waitUntil(lambda: (window.width(), window.height()) == LAPTOP)
    long_status = (  # as a lazy run words it
        "defocused cells: each plane is computed in the background when shown (black until then). The plot shows "
        "the input's focus only: the output's would compute every plane.\n"
        "3 of 9 planes computed; blur width estimated at 5.3-5.8 px (median 5.5)"
    )
    for name in ("Deblur", "Fine-tune (EFCR_ex)", "Compare detections"):
        dock, widget = viewer.window.add_plugin_dock_widget("napari-mpt-deblur", name)
        widget.status.value = long_status
        status, viewport = widget.status.native, widget.scroll_area.viewport()
        widget.reveal(status)
        qtbot.waitUntil(lambda status=status: fully_shown(status, window), timeout=5_000)
        qtbot.waitUntil(lambda status=status: status.height() >= status.heightForWidth(status.width()))
        # inside the dock, not past its right edge (there is no horizontal scroll bar), and wrapped
        assert status.mapTo(viewport, status.rect().topRight()).x() < viewport.width()
        assert status.height() >= 4 * status.fontMetrics().lineSpacing()
        name_label = widget.status._labeled_widget()._label_widget.native
        assert name_label.width() >= name_label.minimumSizeHint().width()  # "status" is not squeezed away
        viewer.window.remove_dock_widget(dock)


def test_the_blur_width_box_reaches_a_model_that_takes_one_and_is_off_for_others(
    viewer_and_widget, registry, grey_model_file, tmp_path
):
    import torch

    viewer, widget = viewer_and_widget
    # the grey model takes no width: the box is off, and its value is not passed
    assert not widget.blur_sigma.enabled and "takes no blur width" in widget.blur_sigma.tooltip
    widget.blur_sigma.value = 2.0
    assert widget.settings().blur_sigma_px is None
    torch.manual_seed(3)
    conditioned = save_model(build_model(tiny_config(blur_conditioned=True)), tmp_path / "width.safetensors")
    registry.add_model_file(conditioned)
    widget.model.value = str(conditioned.resolve())
    assert widget.blur_sigma.enabled and "if you know it" in widget.blur_sigma.tooltip
    assert widget.settings().blur_sigma_px == 2.0
    widget.blur_sigma.value = 0.0  # 0: judged from the image
    assert widget.settings().blur_sigma_px is None

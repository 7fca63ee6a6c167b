"""The Compare detections dock: its headless checks and numbers, then the dock in a real viewer with a real StarDist
model (trained on synthetic nuclei, in the worker process) and the bundled deblurring model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import napari.layers
import numpy as np
import pytest
from scipy.ndimage import binary_erosion, gaussian_filter

from napari_mpt_deblur.detection import DetectionError, WorkerCrashed, compare_labels, shared_worker
from napari_mpt_deblur.detection.metrics import SummaryTable
from napari_mpt_deblur.detection.synthetic import synthetic_nuclei
from napari_mpt_deblur.inference import InputError
from napari_mpt_deblur.models.files import ModelFileError
from napari_mpt_deblur.plugin import compare_job, compare_widget, session
from napari_mpt_deblur.plugin.compare_job import (
    CONTOUR,
    Selection,
    folder_problem,
    image_titles,
    labels_file_name,
    plot_bars,
    rgb_note,
    selection_problem,
    stardist_channels,
    stardist_choices,
    suggest_after,
    summary,
    write_labels,
)
from napari_mpt_deblur.plugin.errors import COMPARE, user_message
from napari_mpt_deblur.plugin.io import read_images
from napari_mpt_deblur.plugin.layer_info import RECORD_KEY

PLUGIN, DOCK = "napari-mpt-deblur", "Compare detections"
MEASURES = ["image", "objects", "mean area (px)", "diameter (px)", "solidity"]
SCORES = ["AP@0.5", "AP@0.7", "AP@0.9", "mean AP", "F1@0.5"]
WAIT_MS = 240_000  # a first detection starts TensorFlow in the worker process, on 2 busy CPU cores


def nuclei(count: int = 2, size: int = 128, seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(blurry, sharp, truth): synthetic nuclei, the same blurred (Gaussian, sigma 3) with noise, and their labels."""
    sharp, truth = synthetic_nuclei(count, size, seed)
    rng = np.random.default_rng(seed)
    blurry = np.stack([gaussian_filter(plane, 3) for plane in sharp]) + rng.normal(0, 0.02, sharp.shape)
    return blurry.astype(np.float32), sharp, truth


@pytest.fixture(scope="module", autouse=True)
def _stop_the_stardist_process():
    yield
    shared_worker().close()


@pytest.fixture(autouse=True)
def _fresh_session(monkeypatch):
    """StarDist folders remembered by one test are not offered in the next."""
    monkeypatch.setattr(session, "SESSION", session.Session())


@pytest.fixture
def records():
    """The notifications napari receives during the test."""
    from napari.utils.notifications import notification_manager

    start = len(notification_manager.records)
    return lambda: notification_manager.records[start:]


def messages(records, severity: str) -> list[str]:
    return [str(n.message) for n in records() if str(n.severity).lower().endswith(severity)]


# --- headless: compare_job --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # napari, empty layer
def test_selection_problems_say_what_to_choose():
    blurry, sharp, truth = nuclei(2, 32)
    before = napari.layers.Image(blurry, name="cells")
    after = napari.layers.Image(sharp, name="cells deblurred")
    labels = napari.layers.Labels(truth, name="truth")
    grey_truth = napari.layers.Image(truth.astype(np.uint16), name="truth from a file")
    rgb = napari.layers.Image(np.zeros((32, 32, 3), np.uint8), name="slide", rgb=True)

    def problem(deblur_first=False, channels=1, **chosen):
        return selection_problem(Selection(**{"before": before, "after": after, **chosen}), deblur_first, channels)

    assert problem() is None and problem(sharp=napari.layers.Image(sharp, name="sharp"), truth=labels) is None
    assert problem(truth=grey_truth) is None  # integer images read from files are labels too
    assert "No 'before' image" in problem(before=None)
    assert "No 'after' image" in problem(after=None) and problem(after=None, deblur_first=True) is None
    assert "'truth' (before) is a labels layer: choose an image layer" in problem(before=labels)
    empty = napari.layers.Image(np.zeros((0, 32, 32), np.float32), name="empty", contrast_limits=(0, 1))
    assert "'empty' (after) is empty (shape (0, 32, 32))" in problem(after=empty)
    assert "chosen as both 'before' and 'after'" in problem(after=before)
    small = napari.layers.Image(blurry[:, :16], name="crop")
    assert "'crop' (after) is (2, 16, 32) but 'cells' (before) is (2, 32, 32)" in problem(after=small)
    assert "same shape" in problem(sharp=small)
    assert "RGB" in problem(
        before=rgb, after=napari.layers.Image(np.zeros((32, 32, 3), np.float32), name="grey", rgb=False)
    )
    assert "takes RGB images" in problem(channels=3)
    float_truth = napari.layers.Image(truth.astype(np.float32), name="probabilities")
    assert "'probabilities' (ground truth) is not a label image" in problem(truth=float_truth)
    assert "has shape (2, 16, 32)" in problem(truth=napari.layers.Labels(truth[:, :16], name="t"))
    # a grey model on RGB layers: a warning, not a refusal
    rgb_after = napari.layers.Image(np.ones((32, 32, 3), np.uint8), name="slide deblurred", rgb=True)
    assert problem(before=rgb, after=rgb_after) is None
    assert "mean of the red, green and blue" in rgb_note(Selection(rgb, rgb_after), 1)
    assert rgb_note(Selection(rgb, rgb_after), 3) is None and rgb_note(Selection(before, after), 1) is None


def test_stardist_choices_remember_folders(tmp_path):
    assert [choice for _, choice in stardist_choices()] == ["2D_versatile_fluo", "2D_versatile_he", "2D_paper_dsb2018"]
    assert stardist_channels("2D_versatile_fluo") == 1 and stardist_channels("2D_versatile_he") == 3
    assert stardist_channels(str(tmp_path)) is None  # no config.json
    assert "has no config.json" in folder_problem(tmp_path)
    first, second = tmp_path / "a" / "nuclei", tmp_path / "b" / "nuclei"
    for folder, channels in ((first, 1), (second, 3)):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"n_channel_in": channels, "n_dim": 2}))
        assert folder_problem(folder) is None
    session.SESSION.add_stardist_folder(first)
    assert stardist_choices()[0] == ("nuclei", str(first.resolve()))
    session.SESSION.add_stardist_folder(second)
    session.SESSION.add_stardist_folder(first)  # chosen again: first again, once
    labels = [label for label, _ in stardist_choices()]
    assert labels[:2] == [str(first.resolve()), str(second.resolve())]  # same names: full paths
    assert len(labels) == 5 and stardist_channels(str(second)) == 3


def test_suggested_after_layer():
    assert suggest_after(["cells", "other", "cells deblurred", "cells deblurred [1]"], "cells") == "cells deblurred [1]"
    assert suggest_after(["cells", "x deblurred", "other"], "cells") == "x deblurred"
    assert suggest_after(["cells", "other"], "cells") == "other"
    assert suggest_after(["cells"], "cells") is None


def scored_comparison(with_truth: bool = True):
    """A comparison of real label images: 'blurry' misses objects and shrinks the rest, 'deblurred' shrinks them."""
    _, _, truth = nuclei(2, 96, seed=1)
    shrunk = np.stack([np.where(binary_erosion(plane > 0, iterations=2), plane, 0) for plane in truth])
    missing = np.where(np.isin(shrunk, [1, 2, 3, 4, 5]), 0, shrunk)
    labels = {"blurry": missing, "deblurred": shrunk, "sharp": truth}
    return compare_labels(labels, truth if with_truth else None, ["z=0", "z=1"])


def test_table_plot_and_summary_show_the_comparison():
    comparison = scored_comparison()
    names = {"blurry": "cells", "deblurred": "cells deblurred", "sharp": "cells sharp"}
    table = comparison.summary_table(image_titles(comparison, names))
    assert [row[0] for row in table.rows] == ["cells (before)", "cells deblurred (after)", "cells sharp (sharp)"]
    assert table.header == [*MEASURES, *SCORES]
    reports = comparison.reports
    mean_ap = table.header.index("mean AP")
    for row, report in zip(table.rows, reports.values()):
        assert int(row[1]) == report.stats.objects
        assert float(row[2]) == pytest.approx(report.stats.mean_area, abs=0.051)
        assert float(row[mean_ap]) == pytest.approx(report.mean_ap, abs=5e-4)
    assert table.rows[2][len(MEASURES) :] == ["1.000"] * 5  # the truth against itself
    assert float(table.rows[0][mean_ap]) < float(table.rows[1][mean_ap]) < 1.0
    # what mpt-deblur compare prints is the same table
    text = comparison.table().splitlines()
    assert text[0].split("  ")[0] == "image" and all(cell in text[0] for cell in table.header)
    assert all(cell in line for row, line in zip(comparison.summary_table().rows, text[1:]) for cell in row)

    title, bars, maximum = plot_bars(comparison, names)
    assert title == "mean AP against the ground truth" and maximum == 1.0
    assert [name for name, _ in bars] == list(names.values())
    assert [value for _, value in bars] == [report.mean_ap for report in reports.values()]
    text = summary(comparison)
    gap = comparison.gap_recovered
    assert 0 < gap < 1 and f"deblurring recovers {100 * gap:.0f}% of the blurry-to-sharp gap" in text
    assert f"before {reports['blurry'].mean_ap:.3f}" in text

    counts = compare_labels({"blurry": np.zeros((2, 8, 8), np.int32)})
    assert counts.summary_table(image_titles(counts, {})) == SummaryTable(
        MEASURES, [["blurry (before)", "0", "", "", ""]]
    )
    title, bars, maximum = plot_bars(counts, {"blurry": "cells"})
    assert (title, bars, maximum) == ("objects detected", [("cells", 0.0)], None)
    assert "add a sharp layer or ground truth" in summary(counts)


def test_a_lower_mean_ap_after_deblurring_is_said_so_in_the_dock_and_the_cli():
    _, _, truth = nuclei(2, 96, seed=1)
    shrunk = np.stack([np.where(binary_erosion(plane > 0, iterations=2), plane, 0) for plane in truth])
    missing = np.where(np.isin(shrunk, [1, 2, 3, 4, 5]), 0, shrunk)
    # deblurring made it worse: 'after' misses objects that 'before' found
    worse = compare_labels({"blurry": shrunk, "deblurred": missing, "sharp": truth}, truth, ["z=0", "z=1"])
    high, low = (worse.reports[key].mean_ap for key in ("blurry", "deblurred"))
    assert worse.gap_recovered < 0
    lowered = f"deblurring lowered mean AP by {high - low:.3f} (from {high:.3f} to {low:.3f})"
    for text in (summary(worse), worse.table()):  # the dock's status line, and what mpt-deblur compare prints
        assert lowered in text and "recovers" not in text
    # without a sharp image there is no gap to measure against, but a change all the same
    better = compare_labels({"blurry": missing, "deblurred": shrunk}, truth)
    assert better.gap_recovered is None
    raised = f"deblurring raised mean AP by {high - low:.3f} (from {low:.3f} to {high:.3f})"
    assert summary(better).splitlines()[-1] == better.table().splitlines()[-1] == raised
    assert "recovers" in summary(scored_comparison()) and "raised" not in scored_comparison().table()


def test_labels_are_written_with_their_calibration_and_read_back(tmp_path):
    _, _, truth = nuclei(2, 32)
    state = {
        "name": "cells detections",
        "scale": (2.0, 0.5, 0.5),
        "units": ("micrometer",) * 3,
        "axis_labels": ("-3", "-2", "-1"),  # napari's defaults: the axes come from the dock's record
        "metadata": {RECORD_KEY: {"detections_of": "cells", "axes": "ZYX"}},
    }
    path = tmp_path / labels_file_name(state["name"])
    assert path.name == "cells detections.tif" and labels_file_name('a/b: "c"?') == "a_b_ _c__.tif"
    assert write_labels(path, truth, state) == [str(path)]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    [(data, meta, kind)] = read_images(path)
    assert kind == "image" and data.dtype == np.uint16  # 16-bit, for ImageJ
    np.testing.assert_array_equal(data, truth)
    np.testing.assert_allclose(meta["scale"], state["scale"])
    assert tuple(meta["units"]) == state["units"] and tuple(meta["axis_labels"]) == ("z", "y", "x")
    big = truth.astype(np.int32) * 40_000  # more labels than 16 bits hold: kept as they are
    write_labels(tmp_path / "big.tif", big, state)
    [(data, _, _)] = read_images(tmp_path / "big.tif")
    np.testing.assert_array_equal(data, big)


def test_errors_become_hints(caplog):
    def hint_for(error):
        return user_message(error, COMPARE)

    assert hint_for(WorkerCrashed("the StarDist process stopped unexpectedly (signal 9)")).startswith(
        "Detection failed: the StarDist process stopped unexpectedly"
    )
    assert hint_for(DetectionError("unknown StarDist model 'x'.")) == "Detection failed: unknown StarDist model 'x'."
    assert hint_for(ModelFileError("broken.safetensors: not a model")).endswith("Pick another deblurring model.")
    assert hint_for(InputError("layer 'x': no Y axis")).endswith("Check the chosen layers and settings.")
    assert "Out of memory" in hint_for(MemoryError("out of memory"))
    assert hint_for(KeyError("x")).startswith("Detection failed: KeyError") and "detection failed" in caplog.text


# --- the dock in a viewer ---------------------------------------------------------------------------------------------


@pytest.fixture
def viewer_and_dock(make_napari_viewer, stardist_model_dir):
    from napari_mpt_deblur.plugin.compare_widget import CompareWidget

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, DOCK)
    assert isinstance(widget, CompareWidget)
    widget.stardist_folder.value = stardist_model_dir  # joins the StarDist menu and is chosen
    widget.device.value = "cpu"
    return viewer, widget


def shown_table(widget) -> SummaryTable:
    """What the dock's table shows (a column per image), as the comparison's table (a row per image)."""
    table = widget.table
    columns = [table.horizontalHeaderItem(c).text() for c in range(table.columnCount())]
    measures = [table.verticalHeaderItem(r).text() for r in range(table.rowCount())]
    rows = [[column, *(table.item(r, c).text() for r in range(len(measures)))] for c, column in enumerate(columns)]
    return SummaryTable(["image", *measures], rows)


def wait_idle(qtbot, widget, timeout: int = WAIT_MS) -> None:
    qtbot.waitUntil(lambda: not widget.running, timeout=timeout)


def add_nuclei(viewer, count: int = 2, size: int = 128, **placement):
    """Blurry, sharp and truth layers (plus a less blurred 'after') of the same synthetic nuclei."""
    blurry, sharp, truth = nuclei(count, size)
    after = np.stack([gaussian_filter(plane, 1) for plane in sharp])
    layers = (
        viewer.add_image(blurry, name="blurry", **placement),
        viewer.add_image(after, name="blurry deblurred", **placement),
        viewer.add_image(sharp, name="sharp", **placement),
        viewer.add_labels(truth, name="truth", **placement),
    )
    return layers


def test_label_like_images_are_told_from_intensity_images():
    from napari_mpt_deblur.plugin.compare_job import label_like
    from napari_mpt_deblur.plugin.samples import defocused_cell_stack

    _, _, truth = nuclei(2, 128)
    assert label_like(truth) and label_like(truth.astype(np.uint16)) and label_like(np.zeros((3, 8, 8), np.uint8))
    assert not label_like(truth.astype(np.float32))  # not integers
    sharp, defocused = (data for data, _, _ in defocused_cell_stack())
    assert not label_like(sharp) and not label_like(defocused)  # 256 grey levels, noise-free: still an image


@pytest.mark.slow
def test_the_menus_start_on_the_selected_layer_and_follow_it_until_picked(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "defocused_cells")
    sharp, defocused = viewer.layers["sharp cells"], viewer.layers["defocused cells"]
    viewer.layers.selection.active = defocused
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, DOCK)
    assert widget.before.value is defocused and widget.after.value is sharp  # the selected layer, and another
    assert widget.truth.choices == (None, compare_widget.ALL_LAYERS)  # uint16 images, but not labels
    viewer.layers.selection.active = sharp
    assert widget.before.value is sharp and widget.after.value is defocused
    # labels, and a label-like image: ground truth, never 'before' or 'after'
    labels = viewer.add_labels(np.zeros((9, 660, 550), np.int32), name="nuclei")
    masks = viewer.add_image(np.zeros((9, 660, 550), np.uint16), name="masks from a file")
    assert widget.before.value is sharp and widget.after.value is defocused
    assert widget.truth.choices == (None, labels, masks, compare_widget.ALL_LAYERS)
    widget.truth.value = compare_widget.ALL_LAYERS  # every integer image, in the viewer's order
    assert widget.truth.value is None and widget.truth.choices == (None, sharp, defocused, labels, masks)
    # a deblurred result selected: its source before, the result after
    result = viewer.add_image(
        defocused.data, name="defocused cells deblurred (default)", metadata={RECORD_KEY: {"source": defocused.name}}
    )
    assert widget.before.value is defocused and widget.after.value is result
    viewer.layers.selection.active = sharp
    assert widget.before.value is sharp and widget.after.value is result  # the newest deblurred image
    # picked by hand: 'before' stays; 'after' follows it, until picked too
    widget.before.value = defocused
    assert widget.after.value is result
    viewer.layers.selection.active = sharp
    assert widget.before.value is defocused and widget.after.value is result
    widget.after.value = sharp
    viewer.layers.selection.active = result
    assert widget.before.value is defocused and widget.after.value is sharp


@pytest.mark.slow
def test_dock_opens_through_the_manifest_and_follows_the_layers(viewer_and_dock, stardist_model_dir, records):
    viewer, widget = viewer_and_dock
    folder = str(stardist_model_dir.resolve())
    assert widget.stardist_model.value == folder and widget.stardist_model.current_choice == "synthetic_nuclei"
    assert widget.stardist_model.choices == (folder, "2D_versatile_fluo", "2D_versatile_he", "2D_paper_dsb2018")
    assert "synthetic_nuclei (your folder, for grey images)" in widget.status.value
    assert widget.prob_thresh.native.text() == widget.nms_thresh.native.text() == "model's own"
    assert widget.settings().prob_thresh is None and widget.settings().nms_thresh is None
    widget.prob_thresh.value = 0.6
    assert widget.settings().prob_thresh == 0.6
    assert widget.model.value == "default" and widget.compare_button.enabled and not widget.cancel_button.enabled
    assert widget.native.isAncestorOf(widget.table) and widget.native.isAncestorOf(widget.bar_plot)
    # the menus follow the viewer: images for the images, labels (and integer images) for the truth
    blurry, deblurred, sharp, truth = add_nuclei(viewer)
    floating = viewer.add_image(np.zeros((8, 8), np.float32), name="float")
    assert widget.before.value is floating  # the selected layer
    viewer.layers.selection.active = blurry
    assert widget.before.value is blurry and widget.after.value is deblurred  # its deblurred version, suggested
    assert widget.sharp.value is None and None in widget.sharp.choices
    assert widget.truth.choices == (None, truth)
    masks = viewer.add_image(np.zeros((8, 8), np.uint16), name="masks from a file")
    assert widget.truth.choices == (None, truth, masks)
    # a folder that is not a StarDist model: said at once, refused on run, until a model is chosen
    widget.stardist_folder.value = stardist_model_dir.parent
    assert "has no config.json" in widget.status.value
    widget.detect_and_compare()
    assert "has no config.json" in messages(records, "error")[-1] and not widget.running
    widget.stardist_model.value = "2D_versatile_fluo"
    assert widget._folder_problem is None and "2D_versatile_fluo (pretrained" in widget.status.value


@pytest.mark.slow
def test_detect_and_compare_with_ground_truth(qtbot, viewer_and_dock, stardist_model_dir, records):
    from napari.utils import progress

    viewer, widget = viewer_and_dock
    placement = {"scale": (2.0, 0.5, 0.5), "translate": (1.0, 2.0, 3.0)}
    blurry, deblurred, sharp, truth = add_nuclei(viewer, **placement)
    viewer.layers.selection.active = blurry  # 'before'; 'after' follows: its deblurred version
    widget.sharp.value, widget.truth.value = sharp, truth
    widget.compare_button.native.click()
    assert widget.running and not widget.compare_button.enabled and widget.cancel_button.enabled
    wait_idle(qtbot, widget)
    assert messages(records, "error") == []
    assert not any(bar.desc == "Detecting objects" for bar in progress._all_instances)
    # the threshold training chose for the test model (it varies by a hundredth from run to run), read from
    # the model the StarDist process detected with (loaded there already)
    own = shared_worker().load(str(stardist_model_dir.resolve())).prob_thresh
    result = widget.result.comparison
    names = ["blurry detections", "blurry deblurred detections", "sharp detections"]
    assert [layer.name for layer in viewer.layers][-3:] == names
    for name, source in zip(names, (blurry, deblurred, sharp)):
        layer = viewer.layers[name]
        assert isinstance(layer, napari.layers.Labels) and layer.data.shape == source.data.shape
        np.testing.assert_array_equal(layer.scale, source.scale)
        np.testing.assert_array_equal(layer.translate, source.translate)
        assert layer.metadata[RECORD_KEY]["detections_of"] == source.name
        assert layer.metadata[RECORD_KEY]["prob_thresh"] == own
        assert layer.contour == CONTOUR > 0  # outlines: the nuclei under them stay visible
    assert viewer.layers["sharp detections"].data.max() > 0
    # the table: every image's APs; the sharp image scores better than the blurry one
    table = shown_table(widget)
    assert [row[0] for row in table.rows] == ["blurry\n(before)", "blurry deblurred\n(after)", "sharp\n(sharp)"]
    assert table.header == [*MEASURES, *SCORES]
    assert all(0 <= float(value) <= 1 for row in table.rows for value in row[len(MEASURES) :])
    column = table.header.index("mean AP")
    mean_ap = dict(zip(["blurry", "blurry deblurred", "sharp"], (float(row[column]) for row in table.rows)))
    assert mean_ap["sharp"] > mean_ap["blurry"] + 0.05
    assert mean_ap["sharp"] == pytest.approx(result.reports["sharp"].mean_ap, abs=5e-4)
    assert [name for name, _ in widget.bar_plot.bars] == ["blurry", "blurry deblurred", "sharp"]
    assert [value for _, value in widget.bar_plot.bars] == pytest.approx([mean_ap[n] for n in mean_ap], abs=5e-4)
    assert widget.bar_plot.title == "mean AP against the ground truth" and widget.bar_plot.maximum == 1.0
    assert widget.bar_plot.axes.get_ylabel() == "mean AP"
    assert widget.status.value.startswith("done in") and "mean AP against the ground truth" in widget.status.value
    if result.gap_recovered is not None:
        assert "of the blurry-to-sharp gap" in widget.status.value
    assert f"StarDist synthetic_nuclei: probability {own:.2f}" in widget.status.value
    # again, with a threshold of its own: the same layers are updated, not added; filled by the user, they stay so
    count = len(viewer.layers)
    viewer.layers["sharp detections"].contour = 0
    widget.prob_thresh.value = 0.95
    widget.detect_and_compare()
    wait_idle(qtbot, widget)
    assert len(viewer.layers) == count and not any(layer.name.endswith("]") for layer in viewer.layers)
    assert viewer.layers["sharp detections"].metadata[RECORD_KEY]["prob_thresh"] == 0.95
    assert viewer.layers["sharp detections"].contour == 0 and viewer.layers["blurry detections"].contour == CONTOUR
    assert widget.result.comparison.reports["sharp"].stats.objects <= result.reports["sharp"].stats.objects


@pytest.mark.slow
def test_deblur_then_detect_in_one_click(qtbot, viewer_and_dock, records):
    viewer, widget = viewer_and_dock
    blurry, _, truth = nuclei(2, 128)
    before = viewer.add_image(blurry, name="cells", scale=(3.0, 1.0, 1.0))
    viewer.add_labels(truth, name="truth", scale=(3.0, 1.0, 1.0))
    widget.before.value = before
    widget.truth.value = viewer.layers["truth"]
    widget.deblur_button.native.click()
    assert widget.running
    wait_idle(qtbot, widget)
    assert messages(records, "error") == []
    deblurred = viewer.layers["cells deblurred (default)"]  # named for the model that made it
    assert isinstance(deblurred, napari.layers.Image) and deblurred.data.shape == blurry.shape
    assert not np.array_equal(deblurred.data, blurry)
    assert deblurred.metadata[RECORD_KEY]["model"] == "default"
    np.testing.assert_array_equal(deblurred.scale, before.scale)
    for name in ("cells detections", "cells deblurred (default) detections"):
        assert viewer.layers[name].data.shape == blurry.shape
        np.testing.assert_array_equal(viewer.layers[name].scale, before.scale)
    assert set(widget.result.labels) == {"blurry", "deblurred"}
    assert widget.after.value is deblurred  # 'Detect and compare' now compares with it
    assert widget.before.value is before  # the result was selected: 'before' is its source
    assert [row[0] for row in shown_table(widget).rows] == ["cells\n(before)", "cells deblurred\n(default)\n(after)"]
    assert "mean AP against the ground truth: before" in widget.status.value
    # again: the deblurred layer and the detections are updated, not piled up as '... [1]'
    names = [layer.name for layer in viewer.layers]
    deblurred.contrast_limits = (0.0, 0.5)  # the user's display stays
    widget.deblur_button.native.click()
    wait_idle(qtbot, widget)
    assert messages(records, "error") == [] and [layer.name for layer in viewer.layers] == names
    assert viewer.layers["cells deblurred (default)"] is deblurred and widget.after.value is deblurred
    assert tuple(deblurred.contrast_limits) == (0.0, 0.5) and deblurred.data.shape == blurry.shape
    assert widget.status.value.startswith("done in")


@pytest.mark.slow
def test_a_failure_after_deblurring_shows_no_full_progress_bar(qtbot, viewer_and_dock, records, tmp_path):
    """A StarDist model that is gone by the time of the run: the deblurring is done (its bar full), detection fails."""
    from qtpy.QtCore import Qt

    viewer, widget = viewer_and_dock
    folder = tmp_path / "moved_away"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"n_channel_in": 1, "n_dim": 2}))
    widget.stardist_folder.value = folder
    assert widget.stardist_model.value == str(folder.resolve())
    shutil.rmtree(folder)
    blurry, _, _ = nuclei(1, 64)
    viewer.add_image(blurry[0], name="cells")
    full = []  # whether the dock's bar was full, at each change
    widget.progress_bar.changed.connect(lambda value: full.append(0 < value == widget.progress_bar.max))
    widget.deblur_button.native.click()
    wait_idle(qtbot, widget)
    (error,) = messages(records, "error")
    assert error.startswith("Detection failed: StarDist model folder not found") and str(folder.name) in error
    assert widget.status.value == error and "cells deblurred (default)" in viewer.layers  # the deblurring was done
    assert any(full)  # the deblurring's bar was full ...
    assert widget.progress_bar.value == 0  # ... the failed run's is not
    assert not widget.save_button.enabled and widget.compare_button.enabled
    # the status text can be selected: the path (or an offline model's URL) can be copied
    flags = widget.status.native.textInteractionFlags()
    assert flags & Qt.TextInteractionFlag.TextSelectableByMouse
    assert flags & Qt.TextInteractionFlag.TextSelectableByKeyboard


@pytest.mark.slow
def test_save_labels_writes_them_with_their_calibration(qtbot, viewer_and_dock, records, tmp_path, monkeypatch):
    from qtpy.QtWidgets import QFileDialog, QMessageBox

    viewer, widget = viewer_and_dock
    placement = {"scale": (2.0, 0.25, 0.25), "units": ("micrometer",) * 3, "axis_labels": ("z", "y", "x")}
    blurry, deblurred, _, truth = add_nuclei(viewer, size=96, **placement)
    viewer.layers.selection.active = blurry
    assert not widget.save_button.enabled  # nothing to save yet
    widget.detect_and_compare()
    wait_idle(qtbot, widget)
    assert widget.save_button.enabled and messages(records, "error") == []
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *args: str(tmp_path))
    widget.save_button.native.click()
    names = ["blurry detections.tif", "blurry deblurred detections.tif"]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(names)  # and no temporary files
    assert widget.status.value == f"saved {', '.join(names)} in {tmp_path}"
    for name in names:
        source = viewer.layers[name.removesuffix(".tif")]
        (reopened,) = viewer.open(tmp_path / name, plugin=PLUGIN)
        np.testing.assert_array_equal(reopened.data, source.data)
        np.testing.assert_allclose(reopened.scale, placement["scale"])
        assert tuple(str(unit) for unit in reopened.units) == placement["units"]
        assert tuple(reopened.axis_labels) == placement["axis_labels"]
        assert reopened in widget.truth.choices  # labels read back: offered as ground truth
    # again, into the same folder: asked first; 'No' writes nothing
    written = {path: path.stat().st_mtime_ns for path in tmp_path.iterdir()}
    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda *args: asked.append(args[2]) or QMessageBox.StandardButton.No)
    widget.save_button.native.click()
    assert asked and "already in" in asked[0] and {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == written
    # detections removed from the viewer: nothing to save, said so
    for name in names:
        viewer.layers.remove(viewer.layers[name.removesuffix(".tif")])
    assert widget.save_labels(tmp_path) == [] and "No detections to save" in messages(records, "error")[-1]


@pytest.fixture
def slow_second_plane(monkeypatch):
    """StarDist's second plane lasts until the run is asked to stop (at most a minute): a long plane, on cue.

    Returns an event set once that plane is in the worker process. The real worker and process do the work.
    """
    worker = shared_worker()
    real_predict, calls, started = worker.predict, [0], threading.Event()

    def predict(*args, should_stop=None, **kwargs):
        calls[0] += 1
        second = calls[0] == 2

        def stop_requested() -> bool:
            if second:
                started.set()
                deadline = time.monotonic() + 60
                while not should_stop() and time.monotonic() < deadline:
                    time.sleep(0.01)
            return should_stop()

        return real_predict(*args, should_stop=stop_requested, **kwargs)

    monkeypatch.setattr(worker, "predict", predict)
    return started


@pytest.mark.slow
def test_cancel_stops_within_a_plane_and_leaves_the_viewer_usable(qtbot, viewer_and_dock, records, slow_second_plane):
    from napari.utils import progress

    viewer, widget = viewer_and_dock
    viewer.layers.selection.active = add_nuclei(viewer, count=3, size=96)[0]  # 'before': blurry, as a user picks
    widget.detect_and_compare()
    qtbot.waitUntil(slow_second_plane.is_set, timeout=WAIT_MS)
    (bar,) = [bar for bar in progress._all_instances if bar.desc == "Detecting objects"]
    assert shared_worker().alive
    widget.cancel_button.native.click()
    wait_idle(qtbot, widget, 30_000)
    assert bar.total == 6 and bar.n == 1  # stopped in the second plane
    assert not shared_worker().alive  # TensorFlow cannot be interrupted: its process was stopped
    assert widget.status.value == "cancelled" and widget.progress_bar.value == 0
    assert not any(layer.name.endswith("detections") for layer in viewer.layers)
    assert widget.compare_button.enabled and widget.deblur_button.enabled and not widget.cancel_button.enabled
    assert messages(records, "error") == [] and widget.result is None
    # the next run works, in a new StarDist process
    widget.detect_and_compare()
    wait_idle(qtbot, widget)
    assert "blurry detections" in viewer.layers and messages(records, "error") == []


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # napari, empty layer
def test_bad_layers_notify_and_leave_the_viewer_alone(qtbot, viewer_and_dock, records):
    viewer, widget = viewer_and_dock
    blurry, deblurred, _, truth = add_nuclei(viewer, size=64)
    empty = viewer.add_image(np.zeros((0, 64, 64), np.float32), name="empty", contrast_limits=(0, 1))
    crop = viewer.add_image(blurry.data[:, :32], name="crop")
    names = [layer.name for layer in viewer.layers]
    widget.detect_and_compare(Selection(truth, deblurred))
    widget.detect_and_compare(Selection(blurry, empty))
    widget.detect_and_compare(Selection(blurry, crop))
    widget.stardist_model.value = "2D_versatile_he"  # an RGB model: refused before anything loads
    widget.detect_and_compare(Selection(blurry, deblurred))
    errors = messages(records, "error")
    assert len(errors) == 4
    assert "'truth' (before) is a labels layer: choose an image layer" in errors[0]
    assert "'empty' (after) is empty" in errors[1]
    assert "the layers to compare must show the same field, with the same shape" in errors[2]
    assert "takes RGB images" in errors[3] and widget.status.value == errors[3]
    assert all(type(n).__name__ == "Notification" for n in records())  # messages, not tracebacks
    assert [layer.name for layer in viewer.layers] == names and not widget.running
    # RGB layers with a grey model: a warning, then detections on the mean of the samples
    widget.stardist_model.value = widget.stardist_model.choices[0]  # the folder: chosen folders come first
    rgb = np.repeat(blurry.data[0][..., None], 3, axis=-1)
    slide = viewer.add_image(rgb, name="slide", rgb=True)
    slide_after = viewer.add_image(np.repeat(deblurred.data[0][..., None], 3, axis=-1), name="slide 2", rgb=True)
    widget.detect_and_compare(Selection(slide, slide_after))
    assert "mean of the red, green and blue" in messages(records, "warning")[-1]
    wait_idle(qtbot, widget)
    assert len(messages(records, "error")) == 4
    assert viewer.layers["slide detections"].data.shape == (64, 64)


@pytest.mark.slow
def test_a_crashed_stardist_process_is_reported_and_the_next_run_works(qtbot, viewer_and_dock, records, monkeypatch):
    viewer, widget = viewer_and_dock
    viewer.layers.selection.active = add_nuclei(viewer, count=3, size=96)[0]  # 'before': blurry, as a user picks
    worker = shared_worker()
    real_predict, killed = worker.predict, []

    def predict(*args, should_stop=None, **kwargs):
        def kill_while_it_works() -> bool:  # the second plane: the process dies in the middle of the run
            if calls[0] == 2 and not killed:
                os.kill(worker.pid, signal.SIGKILL)
                killed.append(True)
            return bool(should_stop and should_stop())

        calls[0] += 1
        return real_predict(*args, should_stop=kill_while_it_works, **kwargs)

    calls = [0]
    monkeypatch.setattr(worker, "predict", predict)
    widget.detect_and_compare()
    wait_idle(qtbot, widget)
    assert killed
    (error,) = messages(records, "error")
    assert "the StarDist process stopped unexpectedly (signal 9)" in error and "starts again" in error
    assert error.startswith(widget.status.value) and "signal 9" in widget.status.value and widget.result is None
    assert widget.progress_bar.value == 0  # not the planes done before the crash
    assert not any(layer.name.endswith("detections") for layer in viewer.layers)
    assert widget.compare_button.enabled and not widget.cancel_button.enabled
    widget.detect_and_compare()  # a new process
    wait_idle(qtbot, widget)
    assert len(messages(records, "error")) == 1 and widget.status.value.startswith("done in")
    assert "blurry detections" in viewer.layers and calls[0] == 2 + 6  # 3 planes of 2 images


@pytest.mark.slow
def test_closing_the_dock_mid_run_stops_quietly(qtbot, viewer_and_dock, records, slow_second_plane):
    viewer, widget = viewer_and_dock
    viewer.layers.selection.active = add_nuclei(viewer, count=3, size=96)[0]  # 'before': blurry, as a user picks
    widget.detect_and_compare()
    qtbot.waitUntil(slow_second_plane.is_set, timeout=WAIT_MS)
    viewer.window.remove_dock_widget(widget.native)
    wait_idle(qtbot, widget, 30_000)
    qtbot.wait(50)
    assert not shared_worker().alive  # the work stopped with the dock, StarDist's plane included
    assert not any(layer.name.endswith("detections") for layer in viewer.layers)
    assert messages(records, "error") == []
    assert not widget.compare_button.enabled  # taken out of the viewer: it runs nothing more
    widget.native.deleteLater()
    qtbot.wait(50)


@pytest.mark.slow
def test_the_dock_fits_a_laptop_screen_beside_the_deblur_dock(make_napari_viewer, qtbot):
    from test_deblur_widget import check_fits_a_laptop

    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "defocused_cells")
    dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, DOCK)
    (advanced,) = widget.sections
    rare = (widget.prob_thresh, widget.nms_thresh, widget.model_file, widget.device)
    assert not advanced.is_expanded() and not any(box.native.isVisibleTo(widget.native) for box in rare)
    deblur_dock, deblur = viewer.window.add_plugin_dock_widget(PLUGIN, "Deblur")
    check_fits_a_laptop(
        qtbot,
        viewer,
        [
            (dock, widget, [widget.compare_button, widget.deblur_button, widget.save_button, widget.bar_plot]),
            (deblur_dock, deblur, [deblur.run_button, deblur.save_button, deblur.focus_plot]),
        ],
    )


def test_the_menus_never_read_a_lazy_deblurred_result(make_napari_viewer, qtbot, monkeypatch):
    """Refreshing the menus looks at integer images to find label-like ones; a deblurred result is intensities, and
    reading a plane of a lazy one would compute it in the GUI thread."""
    from napari_mpt_deblur.plugin.deblur_job import LazyResult

    read = []
    real = compare_job.label_like
    monkeypatch.setattr(compare_job, "label_like", lambda data: read.append(data) or real(data))
    viewer = make_napari_viewer()
    cells = viewer.add_image((np.arange(3 * 64 * 64).reshape(3, 64, 64) % 997).astype(np.uint16), name="cells")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, DOCK)
    _, deblur = viewer.window.add_plugin_dock_widget(PLUGIN, "Deblur")
    deblur.device.value, deblur.lazy.value = "cpu", True
    assert any(data is cells.data for data in read)  # integer images are looked at
    deblur.run()  # adds the result at once; napari draws its plane, computed in a worker
    result = viewer.layers[-1]
    assert isinstance(result.data, LazyResult) and RECORD_KEY in result.metadata
    viewer.layers.selection.active = result
    widget.reset_choices()
    widget.truth.value = "all layers..."  # every integer image, the result included
    assert widget.before.value is cells and widget.after.value is result  # the dock follows the selection
    assert result in widget.truth.choices and not compare_job.looks_like_labels(result)
    assert not [data for data in read if isinstance(data, LazyResult)]
    qtbot.waitUntil(lambda: deblur._lazy.current is None, timeout=WAIT_MS)  # the shown plane, computed in the worker

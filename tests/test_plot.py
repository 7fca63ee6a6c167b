"""The docks' plots (matplotlib on its Qt canvas): labelled axes, readable ticks, a legend off the data, each series on
a readable scale, and plots that shrink. Asserted on the matplotlib artists of real widgets, drawn as shown."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from matplotlib.colors import to_hex
from scipy.ndimage import gaussian_filter

from napari_mpt_deblur.detection.synthetic import synthetic_nuclei
from napari_mpt_deblur.plugin.plot import MIN_HEIGHT, BarPlot, LinePlot, theme_colours

DOCK_WIDTH = 300  # about the narrowest the docks get in napari's window


def shown(qtbot, plot, width: int = DOCK_WIDTH, height: int = 170):
    """Show ``plot`` at this size and draw it, as napari would; returns the renderer."""
    qtbot.addWidget(plot)
    plot.resize(width, height)
    plot.show()
    qtbot.waitExposed(plot)
    plot.canvas.draw()
    return plot.canvas.get_renderer()


def tick_labels(axis) -> list[str]:
    """The tick labels drawn: those of ticks inside the axis' view."""
    low, high = sorted(axis.get_view_interval())
    span = high - low
    return [
        tick.label1.get_text()
        for tick, loc in zip(axis.get_major_ticks(), axis.get_majorticklocs())
        if low - 1e-9 * span <= loc <= high + 1e-9 * span
    ]


def title_of(axes):
    """The left-aligned title (matplotlib keeps it apart from ``axes.title``, the centred one)."""
    return axes._left_title


def share_of_axis(axes, ys) -> float:
    """How much of the y axis' height the values span."""
    low, high = axes.get_ylim()
    return (max(ys) - min(ys)) / (high - low)


def readable(labels: list[str]) -> bool:
    """Plain numbers: no e-notation."""
    try:
        [float(label.replace("\N{MINUS SIGN}", "-")) for label in labels]
    except ValueError:
        return False
    return all("e" not in label.lower() for label in labels)


def focus_plot() -> LinePlot:
    """The Deblur dock's focus plot, as the dock makes it."""
    return LinePlot("focus score", "plane", y_label="input", right=("output",), right_label="output")


def test_focus_plot_gives_input_and_output_each_a_readable_scale(qtbot):
    plot = focus_plot()
    # the sample's scores (docs/napari.md): the output's are several times the input's
    plot.set_series("input", [0, 1, 2], [4e-5, 1.1e-4, 4e-5])
    plot.set_series("output", [0, 1, 2], [1.3e-4, 5.2e-4, 1.4e-4])
    renderer = shown(qtbot, plot)
    axes, right = plot.axes, plot.right_axes
    assert right is not None
    assert [line.get_label() for line in axes.get_lines()] == ["input"]
    assert [line.get_label() for line in right.get_lines()] == ["output"]
    # each series fills most of its own axis: the input's in-focus peak stands out
    assert share_of_axis(axes, [4e-5, 1.1e-4]) > 0.8 and share_of_axis(right, [1.3e-4, 5.2e-4]) > 0.8
    low, high = axes.get_ylim()
    assert low <= 4e-5 and 1.1e-4 <= high and high < 1.3e-4  # not stretched to the output's range
    # labelled axes; ticks as plain numbers, the power of ten in the label
    assert axes.get_xlabel() == "plane"
    assert axes.get_ylabel() == "input ($\\times 10^{-4}$)" and right.get_ylabel() == "output ($\\times 10^{-4}$)"
    assert tick_labels(axes.xaxis) == ["0", "1", "2"]
    for axis in (axes.yaxis, right.yaxis):
        labels = tick_labels(axis)
        assert len(labels) >= 3 and readable(labels), labels
    assert not axes.yaxis.get_offset_text().get_text() and not right.yaxis.get_offset_text().get_text()
    # the legend names both, above the data and beside the title, covering neither
    legend = axes.get_legend()
    assert [text.get_text() for text in legend.get_texts()] == ["input", "output"]
    box, data = legend.get_window_extent(renderer), axes.get_window_extent(renderer)
    assert box.y0 >= data.y1 - 0.5 and not box.overlaps(data)
    title = title_of(axes)
    assert title.get_text() == "focus score" and not box.overlaps(title.get_window_extent(renderer))
    assert box.x1 <= plot.figure.bbox.x1 + 0.5 and box.y1 <= plot.figure.bbox.y1 + 0.5  # inside the figure
    # napari's colours: its background, its text colour for the words, the series' own for the y axes
    colours = theme_colours()
    assert to_hex(plot.figure.get_facecolor()) == to_hex(axes.get_facecolor()) == colours["background"]
    texts = [title, axes.xaxis.label, *legend.get_texts(), *(tick.label1 for tick in axes.xaxis.get_major_ticks())]
    assert {to_hex(text.get_color()) for text in texts} == {colours["text"]}
    assert to_hex(axes.yaxis.label.get_color()) == to_hex(axes.get_lines()[0].get_color())
    assert to_hex(right.yaxis.label.get_color()) == to_hex(right.get_lines()[0].get_color())


def test_one_plane_and_the_input_alone(qtbot):
    plot = focus_plot()
    plot.set_series("input", [0], [4e-5])  # a lazy run of one plane: the input's focus only
    shown(qtbot, plot)
    assert plot.right_axes is None and plot.axes.get_ylabel() == "input ($\\times 10^{-5}$)"
    assert tick_labels(plot.axes.xaxis) == ["0"]  # one tick at the plane, no fractions of planes
    labels = tick_labels(plot.axes.yaxis)
    assert labels and readable(labels) and plot.axes.get_ylim()[0] < 4e-5 < plot.axes.get_ylim()[1]
    assert plot.axes.get_legend() is None and title_of(plot.axes).get_text() == "focus score"
    plot.set_series("output", [0], [1.3e-4])
    plot.canvas.draw()
    assert tick_labels(plot.axes.xaxis) == ["0"] and plot.right_axes.get_lines()[0].get_xydata().tolist() == [
        [0.0, 1.3e-4]
    ]
    plot.clear()
    plot.canvas.draw()
    assert plot.series == {} and [text.get_text() for text in plot.axes.texts] == ["no data yet"]


@pytest.mark.slow
def test_training_curves_take_their_title_as_the_y_label(qtbot):
    loss = LinePlot("training loss", "step")  # as the Fine-tune dock makes them
    psnr = LinePlot("validation PSNR (dB)", "step")
    for step in range(1, 121):
        loss.append("loss", step, 0.05 / step**0.3)
    for step in (20, 40, 60):
        psnr.append("network", step, 30 + step / 100)
        psnr.set_series("input", [20, step], [29.5, 29.5])
    assert [x for x, _ in loss.series["loss"]][:3] == [1.0, 2.0, 3.0] and len(psnr.series["network"]) == 3
    shown(qtbot, loss)
    renderer = shown(qtbot, psnr)
    loss.canvas.draw()
    assert loss.axes.get_ylabel() == "training loss" and loss.axes.get_xlabel() == "step"
    assert loss.axes.get_legend() is None  # one series: nothing to tell apart
    assert readable(tick_labels(loss.axes.yaxis)) and all(float(x) % 1 == 0 for x in tick_labels(loss.axes.xaxis))
    assert psnr.axes.get_ylabel() == "validation PSNR (dB)" and psnr.right_axes is None
    legend = psnr.axes.get_legend()
    assert [text.get_text() for text in legend.get_texts()] == ["network", "input"]
    assert not legend.get_window_extent(renderer).overlaps(psnr.axes.get_window_extent(renderer))
    low, high = psnr.axes.get_ylim()
    assert low < 29.5 and high > 30.6


def test_plots_shrink_to_fit_a_laptop_screen(qtbot):
    plot, bars = focus_plot(), BarPlot("mean AP against the ground truth", y_label="mean AP")
    assert plot.minimumSizeHint().height() <= MIN_HEIGHT and plot.minimumHeight() == MIN_HEIGHT <= 120
    plot.set_series("input", [0, 1, 2], [4e-5, 1.1e-4, 4e-5])
    plot.set_series("output", [0, 1, 2], [1.3e-4, 5.2e-4, 1.4e-4])
    bars.set_bars([("cells", 0.39), ("cells deblurred (default)", 0.505), ("sharp cells", 0.704)], maximum=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # constrained layout warns when it cannot fit the axes
        renderer = shown(qtbot, plot, height=MIN_HEIGHT)
        bar_renderer = shown(qtbot, bars, height=MIN_HEIGHT)
    assert plot.height() == MIN_HEIGHT and plot.canvas.height() == MIN_HEIGHT
    data = plot.axes.get_window_extent(renderer)
    assert data.height > 25  # the data still has room
    assert not plot.axes.get_legend().get_window_extent(renderer).overlaps(data)
    assert (
        not plot.axes.get_legend().get_window_extent(renderer).overlaps(title_of(plot.axes).get_window_extent(renderer))
    )
    assert bars.axes.get_window_extent(bar_renderer).height > 25


def test_bar_plot_names_values_and_axis(qtbot):
    bars = BarPlot("mean AP, or objects, per image")
    renderer = shown(qtbot, bars)
    assert [text.get_text() for text in bars.axes.texts] == ["no data yet"]
    bars.set_bars(
        [("cells", 0.391), ("cells deblurred (default)", 0.505), ("sharp", float("nan")), ("truth", 1.0)],
        "mean AP against the ground truth",
        1.0,
        y_label="mean AP",
    )
    bars.canvas.draw()
    axes = bars.axes
    assert bars.bars == [("cells", 0.391), ("cells deblurred (default)", 0.505), ("truth", 1.0)]  # NaN left out
    assert title_of(axes).get_text() == "mean AP against the ground truth" and axes.get_ylabel() == "mean AP"
    assert to_hex(title_of(axes).get_color()) == to_hex(axes.texts[0].get_color()) == theme_colours()["text"]
    assert [label.get_text() for label in axes.get_xticklabels()] == ["cells", "cells deblurred\n(default)", "truth"]
    assert [text.get_text() for text in axes.texts] == ["0.391", "0.505", "1"]  # each value above its bar
    assert axes.get_ylim()[0] == 0 and axes.get_ylim()[1] > 1.0 and tick_labels(axes.yaxis) == ["0.0", "0.5", "1.0"]
    assert [patch.get_height() for patch in axes.patches] == pytest.approx([0.391, 0.505, 1.0])
    # the values stay inside the axes: the top is above the tallest bar's label
    top = max(text.get_window_extent(renderer).y1 for text in axes.texts)
    assert top <= axes.get_window_extent(renderer).y1
    bars.set_bars([("cells", 41.0), ("cells deblurred", 57.0)], "objects detected", None, y_label="objects")
    bars.canvas.draw()
    assert bars.top() == 57.0 and readable(tick_labels(bars.axes.yaxis))
    assert all(float(label) % 1 == 0 for label in tick_labels(bars.axes.yaxis))  # counts: whole numbers


@pytest.mark.slow
def test_the_deblur_dock_plots_the_focus_of_a_run(qtbot, make_napari_viewer):
    """A real run of the bundled model on nuclei in and out of focus: the input's peak and the output on its axis."""
    sharp, _ = synthetic_nuclei(3, 64, seed=2)
    blurry = np.stack([gaussian_filter(plane, sigma) for plane, sigma in zip(sharp, (3.0, 0.7, 3.0))])
    viewer = make_napari_viewer()
    viewer.add_image(blurry.astype(np.float32), name="nuclei")
    _, widget = viewer.window.add_plugin_dock_widget("napari-mpt-deblur", "Deblur")
    widget.device.value = "cpu"
    widget.model.value = "default"  # the model registry outlives a test: an earlier one may have chosen another
    assert widget.layer.value.name == "nuclei"
    widget.run()
    qtbot.waitUntil(lambda: not widget.running, timeout=120_000)
    plot = widget.focus_plot
    plot.canvas.draw()
    (inputs,) = plot.axes.get_lines()
    (outputs,) = plot.right_axes.get_lines()
    assert inputs.get_label() == "input" and outputs.get_label() == "output"
    ys = inputs.get_ydata()
    assert ys[1] > 2 * max(ys[0], ys[2])  # the plane in focus scores highest
    low, high = plot.axes.get_ylim()
    assert (ys[1] - low) / (high - low) > 0.8 and (min(ys) - low) / (high - low) < 0.3  # and shows it
    assert share_of_axis(plot.right_axes, outputs.get_ydata()) > 0.5
    assert plot.axes.get_xlabel() == "plane" and tick_labels(plot.axes.xaxis) == ["0", "1", "2"]
    assert readable(tick_labels(plot.axes.yaxis)) and readable(tick_labels(plot.right_axes.yaxis))

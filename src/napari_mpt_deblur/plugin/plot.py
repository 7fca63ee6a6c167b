"""Small plots in the docks, drawn by matplotlib on its Qt canvas in napari's colours: lines (focus scores, training
curves) and bars (detection scores).

The canvas is matplotlib's ``FigureCanvasQTAgg``, embedded as napari-matplotlib embeds it. Each plot keeps its data
(:attr:`LinePlot.series`, :attr:`BarPlot.bars`) and redraws its figure from them; the artists are on
:attr:`LinePlot.axes` (and :attr:`LinePlot.right_axes`) and :attr:`BarPlot.axes`.
"""

from __future__ import annotations

import contextlib
import math
import re
import textwrap
from collections.abc import Sequence
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from matplotlib.ticker import Formatter, MaxNLocator
from qtpy.QtWidgets import QSizePolicy, QVBoxLayout, QWidget

COLOURS = ("#4fc3f7", "#ffb74d", "#81c784", "#e57373")
MIN_HEIGHT = 110
"""A plot shrinks to this height (pixels), so that two docks fit a 1366 x 768 screen."""
HEIGHT = 170
"""The height a plot asks for when there is room (pixels)."""
FONT_SIZE = 8.0
"""Titles, axis labels and legends (points); tick labels are a point smaller."""
DARK = {"background": "#262930", "foreground": "#414851", "secondary": "#868e93", "text": "#f0f1f2"}
"""napari's dark theme, for when its current theme cannot be read."""
_PLAIN_RANGE = (-3, 4)
"""Values between 10^-3 and 10^4 are printed as they are; others as a multiple of 10^n, the n in the axis label."""


def theme_colours() -> dict[str, str]:
    """napari's current theme colours: ``background``, ``foreground``, ``secondary`` and ``text`` (hex)."""
    try:
        from napari.settings import get_settings
        from napari.utils.theme import get_system_theme, get_theme

        name = get_settings().appearance.theme
        theme = get_theme(get_system_theme() if name == "system" else name)
        return {key: getattr(theme, key).as_hex() for key in DARK}
    except (ImportError, KeyError, ValueError, AttributeError):
        return dict(DARK)


class _Canvas(FigureCanvasQTAgg):
    """matplotlib's Qt canvas, passing the mouse wheel on (the plots do not zoom, and a dock's scroll area must
    still scroll when the pointer is over one)."""

    def wheelEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        event.ignore()

    def update(self, *args: Any) -> None:
        # the last step of a queued redraw: by then Qt may have deleted the widget (its dock closed) and matplotlib
        # would print the error
        with contextlib.suppress(RuntimeError):
            super().update(*args)


class _Plot(QWidget):
    """A matplotlib figure on a Qt canvas that fills the widget and shrinks to :data:`MIN_HEIGHT`."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        # constrained layout makes room for the labels, ticks and the legend above the axes at every size
        self.figure = Figure(figsize=(3.2, HEIGHT / 100), dpi=100, layout="constrained")
        self.figure.get_layout_engine().set(h_pad=2 / 72, w_pad=2 / 72, hspace=0, wspace=0)
        self.canvas = _Canvas(self.figure)
        self.canvas.setMinimumSize(10, 10)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self.setMinimumHeight(MIN_HEIGHT)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)

    def _new_axes(self) -> tuple[Axes, dict[str, str]]:
        """Clear the figure; fresh axes and the theme's colours."""
        colours = theme_colours()
        self.figure.clear()
        self.figure.set_facecolor(colours["background"])
        return self.figure.add_subplot(), colours

    def _no_data(self, axes: Axes, colours: dict[str, str]) -> None:
        axes.set_xticks([])
        axes.set_yticks([])
        axes.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=axes.transAxes, fontsize=FONT_SIZE)
        _style(axes, colours)


class LinePlot(_Plot):
    """Named series of (x, y) points with labelled axes, readable ticks and a legend above the data.

    Parameters
    ----------
    title
        What the plot shows. The y axis label when ``y_label`` is empty, else drawn above the axes.
    x_label
        What the x axis counts (e.g. ``plane``, ``step``).
    parent
        The Qt parent.
    y_label
        The left y axis' label.
    right
        Series drawn against a y axis of their own on the right, so that each of two series of different size keeps
        a readable scale (e.g. the focus of a deblurred output next to its input's).
    right_label
        The right y axis' label.

    Attributes
    ----------
    series
        ``{name: [(x, y), ...]}``, in the order they came; points with a y that is not finite are left out.
    axes, right_axes
        The figure's left axes, and its right axes (None unless a series in ``right`` is shown).
    """

    def __init__(
        self,
        title: str = "",
        x_label: str = "",
        parent: QWidget | None = None,
        *,
        y_label: str = "",
        right: Sequence[str] = (),
        right_label: str = "",
    ) -> None:
        super().__init__(parent)
        self.title, self.x_label, self.y_label = title, x_label, y_label
        self.right, self.right_label = tuple(right), right_label
        self.series: dict[str, list[tuple[float, float]]] = {}
        self.axes: Axes
        self.right_axes: Axes | None = None
        self._redraw()

    def set_series(self, name: str, xs: Sequence[float], ys: Sequence[float]) -> None:
        """Replace one series (an empty one removes it) and redraw."""
        points = [(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(float(y))]
        if points:
            self.series[name] = points
        else:
            self.series.pop(name, None)
        self._redraw()

    def append(self, name: str, x: float, y: float) -> None:
        """Add one point to a series (created on first use) and redraw."""
        if math.isfinite(float(y)):
            self.series.setdefault(name, []).append((float(x), float(y)))
            self._redraw()

    def clear(self) -> None:
        """Remove every series."""
        self.series.clear()
        self._redraw()

    def bounds(self) -> tuple[float, float, float, float] | None:
        """(x min, x max, y min, y max) over every series, or None when empty."""
        points = [p for series in self.series.values() for p in series]
        if not points:
            return None
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        return min(xs), max(xs), min(ys), max(ys)

    def _redraw(self) -> None:
        axes, colours = self._new_axes()
        self.axes, self.right_axes = axes, None
        if not self.series:
            self._no_data(axes, colours)
            self.canvas.draw_idle()
            return
        right = [name for name in self.series if name in self.right]
        if right and len(right) < len(self.series):
            self.right_axes = axes.twinx()
        lines = []
        for colour, (name, points) in zip(_cycle(COLOURS, len(self.series)), self.series.items()):
            target = self.right_axes if self.right_axes is not None and name in right else axes
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            # markers while points are few enough to tell apart (one per plane), so a single point shows too
            marker = "o" if len(points) <= 40 else None
            (line,) = target.plot(xs, ys, color=colour, linewidth=1.4, marker=marker, markersize=3, label=name)
            lines.append(line)
        xs = [x for series in self.series.values() for x, _ in series]
        if min(xs) == max(xs):  # one plane: its tick alone, not a range of fractions
            axes.set_xlim(xs[0] - 0.5, xs[0] + 0.5)
            axes.set_xticks([xs[0]])
        elif all(x == int(x) for x in xs):
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # planes and steps: no fractional ticks
        axes.set_xlabel(self.x_label, fontsize=FONT_SIZE)
        if self.y_label:
            axes.set_title(self.title, loc="left", fontsize=FONT_SIZE, color=colours["text"])
        left = [name for name in self.series if name not in right]
        if self.right_axes is not None:  # each axis in the colour of the series read on it
            _label_y(axes, self.y_label or self.title, _colour_of(self.series, left))
            _label_y(self.right_axes, self.right_label, _colour_of(self.series, right))
        else:
            _label_y(axes, (self.right_label if not left else "") or self.y_label or self.title, colours["text"])
        if len(lines) > 1:
            # above the axes, right-aligned, outside the data: it never covers a point
            axes.legend(
                handles=lines,
                loc="lower right",
                bbox_to_anchor=(1.0, 1.0),
                ncols=len(lines),
                frameon=False,
                borderaxespad=0.1,
                handlelength=1.5,
                columnspacing=1.0,
                fontsize=FONT_SIZE,
                labelcolor=colours["text"],
            )
        for target in (axes, self.right_axes):
            if target is not None:
                _style(target, colours)
        self.canvas.draw_idle()


class BarPlot(_Plot):
    """Named values as vertical bars from zero, each with its value above it and its name below.

    Parameters
    ----------
    title
        Shown above the axes.
    parent
        The Qt parent.
    y_label
        The y axis' label (e.g. ``mean AP``).

    Attributes
    ----------
    bars
        ``[(name, value), ...]`` in the order drawn, left to right.
    axes
        The figure's axes.
    """

    def __init__(self, title: str = "", parent: QWidget | None = None, *, y_label: str = "") -> None:
        super().__init__(parent)
        self.title, self.y_label = title, y_label
        self.bars: list[tuple[str, float]] = []
        self.maximum: float | None = None
        self.digits = 3
        self.axes: Axes
        self._redraw()

    def set_bars(
        self,
        bars: Sequence[tuple[str, float]],
        title: str | None = None,
        maximum: float | None = None,
        digits: int = 3,
        y_label: str | None = None,
    ) -> None:
        """Show these (name, value) bars (values that are not finite are left out) and redraw.

        Parameters
        ----------
        bars
            In the order drawn, left to right.
        title
            A new title (None keeps it).
        maximum
            The value at the top of the axis (e.g. 1 for scores); None: the largest bar.
        digits
            Significant digits of the values printed above the bars.
        y_label
            A new y axis label (None keeps it).
        """
        self.bars = [(str(name), float(value)) for name, value in bars if math.isfinite(float(value))]
        if title is not None:
            self.title = title
        if y_label is not None:
            self.y_label = y_label
        self.maximum, self.digits = maximum, digits
        self._redraw()

    def clear(self) -> None:
        """Remove every bar."""
        self.bars = []
        self._redraw()

    def top(self) -> float:
        """The value at the top of the axis."""
        largest = max((value for _, value in self.bars), default=0.0)
        top = max(self.maximum or 0.0, largest)
        return top if top > 0 else 1.0

    def _redraw(self) -> None:
        axes, colours = self._new_axes()
        self.axes = axes
        axes.set_title(self.title, loc="left", fontsize=FONT_SIZE, color=colours["text"])
        if not self.bars:
            self._no_data(axes, colours)
            self.canvas.draw_idle()
            return
        positions = range(len(self.bars))
        values = [max(0.0, value) for _, value in self.bars]
        bars = axes.bar(positions, values, width=0.6, color=_cycle(COLOURS, len(self.bars)))
        labels = [f"{value:.{self.digits}g}" for _, value in self.bars]
        axes.bar_label(bars, labels=labels, padding=2, fontsize=FONT_SIZE - 1, color=colours["text"])
        # long layer names on a few short lines rather than over each other
        axes.set_xticks(list(positions), [textwrap.fill(name, 16) for name, _ in self.bars])
        axes.set_ylim(0, self.top() * 1.15)  # room for the values above the bars
        axes.yaxis.set_major_locator(MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10], integer=self.maximum is None))
        _label_y(axes, self.y_label, colours["text"])
        _style(axes, colours)
        self.canvas.draw_idle()


def _cycle(colours: Sequence[str], count: int) -> list[str]:
    return [colours[i % len(colours)] for i in range(count)]


def _colour_of(series: dict[str, list[tuple[float, float]]], names: Sequence[str]) -> str:
    """The colour a series is drawn in, for the label of the axis it is read on."""
    position = list(series).index(names[0]) if names else 0
    return COLOURS[position % len(COLOURS)]


def _label_y(axes: Axes, label: str, colour: str) -> None:
    """Label a y axis and print its ticks plainly: values far from 1 as a multiple of 10^n, the n in the label.

    Tick labels in e-notation (or matplotlib's offset text, which lands where the title and legend are) are hard to
    read; ``4, 8, 12`` with ``(×10⁻⁵)`` in the label is not.
    """
    low, high = axes.get_ylim()
    largest = max(abs(low), abs(high))
    power = math.floor(math.log10(largest)) if largest > 0 else 0
    power = power if not _PLAIN_RANGE[0] < power < _PLAIN_RANGE[1] else 0
    axes.yaxis.set_major_formatter(_PlainFormatter(10.0**power))
    text = f"{label} ($\\times 10^{{{power}}}$)".strip() if power else label
    axes.set_ylabel(text, fontsize=FONT_SIZE, color=colour)


class _PlainFormatter(Formatter):
    """Tick values divided by ``scale``, with the fewest decimals that tell the ticks apart (no e-notation)."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale
        self.decimals = 0

    def set_locs(self, locs: Sequence[float]) -> None:
        super().set_locs(locs)
        values = sorted(float(v) / self.scale for v in locs)
        steps = [b - a for a, b in zip(values, values[1:]) if b > a]
        step = min(steps) if steps else 1.0
        self.decimals = next((d for d in range(10) if all(abs(round(v, d) - v) < step * 1e-6 for v in values)), 10)

    def __call__(self, value: float, pos: int | None = None) -> str:
        text = f"{value / self.scale:.{self.decimals}f}"
        return text[1:] if re.fullmatch(r"-0\.?0*", text) else text


def _style(axes: Axes, colours: dict[str, str]) -> None:
    """napari's colours on one axes: its background, the spines, ticks and text."""
    axes.set_facecolor(colours["background"])
    for spine in axes.spines.values():
        spine.set_color(colours["secondary"])
    axes.tick_params(colors=colours["secondary"], labelcolor=colours["text"], labelsize=FONT_SIZE - 1)
    axes.xaxis.label.set_color(colours["text"])
    for text in axes.texts:
        text.set_color(colours["text"])

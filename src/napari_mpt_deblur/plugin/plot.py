"""Small plots drawn with QPainter, without a plotting library: lines (focus scores, training curves) and bars
(detection scores)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

COLOURS = ("#4fc3f7", "#ffb74d", "#81c784", "#e57373")


class LinePlot(QWidget):
    """Named series of (x, y) points on shared axes, with a legend and the y range printed.

    Parameters
    ----------
    title
        Shown at the top left.
    x_label
        What the x axis counts (e.g. ``plane``, ``step``).
    """

    def __init__(self, title: str = "", x_label: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.title, self.x_label = title, x_label
        self.series: dict[str, list[tuple[float, float]]] = {}
        self.setMinimumHeight(140)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)

    def set_series(self, name: str, xs: Sequence[float], ys: Sequence[float]) -> None:
        """Replace one series (an empty one removes it) and repaint."""
        points = [(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(float(y))]
        if points:
            self.series[name] = points
        else:
            self.series.pop(name, None)
        self.update()

    def append(self, name: str, x: float, y: float) -> None:
        """Add one point to a series (created on first use) and repaint."""
        if math.isfinite(float(y)):
            self.series.setdefault(name, []).append((float(x), float(y)))
            self.update()

    def clear(self) -> None:
        self.series.clear()
        self.update()

    def bounds(self) -> tuple[float, float, float, float] | None:
        """(x min, x max, y min, y max) over every series, or None when empty."""
        points = [p for series in self.series.values() for p in series]
        if not points:
            return None
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        return min(xs), max(xs), min(ys), max(ys)

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        painter, text, metrics, line = _begin(self, self.title)
        area = QRectF(44, line + 6, max(10, self.width() - 52), max(10, self.height() - 2 * line - 14))
        painter.setPen(QPen(QColor(text.red(), text.green(), text.blue(), 90)))
        painter.drawRect(area)
        bounds = self.bounds()
        if bounds is None:
            painter.drawText(area, Qt.AlignmentFlag.AlignCenter, "no data yet")
            return
        x0, x1, y0, y1 = bounds
        if x1 == x0:
            x0, x1 = x0 - 0.5, x1 + 0.5
        if y1 == y0:
            y0, y1 = y0 - 0.5, y1 + 0.5
        painter.setPen(text)
        painter.drawText(2, int(area.top()) + line, f"{y1:.3g}")
        painter.drawText(2, int(area.bottom()), f"{y0:.3g}")
        painter.drawText(int(area.left()), int(area.bottom()) + line + 2, f"{x0:g}")
        painter.drawText(
            int(area.right()) - metrics.horizontalAdvance(f"{x1:g}"), int(area.bottom()) + line + 2, f"{x1:g}"
        )
        painter.drawText(
            int(area.center().x()) - metrics.horizontalAdvance(self.x_label) // 2,
            int(area.bottom()) + line + 2,
            self.x_label,
        )
        legend_x = area.left() + 6
        for colour, (name, points) in zip(COLOURS, self.series.items()):
            pen = QPen(QColor(colour))
            pen.setWidthF(1.6)
            painter.setPen(pen)
            polygon = QPolygonF(
                [
                    QPointF(
                        area.left() + (x - x0) / (x1 - x0) * area.width(),
                        area.bottom() - (y - y0) / (y1 - y0) * area.height(),
                    )
                    for x, y in points
                ]
            )
            painter.drawPolyline(polygon)
            if len(points) == 1:
                painter.drawEllipse(polygon[0], 2.5, 2.5)
            painter.drawText(int(legend_x), int(area.top()) + line, name)
            legend_x += metrics.horizontalAdvance(name) + 14


class BarPlot(QWidget):
    """Named values as vertical bars from zero, each with its value above and its name below.

    Parameters
    ----------
    title
        Shown at the top left.
    """

    def __init__(self, title: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.title = title
        self.bars: list[tuple[str, float]] = []
        self.maximum: float | None = None
        self.digits = 3
        self.setMinimumHeight(140)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)

    def set_bars(
        self,
        bars: Sequence[tuple[str, float]],
        title: str | None = None,
        maximum: float | None = None,
        digits: int = 3,
    ) -> None:
        """Show these (name, value) bars (values that are not finite are left out) and repaint.

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
        """
        self.bars = [(str(name), float(value)) for name, value in bars if math.isfinite(float(value))]
        if title is not None:
            self.title = title
        self.maximum, self.digits = maximum, digits
        self.update()

    def clear(self) -> None:
        self.bars = []
        self.update()

    def top(self) -> float:
        """The value at the top of the axis."""
        largest = max((value for _, value in self.bars), default=0.0)
        top = max(self.maximum or 0.0, largest)
        return top if top > 0 else 1.0

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        painter, text, metrics, line = _begin(self, self.title)
        # room for the values above the bars and the names below them
        area = QRectF(8, 2 * line + 8, max(10, self.width() - 16), max(10, self.height() - 4 * line - 12))
        painter.setPen(QPen(QColor(text.red(), text.green(), text.blue(), 90)))
        painter.drawLine(QPointF(area.left(), area.bottom()), QPointF(area.right(), area.bottom()))
        if not self.bars:
            painter.drawText(area, Qt.AlignmentFlag.AlignCenter, "no data yet")
            return
        top = self.top()
        slot = area.width() / len(self.bars)
        width = min(slot * 0.6, 80.0)
        for i, (colour, (name, value)) in enumerate(zip(_cycle(COLOURS, len(self.bars)), self.bars)):
            centre = area.left() + slot * (i + 0.5)
            height = max(0.0, value) / top * area.height()
            bar = QRectF(centre - width / 2, area.bottom() - height, width, height)
            painter.fillRect(bar, QColor(colour))
            painter.setPen(text)
            label = f"{value:.{self.digits}g}"
            painter.drawText(
                QRectF(centre - slot / 2, bar.top() - line - 2, slot, line), Qt.AlignmentFlag.AlignCenter, label
            )
            shown = metrics.elidedText(name, Qt.TextElideMode.ElideMiddle, int(slot) - 4)
            painter.drawText(
                QRectF(centre - slot / 2, area.bottom() + 4, slot, line), Qt.AlignmentFlag.AlignCenter, shown
            )


def _cycle(colours: Sequence[str], count: int) -> list[str]:
    return [colours[i % len(colours)] for i in range(count)]


def _begin(widget: QWidget, title: str) -> tuple[QPainter, QColor, Any, int]:
    """A painter on ``widget`` in the palette's text colour, with ``title`` drawn: (painter, colour, metrics, line)."""
    painter = QPainter(widget)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    text = widget.palette().windowText().color()
    painter.setPen(text)
    metrics = painter.fontMetrics()
    line = metrics.height()
    painter.drawText(4, line, title)
    return painter, text, metrics, line

"""A small line plot drawn with QPainter: focus scores and training curves without a plotting library."""

from __future__ import annotations

import math
from collections.abc import Sequence

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
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        text = self.palette().windowText().color()
        painter.setPen(text)
        metrics = painter.fontMetrics()
        line = metrics.height()
        painter.drawText(4, line, self.title)
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

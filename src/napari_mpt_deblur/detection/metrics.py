"""Measure detections: object counts, sizes and shapes, and matching against a reference.

Matching is stardist's (``stardist.matching``, no TensorFlow): a predicted
object is a true positive when its intersection over union (IoU) with a
reference object reaches the threshold. "AP" is StarDist's and the paper's
average precision, TP / (TP + FP + FN), at IoU 0.5, 0.7 and 0.9; "mean AP" is
their mean.

Stacks are scored plane by plane and overall (all planes' objects pooled).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

IOU_THRESHOLDS = (0.5, 0.7, 0.9)
MIN_GAP = 0.01
"""A blurry-to-sharp difference in mean AP below this leaves no gap worth a share."""

BLURRY, DEBLURRED, SHARP = "blurry", "deblurred", "sharp"
REFERENCE_TRUTH = "ground truth"
REFERENCE_SHARP = "detections on the sharp image"


@dataclass(frozen=True)
class ObjectStats:
    """Counts, sizes (pixels) and shapes of the objects in one plane or a whole stack."""

    objects: int
    mean_area: float
    median_area: float
    mean_diameter: float
    """Diameter of the circle with the object's area."""
    mean_solidity: float
    """Area over convex-hull area: 1 for convex objects, lower for ragged ones."""
    mean_eccentricity: float
    """Of the ellipse with the same second moments: 0 for a circle, towards 1 for elongated objects."""


@dataclass(frozen=True)
class MatchScores:
    """How well detections match the reference at one IoU threshold."""

    iou: float
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    ap: float
    """TP / (TP + FP + FN)."""


@dataclass(frozen=True)
class DetectionReport:
    """One image's detections: overall and per plane."""

    name: str
    stats: ObjectStats
    plane_stats: list[ObjectStats]
    scores: list[MatchScores] | None = None
    """Against the reference at each IoU threshold, all planes pooled (None without a reference)."""
    plane_scores: list[list[MatchScores]] | None = None

    @property
    def mean_ap(self) -> float | None:
        return float(np.mean([s.ap for s in self.scores])) if self.scores else None

    def plane_mean_ap(self, plane: int) -> float | None:
        return float(np.mean([s.ap for s in self.plane_scores[plane]])) if self.plane_scores else None


@dataclass(frozen=True)
class SummaryTable:
    """A comparison's numbers as text (all planes pooled): a row per image, a column per measurement."""

    header: list[str]
    """``image``, then what each column measures: ``objects``, ``mean area (px)``, ..., ``mean AP``, ``F1@0.5``."""
    rows: list[list[str]]
    """One per image: its name, then its formatted values (empty where there is nothing to show)."""


@dataclass(frozen=True)
class Comparison:
    """Detections on blurry, deblurred and (optionally) sharp versions of the same image, side by side."""

    reports: dict[str, DetectionReport]
    reference: str | None = None
    """What the scores are measured against: ground-truth labels, the sharp image's detections, or nothing."""
    thresholds: tuple[float, ...] = IOU_THRESHOLDS
    plane_labels: list[str] = field(default_factory=list)
    """A name for each plane (e.g. ``z=3``); a single entry for 2-D images."""

    @property
    def gap_recovered(self) -> float | None:
        """(deblurred - blurry) / (sharp - blurry) in mean AP: the share of the gap that deblurring closes.

        None without a sharp image or a reference, or when blurry and sharp
        are within :data:`MIN_GAP` of each other (no gap to close).
        """
        maps = {name: report.mean_ap for name, report in self.reports.items()}
        blurry, deblurred, sharp = maps.get(BLURRY), maps.get(DEBLURRED), maps.get(SHARP)
        if blurry is None or deblurred is None or sharp is None or sharp - blurry < MIN_GAP:
            return None
        return (deblurred - blurry) / (sharp - blurry)

    def deblurring_effect(self) -> str | None:
        """What deblurring did to mean AP, in a sentence, as the CLI and the Compare dock print it; None if unscored.

        The share of the blurry-to-sharp gap it recovers (:attr:`gap_recovered`) when deblurring did not lower
        mean AP; otherwise, or without a gap to measure against, by how much it lowered or raised mean AP: "recovers
        -27 % of the gap" reads as a typo.
        """
        blurry, deblurred = (self.reports[key].mean_ap if key in self.reports else None for key in (BLURRY, DEBLURRED))
        if blurry is None or deblurred is None:
            return None
        change = f"mean AP by {abs(deblurred - blurry):.3f} (from {blurry:.3f} to {deblurred:.3f})"
        if round(deblurred - blurry, 3) < 0:
            return f"deblurring lowered {change}"
        gap = self.gap_recovered
        if gap is not None:
            return f"deblurring recovers {100 * max(gap, 0.0):.0f}% of the blurry-to-sharp gap in mean AP"
        return f"deblurring raised {change}" if round(deblurred - blurry, 3) > 0 else None

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per image and plane, plus an ``all`` row per image (for CSV)."""
        rows = []
        for name, report in self.reports.items():
            planes: list[tuple[str, ObjectStats, list[MatchScores] | None]] = []
            if len(self.plane_labels) > 1:  # a single plane is its own total
                planes = [
                    (label, report.plane_stats[i], report.plane_scores[i] if report.plane_scores else None)
                    for i, label in enumerate(self.plane_labels)
                ]
            planes.append(("all", report.stats, report.scores))
            for plane, stats, scores in planes:
                row: dict[str, Any] = {"image": name, "plane": plane, **asdict(stats)}
                if scores:
                    for score in scores:
                        for key in ("precision", "recall", "f1", "ap"):
                            row[f"{key}@{score.iou:g}"] = getattr(score, key)
                    row["mean_ap"] = float(np.mean([s.ap for s in scores]))
                rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready."""
        return {
            "reference": self.reference,
            "iou_thresholds": list(self.thresholds),
            "planes": self.plane_labels,
            "gap_recovered": self.gap_recovered,
            "images": {
                name: {
                    "mean_ap": report.mean_ap,
                    "stats": asdict(report.stats),
                    "scores": [asdict(s) for s in report.scores] if report.scores else None,
                    "planes": [
                        {
                            "plane": label,
                            "stats": asdict(report.plane_stats[i]),
                            "scores": [asdict(s) for s in report.plane_scores[i]] if report.plane_scores else None,
                            "mean_ap": report.plane_mean_ap(i),
                        }
                        for i, label in enumerate(self.plane_labels)
                    ],
                }
                for name, report in self.reports.items()
            },
        }

    def summary_table(self, names: Mapping[str, str] | None = None) -> SummaryTable:
        """The numbers of every image, all planes pooled, as the CLI prints them and the Compare dock shows them.

        Parameters
        ----------
        names
            What to call each image (default: its key, e.g. ``blurry``).

        Returns
        -------
        SummaryTable
            Object count, mean area, diameter and solidity; with a reference, the AP at each IoU threshold,
            mean AP and F1 at the first threshold.
        """
        names = names or {}
        header = ["image", "objects", "mean area (px)", "diameter (px)", "solidity"]
        scored = any(report.scores for report in self.reports.values())
        if scored:
            header += [f"AP@{t:g}" for t in self.thresholds] + ["mean AP", f"F1@{self.thresholds[0]:g}"]
        rows = []
        for key, report in self.reports.items():
            s = report.stats
            row = [names.get(key, key), str(s.objects), _fmt(s.mean_area, 1), _fmt(s.mean_diameter, 1)]
            row.append(_fmt(s.mean_solidity, 3))
            if scored:
                if report.scores:
                    row += [_fmt(score.ap, 3) for score in report.scores]
                    row += [_fmt(report.mean_ap, 3), _fmt(report.scores[0].f1, 3)]
                else:
                    row += [""] * (len(self.thresholds) + 2)
            rows.append(row)
        return SummaryTable(header, rows)

    def findings(self) -> list[str]:
        """What the scores say about deblurring, in sentences (none when unscored): whether blurry and sharp
        leave a gap to recover, and :meth:`deblurring_effect`."""
        lines = []
        maps = [self.reports[key].mean_ap if key in self.reports else None for key in (BLURRY, DEBLURRED, SHARP)]
        if None not in maps and self.gap_recovered is None:
            lines.append("blurry and sharp score alike: no gap for deblurring to recover")
        effect = self.deblurring_effect()
        if effect is not None:
            lines.append(effect)
        return lines

    def table(self) -> str:
        """A plain-text summary (:meth:`summary_table`, then :meth:`findings`), as the CLI prints it."""
        table = self.summary_table()
        lines = [table.header, *table.rows]
        widths = [max(len(row[i]) for row in lines) for i in range(len(table.header))]
        text = [
            "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in lines
        ]
        if self.reference:
            text.append(f"scores against the {self.reference}")
        return "\n".join(text + self.findings())


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def object_stats(labels: np.ndarray | Sequence[np.ndarray]) -> ObjectStats:
    """Counts, sizes and shapes of the objects in a label image (or pooled over several)."""
    from skimage.measure import regionprops_table

    planes = [labels] if isinstance(labels, np.ndarray) and labels.ndim == 2 else list(labels)
    columns: dict[str, list[np.ndarray]] = {"area": [], "solidity": [], "eccentricity": []}
    for plane in planes:
        plane = np.asarray(plane)
        if not plane.any():
            continue
        table = regionprops_table(plane.astype(np.int32, copy=False), properties=tuple(columns))
        for key in columns:
            columns[key].append(np.asarray(table[key], dtype=np.float64))
    values = {key: np.concatenate(parts) if parts else np.zeros(0) for key, parts in columns.items()}
    area = values["area"]
    if area.size == 0:
        nan = float("nan")
        return ObjectStats(0, nan, nan, nan, nan, nan)
    return ObjectStats(
        objects=int(area.size),
        mean_area=float(area.mean()),
        median_area=float(np.median(area)),
        mean_diameter=float(np.mean(np.sqrt(4 * area / np.pi))),
        mean_solidity=float(values["solidity"].mean()),
        mean_eccentricity=float(values["eccentricity"].mean()),
    )


def match_scores(
    predicted: Sequence[np.ndarray], reference: Sequence[np.ndarray], thresholds: Sequence[float] = IOU_THRESHOLDS
) -> list[MatchScores]:
    """stardist's matching of predicted to reference objects, all planes pooled, at each IoU threshold."""
    from stardist.matching import matching_dataset

    results = matching_dataset(
        [np.asarray(r, dtype=np.int32) for r in reference],
        [np.asarray(p, dtype=np.int32) for p in predicted],
        thresh=list(thresholds),
        criterion="iou",
        by_image=False,
        show_progress=False,
    )
    return [
        MatchScores(
            iou=float(t),
            tp=int(r.tp),
            fp=int(r.fp),
            fn=int(r.fn),
            precision=float(r.precision),
            recall=float(r.recall),
            f1=float(r.f1),
            ap=float(r.accuracy),
        )
        for t, r in zip(thresholds, results)
    ]


def compare_labels(
    labels: Mapping[str, np.ndarray],
    truth: np.ndarray | None = None,
    plane_labels: Sequence[str] | None = None,
    thresholds: Sequence[float] = IOU_THRESHOLDS,
) -> Comparison:
    """Compare label images of the same field: stats for each, scores against a reference when there is one.

    Parameters
    ----------
    labels
        Label images by name (:data:`BLURRY`, :data:`DEBLURRED`, :data:`SHARP`
        or any other), all of the same shape: (Y, X) or a stack (..., Y, X).
    truth
        Ground-truth labels of that shape. Without them, detections on the
        sharp image (when given) are the reference.
    plane_labels
        A name per plane of a stack (default ``plane 0``, ``plane 1``, ...).
    """
    shapes = {name: np.shape(array) for name, array in labels.items()}
    if truth is not None:
        shapes["ground truth"] = np.shape(truth)
    if len(set(shapes.values())) > 1:
        described = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"the images to compare must have the same shape; got {described}")
    first = np.asarray(next(iter(labels.values())))
    if first.ndim < 2:
        raise ValueError("label images must have at least 2 dimensions (Y, X)")

    def planes(array: np.ndarray) -> list[np.ndarray]:
        array = np.asarray(array)
        return list(array.reshape((-1, *array.shape[-2:])))

    count = int(np.prod(first.shape[:-2], dtype=np.int64))
    names = list(plane_labels) if plane_labels is not None else [f"plane {i}" for i in range(count)]
    if len(names) != count:
        raise ValueError(f"{len(names)} plane names for {count} planes")

    if truth is not None:
        reference, reference_name = planes(truth), REFERENCE_TRUTH
    elif SHARP in labels:
        reference, reference_name = planes(labels[SHARP]), REFERENCE_SHARP
    else:
        reference, reference_name = None, None

    reports = {}
    for name, array in labels.items():
        stack = planes(array)
        scores = plane_scores = None
        if reference is not None:
            scores = match_scores(stack, reference, thresholds)
            plane_scores = [match_scores([p], [r], thresholds) for p, r in zip(stack, reference)]
        reports[name] = DetectionReport(
            name=name,
            stats=object_stats(stack),
            plane_stats=[object_stats(p) for p in stack],
            scores=scores,
            plane_scores=plane_scores,
        )
    return Comparison(reports, reference_name, tuple(thresholds), names)

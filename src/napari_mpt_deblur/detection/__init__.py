"""Cell detection with StarDist, before and after deblurring (StarDist runs in its own process).

from napari_mpt_deblur.detection import DetectionSettings, detect, compare
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# Loaded on first use: the StarDist process runs ``-m napari_mpt_deblur.detection.worker`` and must not pay for torch.
_LAZY = {
    "DEFAULT_STARDIST_MODEL": "engine",
    "PRETRAINED_MODELS": "engine",
    "CompareResult": "engine",
    "DetectionProgress": "engine",
    "DetectionSettings": "engine",
    "compare": "engine",
    "detect": "engine",
    "iter_compare": "engine",
    "iter_detect": "engine",
    "Comparison": "metrics",
    "DetectionReport": "metrics",
    "MatchScores": "metrics",
    "ObjectStats": "metrics",
    "compare_labels": "metrics",
    "DetectionCancelled": "worker",
    "DetectionError": "worker",
    "StarDistWorker": "worker",
    "WorkerCrashed": "worker",
    "shared_worker": "worker",
}

__all__ = [
    "CompareResult",
    "Comparison",
    "DEFAULT_STARDIST_MODEL",
    "DetectionCancelled",
    "DetectionError",
    "DetectionProgress",
    "DetectionReport",
    "DetectionSettings",
    "MatchScores",
    "ObjectStats",
    "PRETRAINED_MODELS",
    "StarDistWorker",
    "WorkerCrashed",
    "compare",
    "compare_labels",
    "detect",
    "iter_compare",
    "iter_detect",
    "shared_worker",
]

if TYPE_CHECKING:
    from .engine import (
        DEFAULT_STARDIST_MODEL,
        PRETRAINED_MODELS,
        CompareResult,
        DetectionProgress,
        DetectionSettings,
        compare,
        detect,
        iter_compare,
        iter_detect,
    )
    from .metrics import Comparison, DetectionReport, MatchScores, ObjectStats, compare_labels
    from .worker import DetectionCancelled, DetectionError, StarDistWorker, WorkerCrashed, shared_worker


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

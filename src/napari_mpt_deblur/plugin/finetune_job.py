"""What one run of the Fine-tune dock does (no Qt, no napari: testable headless).

The dock checks the chosen layers (:func:`layer_problem`, on their
:class:`~.layer_info.LayerInfo`), gathers them and the settings into a
:class:`FinetuneRun`, and runs :func:`finetune_steps` in a thread worker: the
same headless path as ``mpt-deblur finetune``
(:func:`~napari_mpt_deblur.training.finetune.prepare_finetune`, then
:func:`~napari_mpt_deblur.training.finetune.run_finetune`). :func:`model_provenance`
is what a saved or exported model records; :func:`export_for_bioimageio` writes the package.
"""

from __future__ import annotations

import contextlib
import copy
import math
import tempfile
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import Microscope, ModelCard
from ..training.config import TrainConfig
from ..training.finetune import FINETUNE_DEFAULTS, TrainingLog, prepare_finetune, run_finetune
from . import session
from .layer_info import LayerInfo

if TYPE_CHECKING:
    from ..models.mpt import MPT
    from ..training.engine import TrainProgress

MODEL_SUFFIX = ".safetensors"
PLOTTED_VALIDATIONS = 20
"""The dock validates about this many times per run (at most every ``FINETUNE_DEFAULTS.validate_every`` steps)."""


def dock_schedule(steps: int) -> tuple[int, int]:
    """(validate_every, checkpoint_every) for a run of ``steps`` in the dock.

    The dock validates often enough to draw a curve and to keep good weights
    (the CLI's default of every 100 steps would leave a short run with one
    validation). Checkpoints go to a temporary folder, as the CLI's.
    """
    validate = max(1, min(FINETUNE_DEFAULTS.validate_every, steps // PLOTTED_VALIDATIONS))
    return validate, min(FINETUNE_DEFAULTS.checkpoint_every, steps)


def dock_validations(steps: int) -> int:
    """How many validations a dock run of ``steps`` makes: the starting model's, then every ``validate_every``
    steps and at the last (see :func:`dock_schedule`)."""
    validate_every, _ = dock_schedule(steps)
    return 1 + math.ceil(steps / validate_every)


def layer_problem(layer: LayerInfo) -> str | None:
    """Why a layer cannot be fine-tuned on (a message for the user), or None."""
    if layer.kind == "labels":
        return (
            f"'{layer.name}' is a Labels layer (a segmentation), not an image. Fine-tuning needs intensity images: "
            "select image layers (right-click a layer > Convert to Image if it holds intensities)."
        )
    if layer.kind != "image":
        return f"'{layer.name}' is not an image layer; select image layers."
    if layer.rgb:
        return f"'{layer.name}' is RGB; fine-tuning works on grayscale planes: split it into channels and select one."
    shape = layer.shape
    if 0 in shape:
        return f"'{layer.name}' is empty (shape {shape}); select a layer with pixels."
    if min(shape[-2:]) < 3:
        return f"'{layer.name}' has planes of {shape[-2:]} pixels; they need at least 3 x 3."
    return None


def physical_size(layer: LayerInfo) -> tuple[tuple[float, float] | None, str | None, float | None]:
    """(Y, X) pixel size, unit and Z spacing of a layer, for the optics: from its file's metadata, else from its
    scale and units (none when Y and X are not in the same length unit)."""
    metadata = layer.metadata
    if metadata.get("pixel_size") or metadata.get("z_spacing"):
        return metadata.get("pixel_size"), metadata.get("unit"), metadata.get("z_spacing")
    units = [] if layer.units is None or isinstance(layer.units, str) else [str(unit) for unit in layer.units]
    scale = list(layer.scale or ())
    if len(units) != len(scale) or len(scale) < 2 or units[-1] in ("pixel", "") or units[-1] != units[-2]:
        return None, None, None
    labels = [label.lower() for label in layer.axis_labels or ()]
    z_spacing = scale[labels.index("z")] if "z" in labels and units[labels.index("z")] == units[-1] else None
    return (scale[-2], scale[-1]), units[-1], z_spacing


@dataclass
class FinetuneRun:
    """One fine-tuning run: its inputs, and what the worker leaves behind (no Qt widgets here)."""

    choice: str
    """The starting model (a bundled name or a file)."""
    config: TrainConfig
    unlabeled: list[tuple[str, Any]]
    """(layer name, full-resolution pixels) of each stack to adapt to."""
    labeled: tuple[tuple[str, Any], tuple[str, Any]] | None
    """(name, pixels) of the blurry and the sharp layer of labeled pairs, or None."""
    min_focus: float
    folder: tempfile.TemporaryDirectory
    microscope: Microscope = field(default_factory=Microscope)
    sharpen_in_focus: bool = True
    """Have the fine-tuned model sharpen against the optics' in-focus PSF (:func:`prepare_finetune`)."""
    log: TrainingLog = field(default_factory=TrainingLog)
    model: MPT | None = None
    start_provenance: dict[str, Any] = field(default_factory=dict)
    data_record: dict[str, Any] = field(default_factory=dict)
    failed: bool = False
    error: str = ""
    """The message for the user of the error that ended the run (empty: none)."""
    summary: str = ""
    """What the run did and which weights the model kept (the status line's, after the run)."""
    notes: list[str] = field(default_factory=list)
    """What the data told (the blur measured, no in-focus planes...), shown after the run."""
    done: bool = False
    """The worker has stopped and the run is cleaned up."""

    @property
    def checkpoint(self) -> Path:
        return Path(self.folder.name) / f"checkpoint{MODEL_SUFFIX}"


def finetune_steps(run: FinetuneRun) -> Generator[str | TrainProgress, None, None]:
    """The worker's generator: load, prepare, train; yields status strings then every step's progress.

    Closing it (the dock's Stop, between steps), finishing or failing gives the model its best weights,
    removes the temporary folder and lets go of the layers' pixels.
    """
    try:
        yield f"loading {Path(run.choice).name}..."
        # a copy: the session's model is shared with the other docks and must not change under them
        model = copy.deepcopy(session.SESSION.load_model(run.choice))
        run.model = model
        card = getattr(model, "card", None)
        run.start_provenance = dict(card.provenance) if card is not None else {}
        yield "preparing patches (focus scores, validation)..."
        data = prepare_finetune(
            model,
            [layer for _, layer in run.unlabeled],
            labeled=None if run.labeled is None else (run.labeled[0][1], run.labeled[1][1]),
            config=run.config,
            min_focus_quantile=run.min_focus,
            microscope=run.microscope,
            sharpen_in_focus=run.sharpen_in_focus,
        )
        run.config = data.config
        run.data_record = {
            "unlabeled_layers": [name for name, _ in run.unlabeled],
            **data.provenance,
            **({"labeled_layers": [run.labeled[0][0], run.labeled[1][0]]} if run.labeled else {}),
        }
        run.notes = list(data.notes)
        if data.estimate is not None:
            run.notes.insert(0, data.estimate.describe())
        yield "scoring the starting model on held-out planes..."
        steps = run_finetune(model, data, run.checkpoint, run.log)
        with contextlib.closing(steps):
            yield from steps
    except Exception:  # reported by the dock (start_worker's on_error)
        run.failed = True
        raise
    finally:
        if run.model is not None:
            run.log.restore_best(run.model)  # done by run_finetune too, unless it failed before it began
        release(run)


def release(run: FinetuneRun) -> None:
    """Remove the run's temporary folder and let go of the layers' pixels (the viewer's; their layers may go)."""
    run.folder.cleanup()
    run.unlabeled = [(name, None) for name, _ in run.unlabeled]  # the names stay for the record
    run.labeled = None if run.labeled is None else ((run.labeled[0][0], None), (run.labeled[1][0], None))


def model_provenance(run: FinetuneRun) -> dict[str, Any]:
    """What a fine-tuned model records: the starting model's provenance, what it was tuned from and on, how."""
    return {
        **run.start_provenance,
        "fine_tuned_from": run.choice,
        "fine_tuned_on": run.data_record,
        "fine_tune": {"tool": "napari dock", **run.log.summary()},
        "train_config": run.config.to_dict(),
    }


def suggested_model_path(run: FinetuneRun) -> Path:
    """Where to save the run's model unless the user says: the home folder, named after the model and first stack."""
    first = run.unlabeled[0][0] if run.unlabeled else "stack"
    stem = Path(run.choice).name.removesuffix(MODEL_SUFFIX)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{stem}-tuned-{first}")
    return Path.home() / f"{safe}{MODEL_SUFFIX}"


def export_for_bioimageio(model: MPT, card: ModelCard, data: Any, path: Path, description: str) -> Path:
    """The export worker: the middle plane of ``data`` (a grey layer's array), then the package at ``path``."""
    from ..models.bioimageio import export_package

    plane = np.asarray(data[tuple(n // 2 for n in data.shape[:-2])])  # read here, off the GUI thread
    # a copy with the fine-tune's card: the dock's model keeps its own, and may be saved again meanwhile
    package = copy.deepcopy(model)
    package.card = card
    return export_package(package, path, plane, description=description)

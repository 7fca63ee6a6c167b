"""The Fine-tune dock: fine-tune a model on the lab's own image layers with EFCR_ex, live.

The dock gathers the layers and settings, then runs the same headless path as
``mpt-deblur finetune`` (:func:`~napari_mpt_deblur.training.finetune.prepare_finetune`
then :func:`~napari_mpt_deblur.training.engine.iter_train`) in a thread worker
(:func:`~.widgets_common.start_worker`), so the viewer stays responsive. Every
step updates the loss and validation curves; Stop ends the run between steps,
and the model keeps the weights of its best validation
(:class:`~napari_mpt_deblur.training.finetune.TrainingLog`).
Save writes a model file that the Deblur widget offers at once.
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

from magicgui.widgets import ComboBox, Container, FileEdit, FloatSpinBox, PushButton, Select, SpinBox
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info, show_warning

from ..models.files import ModelFileError, save_model
from ..training.config import TrainConfig
from ..training.finetune import FINETUNE_DEFAULTS, TrainingLog, prepare_finetune
from .models import REGISTRY
from .plot import LinePlot
from .widgets_common import (
    DockState,
    FollowSelection,
    ModelPicker,
    device_box,
    image_for,
    out_of_memory,
    progress_and_status,
    stop_when_closed,
)

if TYPE_CHECKING:
    import napari
    from superqt.utils import GeneratorWorker

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


@dataclass
class _Run:
    """One fine-tuning run: its inputs, and what the worker leaves behind (no Qt widgets here)."""

    choice: str
    config: TrainConfig
    unlabeled: list[tuple[str, Any]]
    labeled: tuple[tuple[str, Any], tuple[str, Any]] | None
    min_focus: float
    folder: tempfile.TemporaryDirectory
    log: TrainingLog = field(default_factory=TrainingLog)
    model: MPT | None = None
    start_provenance: dict[str, Any] = field(default_factory=dict)
    data_record: dict[str, Any] = field(default_factory=dict)
    failed: bool = False
    error: str = ""
    """The message for the user of the error that ended the run (empty: none)."""
    summary: str = ""
    """What the run did and which weights the model kept (the status line's, after the run)."""
    done: bool = False
    """The worker has stopped and the run is cleaned up."""

    @property
    def checkpoint(self) -> Path:
        return Path(self.folder.name) / f"checkpoint{MODEL_SUFFIX}"


def _train(run: _Run) -> Generator[str | TrainProgress, None, None]:
    """The worker's generator: load, prepare, train; yields status strings then every step's progress.

    Closing it (the dock's Stop, between steps), finishing or failing gives the model its best weights,
    removes the temporary folder and lets go of the layers' pixels.
    """
    from ..training.engine import iter_train

    try:
        yield f"loading {Path(run.choice).name}..."
        # a copy: the registry's model is shared with the Deblur widget and must not change under it
        model = copy.deepcopy(REGISTRY.load(run.choice))
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
        )
        run.config = data.config
        run.data_record = {
            "unlabeled_layers": [name for name, _ in run.unlabeled],
            **data.provenance,
            **({"labeled_layers": [run.labeled[0][0], run.labeled[1][0]]} if run.labeled else {}),
        }
        yield "training..."
        steps = iter_train(
            model, data.sampler, run.checkpoint, data.config, validation=data.validation, unlabeled=data.unlabeled
        )
        with contextlib.closing(steps):
            for event in steps:
                run.log.update(event, model)  # here, in the training thread: the weights are this step's
                yield event
    except Exception:  # reported by the dock (start_worker's on_error)
        run.failed = True
        raise
    finally:
        if run.model is not None:
            run.log.restore_best(run.model)
        _release(run)


def _release(run: _Run) -> None:
    """Remove the run's temporary folder and let go of the layers' pixels (the viewer's; their layers may go)."""
    run.folder.cleanup()
    run.unlabeled = [(name, None) for name, _ in run.unlabeled]  # the names stay for the record
    run.labeled = None if run.labeled is None else ((run.labeled[0][0], None), (run.labeled[1][0], None))


def hint_for(error: BaseException) -> str:
    """A user-facing message for an error raised while fine-tuning, with what to try."""
    text = (str(error) or type(error).__name__).rstrip(". ")
    if isinstance(error, ModelFileError):
        return f"{text}. Pick another model file."
    if isinstance(error, FloatingPointError):  # the engine's message already says to lower the learning rate
        return f"Fine-tuning diverged: {text}."
    if out_of_memory(error):
        return f"Out of memory ({text}). Use a smaller patch or batch, or the cpu device."
    if isinstance(error, OSError):
        return f"{text}. Check the disk space and permissions of the temporary folder."
    if isinstance(error, ValueError):
        return f"{text}. Check the selected layers and settings."
    return f"Fine-tuning failed: {type(error).__name__}: {text}."


def format_seconds(seconds: float) -> str:
    """'42 s', '3 min 05 s', '1 h 02 min'; '?' when unknown."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class FinetuneWidget(Container):
    """Fine-tune a deblurring model on your own image layers (EFCR_ex), with live loss and validation curves.

    Parameters
    ----------
    napari_viewer
        The viewer whose image layers are offered (napari passes it).

    Attributes
    ----------
    log
        The :class:`TrainingLog` of the current or last run (None before the first).
    tuned_model
        The fine-tuned model of the last run, holding its best weights (None until a run has steps).
    worker
        The thread worker of the running fine-tune, or None when idle.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self._viewer = napari_viewer
        self._run: _Run | None = None
        self._last: _Run | None = None
        self._state = DockState()
        self.tuned_model: MPT | None = None
        defaults = FINETUNE_DEFAULTS
        self.progress_bar, self.status = progress_and_status("status", "idle")

        self.unlabeled = Select(
            name="unlabeled",
            label="your stacks\n(Ctrl/⌘-click\nto pick several)",
            choices=self._data_layers,
            tooltip="Your own (unlabeled) image layers, 2-D or stacks of any depth: the model adapts to them. "
            "Ctrl-click (⌘-click on a Mac) adds or removes a layer; Shift-click picks a range. "
            "Until you pick here, the image layers selected in the layer list are used.",
        )
        self.unlabeled.native.setMaximumHeight(110)
        self.blurry = ComboBox(
            label="labeled: blurry",
            choices=self._optional_layers,
            tooltip="Optional: a blurry layer with its sharp counterpart (same shape). Without them, pairs are "
            "made by synthetic defocus of the sharpest quarter of your planes.",
        )
        self.sharp = ComboBox(label="labeled: sharp", choices=self._optional_layers, tooltip=self.blurry.tooltip)
        self._models = ModelPicker(
            self.status, label="start from", tooltip="The model to fine-tune (not changed itself)."
        )
        self.model, self.model_file = self._models.combo, self._models.file
        self.steps = SpinBox(label="steps", value=defaults.steps, min=1, max=1_000_000, step=50)
        self.batch = SpinBox(label="batch", value=defaults.batch_size, min=1, max=64)
        self.patch = SpinBox(label="patch", value=defaults.patch_size, min=32, max=1024, step=16)
        self.lr = _float_box("learning rate", defaults.lr, 1e-6, 1e-2, 1e-6, 7)
        self.beta = _float_box("EFCR_ex weight", defaults.efcr_beta, 0.0, 1.0, 1e-4, 6)
        self.beta.tooltip = (
            "Weight of the contrastive EFCR_ex term (0: off, plain L1 on the pairs; the paper uses 1e-5). "
            "Off by default: on a new domain it added nothing measurable (docs/benchmarks.md, experiment 3)."
        )
        self.reblur = _float_box("re-blur weight", defaults.reblur_weight, 0.0, 10.0, 0.05, 3)
        self.reblur.tooltip = (
            "Weight of the self-supervised re-blur term on your planes (0: off; it cost up to 0.6 dB on a new domain)."
        )
        self.min_focus = _float_box("min focus quantile", 0.0, 0.0, 0.95, 0.05, 2)
        self.min_focus.tooltip = "Use only your planes whose focus score is at least this quantile (0: all)."
        self.device = device_box(defaults.device)
        self.start_button = PushButton(text="Start")
        self.stop_button = PushButton(text="Stop", enabled=False)
        self.save_path = FileEdit(label="save as", mode="w", filter=f"*{MODEL_SUFFIX}")
        self.save_button = PushButton(text="Save model", enabled=False)
        self.extend(
            [
                self.unlabeled,
                self.blurry,
                self.sharp,
                self.model,
                self.model_file,
                self.steps,
                self.batch,
                self.patch,
                self.lr,
                self.beta,
                self.reblur,
                self.min_focus,
                self.device,
                self.start_button,
                self.stop_button,
                self.progress_bar,
                self.status,
                self.save_path,
                self.save_button,
            ]
        )
        self.loss_plot = LinePlot("training loss", "step")
        self.psnr_plot = LinePlot("validation PSNR (dB)", "step")
        self.native.layout().addWidget(self.loss_plot)
        self.native.layout().addWidget(self.psnr_plot)

        self.start_button.changed.connect(self.start)
        self.stop_button.changed.connect(self.stop)
        self.save_button.changed.connect(self._save_clicked)
        self._state.disconnects.append(self._models.unsubscribe)
        stop_when_closed(self, self._state)
        self._follow = FollowSelection(napari_viewer, self._state, [self.unlabeled], self._suggest_stacks)
        self._follow.follow()  # start on the selected layers

    # choices -------------------------------------------------------------------------------

    def _data_layers(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image | Labels)]

    def _optional_layers(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [("none", None), *self._data_layers()]

    @staticmethod
    def _suggest_stacks(layers: napari.components.LayerList) -> dict[str, Any]:
        """The selected grey image layers (a deblurred result's source instead of the result), in list order."""
        chosen = {image_for(layer, layers) for layer in layers.selection}
        stacks = [layer for layer in layers if layer in chosen and not layer.rgb]
        return {"unlabeled": stacks} if stacks else {}

    # state ---------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether a fine-tune is in progress."""
        return self._state.running

    @property
    def worker(self) -> GeneratorWorker | None:
        """The running thread worker, or None."""
        return self._state.worker

    @property
    def log(self) -> TrainingLog | None:
        """The training log of the current run, else of the last one."""
        run = self._run or self._last
        return run.log if run is not None else None

    def _set_running(self, running: bool) -> None:
        for widget in (self.start_button, self.unlabeled, self.blurry, self.sharp, self.model, self.model_file):
            widget.enabled = not running
        for widget in (self.steps, self.batch, self.patch, self.lr, self.beta, self.reblur, self.min_focus):
            widget.enabled = not running
        self.device.enabled = not running
        self.stop_button.enabled = running
        self.save_button.enabled = not running and self.tuned_model is not None

    # start -----------------------------------------------------------------------------------

    def check_inputs(self) -> str | None:
        """What is wrong with the chosen layers and model (a message for the user), or None."""
        chosen = list(self.unlabeled.value or [])
        if not chosen:
            return "Select at least one image layer of your own under 'your stacks' to fine-tune on."
        blurry, sharp = self.blurry.value, self.sharp.value
        if (blurry is None) != (sharp is None):
            return "Choose both a blurry and a sharp layer for labeled pairs, or set both to 'none'."
        for layer in [*chosen, *(x for x in (blurry, sharp) if x is not None)]:
            problem = _layer_problem(layer)
            if problem:
                return problem
        if blurry is not None and sharp is not None:
            if blurry is sharp:
                return f"'{blurry.name}' is chosen as both blurry and sharp; pick its sharp counterpart."
            if _shape(blurry) != _shape(sharp):
                return (
                    f"The labeled pair differs in shape: '{blurry.name}' is {_shape(blurry)} and '{sharp.name}' is "
                    f"{_shape(sharp)}. Choose a blurry and a sharp layer of the same shape, or 'none'."
                )
        if self._models.problem:
            return self._models.problem
        if not self.model.value:
            return "No model to start from: pick a model file (.safetensors) under 'model file'."
        return None

    def start(self) -> None:
        """Check the inputs, then fine-tune in a thread worker (a warning and the status line say what is wrong,
        if anything)."""
        if self.running or self._state.closed:
            return
        problem = self.check_inputs()
        if problem:
            self._refuse(problem)
            return
        steps = int(self.steps.value)
        validate_every, checkpoint_every = dock_schedule(steps)
        lr = float(self.lr.value)
        try:
            config = FINETUNE_DEFAULTS.replace(
                steps=steps,
                batch_size=int(self.batch.value),
                patch_size=int(self.patch.value),
                lr=lr,
                lr_min=min(lr, TrainConfig.lr_min),
                efcr_beta=float(self.beta.value),
                reblur_weight=float(self.reblur.value),
                device=str(self.device.value),
                validate_every=validate_every,
                checkpoint_every=checkpoint_every,
            )
        except ValueError as error:  # ConfigError
            self._refuse(f"Settings: {error}")
            return
        labeled = None
        if self.blurry.value is not None:
            labeled = (
                (self.blurry.value.name, _pixels(self.blurry.value)),
                (self.sharp.value.name, _pixels(self.sharp.value)),
            )
        run = _Run(
            choice=str(self.model.value),
            config=config,
            unlabeled=[(layer.name, _pixels(layer)) for layer in self.unlabeled.value],
            labeled=labeled,
            min_focus=float(self.min_focus.value),
            folder=tempfile.TemporaryDirectory(prefix="mpt-finetune-"),
        )
        self._run = run
        self.tuned_model = None
        self.loss_plot.clear()
        self.psnr_plot.clear()
        self.progress_bar.max = steps
        self.progress_bar.value = 0
        self.status.value = "starting..."
        self._set_running(True)
        self._state.start(
            _train(run),
            "Fine-tuning",
            steps,
            on_yield=self._on_yielded,
            on_error=self._on_errored,
            on_finished=self._on_finished,
        )

    def _refuse(self, problem: str) -> None:
        """Start found a problem: nothing starts, and the warning and the status line say why."""
        self.status.value = problem
        self._set_running(False)
        show_warning(problem)

    def stop(self) -> None:
        """Stop between steps; the model keeps the weights of its best validation so far."""
        if self._state.running:
            self._state.stop()
            if not self._state.deleted:
                self.status.value = "stopping after this step..."
                self.stop_button.enabled = False

    # worker signals (queued to the GUI thread; called while the widget lives, its Qt widgets may be gone) ------

    def _on_yielded(self, event: Any) -> None:
        state = self._state
        if state.deleted:
            return
        if isinstance(event, str):
            self.status.value = event
            return
        log = self._run.log if self._run is not None else None
        self.loss_plot.append("loss", event.step, event.losses["total"])
        if event.validation:
            self.psnr_plot.append("network", event.step, event.validation["psnr"])
            first = self.psnr_plot.series["network"][0][0]
            self.psnr_plot.set_series("input", [first, event.step], [event.validation["input_psnr"]] * 2)
        lines = [f"step {event.step}/{event.steps}   loss {event.losses['total']:.4f}"]
        if state.worker is not None and state.worker.abort_requested:
            lines[0] += "   (stopping after this step...)"
        if log is not None and log.best_psnr is not None:
            last = log.psnr[-1][1]
            lines.append(
                f"val PSNR {last:.2f} dB (best {log.best_psnr:.2f} at step {log.best_step}; input {log.input_psnr:.2f})"
            )
        lines.append(f"time left {format_seconds(event.remaining_s)}")
        self.status.value = "\n".join(lines)
        # last: napari's progress bar may process Qt events, and so run the worker's next signals
        state.show_progress(
            self.progress_bar, event.step, event.steps, f"Fine-tuning: loss {event.losses['total']:.4f}"
        )

    def _on_errored(self, error: BaseException) -> None:
        message = hint_for(error)
        if self._run is not None:
            self._run.error = message
        show_error(message)

    def _on_finished(self) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        _release(run)  # done by the worker too, unless it stopped before it began
        run.done = True
        self._last = run
        log = run.log
        # after a failure the last weights may be the broken ones: keep only weights that validated
        usable = run.model is not None and log.step > 0 and (not run.failed or log.best_state is not None)
        self.tuned_model = run.model if usable else None
        if self._state.deleted:
            return
        if usable:
            what = "stopped" if log.step < log.steps else "finished"
            kept = f"; kept the weights of step {log.weights_step}"
            if log.best_psnr is not None:
                kept += f" (val PSNR {log.best_psnr:.2f} dB, input {log.input_psnr:.2f})"
            run.summary = f"{what} after {log.step}/{log.steps} steps{kept}"
            self.status.value = f"{run.summary}. Save the model to use it."
            if not _chosen_file(self.save_path.value):
                self.save_path.value = _suggest_path(run)
        else:
            self.status.value = "stopped before the first step"
        if run.failed:
            failure = f"failed: {run.error or 'see the notification'}"
            self.status.value = f"{failure}\n{self.status.value}" if usable else failure
        self._set_running(False)

    def close_dock(self) -> None:
        """Stop a running fine-tune and stop following the registry (done when napari closes the dock)."""
        self._state.close()

    # save -------------------------------------------------------------------------------------

    def _save_clicked(self) -> None:
        path = self.save_path.value
        if not _chosen_file(path):
            show_warning(f"Choose a file name under 'save as' (a {MODEL_SUFFIX} file) to save the fine-tuned model.")
            return
        try:
            saved = self.save(path)
        except (OSError, ValueError) as error:
            show_error(f"Could not save the model to {path}: {error}")
            return
        summary = self._last.summary if self._last is not None else ""
        self.status.value = f"{summary} — saved to {saved.name}" if summary else f"saved to {saved.name}"
        show_info(f"Fine-tuned model saved to {saved}")

    def save(self, path: str | Path) -> Path:
        """Write the fine-tuned model (with what it was tuned on) and offer it in every model menu.

        Parameters
        ----------
        path
            The model file to write; ``.safetensors`` is added when missing. The
            file appears only once complete (an existing one is replaced).

        Returns
        -------
        Path
            The file written.

        Raises
        ------
        ValueError
            When there is no fine-tuned model yet.
        """
        run, model = self._last, self.tuned_model
        if run is None or model is None:
            raise ValueError("no fine-tuned model yet; run a fine-tune first")
        path = Path(path).expanduser()
        if path.suffix.lower() != MODEL_SUFFIX:
            path = path.with_name(path.name + MODEL_SUFFIX)
        provenance = {
            **run.start_provenance,
            "fine_tuned_from": run.choice,
            "fine_tuned_on": run.data_record,
            "fine_tune": {"tool": "napari dock", **run.log.summary()},
            "train_config": run.config.to_dict(),
        }
        normalization = getattr(getattr(model, "card", None), "normalization", None)
        saved = save_model(model, path, normalization=normalization, provenance=provenance)
        REGISTRY.add_file(saved)
        return saved


def _float_box(label: str, value: float, low: float, high: float, step: float, decimals: int) -> FloatSpinBox:
    box = FloatSpinBox(label=label, min=0.0, max=high, step=step)
    box.native.setDecimals(decimals)  # before min/value, or small values round to 0 at the default 2 decimals
    box.min, box.value = low, value
    return box


def _shape(layer: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in layer.data[0].shape) if layer.multiscale else tuple(int(n) for n in layer.data.shape)


def _pixels(layer: Any) -> Any:
    """The layer's full-resolution array (not read here: the worker reads it)."""
    return layer.data[0] if layer.multiscale else layer.data


def _layer_problem(layer: Any) -> str | None:
    if isinstance(layer, Labels):
        return (
            f"'{layer.name}' is a Labels layer (a segmentation), not an image. Fine-tuning needs intensity images: "
            "select image layers (right-click a layer > Convert to Image if it holds intensities)."
        )
    if not isinstance(layer, Image):
        return f"'{layer.name}' is not an image layer; select image layers."
    if getattr(layer, "rgb", False):
        return f"'{layer.name}' is RGB; fine-tuning works on grayscale planes: split it into channels and select one."
    shape = _shape(layer)
    if 0 in shape:
        return f"'{layer.name}' is empty (shape {shape}); select a layer with pixels."
    if min(shape[-2:]) < 3:
        return f"'{layer.name}' has planes of {shape[-2:]} pixels; they need at least 3 x 3."
    return None


def _chosen_file(path: Any) -> bool:
    return path is not None and str(path) not in ("", ".") and not Path(path).is_dir()


def _suggest_path(run: _Run) -> Path:
    first = run.unlabeled[0][0] if run.unlabeled else "stack"
    stem = Path(run.choice).name.removesuffix(MODEL_SUFFIX)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{stem}-tuned-{first}")
    return Path.home() / f"{safe}{MODEL_SUFFIX}"

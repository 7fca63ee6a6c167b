"""The Fine-tune dock: fine-tune a model on the lab's own image layers with EFCR_ex, live.

The dock gathers the layers and settings into a run of :mod:`.finetune_job`, which
holds what is not Qt, and runs it (the same headless path as ``mpt-deblur finetune``)
in a thread worker (:func:`~.widgets_common.start_worker`), so the viewer stays responsive. The
microscope's boxes (NA, medium, emission wavelength, pixel size; the pixel size and Z
step of the first layer's file by default) shapes the synthetic blur. Every
step updates the loss and validation curves; Stop ends the run between steps,
and the model keeps the weights of its best validation, or the starting model's
when the fine-tune did not beat them
(:class:`~napari_mpt_deblur.training.finetune.TrainingLog`).
Save writes a model file that the Deblur widget offers at once; *Export for bioimage.io...* writes a
bioimage.io package (:func:`~napari_mpt_deblur.models.bioimageio.export_package`) in a worker.
"""

from __future__ import annotations

import dataclasses
import tempfile
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, Label, PushButton, Select, SpinBox
from napari.layers import Image, Labels
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QPalette
from qtpy.QtWidgets import QFileDialog, QSizePolicy

from ..config import MEDIA, UNKNOWN_PIXEL_UM, ConfigError, Microscope, ModelCard
from ..models.files import ModelFileError, save_model
from ..training.config import TrainConfig
from ..training.finetune import FINETUNE_DEFAULTS, TrainingLog
from . import session
from .errors import FINETUNE, user_message
from .finetune_job import (
    MODEL_SUFFIX,
    FinetuneRun,
    dock_schedule,
    dock_validations,
    export_for_bioimageio,
    finetune_steps,
    layer_problem,
    model_provenance,
    physical_size,
    release,
    suggested_model_path,
)
from .layer_info import LayerInfo
from .plot import LinePlot
from .timing import LONG_RUN_S, FinetuneEstimate, format_seconds, iter_measure_finetune
from .widgets_common import (
    DockState,
    FollowSelection,
    ModelPicker,
    ScrollingDock,
    WhenShown,
    device_box,
    image_for,
    progress_and_status,
    row,
    show_path_end,
    start_worker,
    stop_when_closed,
    weak_callback,
)

if TYPE_CHECKING:
    import napari
    from superqt.utils import GeneratorWorker

    from ..models.mpt import MPT

PACKAGE_SUFFIX = ".zip"
"""A bioimage.io model package."""
ESTIMATE_DELAY_MS = 700
"""The time estimate waits this long after the last change of the settings it depends on before timing steps."""


class FinetuneWidget(ScrollingDock):
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
    advanced
        The folding section of the rarely changed settings (batch, patch, learning rate, loss weights, min focus
        quantile, device), collapsed at first.
    save_button, export_button
        *Save model* (a ``.safetensors`` model file) and *Export for bioimage.io...* (a ``.zip`` package).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self._viewer = napari_viewer
        self._run: FinetuneRun | None = None
        self._last: FinetuneRun | None = None
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
            "made by synthetic defocus of the sharpest of your planes.",
        )
        self.sharp = ComboBox(label="labeled: sharp", choices=self._optional_layers, tooltip=self.blurry.tooltip)
        self._models = ModelPicker(
            self.status, label="start from", tooltip="The model to fine-tune (not changed itself)."
        )
        self.model, self.model_file = self._models.combo, self._models.file
        self.steps = SpinBox(label="steps", value=defaults.steps, min=1, max=1_000_000, step=50)
        self.estimate = Label(name="estimate", label="time", value="")
        self.estimate.native.setWordWrap(True)
        self.estimate.native.setTextFormat(Qt.TextFormat.RichText)  # the suggested step count is a link
        # the whole column, left-aligned: a wrapped label otherwise takes a narrow width of its own, centred
        self.estimate.native.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.estimate.native.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)
        self.estimate.tooltip = (
            "How long the run takes on the chosen device, from training steps of the chosen model timed at the "
            "chosen batch and patch (preparing the patches comes on top)."
        )
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
        microscope = Microscope()
        # one row each: side by side they made the dock 525 pixels wide at least, half of a laptop's canvas
        self.na = _float_box("objective NA", microscope.na, 0.05, 1.6, 0.05, 2)
        self.na.tooltip = "Numerical aperture of the objective (engraved on it, e.g. 1.4 for an oil objective)."
        self.medium = ComboBox(
            label="immersion",
            choices=list(MEDIA),
            value=microscope.medium,
            tooltip="Immersion medium of the objective: " + ", ".join(f"{k} (n = {v})" for k, v in MEDIA.items()),
        )
        self.wavelength = SpinBox(label="emission nm", value=round(microscope.wavelength_um * 1000), min=300, max=1500)
        self.wavelength.tooltip = "Emission wavelength in nanometres (520 for GFP, 610 for mCherry)."
        self.pixel_size = _float_box("pixel um", 0.0, 0.0, 100.0, 0.01, 4)
        self.pixel_size.tooltip = (
            "Pixel size in the sample, micrometres. 0: from the first stack's file (its metadata or the layer's "
            f"scale), shown in the box; if neither says, {UNKNOWN_PIXEL_UM:g} um. Synthetic pairs are blurred as this "
            "microscope blurs, up to the blur measured across your stacks."
        )
        self.sharpen = CheckBox(
            text="sharpen in focus",
            value=True,
            tooltip="The fine-tuned model sharpens its output against your "
            "objective's in-focus PSF (from the NA, immersion, emission and pixel size above): about +2 dB in focus "
            "at NA 1.4, but worse than not at all if the NA given is lower than the objective's.",
        )
        self.device = device_box(defaults.device)
        self.start_button = PushButton(text="Start")
        self.stop_button = PushButton(text="Stop", enabled=False)
        self.save_path = FileEdit(label="save as", mode="w", filter=f"*{MODEL_SUFFIX}")
        show_path_end(self.save_path, f"The file to save the fine-tuned model to ({MODEL_SUFFIX}).")
        self.save_button = PushButton(text="Save model", enabled=False)
        self.export_button = PushButton(
            text="Export for bioimage.io...",
            enabled=False,
            tooltip="Write the fine-tuned model as a bioimage.io package (.zip) that deepImageJ, ilastik and "
            "bioimageio.core run, tested on a plane of your first stack.",
        )
        self.add_part(
            Container(
                widgets=[
                    self.unlabeled,
                    self.blurry,
                    self.sharp,
                    self.model,
                    self.model_file,
                    self.na,
                    self.medium,
                    self.wavelength,
                    self.pixel_size,
                    self.steps,
                    self.estimate,
                ]
            )
        )
        # rarely changed: the defaults are the ones experiment 3 chose (docs/benchmarks.md)
        self.advanced = self.add_section(
            "advanced: batch, patch, learning rate, device",
            Container(
                widgets=[
                    self.batch,
                    self.patch,
                    self.lr,
                    self.beta,
                    self.reblur,
                    self.min_focus,
                    self.sharpen,
                    self.device,
                ]
            ),
        )
        self.add_part(row(self.start_button, self.stop_button))
        self.add_part(Container(widgets=[self.progress_bar, self.status, self.save_path]))
        self.add_part(row(self.save_button, self.export_button))
        self.loss_plot = LinePlot("training loss", "step")
        self.psnr_plot = LinePlot("validation PSNR (dB)", "step")
        self.add_part(self.loss_plot)
        self.add_part(self.psnr_plot)
        self.align_labels()

        self.start_button.changed.connect(self.start)
        self.stop_button.changed.connect(self.stop)
        self.save_button.changed.connect(self._save_clicked)
        self.export_button.changed.connect(self._export_clicked)
        self._export_worker: GeneratorWorker | None = None
        self._export_bar: progress | None = None
        self._state.disconnects.append(self._models.unsubscribe)
        stop_when_closed(self, self._state)
        self._follow = FollowSelection(napari_viewer, self._state, [self.unlabeled], self._suggest_stacks)
        self._follow.follow()  # start on the selected layers
        self.unlabeled.changed.connect(self._show_pixel_source)
        self._show_pixel_source()

        # the time estimate: steps of the chosen model timed in a worker, once the settings rest for a moment
        self.time_per_step: FinetuneEstimate | None = None
        """The last timing of training steps (None before the first), for :attr:`estimate`."""
        self._timed: tuple[Any, ...] | None = None  # the settings it was measured with
        self._timing: tuple[Any, ...] | None = None  # the settings being measured now
        self._timing_worker: GeneratorWorker | None = None
        self._timer = QTimer(self.native)
        self._timer.setSingleShot(True)
        self._timer.setInterval(ESTIMATE_DELAY_MS)
        self._timer.timeout.connect(self._measure)
        for box in (self.model, self.batch, self.patch, self.device, self.beta, self.reblur):
            box.changed.connect(self._estimate_soon)
        self.steps.changed.connect(self._show_estimate)
        self.estimate.native.linkActivated.connect(self._use_steps)
        self._state.disconnects.append(weak_callback(self._stop_timing))
        WhenShown(self.native, weak_callback(self._estimate_soon))  # a hidden dock times nothing
        self._estimate_soon()

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

    @property
    def exporting(self) -> bool:
        """Whether a bioimage.io export is being written."""
        return self._export_worker is not None

    def _set_running(self, running: bool) -> None:
        for widget in (self.unlabeled, self.blurry, self.sharp, self.model, self.model_file):
            widget.enabled = not running
        for widget in (self.steps, self.batch, self.patch, self.lr, self.beta, self.reblur, self.min_focus):
            widget.enabled = not running
        self.device.enabled = not running
        self.start_button.enabled = not running and not self.exporting  # one job at a time: one status line
        self.stop_button.enabled = running
        self.save_button.enabled = self.export_button.enabled = (
            not running and not self.exporting and self.tuned_model is not None
        )

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
            problem = layer_problem(LayerInfo.of(layer))
            if problem:
                return problem
        if blurry is not None and sharp is not None:
            if blurry is sharp:
                return f"'{blurry.name}' is chosen as both blurry and sharp; pick its sharp counterpart."
            blurry_shape, sharp_shape = LayerInfo.of(blurry).shape, LayerInfo.of(sharp).shape
            if blurry_shape != sharp_shape:
                return (
                    f"The labeled pair differs in shape: '{blurry.name}' is {blurry_shape} and '{sharp.name}' is "
                    f"{sharp_shape}. Choose a blurry and a sharp layer of the same shape, or 'none'."
                )
        if self._models.problem:
            return self._models.problem
        if not self.model.value:
            return "No model to start from: pick a model file (.safetensors) under 'model file'."
        return None

    def start(self) -> None:
        """Check the inputs, then fine-tune in a thread worker (a warning and the status line say what is wrong,
        if anything)."""
        if self.running or self.exporting or self._state.closed:
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
        try:
            microscope = self.microscope_for(self.unlabeled.value[0])
        except ConfigError as error:
            self._refuse(f"Microscope: {error}")
            return
        labeled = None
        if self.blurry.value is not None:
            labeled = (
                (self.blurry.value.name, LayerInfo.of(self.blurry.value).pixels),
                (self.sharp.value.name, LayerInfo.of(self.sharp.value).pixels),
            )
        run = FinetuneRun(
            choice=str(self.model.value),
            config=config,
            unlabeled=[(layer.name, LayerInfo.of(layer).pixels) for layer in self.unlabeled.value],
            labeled=labeled,
            min_focus=float(self.min_focus.value),
            folder=tempfile.TemporaryDirectory(prefix="mpt-finetune-"),
            microscope=microscope,
            sharpen_in_focus=bool(self.sharpen.value),
        )
        self._run = run
        self._stop_timing()  # the run itself needs the device
        self.tuned_model = None
        self.loss_plot.clear()
        self.psnr_plot.clear()
        self.progress_bar.max = steps
        self.progress_bar.value = 0
        self.status.value = "starting..."
        self._set_running(True)
        self._state.start(
            finetune_steps(run),
            "Fine-tuning",
            steps,
            on_yield=self._on_yielded,
            on_error=self._on_errored,
            on_finished=self._on_finished,
        )

    # time estimate ---------------------------------------------------------------------------

    def _timing_key(self) -> tuple[Any, ...]:
        return (
            self.model.value,
            int(self.batch.value),
            int(self.patch.value),
            str(self.device.value),
            float(self.beta.value) > 0,
            float(self.reblur.value) > 0,
        )

    def _estimate_soon(self, *_: Any) -> None:
        """The settings that set a step's cost changed: time steps again once they rest (typing in a box)."""
        if not self._state.closed and not self._state.deleted and not self.running:
            self._timer.start()

    def _measure(self) -> None:
        """Time training steps of the chosen model with the chosen batch, patch, loss terms and device."""
        if self._state.closed or self.running or self._state.deleted or not self.native.isVisible():
            return  # a hidden dock: timed once shown
        key = self._timing_key()
        if key == self._timed:
            self._show_estimate()
            return
        if self._timing_worker is not None:
            if key != self._timing:
                self._timing_worker.quit()  # settings changed meanwhile: _timed_out measures again
            return
        choice = key[0]
        if not choice or self._models.problem:
            self.estimate.value = ""
            return
        try:
            model = session.SESSION.load_model(choice)
            config = FINETUNE_DEFAULTS.replace(
                batch_size=key[1],
                patch_size=key[2],
                device=key[3],
                efcr_beta=float(self.beta.value),
                reblur_weight=float(self.reblur.value),
            )
        except (ModelFileError, OSError, ValueError) as error:  # Start says what is wrong
            self.estimate.value = f"cannot estimate: {error}"
            return
        self._timing = key
        self.estimate.value = "timing a training step on this device..."
        self._timing_worker = start_worker(
            iter_measure_finetune(model, config),
            on_return=self._timed_steps,
            on_error=self._timing_failed,
            on_finished=self._timed_out,
        )

    def _timed_steps(self, estimate: FinetuneEstimate) -> None:
        self.time_per_step, self._timed = estimate, self._timing
        if not self._state.deleted:
            self._show_estimate()

    def _timing_failed(self, error: BaseException) -> None:
        self.time_per_step, self._timed = None, self._timing  # not again until the settings change
        if not self._state.deleted:
            self.estimate.value = f"cannot estimate: {user_message(error, FINETUNE)}"

    def _timed_out(self) -> None:
        self._timing_worker, self._timing = None, None
        if not self._state.deleted and not self._state.closed and self._timing_key() != self._timed:
            self._estimate_soon()  # the settings changed while it measured

    def _stop_timing(self) -> None:
        self._timer.stop()
        if self._timing_worker is not None:
            self._timing_worker.quit()  # stops after the step it is in

    def _show_estimate(self, *_: Any) -> None:
        """The run's length for the steps chosen, from the last timing; a shorter run suggested when it is long."""
        estimate = self.time_per_step
        if estimate is None or self._state.deleted or self._timed != self._timing_key():
            return
        steps = int(self.steps.value)
        total = estimate.total_s(steps, dock_validations(steps))
        text = (
            f"about {format_seconds(total)} for {steps} steps on {estimate.device} "
            f"({estimate.step_s:.2g} s a step), plus preparing the patches."
        )
        if total > LONG_RUN_S:
            fits = estimate.steps_within(LONG_RUN_S, dock_validations)
            # the link in the theme's text colour, underlined (Qt's own link blue is unreadable on napari's dark theme)
            colour = self.estimate.native.palette().color(QPalette.ColorRole.WindowText).name()
            link = f"<a href='{fits}' style='color: {colour}'>use {fits} steps</a>"
            text += f" About {fits} steps fit in {LONG_RUN_S // 60} min: {link}."
        self.estimate.value = text

    def _use_steps(self, link: str) -> None:
        """The suggested step count's link: set *steps* to it."""
        if not self.running:
            self.steps.value = int(link)

    def microscope_for(self, layer: Any) -> Microscope:
        """The microscope row's optics; pixel size and Z step from ``layer``'s file or scale where not given.

        Raises
        ------
        ConfigError
            For optics that cannot be (an NA above the medium's refractive index...).
        """
        from ..data.optics import microscope_from_metadata

        pixel_size, unit, z_spacing = physical_size(LayerInfo.of(layer))
        given = {"na": float(self.na.value), "medium": str(self.medium.value)}
        given["wavelength_um"] = int(self.wavelength.value) / 1000
        given["pixel_size_um"] = float(self.pixel_size.value) or None
        return microscope_from_metadata(pixel_size, unit, z_spacing, **given)

    def _show_pixel_source(self, *_: Any) -> None:
        """The pixel box at 0 says what 0 stands for: the first stack's pixel size, or that none is known."""
        from ..data.optics import microscope_from_metadata

        stacks = list(self.unlabeled.value or [])
        known = None
        if stacks:
            pixel_size, unit, _z = physical_size(LayerInfo.of(stacks[0]))
            known = microscope_from_metadata(pixel_size, unit, None).pixel_size_um
        text = f"{known:.4g} (from the image)" if known else f"{UNKNOWN_PIXEL_UM:g} (the image does not say)"
        self.pixel_size.native.setSpecialValueText(text)

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
        message = user_message(error, FINETUNE)
        if self._run is not None:
            self._run.error = message
        show_error(message)

    def _on_finished(self) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        release(run)  # done by the worker too, unless it stopped before it began
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
            run.summary = f"{what} after {log.step}/{log.steps} steps; {log.outcome()}"
            self.status.value = "\n".join([f"{run.summary}. Save the model to use it.", *run.notes])
            if not _chosen_file(self.save_path.value):
                self.save_path.value = suggested_model_path(run)
        else:
            self.status.value = "stopped before the first step"
        if run.failed:
            failure = f"failed: {run.error or 'see the notification'}"
            self.status.value = f"{failure}\n{self.status.value}" if usable else failure
        self._set_running(False)
        self._estimate_soon()  # settings may have changed since the timing the run interrupted

    def close_dock(self) -> None:
        """Stop a running fine-tune and stop following the session's models (done when napari closes the dock)."""
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
        normalization = getattr(getattr(model, "card", None), "normalization", None)
        saved = save_model(model, path, normalization=normalization, provenance=model_provenance(run))
        session.SESSION.add_model_file(saved)
        return saved

    # export -----------------------------------------------------------------------------------

    def _export_clicked(self) -> None:
        if self.tuned_model is None or self.exporting or self.running:
            return
        path, _ = QFileDialog.getSaveFileName(
            self.native, "Export for bioimage.io", str(self._package_path()), f"bioimage.io package (*{PACKAGE_SUFFIX})"
        )
        if path:
            self.export(path)

    def _package_path(self) -> Path:
        """The package name the dialog proposes: the model file's (chosen or saved), as a ``.zip``."""
        chosen = self.save_path.value
        base = Path(chosen) if _chosen_file(chosen) else suggested_model_path(self._last) if self._last else None
        base = base or Path.home() / f"fine-tuned{MODEL_SUFFIX}"
        return base.with_name(base.name.removesuffix(MODEL_SUFFIX) + PACKAGE_SUFFIX)

    def test_layer(self) -> Image | None:
        """The layer whose middle plane tests the exported package: the run's first stack, else the first
        image under *your stacks* (None when there is none)."""
        layers = {layer.name: layer for layer in self._viewer.layers if isinstance(layer, Image) and not layer.rgb}
        run = self._last
        names = [name for name, _ in run.unlabeled] if run is not None else []
        chosen = [layer.name for layer in self.unlabeled.value or ()]
        return next((layers[name] for name in [*names, *chosen] if name in layers), None)

    def export(self, path: str | Path) -> None:
        """Write the fine-tuned model as a bioimage.io package (``.zip``), in a worker.

        The package (:func:`~napari_mpt_deblur.models.bioimageio.export_package`) holds the weights, the
        provenance *Save model* records and test tensors cut from the middle plane of :meth:`test_layer`. It
        appears under ``path`` only once complete. The status line and a notification say how it went;
        ``load_model`` (and the *model file* boxes) read it back.

        Parameters
        ----------
        path
            The package to write; ``.zip`` is added when missing. An existing file is replaced.
        """
        run, model = self._last, self.tuned_model
        if self.exporting or self.running:
            return
        if run is None or model is None:
            self._export_refused("No fine-tuned model yet: run a fine-tune first.")
            return
        layer = self.test_layer()
        if layer is None:
            self._export_refused(
                "No grey image layer to test the package on: add one of your stacks and select it under 'your stacks'."
            )
            return
        target = Path(path).expanduser()
        if target.suffix.lower() != PACKAGE_SUFFIX:
            target = target.with_name(target.name + PACKAGE_SUFFIX)
        card = getattr(model, "card", None) or ModelCard(model.config)
        card = dataclasses.replace(card, provenance=model_provenance(run))
        layers = ", ".join(name for name, _ in run.unlabeled)
        description = (
            "Defocus deblurring of microscopy images with a Multi-Pyramid Transformer (MPT), fine-tuned with EFCR_ex "
            f"in napari-mpt-deblur on {layers}."
        )
        self.status.value = f"exporting to {target.name} (tested on the middle plane of '{layer.name}')..."
        self._export_worker = start_worker(
            partial(export_for_bioimageio, model, card, LayerInfo.of(layer).pixels, target, description),
            on_return=self._exported,
            on_error=self._export_failed,
            on_finished=self._export_finished,
        )
        self._set_running(False)
        self._export_bar = progress(total=0, desc=f"Exporting {target.name}")  # last: processes Qt events

    def _export_refused(self, problem: str) -> None:
        self.status.value = problem
        show_warning(problem)

    def _exported(self, path: Path) -> None:
        message = f"Exported for bioimage.io to {path}"
        if not self._state.deleted:
            summary = self._last.summary if self._last is not None else ""
            self.status.value = f"{summary} — exported to {path.name}" if summary else f"exported to {path.name}"
        show_info(message)

    def _export_failed(self, error: BaseException) -> None:
        text = (str(error) or type(error).__name__).rstrip(". ")
        message = f"Could not export for bioimage.io: {text}."
        if not self._state.deleted:
            self.status.value = f"failed: {message}"
        show_error(message)

    def _export_finished(self) -> None:
        self._export_worker = None
        bar, self._export_bar = self._export_bar, None
        if not self._state.deleted:
            self._set_running(self.running)
        if bar is not None:
            bar.close()  # last: processes Qt events


def _float_box(label: str, value: float, low: float, high: float, step: float, decimals: int) -> FloatSpinBox:
    box = FloatSpinBox(label=label, min=0.0, max=high, step=step)
    box.native.setDecimals(decimals)  # before min/value, or small values round to 0 at the default 2 decimals
    box.min, box.value = low, value
    return box


def _chosen_file(path: Any) -> bool:
    return path is not None and str(path) not in ("", ".") and not Path(path).is_dir()

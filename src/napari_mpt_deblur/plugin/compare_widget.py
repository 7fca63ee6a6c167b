"""The Compare detections dock: does deblurring help a segmentation? StarDist on the image before and after.

Choose the blurry layer (*before*) and its deblurred version (*after*), or let
the dock deblur it first; optionally a sharp layer and ground-truth labels to
score against. The dock runs the headless comparison
(:func:`~napari_mpt_deblur.detection.iter_compare`, StarDist in its own
process) in a thread worker, adds each image's detections as a Labels layer
over its source (outlines; a run again updates the layers it made), and shows
the measurements in a table and a bar plot. *Save labels...* writes the
detections as TIFF files with the plugin's writer, calibration included.

What is not Qt (checks, the run, the numbers shown) lives in
:mod:`.compare_job`; this module wires it to widgets, the worker and napari's
progress and notifications, with the helpers shared with the other docks
(:mod:`.widgets_common`).
"""

from __future__ import annotations

import importlib.util
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import napari.components
import napari.layers
import napari.viewer
import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, FloatSpinBox, PushButton
from napari.utils.notifications import show_error, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QHeaderView,
    QMessageBox,
    QTableWidget,
    QTableWidgetItem,
)

from ..config import ConfigError, DeblurSettings
from ..detection.engine import CompareResult, DetectionProgress, DetectionSettings
from ..detection.metrics import BLURRY, DEBLURRED, SHARP, SummaryTable
from ..detection.worker import DetectionCancelled
from ..inference import DeblurProgress, InputError
from ..models.files import ModelFileError
from . import session
from .compare_job import (
    CONTOUR,
    INSTALL_HINT,
    PLACEMENT,
    ROLES,
    CompareRun,
    Deblurred,
    Selection,
    compare_steps,
    describe_stardist,
    detection_record,
    detections_layer_kwargs,
    folder_problem,
    image_titles,
    is_label_image,
    labels_file_name,
    looks_like_labels,
    plot_bars,
    rgb_note,
    selection_problem,
    stardist_channels,
    stardist_choices,
    suggest_after,
    summary,
    write_labels,
)
from .deblur_job import DeblurJob, result_layer_kwargs
from .errors import COMPARE, user_message
from .io import SaveError
from .layer_info import RECORD_KEY, LayerInfo
from .plot import BarPlot
from .widgets_common import (
    DockState,
    FollowSelection,
    ModelPicker,
    ScrollingDock,
    device_box,
    image_for,
    list_in_order,
    progress_and_status,
    row,
    stop_when_closed,
    unwrapped,
)

ALL_LAYERS = "all layers..."
"""The ground-truth menu's entry that lists every integer image, not only those that look like labels."""


@dataclass(eq=False)
class _CompareState(DockState):
    """The dock's state, with the running comparison's (never the widget itself)."""

    run: CompareRun | None = None
    failed: bool = False  # the running comparison stopped on an error
    detections: list[weakref.ref] = field(default_factory=list)  # the Labels layers of the last comparison
    deblurred: dict[tuple[str, str], weakref.ref] = field(default_factory=dict)  # (source, model) -> result made

    def stop(self) -> None:
        """Stop now: between tiles when deblurring, within the plane when StarDist works (its process restarts)."""
        if self.run is not None:
            self.run.stop.set()
        super().stop()


# --- the dock -------------------------------------------------------------------------------------------------------


class CompareWidget(ScrollingDock):
    """Detect objects with StarDist on an image before and after deblurring, and compare the detections.

    Parameters
    ----------
    napari_viewer
        The viewer whose layers are offered and where the detections are added.

    Attributes
    ----------
    before, after, sharp, truth
        The layers to compare (magicgui menus; set their ``value`` to drive the widget from code).
    stardist_model, stardist_folder, prob_thresh, nms_thresh
        The StarDist model (a pretrained name or a folder) and its thresholds (0: the model's own).
    model, model_file, device
        The deblurring model and device for *Deblur, then detect*.
    advanced
        The folding section that holds the thresholds, ``model_file`` and ``device`` (collapsed at first).
    compare_button, deblur_button, cancel_button, save_button, progress_bar, status
        Controls and feedback (the status text can be selected and copied).
    table, bar_plot
        The results of the last comparison.
    result
        The last :class:`~napari_mpt_deblur.detection.CompareResult` (None before the first).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        self.viewer = napari_viewer
        self._state = _CompareState()
        self._folder_problem: str | None = None
        self._all_truth_layers = False  # the ground-truth menu lists every integer image, not only label-like ones
        self.result: CompareResult | None = None

        self.progress_bar, self.status = progress_and_status()
        self.before = ComboBox(
            name="before",
            label="before",
            choices=self._images,
            tooltip="The blurry image layer: the one selected in the layer list (or the source of a selected "
            "deblurred result), until you pick one here.",
        )
        self.after = ComboBox(
            name="after",
            label="after",
            choices=self._images,
            tooltip="Its deblurred version (not used by 'Deblur, then detect', which makes it). Follows 'before' "
            "(its newest deblurred result) until you pick one here.",
        )
        self.sharp = ComboBox(
            name="sharp",
            label="sharp (optional)",
            choices=self._optional_images,
            tooltip="An in-focus image of the same field. Without ground truth, its detections are the reference.",
        )
        self.truth = ComboBox(
            name="truth",
            label="ground truth\n(optional)",
            choices=self._label_images,
            tooltip="Labels of the true objects (a Labels layer, or an image of integer labels, 0 = background). "
            f"Integer images that do not look like labels are listed after choosing '{ALL_LAYERS}'.",
        )
        self.stardist_model = ComboBox(
            name="stardist_model",
            label="StarDist model",
            choices=stardist_choices,
            tooltip="StarDist's pretrained models (downloaded once) and the model folders chosen below.",
        )
        self.stardist_folder = FileEdit(
            name="stardist_folder",
            label="model folder",
            mode="d",
            nullable=True,
            tooltip="A StarDist model you trained: the folder holding config.json and weights_best.h5.",
        )
        self.prob_thresh = _threshold_box(
            "prob_thresh", "probability threshold", "Objects less likely than this are dropped (higher: fewer)."
        )
        self.nms_thresh = _threshold_box(
            "nms_thresh", "overlap threshold", "Candidates overlapping more than this are merged (higher: more kept)."
        )
        self.compare_button = PushButton(name="compare_button", text="Detect and compare")
        self._models = ModelPicker(
            self.status,
            label="deblur model",
            tooltip="The model 'Deblur, then detect' uses (the Deblur dock's list).",
        )
        self.model, self.model_file = self._models.combo, self._models.file
        self.device = device_box()
        self.deblur_button = PushButton(name="deblur_button", text="Deblur, then detect")
        self.cancel_button = PushButton(name="cancel_button", text="Cancel", enabled=False)
        self.save_button = PushButton(
            name="save_button",
            text="Save labels...",
            enabled=False,
            tooltip="Write the last comparison's detections into a folder, one TIFF per image, with their pixel "
            "size, Z spacing and units (the plugin's writer).",
        )
        # selectable: an error such as an offline StarDist model gives a URL and a folder to copy
        self.status.native.setTextInteractionFlags(
            Qt.TextInteractionFlag.TextSelectableByMouse | Qt.TextInteractionFlag.TextSelectableByKeyboard
        )
        self._save_folder: Path | None = None
        super().__init__()
        self.add_part(
            Container(
                widgets=[
                    self.before,
                    self.after,
                    self.sharp,
                    self.truth,
                    self.stardist_model,
                    self.stardist_folder,
                    self.model,
                ]
            )
        )
        # rarely changed: the StarDist model's own thresholds, the deblur model from the menu, "auto" finds the GPU
        self.advanced = self.add_section(
            "advanced: thresholds, deblur model file, device",
            Container(widgets=[self.prob_thresh, self.nms_thresh, self.model_file, self.device]),
        )
        self.add_part(row(self.compare_button, self.deblur_button))
        self.add_part(row(self.cancel_button, self.save_button))
        self.add_part(Container(widgets=[self.progress_bar, self.status]))
        self.table = QTableWidget(0, 0)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self._show_table(None)
        self.bar_plot = BarPlot("mean AP, or objects, per image", y_label="mean AP or objects")
        self.add_part(self.table)
        self.add_part(self.bar_plot)
        self.align_labels()

        self.stardist_model.changed.connect(self._on_stardist_chosen)
        self.stardist_folder.changed.connect(self._on_folder_picked)
        self.compare_button.changed.connect(self._on_compare_clicked)
        self.deblur_button.changed.connect(self._on_deblur_clicked)
        self.cancel_button.changed.connect(self.cancel)
        self.save_button.changed.connect(self._on_save_clicked)
        self.truth.changed.connect(self._on_truth_chosen)
        self._state.disconnects.append(self._models.unsubscribe)
        stop_when_closed(self, self._state)
        self._follow = FollowSelection(napari_viewer, self._state, [self.before, self.after], self._suggest_layers)
        self.before.changed.connect(self._on_before_changed)  # after the follower's slot: it knows a pick by hand
        self._follow.follow()  # start on the selected layer
        self._suggest_after()
        self.status.value = (
            INSTALL_HINT if not _stardist_installed() else describe_stardist(str(self.stardist_model.value))
        )

    # --- choices ----------------------------------------------------------------------------------------------------

    def _images(self, _: Any = None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, napari.layers.Image)]

    def _optional_images(self, _: Any = None) -> list[tuple[str, Any]]:
        return [("none", None), *self._images()]

    def _label_images(self, _: Any = None) -> list[tuple[str, Any]]:
        """Labels layers and label-like integer images; every integer image after 'all layers...' is chosen."""
        candidates = [layer for layer in self.viewer.layers if is_label_image(layer)]
        shown = candidates if self._all_truth_layers else [layer for layer in candidates if looks_like_labels(layer)]
        more = [(ALL_LAYERS, ALL_LAYERS)] if len(shown) < len(candidates) else []
        return [("none", None), *((layer.name, layer) for layer in shown), *more]

    def _on_truth_chosen(self, choice: Any) -> None:
        if choice != ALL_LAYERS:
            return
        self._all_truth_layers = True
        with self.truth.changed.blocked():
            self.truth.value = None  # nothing picked yet: the menu now lists every integer image
        list_in_order(self.truth)

    def reset_choices(self, *args: Any) -> None:
        """Follow the viewer's layers (napari calls this as layers come, go or are renamed)."""
        super().reset_choices(*args)
        list_in_order(self.truth)  # "all layers..." stays last
        self._suggest_after()

    def _suggest_layers(self, layers: napari.components.LayerList) -> dict[str, Any]:
        """For the selected layer: a deblurred result with its source, else the image with its deblurred result.

        Once *before* is picked by hand, *after* follows only to a selected result of it.
        """
        active = layers.selection.active
        before = image_for(active, layers)
        if before is None or looks_like_labels(before):
            return {}
        if "before" in self._follow.by_hand:
            return {"after": active} if before is self.before.value and before is not active else {}
        if before is not active:  # the active layer is a result of ``before``
            return {"before": before, "after": active}
        after = self._after_for(before)
        return {"before": before} if after is None else {"before": before, "after": after}

    def _after_for(self, before: napari.layers.Image) -> napari.layers.Image | None:
        """An image to compare with ``before`` (:func:`suggest_after`), never one that looks like labels."""
        names = [name for name, layer in self._images() if not looks_like_labels(layer)]
        suggestion = suggest_after(names, before.name)
        return None if suggestion is None else self.viewer.layers[suggestion]

    def _suggest_after(self) -> None:
        """Never offer the same layer, or a label-like image, as *after* when another image is there."""
        before, after = self.before.value, self.after.value
        if before is None or "after" in self._follow.by_hand:
            return
        if after is None or after is before or looks_like_labels(after):
            self._show_after_for(before)

    def _on_before_changed(self, before: napari.layers.Image | None) -> None:
        """*after* follows a new *before* (picked by hand too): its newest deblurred result, or another image."""
        after = self.after.value
        if before is None or "after" in self._follow.by_hand:
            return
        if after is None or after is before or image_for(after, self.viewer.layers) is not before:
            self._show_after_for(before)

    def _show_after_for(self, before: napari.layers.Image) -> None:
        suggestion = self._after_for(before)
        if suggestion is not None:
            self._follow.show("after", suggestion)

    def selection(self) -> Selection:
        """The layers chosen in the menus."""
        return Selection(self.before.value, self.after.value, self.sharp.value, self.truth.value)

    def _on_stardist_chosen(self, choice: str | None) -> None:
        self._folder_problem = None
        if choice and not self._state.deleted and not self._state.running:
            self.status.value = describe_stardist(choice)

    def _on_folder_picked(self, path: Path | None) -> None:
        if path is None or str(path) in ("", "."):
            self._folder_problem = None
            return
        folder = Path(path).expanduser()
        if not folder.is_dir():
            return  # typing a path: wait until it names a folder
        self._folder_problem = folder_problem(folder)
        if self._folder_problem:
            self.status.value = self._folder_problem  # a notification when a run is refused, not at every keystroke
            return
        choice = session.SESSION.add_stardist_folder(folder)
        combo = self.stardist_model
        with combo.changed.blocked():
            combo.native.clear()  # magicgui keeps listed items in place and appends new ones: list them in order
            combo.reset_choices()
        combo.value = choice
        self._on_stardist_chosen(choice)

    def settings(self) -> DetectionSettings:
        """The detection settings the widget shows (a threshold of 0: the model's own).

        Raises
        ------
        ValueError
            For settings the engine refuses.
        """
        return DetectionSettings(
            model=str(self.stardist_model.value or ""),
            prob_thresh=float(self.prob_thresh.value) or None,
            nms_thresh=float(self.nms_thresh.value) or None,
        )

    # --- running ----------------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether a comparison is in progress."""
        return self._state.running

    def _on_compare_clicked(self) -> None:
        self.detect_and_compare()

    def _on_deblur_clicked(self) -> None:
        self.deblur_then_detect()

    def detect_and_compare(self, selection: Selection | None = None) -> None:
        """Detect on the *before*, *after* (and *sharp*) layers and compare; problems become notifications.

        Parameters
        ----------
        selection
            The layers to use (default: those chosen in the menus).
        """
        self._start(selection or self.selection(), deblur_first=False)

    def deblur_then_detect(self, selection: Selection | None = None) -> None:
        """Deblur the *before* layer with the chosen model, add the result, then detect on both and compare.

        Parameters
        ----------
        selection
            The layers to use (default: those chosen in the menus; *after* is not used).
        """
        self._start(selection or self.selection(), deblur_first=True)

    def _start(self, selection: Selection, deblur_first: bool) -> None:
        state = self._state
        if state.running or state.closed:
            return
        problem = self._problem(selection, deblur_first)
        if problem:
            self._refuse(problem)
            return
        try:
            settings = self.settings()
            job = self._deblur_job(selection.before) if deblur_first else None
        except (InputError, ModelFileError, ConfigError, OSError, ValueError) as error:
            self._refuse(f"{str(error).rstrip('.')}.")
            return
        before = selection.before
        images = {BLURRY: before, DEBLURRED: None if deblur_first else selection.after, SHARP: selection.sharp}
        images = {key: layer for key, layer in images.items() if layer is not None}
        run = CompareRun(
            sources={key: layer.as_layer_data_tuple()[1] for key, layer in images.items()},
            data={key: LayerInfo.of(layer).pixels for key, layer in images.items()},
            truth=None if selection.truth is None else LayerInfo.of(selection.truth).pixels,
            axes=LayerInfo.of(before).axes,
            settings=settings,
            deblur=job,
        )
        state.run, state.cancel_requested, state.failed = run, False, False
        self.result = None
        self.compare_button.enabled = self.deblur_button.enabled = self.save_button.enabled = False
        self.cancel_button.enabled = True
        self.progress_bar.max, self.progress_bar.value = 1, 0
        self._show_table(None)
        self.bar_plot.clear()
        self.status.value = f"deblurring {before.name} ..." if job else "starting ..."
        state.start(
            compare_steps(run),
            f"Deblurring {before.name}" if job else "Detecting objects",
            on_yield=self._on_yielded,
            on_return=self._on_returned,
            on_error=self._on_error,
            on_finished=self._on_finished,
        )
        note = rgb_note(selection, stardist_channels(settings.model))
        deblur_note = job.rgb_note() if job is not None else None
        for message in (deblur_note, note):  # last: a notification may process Qt events
            if message:
                show_warning(message)

    def _problem(self, selection: Selection, deblur_first: bool) -> str | None:
        if not _stardist_installed():
            return f"{INSTALL_HINT}."
        if self._folder_problem:
            return self._folder_problem
        if not self.stardist_model.value:
            return "Choose a StarDist model: a pretrained one, or your model's folder under 'model folder'."
        if deblur_first and self._models.problem:
            return self._models.problem
        return selection_problem(selection, deblur_first, stardist_channels(str(self.stardist_model.value)))

    def _deblur_job(self, layer: Any) -> DeblurJob:
        choice = self.model.value
        model = session.SESSION.load_model(choice) if choice else None
        settings = DeblurSettings(device=str(self.device.value))
        return DeblurJob.from_layer(LayerInfo.of(layer), model, settings, False, model_name=choice or "")

    def _refuse(self, message: str) -> None:
        self.status.value = message
        show_error(message)

    def cancel(self) -> None:
        """Stop the running comparison now (StarDist within its plane); no detections are added."""
        if self._state.cancel():
            self.cancel_button.enabled = False
            self.status.value = "cancelling ..."

    # napari's progress bars and notifications may process Qt events while they update, so the worker's next
    # signals can run inside these handlers: each one reads what it needs first and updates napari last.
    # The worker's slots are called while the widget lives (see start_worker); its Qt widgets may be gone.

    def _on_yielded(self, event: Any) -> None:
        state = self._state
        run = state.run
        if state.worker is None or run is None:
            return  # delivered after the run ended
        if isinstance(event, Deblurred):
            if not state.deleted:
                self.progress_bar.max, self.progress_bar.value = 1, 0  # detection starts; deblurring's 100 % is past
            self._add_deblurred(run, event.data)
        elif isinstance(event, str):
            if not state.deleted:
                self.status.value = event
        elif isinstance(event, DeblurProgress):
            if not state.deleted:
                plane = min(event.planes_done + 1, event.planes_total)
                self.status.value = (
                    f"deblurring: plane {plane}/{event.planes_total}, tile {event.tiles_done}/{event.tiles_total}"
                )
            state.show_progress(self.progress_bar, event.tiles_done, event.tiles_total)
        elif isinstance(event, DetectionProgress):
            name = run.sources.get(event.image, {}).get("name", event.image)
            if not state.deleted:
                self.status.value = (
                    f"detecting: plane {event.planes_done}/{event.planes_total} "
                    f"({ROLES.get(event.image, event.image)}: {name}, {event.objects} objects)"
                )
            phase = "Detecting objects" if run.deblur is not None else None  # the bar was named for deblurring
            state.show_progress(self.progress_bar, event.planes_done, event.planes_total, phase)

    def _add_deblurred(self, run: CompareRun, data: np.ndarray) -> None:
        """Add the deblurred image over its source, or update the layer an earlier run of the same model made."""
        if self._state.closed or run.deblur is None:
            return
        kwargs = result_layer_kwargs(run.sources[BLURRY], run.deblur.provenance())
        key = (run.deblur.source, run.deblur.model_name)
        made = self._state.deblurred.get(key)
        earlier = made() if made is not None else None
        if earlier is not None and earlier in self.viewer.layers and earlier.data.shape == data.shape:
            earlier.data = data
            earlier.metadata = kwargs["metadata"]
            for name in PLACEMENT:  # the user's display settings (contrast, colormap, name) stay
                if name in kwargs:
                    setattr(earlier, name, kwargs[name])
            layer = earlier
        else:
            layer = self.viewer.add_image(data, **kwargs)
            self._state.deblurred[key] = _weak_layer(layer)
        run.sources[DEBLURRED] = layer.as_layer_data_tuple()[1]
        if not self._state.deleted:
            self._follow.show("after", layer)  # 'Detect and compare' runs on it next time

    def _on_returned(self, result: CompareResult) -> None:
        state = self._state
        run = state.run
        if state.cancel_requested or state.closed or run is None:
            return  # stopped after the last plane, or the dock is gone: the user asked for nothing
        self.result = result
        names = {key: source.get("name", key) for key, source in run.sources.items()}
        seconds = time.perf_counter() - run.started
        text = f"done in {seconds:.1f} s\n{summary(result.comparison, run.info, run.settings)}"
        self._show_table(result.comparison.summary_table(image_titles(result.comparison, names)))
        title, bars, maximum = plot_bars(result.comparison, names)
        self.bar_plot.set_bars(bars, title, maximum, y_label="mean AP" if maximum else "objects")
        self.status.value = text
        layers = [self._add_detections(labels, run, key) for key, labels in result.labels.items()]
        self._state.detections = [_weak_layer(layer) for layer in layers]
        self._enable_saving()  # the run may have finished while napari added the layers

    def _show_table(self, table: SummaryTable | None) -> None:
        """Fill the table (None empties it), as high as its rows: the bar plot stays in view.

        A column per image, a row per measurement: the images stand side by side in a narrow dock.
        """
        widget = self.table
        widget.clear()
        widget.setColumnCount(len(table.rows) if table else 0)
        widget.setRowCount(len(table.header) - 1 if table else 0)
        if table is not None:
            widget.setHorizontalHeaderLabels([row[0].replace(" (", "\n(") for row in table.rows])
            widget.setVerticalHeaderLabels(table.header[1:])
            for c, row in enumerate(table.rows):
                for r, cell in enumerate(row[1:]):
                    item = QTableWidgetItem(cell)
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                    widget.setItem(r, c, item)
            widget.resizeRowsToContents()
        header = widget.horizontalHeader().sizeHint().height() if table else 0
        rows = sum(widget.rowHeight(r) for r in range(widget.rowCount()))
        widget.setFixedHeight(header + rows + 2 * widget.frameWidth() + 2)

    def _add_detections(self, labels: np.ndarray, run: CompareRun, key: str) -> napari.layers.Labels:
        """Add an image's detections over it as outlines, or update the layer that an earlier run made for it (its
        display, filled or outlined, as the user left it)."""
        kwargs = detections_layer_kwargs(run.sources[key], detection_record(run, key))
        name = kwargs.pop("name")
        earlier = next(
            (
                layer
                for layer in self.viewer.layers
                if isinstance(layer, napari.layers.Labels)
                and layer.name == name
                and "detections_of" in layer.metadata.get(RECORD_KEY, {})
                and layer.ndim == labels.ndim
            ),
            None,
        )
        if earlier is None:
            layer = self.viewer.add_labels(labels, name=name, **kwargs)
            layer.contour = CONTOUR
            return layer
        earlier.data = labels
        for key_, value in kwargs.items():
            setattr(earlier, key_, value)
        return earlier

    def _on_error(self, error: BaseException) -> None:
        if isinstance(error, DetectionCancelled):
            return  # the user's Cancel, or the dock closing: _on_finished says so
        self._state.failed = True
        message = user_message(error, COMPARE)
        if not self._state.deleted:
            self.status.value = message.split("\n", 1)[0]  # the notification keeps the rest (the worker's log)
        show_error(message)

    def _on_finished(self) -> None:
        state = self._state
        state.run = None
        if not state.deleted:
            self.compare_button.enabled = self.deblur_button.enabled = not state.closed
            self._enable_saving()
            self.cancel_button.enabled = False
            if state.cancel_requested or state.failed:
                self.progress_bar.value = 0  # not a full bar for work that did not finish
            if state.cancel_requested:
                self.status.value = "cancelled"

    # --- saving -----------------------------------------------------------------------------------------------------

    def _enable_saving(self) -> None:
        state = self._state
        if not state.deleted:
            self.save_button.enabled = not state.running and not state.closed and bool(self.detection_layers())

    def detection_layers(self) -> list[napari.layers.Labels]:
        """The Labels layers of the last comparison still in the viewer (what *Save labels...* writes)."""
        layers = (made() for made in self._state.detections)
        return [layer for layer in layers if layer is not None and layer in self.viewer.layers]

    def _on_save_clicked(self) -> None:
        start = str(self._save_folder or Path.home())
        folder = QFileDialog.getExistingDirectory(self.native, "Save the detections (one TIFF per image) in", start)
        if not folder:
            return
        taken = [
            name
            for name in (labels_file_name(layer.name) for layer in self.detection_layers())
            if (Path(folder) / name).exists()
        ]
        if taken:
            answer = QMessageBox.question(
                self.native,
                "Replace files?",
                f"{', '.join(taken)} already in {folder}. Replace?",
                QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
            )
            if answer != QMessageBox.StandardButton.Yes:
                return
        self.save_labels(folder)

    def save_labels(self, folder: str | Path) -> list[Path]:
        """Write the last comparison's detections into ``folder``: one TIFF per Labels layer, named after it.

        The plugin's writer (:func:`~.compare_job.write_labels`) keeps the pixel size, Z spacing and units, and
        writes each file under a temporary name first: a failed save leaves no partial file. Existing files of those
        names are replaced. Problems become a notification and the status line.

        Parameters
        ----------
        folder
            An existing folder.

        Returns
        -------
        list of Path
            The files written.
        """
        layers = self.detection_layers()
        if not layers:
            self._refuse("No detections to save: run 'Detect and compare' first (or the layers were removed).")
            return []
        folder = Path(folder).expanduser()
        self._save_folder = folder
        written = []
        for layer in layers:
            target = folder / labels_file_name(layer.name)
            try:
                write_labels(target, layer.data, layer.as_layer_data_tuple()[1])
            except SaveError as error:
                self._refuse(f"Could not save the detections: {error}")
                return written
            written.append(target)
        self.status.value = f"saved {', '.join(path.name for path in written)} in {folder}"
        return written


def _weak_layer(layer: Any) -> weakref.ref:
    """A weak reference to a layer. napari hands plugin docks a new proxy of its objects at every access (each gone
    as soon as unused): the reference is to the layer itself."""
    return weakref.ref(unwrapped(layer))


def _threshold_box(name: str, label: str, tooltip: str) -> FloatSpinBox:
    box = FloatSpinBox(name=name, label=label, min=0.0, max=0.99, step=0.05, value=0.0)
    box.native.setDecimals(2)
    box.native.setSpecialValueText("model's own")  # shown for 0, the minimum
    box.tooltip = f"{tooltip} 'model's own': the threshold the model was trained or tuned with."
    return box


def _stardist_installed() -> bool:
    return importlib.util.find_spec("stardist") is not None

"""The Deblur dock widget: pick an image layer and a model, get the deblurred layer, save it.

Everything that is not Qt lives in :mod:`.deblur_job` (checks, result layer,
lazy result, focus profile), :mod:`.timing` and the inference engine; this
module wires them to widgets, thread workers and napari's progress and
notifications, with the helpers it shares with the Fine-tune dock
(:mod:`.widgets_common`). :class:`LazyPlanes` computes what a lazy result
layer shows, in a worker, so browsing never waits in the GUI thread.
"""

import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import napari.components
import napari.layers
import napari.viewer
import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, PushButton, SpinBox
from napari.utils import progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QFileDialog

from .. import images
from ..config import MAX_BLUR_SIGMA_PX, ConfigError, DeblurSettings, IntensityNormalization
from ..inference import DEFAULT_TILE, DeblurProgress, InputError, default_overlap
from ..models.files import ModelFileError
from . import session
from .deblur_job import DeblurJob, LazyResult, SavedPlanes, focus_profile, result_layer_kwargs
from .errors import DEBLUR, user_message
from .io import SaveError, write_tiff_layer
from .layer_info import LayerInfo
from .plot import LinePlot
from .timing import TimeLeft
from .widgets_common import (
    DockState,
    FollowSelection,
    ModelPicker,
    ScrollingDock,
    device_box,
    gui_relay,
    image_for,
    progress_and_status,
    row,
    start_worker,
    stop_when_closed,
    unwrapped,
    weak_callback,
)

logger = logging.getLogger(__name__)

UPDATE_S = 0.25
"""A lazy plane's progress is shown at most this often (seconds)."""

BLUR_WIDTH_TIP = (
    "The blur's width, if you know it: sigma in pixels of a Gaussian as wide as the PSF (its 80 % radius / 1.79), "
    "in-focus blur included (in focus about 0.21 x wavelength / NA / pixel size). The model deblurs better when "
    "told. 0: it estimates the width from each plane when it carries an estimator (the bundled default does; "
    "the status line then says what it estimated), else judges the blur from the image."
)
NO_BLUR_WIDTH_TIP = "This model takes no blur width: it judges the blur from the image."

NO_MODEL_HINT = "No model yet: pick a model file (.safetensors) or a reference checkpoint (.pth) under 'model file'."


def _compute(
    steps: Generator[DeblurProgress, None, np.ndarray], data: Any, axes: str
) -> Generator[DeblurProgress, None, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The worker's generator: the engine's progress, then the result with both focus profiles."""
    result = yield from steps
    return result, focus_profile(data, axes), focus_profile(result, axes)


@dataclass(eq=False)
class _PlaneRun:
    """One plane a :class:`LazyPlanes` computes: what its worker's slots need (they get this, not shared state)."""

    position: tuple[int, ...]
    where: str
    tiles: int
    started: float = field(default_factory=time.perf_counter)
    time_left: TimeLeft = field(default_factory=TimeLeft)
    worker: Any = None
    pbar: progress | None = None
    done: bool = False
    reported: float = 0.0
    judged_before: int = 0
    """How many widths the engine had estimated when the plane started (its own come after)."""


class LazyPlanes:
    """Computes the planes a lazy result layer shows, one at a time in a worker: never in the GUI thread.

    napari drawing the layer asks its data (a :class:`~.deblur_job.LazyResult`) for a plane; one not computed
    yet is drawn black and becomes wanted. This computes the first wanted plane, reporting every tile (a bar in
    napari's activity dock, and :attr:`listener`); when napari asks for other planes before it is done (the user
    moved on), it stops between two tiles and starts on those. When a plane napari draws is ready, the layers
    showing the result are refreshed. It lives as long as the result (the layer's data), with or without the
    dock that made it; when no layer of the viewer shows the result any more, it stops.

    Parameters
    ----------
    viewer
        The viewer the result layer is in (held weakly).
    result
        The lazy result; its ``on_wanted`` is set to this object's wake-up.
    name
        The result's name, for messages (set :attr:`name` to the layer's once added).
    """

    def __init__(self, viewer: napari.viewer.Viewer, result: LazyResult, name: str) -> None:
        self.result = result
        self.name = name
        self.listener: Callable[[str, int, int], None] | None = None
        """Called with (a status line, tiles done, tiles total) as planes are computed (a dock, held weakly)."""
        self.current: _PlaneRun | None = None
        """The plane being computed (None when idle)."""
        self.failed: dict[tuple[int, ...], str] = {}
        """Planes whose computation failed: not tried again until napari asks for them anew."""
        self._viewer = weakref.ref(unwrapped(viewer))  # the viewer, not the proxy a dock gets (it may go first)
        self._relay = gui_relay()  # napari may slice in another thread (its experimental asynchronous slicing)
        self._scheduling = self._again = False
        result.on_wanted = self._wake
        viewer.layers.events.removed.connect(self._layer_removed)  # napari holds the method weakly

    def layers(self) -> list[napari.layers.Image]:
        """The viewer's layers that show this result."""
        viewer = self._viewer()
        return [] if viewer is None else [layer for layer in viewer.layers if unwrapped(layer.data) is self.result]

    def _wake(self) -> None:  # any thread
        self._relay.call(self._schedule)

    def _schedule(self) -> None:
        # napari's progress bars process Qt events as they appear, so this can be called from inside itself:
        # the inner call only asks the outer one to look again
        if self._scheduling:
            self._again = True
            return
        self._scheduling = True
        try:
            self._again = True
            while self._again:
                self._again = False
                self._schedule_once()
        finally:
            self._scheduling = False

    def _schedule_once(self) -> None:
        result = self.result
        shown = result.shown()
        self.failed = {position: why for position, why in self.failed.items() if position in shown}
        wanted = [position for position in result.wanted() if position not in self.failed]
        current = self.current
        if current is not None:
            if current.position not in wanted and current.worker is not None:
                current.worker.quit()  # the user moved on: stop between two tiles; _finished goes on
        elif wanted:
            self._start(wanted[0])

    def _start(self, position: tuple[int, ...]) -> None:
        planes = self.result.planes
        run = _PlaneRun(position, planes.describe(position), planes.tiles_per_block, judged_before=len(self._judged()))
        self.current = run
        run.worker = start_worker(
            self.result.iter_compute(position),
            on_yield=partial(self._progress, run),
            on_return=partial(self._computed, run),
            on_error=partial(self._failed_with, run),
            on_finished=partial(self._finished, run),
        )
        self._tell(f"computing {run.where} of '{self.name}' ...", 0, run.tiles)
        run.pbar = progress(total=run.tiles, desc=f"Deblurring {self.name}, {run.where}")  # last: processes events

    def _judged(self) -> list[float]:
        """The widths the engine has estimated so far (a plane's own are those added while it ran)."""
        return self.result.planes.deblurrer.estimated_widths

    def _tell(self, text: str, done: int, total: int) -> None:
        if self.listener is not None:
            self.listener(text, done, total)

    def _progress(self, run: _PlaneRun, event: DeblurProgress) -> None:
        if run is not self.current:
            return  # delivered after the plane ended
        left = run.time_left.describe(event.tiles_done, event.tiles_total)
        now = time.perf_counter()
        if now - run.reported < UPDATE_S and event.tiles_done < event.tiles_total and not event.message:
            return  # small tiles come fast: redrawing the dock and the activity bar for each would load the GUI
        run.reported = now
        line = f"computing {run.where} of '{self.name}': tile {event.tiles_done}/{event.tiles_total}"
        self._tell(f"{line}, {left}" if left else line, event.tiles_done, event.tiles_total)
        pbar = run.pbar
        if pbar is not None:  # last: napari's bars process Qt events (and show their own time left)
            pbar.update(event.tiles_done - pbar.n)
        if event.message:
            show_info(event.message)

    def _computed(self, run: _PlaneRun, _: np.ndarray) -> None:
        run.done = True

    def _failed_with(self, run: _PlaneRun, error: BaseException) -> None:
        message = f"'{self.name}', {run.where}: {user_message(error, DEBLUR)}"
        self.failed[run.position] = message
        self._tell(message, 0, run.tiles)
        show_error(message)

    def _finished(self, run: _PlaneRun) -> None:
        if self.current is run:
            self.current = None
        pbar, run.pbar = run.pbar, None
        if run.done:
            seconds = time.perf_counter() - run.started
            line = f"{run.where} of '{self.name}' computed in {seconds:.1f} s"
            judged = self.result.planes.deblurrer.describe_judged(since=run.judged_before)
            self._tell(f"{line}; {judged}" if judged else line, run.tiles, run.tiles)
            if run.position in self.result.shown() and not set(self.result.wanted()) - set(self.failed):
                for layer in self.layers():  # napari draws it again, from the cache this time
                    layer.refresh()
        self._schedule()
        if pbar is not None:
            pbar.close()  # last: processes events

    def _layer_removed(self, _: Any = None) -> None:
        if not self.layers():
            self.result.forget_display()
            current = self.current
            if current is not None and current.worker is not None:
                current.worker.quit()


@dataclass(eq=False)
class _RunState(DockState):
    """The dock's state, with the running job's (never the widget itself)."""

    source_state: dict[str, Any] = field(default_factory=dict)
    job: DeblurJob | None = None
    started: float = 0.0
    time_left: TimeLeft = field(default_factory=TimeLeft)
    saving: Path | None = None
    """The file being saved (None when no save runs)."""
    stop_saving: threading.Event = field(default_factory=threading.Event)


class DeblurWidget(ScrollingDock):
    """Deblur an image layer with an MPT model, lazily (planes computed as shown) or all at once.

    Parameters
    ----------
    napari_viewer
        The viewer whose image layers are offered and where results are added.

    Attributes
    ----------
    layer, model, model_file, blur_sigma, device, tile, overlap, low, high, lazy
        The inputs (magicgui widgets; set their ``value`` to drive the widget from code).
    advanced
        The folding section that holds ``device``, ``tile``, ``overlap``, ``low`` and ``high`` (collapsed at first).
    run_button, cancel_button, progress_bar, status
        Controls and feedback.
    save_button
        *Save result...*: writes the result layer (:meth:`result_layer`) with the plugin's TIFF writer.
    focus_plot
        Focus score per plane of the input and the output.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        self.viewer = napari_viewer
        self._state = _RunState()
        self._overlap_follows_tile = True
        self._setting_defaults = False
        self._default_percentiles = (1.0, 99.8)

        self.progress_bar, self.status = progress_and_status()
        self.layer = ComboBox(
            name="layer",
            label="image",
            choices=self._image_layer_choices,
            tooltip="The image layer to deblur: the one selected in the layer list, until you pick one here.",
        )
        self._models = ModelPicker(
            self.status,
            label="model",
            tooltip="Bundled models, models saved by the Fine-tune dock and files picked below.",
        )
        self.model, self.model_file = self._models.combo, self._models.file
        self.blur_sigma = FloatSpinBox(
            name="blur_sigma",
            label="blur width (px)",
            min=0.0,
            max=MAX_BLUR_SIGMA_PX,
            step=0.1,
            value=0.0,
            tooltip=BLUR_WIDTH_TIP,
        )
        self.device = device_box()
        self.tile = SpinBox(
            name="tile",
            label="tile",
            min=0,
            max=16384,
            step=16,
            value=DEFAULT_TILE,
            tooltip="Tile side in pixels (0: whole planes, no tiling). Smaller tiles need less memory.",
        )
        self.overlap = SpinBox(
            name="overlap",
            label="overlap",
            min=0,
            max=8192,
            value=default_overlap(DEFAULT_TILE),
            tooltip="Pixels shared by neighbouring tiles, blended (at most half the tile). "
            "Follows the tile (a quarter, at most 64) until you change it.",
        )
        self.low = FloatSpinBox(
            name="low",
            label="low percentile",
            min=0.0,
            max=100.0,
            step=0.1,
            value=1.0,
            tooltip="Intensity percentile mapped to 0 (default: what the model was trained with).",
        )
        self.high = FloatSpinBox(
            name="high",
            label="high percentile",
            min=0.0,
            max=100.0,
            step=0.1,
            value=99.8,
            tooltip="Intensity percentile mapped to 1 (default: what the model was trained with).",
        )
        self.lazy = CheckBox(
            name="lazy",
            text="compute planes as I browse",
            value=False,
            tooltip="Checked: the result appears at once and each plane is computed in the background when shown.\n"
            "Unchecked: every plane is computed now, with progress.",
        )
        self.run_button = PushButton(name="run_button", text="Run")
        self.cancel_button = PushButton(name="cancel_button", text="Cancel", enabled=False)
        self.save_button = PushButton(
            name="save_button",
            text="Save result...",
            enabled=False,
            tooltip="Write the deblurred result (the selected one, else the newest) as a TIFF that keeps its pixel "
            "size, Z spacing and units.",
        )
        self._lazy: LazyPlanes | None = None  # the newest lazy result's, which reports on the status line
        self._lazy_note = ""
        super().__init__()
        self.add_part(Container(widgets=[self.layer, self.model, self.model_file, self.blur_sigma, self.lazy]))
        # rarely changed: the model sets the tile and percentiles, and "auto" finds the GPU
        self.advanced = self.add_section(
            "advanced: device, tiles, percentiles",
            Container(widgets=[self.device, self.tile, self.overlap, self.low, self.high]),
        )
        self.add_part(row(self.run_button, self.cancel_button))
        self.add_part(Container(widgets=[self.progress_bar, self.status, self.save_button]))
        # the output on a y axis of its own: deblurring raises the score several-fold, which would flatten the input
        self.focus_plot = LinePlot("focus score", "plane", y_label="input", right=("output",), right_label="output")
        self.add_part(self.focus_plot)
        self.align_labels()

        self.tile.changed.connect(self._on_tile_changed)
        self.overlap.changed.connect(self._on_overlap_changed)
        self.model.changed.connect(self._on_model_changed)
        self.run_button.changed.connect(self._on_run_clicked)
        self.cancel_button.changed.connect(self.cancel)
        self.save_button.changed.connect(self._on_save_clicked)
        self._state.disconnects.append(self._models.unsubscribe)
        self._state.disconnects.append(self._state.stop_saving.set)  # closing the dock cancels a save too
        stop_when_closed(self, self._state)
        self._follow = FollowSelection(napari_viewer, self._state, [self.layer], self._suggest_layer)
        self._follow.follow()  # start on the selected layer
        self._on_model_changed(self.model.value)
        update = weak_callback(self._update_save_button)
        for emitter in (
            napari_viewer.layers.events.inserted,
            napari_viewer.layers.events.removed,
            napari_viewer.layers.selection.events.active,
        ):
            emitter.connect(update)
            self._state.disconnects.append(lambda emitter=emitter: emitter.disconnect(update))
        self._update_save_button()

    def _image_layer_choices(self, _: Any = None) -> list[tuple[str, Any]]:
        """The viewer's image layers (napari's dock refreshes the menu as layers come, go or are renamed)."""
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, napari.layers.Image)]

    @staticmethod
    def _suggest_layer(layers: napari.components.LayerList) -> dict[str, Any]:
        image = image_for(layers.selection.active, layers)
        return {} if image is None else {"layer": image}

    # --- settings ---------------------------------------------------------------------------------------------------

    def _on_model_changed(self, choice: str | None) -> None:
        if self._state.deleted:
            return
        if not choice:
            self.status.value = NO_MODEL_HINT
            return
        try:
            model = session.SESSION.load_model(choice)
        except (ModelFileError, OSError) as error:
            self.status.value = str(error)
            return
        card = getattr(model, "card", None)
        normalization = card.normalization if card else IntensityNormalization()
        self._setting_defaults = True
        try:
            self.tile.value = (card.tile_size if card else None) or DEFAULT_TILE
            fixed = normalization.mode == "fixed"
            low, high = (0.0, 100.0) if normalization.mode != "percentile" else (normalization.low, normalization.high)
            self.low.value, self.high.value = low, high
            # as the boxes show them (rounded to their decimals), so untouched boxes keep the model's exact values
            self._default_percentiles = (float(self.low.value), float(self.high.value))
            for box in (self.low, self.high):
                box.enabled = not fixed
            if fixed:
                self.low.tooltip = self.high.tooltip = (
                    f"This model maps the fixed values {normalization.low:g}..{normalization.high:g} to 0..1."
                )
        finally:
            self._setting_defaults = False
        self.blur_sigma.enabled = model.config.blur_conditioned
        self.blur_sigma.tooltip = BLUR_WIDTH_TIP if model.config.blur_conditioned else NO_BLUR_WIDTH_TIP
        channels = model.config.in_channels
        kind = "RGB" if channels == 3 else "grey"
        self.status.value = (
            f"model: {Path(choice).name} ({kind}; {normalization.mode} normalisation per {normalization.per})"
        )

    def _on_tile_changed(self, tile: int) -> None:
        if self._overlap_follows_tile:
            following, self._setting_defaults = self._setting_defaults, True
            try:
                self.overlap.value = default_overlap(tile)
            finally:
                self._setting_defaults = following
        self.overlap.enabled = tile != 0

    def _on_overlap_changed(self, _: int) -> None:
        if not self._setting_defaults:
            self._overlap_follows_tile = False

    def settings(self) -> DeblurSettings:
        """The engine settings the widget shows.

        Raises
        ------
        ConfigError
            For values the engine refuses (e.g. a tile of 1 to 15 pixels, low >= high).
        """
        tile = int(self.tile.value)
        overlap = None if tile == 0 else min(int(self.overlap.value), tile // 2)
        low, high = float(self.low.value), float(self.high.value)
        normalization = None  # the model's own, unless the user changed the percentiles
        if (low, high) != self._default_percentiles and self.low.enabled:
            card = getattr(session.SESSION.load_model(self.model.value), "card", None) if self.model.value else None
            per = card.normalization.per if card else "plane"
            normalization = IntensityNormalization(mode="percentile", low=low, high=high, per=per)
        width = float(self.blur_sigma.value)
        return DeblurSettings(
            tile=tile,
            overlap=overlap,
            device=str(self.device.value),
            normalization=normalization,
            blur_sigma_px=width if width > 0 and self.blur_sigma.enabled else None,
        )

    # --- running ----------------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether an eager run is in progress."""
        return self._state.running

    def _on_run_clicked(self) -> None:
        self.run()

    def run(self, layer: napari.layers.Layer | None = None) -> None:
        """Deblur ``layer`` (default: the chosen one) as the widget is set; errors become notifications.

        Lazy: the result layer is added at once, and the planes napari shows are computed in a worker
        (:class:`LazyPlanes`). Eager: the work runs in a thread and the result is added when complete.
        """
        if self.running or self._state.closed:
            return
        layer = layer if layer is not None else self.layer.value
        if layer is None or self._models.problem:
            self._refuse(self._models.problem or "no image layer: open an image, or add one to the viewer, first")
            return
        info = LayerInfo.of(layer)
        choice = self.model.value
        try:
            settings = self.settings()
            model = session.SESSION.load_model(choice) if (choice and info.kind == "image") else None
            job = DeblurJob.from_layer(info, model, settings, bool(self.lazy.value), model_name=choice or "")
            source_state = layer.as_layer_data_tuple()[1]
            if job.lazy:
                self._run_lazy(job, source_state)
            else:
                self._run_eager(job, source_state)
        except (InputError, ModelFileError, ConfigError, OSError) as error:
            self._refuse(str(error))
            return
        note = job.rgb_note()
        if note:  # last: a notification may process Qt events
            show_info(note)

    def _refuse(self, message: str) -> None:
        show_error(message)
        self.status.value = message

    def _run_lazy(self, job: DeblurJob, source_state: dict[str, Any]) -> None:
        result = LazyResult(job.planes())
        kwargs = result_layer_kwargs(source_state, job.provenance())
        lazy = LazyPlanes(self.viewer, result, kwargs["name"])
        lazy.listener = weak_callback(self._on_lazy_progress)
        self._lazy = lazy
        self._lazy_note = (
            f"{job.source}: each plane is computed in the background when shown (black until then). The plot "
            "shows the input's focus only: the output's would compute every plane."
        )
        self.status.value = self._lazy_note
        layer = self.viewer.add_image(result, **kwargs)  # napari draws it: the shown plane is wanted
        lazy.name = layer.name
        self.focus_plot.clear()
        start_worker(
            lambda: focus_profile(job.data, job.axes),
            on_return=self._on_input_focus,
            on_error=lambda error: logger.warning("focus profile failed: %s", error),
        )

    def _on_input_focus(self, scores: np.ndarray) -> None:
        if not self._state.deleted:
            self.focus_plot.set_series("input", np.arange(len(scores)), scores)

    def _on_lazy_progress(self, line: str, done: int, total: int) -> None:
        """The newest lazy result's planes, on the status line and (when no run or save uses it) the bar."""
        if self._state.deleted:
            return
        self.status.value = f"{self._lazy_note}\n{line}" if self._lazy_note else line
        if not self.running:
            self.progress_bar.max, self.progress_bar.value = max(1, total), done

    def _run_eager(self, job: DeblurJob, source_state: dict[str, Any]) -> None:
        state = self._state
        state.job, state.source_state, state.cancel_requested = job, source_state, False
        state.started, state.time_left = time.perf_counter(), TimeLeft()
        self._lazy_note = ""  # the status line is this run's now
        self._set_busy(True)
        self.progress_bar.max, self.progress_bar.value = 1, 0
        self.status.value = f"deblurring {job.source} ..."
        self.focus_plot.clear()
        state.start(
            _compute(job.deblur_steps(), job.data, job.axes),
            f"Deblurring {job.source}",
            on_yield=self._on_progress,
            on_return=self._on_returned,
            on_error=self._on_error,
            on_finished=self._on_finished,
        )

    def _set_busy(self, busy: bool) -> None:
        """A run or a save is in progress (one at a time), or none; set before the worker starts."""
        self.run_button.enabled = not busy and not self._state.closed
        self.cancel_button.enabled = busy
        self.save_button.enabled = not busy and self.result_layer() is not None

    def cancel(self) -> None:
        """Stop the running computation after the current tile (nothing is added), or the save (nothing is
        written)."""
        self._state.stop_saving.set()
        if self._state.cancel():
            self.cancel_button.enabled = False
            self.status.value = "cancelling after the current tile ..."

    # napari's progress bars and notifications may process Qt events while they update, so the worker's next
    # signals can run inside these handlers: each one reads what it needs first and updates napari last.
    # The worker's slots are called while the widget lives (see start_worker); its Qt widgets may be gone.

    def _on_progress(self, event: DeblurProgress) -> None:
        state = self._state
        if state.worker is None:
            return  # delivered after the run ended
        left = state.time_left.describe(event.tiles_done, event.tiles_total)  # from the tiles' measured pace
        if not state.deleted:
            plane = min(event.planes_done + 1, event.planes_total)
            line = f"plane {plane}/{event.planes_total}, tile {event.tiles_done}/{event.tiles_total}"
            self.status.value = f"{line}, {left}" if left else line
        state.show_progress(self.progress_bar, event.tiles_done, event.tiles_total)  # napari's bar: its own ETA
        if event.message:
            show_info(event.message)

    def _on_returned(self, value: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        state = self._state
        job = state.job
        if state.cancel_requested or state.closed or job is None:
            return  # cancelled after the last tile: the user asked for nothing
        result, before, after = value
        kwargs = result_layer_kwargs(state.source_state, job.provenance())
        if not state.deleted:
            planes = np.arange(len(before))
            self.focus_plot.set_series("input", planes, before)
            self.focus_plot.set_series("output", planes, after)
            line = f"{job.source}: done in {time.perf_counter() - state.started:.1f} s"
            judged = job.engine.describe_judged()
            self.status.value = f"{line}; {judged}" if judged else line
        self.viewer.add_image(result, **kwargs)

    def _on_error(self, error: BaseException) -> None:
        message = user_message(error, DEBLUR)
        if not self._state.deleted:
            self.status.value = message
        show_error(message)

    def _on_finished(self) -> None:
        state = self._state
        state.job, state.source_state = None, {}
        if not state.deleted:
            self._set_busy(False)
            if state.cancel_requested:
                self.progress_bar.value = 0
                self.status.value = "cancelled"

    # --- saving -----------------------------------------------------------------------------------------------------

    def result_layer(self) -> napari.layers.Image | None:
        """The layer *Save result...* writes: the selected layer when it is a deblurred result, else the newest
        (topmost) deblurred result in the viewer; None when there is none."""
        layers = self.viewer.layers

        def is_result(layer: Any) -> bool:
            return isinstance(layer, napari.layers.Image) and LayerInfo.of(layer).made_by_plugin

        active = layers.selection.active
        if is_result(active):
            return active
        return next((layer for layer in reversed(layers) if is_result(layer)), None)

    def _update_save_button(self, *_: Any) -> None:
        if not self._state.deleted:
            self.save_button.enabled = not self._state.running and self.result_layer() is not None

    def _on_save_clicked(self) -> None:
        self.save_result()

    def save_result(self, path: str | Path | None = None) -> None:
        """Write the result layer (:meth:`result_layer`) as a TIFF with the plugin's writer, in the background.

        The writer (:func:`~.io.write_tiff_layer`) keeps the pixel size, Z spacing, units and axes, and writes
        under a temporary name, renamed when complete: a failed or cancelled save leaves no file. A lazy result's
        planes not computed yet are computed first. Errors become notifications.

        Parameters
        ----------
        path
            The file (``.tif`` is added to a name without ``.tif``/``.tiff``); None asks in a file dialog.
        """
        state = self._state
        if state.running or state.closed:
            return
        layer = self.result_layer()
        if layer is None:
            self._refuse("nothing to save yet: run the dock first, or select a deblurred result")
            return
        if path is None:
            path = self._ask_save_path(layer)
            if path is None:
                return
        target = Path(path).expanduser()
        if not target.name.lower().endswith(images.TIFF_SUFFIXES):
            target = target.with_name(target.name + ".tif")
        source = (layer.metadata or {}).get("source")
        if isinstance(source, str) and Path(source).exists() and Path(source).resolve() == target.resolve():
            self._refuse(f"{target} is the input of '{layer.name}': choose another name, so the input stays")
            return
        data = unwrapped(LayerInfo.of(layer).pixels)
        meta = {**layer.as_layer_data_tuple()[1], "multiscale": False}  # the writer gets the full-resolution level
        shape = tuple(data.shape)
        planes = math.prod(shape[: -3 if meta.get("rgb") else -2])
        stop = state.stop_saving
        stop.clear()
        state.cancel_requested, state.saving = False, target
        relay, report = gui_relay(), weak_callback(self._on_save_progress)
        reads = SavedPlanes(data, planes, lambda done, total: relay.call(lambda: report(done, total)), stop.is_set)
        self.status.value = f"saving '{layer.name}' to {target.name} ..."
        self.progress_bar.max, self.progress_bar.value = planes, 0
        self._set_busy(True)
        state.start(
            lambda: write_tiff_layer(str(target), reads, meta),
            f"Saving {layer.name}",
            planes,
            on_return=self._on_saved,
            on_error=self._on_save_error,
            on_finished=self._on_save_finished,
        )

    def _ask_save_path(self, layer: napari.layers.Image) -> str | None:
        """The file dialog of *Save result...*: a TIFF, in the input's folder, named after the layer."""
        source = (layer.metadata or {}).get("source")
        folder = Path(source).parent if isinstance(source, str) and Path(source).parent.is_dir() else Path.cwd()
        name = "".join("_" if c in '/\\:*?"<>|' else c for c in layer.name)
        path, _ = QFileDialog.getSaveFileName(
            self.native, "Save result", str(folder / f"{name}.tif"), "TIFF (*.tif *.tiff)"
        )
        return path or None

    def _on_save_progress(self, done: int, total: int) -> None:
        state = self._state
        if state.saving is None:
            return
        if not state.deleted:
            self.status.value = f"saving to {state.saving.name}: plane {done}/{total}"
        state.show_progress(self.progress_bar, done, total)

    def _on_saved(self, paths: list[str]) -> None:
        message = f"saved to {paths[0]} (with its pixel size, Z spacing and units)"
        if not self._state.deleted:
            self.status.value = message
        show_info(message)

    def _on_save_error(self, error: BaseException) -> None:
        if self._state.stop_saving.is_set():
            return  # cancelled: the writer left nothing behind
        message = str(error) if isinstance(error, SaveError) else f"saving failed: {type(error).__name__}: {error}"
        if not self._state.deleted:
            self.status.value = message
        show_error(message)

    def _on_save_finished(self) -> None:
        state = self._state
        cancelled = state.stop_saving.is_set()
        state.saving = None
        if not state.deleted:
            self._set_busy(False)
            if cancelled:
                self.progress_bar.value = 0
                self.status.value = "cancelled: nothing was written"

"""The Deblur dock widget: pick an image layer and a model, get the deblurred layer.

Everything that is not Qt lives in :mod:`.deblur_job` (checks, result layer,
focus profile) and the inference engine; this module wires them to widgets, a
thread worker and napari's progress and notifications, with the helpers it
shares with the Fine-tune dock (:mod:`.widgets_common`).
"""

import logging
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import napari.components
import napari.layers
import napari.viewer
import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, PushButton, SpinBox
from napari.utils.notifications import show_error, show_info

from ..config import ConfigError, DeblurSettings, IntensityNormalization
from ..inference import DEFAULT_TILE, DeblurProgress, InputError, deblur_lazy, default_overlap, iter_deblur
from ..models.files import ModelFileError
from .deblur_job import DeblurJob, focus_profile, result_layer_kwargs
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
    start_worker,
    stop_when_closed,
)

logger = logging.getLogger(__name__)

NO_MODEL_HINT = "No model yet: pick a model file (.safetensors) or a reference checkpoint (.pth) under 'model file'."


def _compute(
    steps: Generator[DeblurProgress, None, np.ndarray], data: Any, axes: str
) -> Generator[DeblurProgress, None, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The worker's generator: the engine's progress, then the result with both focus profiles."""
    result = yield from steps
    return result, focus_profile(data, axes), focus_profile(result, axes)


@dataclass(eq=False)
class _RunState(DockState):
    """The dock's state, with the running job's (never the widget itself)."""

    source_state: dict[str, Any] = field(default_factory=dict)
    job: DeblurJob | None = None
    started: float = 0.0


class DeblurWidget(Container):
    """Deblur an image layer with an MPT model, lazily (planes computed as shown) or all at once.

    Parameters
    ----------
    napari_viewer
        The viewer whose image layers are offered and where results are added.

    Attributes
    ----------
    layer, model, model_file, device, tile, overlap, low, high, lazy
        The inputs (magicgui widgets; set their ``value`` to drive the widget from code).
    run_button, cancel_button, progress_bar, status
        Controls and feedback.
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
            tooltip="Checked: the result appears at once and each plane is computed when shown.\n"
            "Unchecked: every plane is computed now, with progress.",
        )
        self.run_button = PushButton(name="run_button", text="Run")
        self.cancel_button = PushButton(name="cancel_button", text="Cancel", enabled=False)
        super().__init__(
            widgets=[
                self.layer,
                self.model,
                self.model_file,
                self.device,
                self.tile,
                self.overlap,
                self.low,
                self.high,
                self.lazy,
                self.run_button,
                self.cancel_button,
                self.progress_bar,
                self.status,
            ]
        )
        self.focus_plot = LinePlot("focus score per plane", "plane")
        self.native.layout().addWidget(self.focus_plot)

        self.tile.changed.connect(self._on_tile_changed)
        self.overlap.changed.connect(self._on_overlap_changed)
        self.model.changed.connect(self._on_model_changed)
        self.run_button.changed.connect(self._on_run_clicked)
        self.cancel_button.changed.connect(self.cancel)
        self._state.disconnects.append(self._models.unsubscribe)
        stop_when_closed(self, self._state)
        self._follow = FollowSelection(napari_viewer, self._state, [self.layer], self._suggest_layer)
        self._follow.follow()  # start on the selected layer
        self._on_model_changed(self.model.value)

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
            model = REGISTRY.load(choice)
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
            card = getattr(REGISTRY.load(self.model.value), "card", None) if self.model.value else None
            per = card.normalization.per if card else "plane"
            normalization = IntensityNormalization(mode="percentile", low=low, high=high, per=per)
        return DeblurSettings(tile=tile, overlap=overlap, device=str(self.device.value), normalization=normalization)

    # --- running ----------------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether an eager run is in progress."""
        return self._state.running

    def _on_run_clicked(self) -> None:
        self.run()

    def run(self, layer: napari.layers.Layer | None = None) -> None:
        """Deblur ``layer`` (default: the chosen one) as the widget is set; errors become notifications.

        Lazy: the result layer is added at once. Eager: the work runs in a
        thread and the result is added when complete.
        """
        if self.running or self._state.closed:
            return
        layer = layer if layer is not None else self.layer.value
        if layer is None or self._models.problem:
            self._refuse(self._models.problem or "no image layer: open an image, or add one to the viewer, first")
            return
        kind = "image" if isinstance(layer, napari.layers.Image) else layer.__class__.__name__.lower()
        choice = self.model.value
        try:
            settings = self.settings()
            model = REGISTRY.load(choice) if (choice and kind == "image") else None
            job = DeblurJob.from_layer(
                kind,
                layer.name,
                layer.data,
                layer.ndim,
                bool(getattr(layer, "rgb", False)),
                getattr(layer, "axis_labels", None),
                model,
                settings,
                bool(self.lazy.value),
                model_name=choice or "",
                multiscale=bool(getattr(layer, "multiscale", False)),
            )
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
        data = deblur_lazy(job.model, job.data, job.axes, job.settings)
        self.viewer.add_image(data, **result_layer_kwargs(source_state, job.provenance()))
        self.status.value = (
            f"{job.source}: each plane is computed when shown. The plot shows the input's focus only: "
            "the output's would compute every plane."
        )
        self.focus_plot.clear()
        start_worker(
            lambda: focus_profile(job.data, job.axes),
            on_return=self._on_input_focus,
            on_error=lambda error: logger.warning("focus profile failed: %s", error),
        )

    def _on_input_focus(self, scores: np.ndarray) -> None:
        if not self._state.deleted:
            self.focus_plot.set_series("input", np.arange(len(scores)), scores)

    def _run_eager(self, job: DeblurJob, source_state: dict[str, Any]) -> None:
        state = self._state
        state.job, state.source_state, state.cancel_requested = job, source_state, False
        state.started = time.perf_counter()
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.progress_bar.max, self.progress_bar.value = 1, 0
        self.status.value = f"deblurring {job.source} ..."
        self.focus_plot.clear()
        state.start(
            _compute(iter_deblur(job.model, job.data, job.axes, job.settings), job.data, job.axes),
            f"Deblurring {job.source}",
            on_yield=self._on_progress,
            on_return=self._on_returned,
            on_error=self._on_error,
            on_finished=self._on_finished,
        )

    def cancel(self) -> None:
        """Stop the running computation after the current tile; nothing is added."""
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
        if not state.deleted:
            plane = min(event.planes_done + 1, event.planes_total)
            self.status.value = f"plane {plane}/{event.planes_total}, tile {event.tiles_done}/{event.tiles_total}"
        state.show_progress(self.progress_bar, event.tiles_done, event.tiles_total)
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
            self.status.value = f"{job.source}: done in {time.perf_counter() - state.started:.1f} s"
        self.viewer.add_image(result, **kwargs)

    def _on_error(self, error: BaseException) -> None:
        if isinstance(error, (InputError, ModelFileError, ConfigError)):
            message = str(error)
        elif out_of_memory(error):
            message = f"out of memory ({error}): try smaller tiles or the CPU"
        else:
            logger.error("deblurring failed", exc_info=error)
            message = f"deblurring failed: {type(error).__name__}: {error}"
        if not self._state.deleted:
            self.status.value = message
        show_error(message)

    def _on_finished(self) -> None:
        state = self._state
        state.job, state.source_state = None, {}
        if not state.deleted:
            self.run_button.enabled = not state.closed
            self.cancel_button.enabled = False
            if state.cancel_requested:
                self.progress_bar.value = 0
                self.status.value = "cancelled"

"""The Fine-tune dock (real viewer, real training of a tiny model) and its headless core."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import pattern_pairs, tiny_config
from napari_mpt_deblur import MPT, load_model, save_model
from napari_mpt_deblur.config import IntensityNormalization, ModelCard
from napari_mpt_deblur.inference import deblur_array
from napari_mpt_deblur.plugin import session
from napari_mpt_deblur.training.engine import TrainProgress
from napari_mpt_deblur.training.finetune import FINETUNE_DEFAULTS, AnchoredPairs, TrainingLog, prepare_finetune
from napari_mpt_deblur.training.patches import LabeledPairs, SyntheticPairs

PLUGIN, DOCK = "napari-mpt-deblur", "Fine-tune (EFCR_ex)"
WAIT_MS = 300_000  # a few training steps on 2 busy CPU cores


def cell_planes(count: int = 4, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(blurry, sharp) planes of bright discs, as uint16: a small lab stack and its in-focus truth."""
    blurry, sharp = pattern_pairs(count, size, seed, discs=10)
    return (blurry * 1000 + 100).astype(np.uint16), (sharp * 1000 + 100).astype(np.uint16)


def small_model() -> MPT:
    """Smaller than tiny_config (one block per level) so steps take about a second on a busy CPU."""
    return MPT(tiny_config(num_blocks=(1, 1, 1, 1), scales=((1 / 4,), (1 / 2,), (1.0,), (1.0,))))


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(1)
    return save_model(small_model(), tmp_path / "start.safetensors", provenance={"trained_on": "discs"})


@pytest.fixture
def notifications():
    """The napari notifications dispatched during the test."""
    from napari.utils.notifications import notification_manager

    start = len(notification_manager.records)

    class View:
        def messages(self) -> list[str]:
            return [str(n.message) for n in notification_manager.records[start:]]

        def errors(self) -> list[str]:
            return [str(n.message) for n in notification_manager.records[start:] if n.severity == "error"]

    return View()


def open_dock(viewer):
    dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, DOCK)
    return dock, widget


def configure(widget, model_path, layer, *, steps: int, beta: float | None = None) -> None:
    widget.model_file.value = model_path  # a picked file joins the session's models and is selected
    widget.unlabeled.value = [layer]
    widget.steps.value = steps
    widget.batch.value = 2
    widget.patch.value = 32
    widget.lr.value = 1e-3
    widget.device.value = "cpu"
    if beta is not None:
        widget.beta.value = beta


# headless ---------------------------------------------------------------------------------


def test_prepare_finetune_makes_synthetic_or_labeled_pairs_and_records_them():
    blurry, sharp = cell_planes(4)
    stack = np.concatenate([sharp, blurry])  # some planes in focus, some not
    config = FINETUNE_DEFAULTS.replace(patch_size=32, batch_size=2)
    model = small_model()
    model.card = ModelCard(model.config, IntensityNormalization(mode="percentile", low=0.5, high=99.5))

    data = prepare_finetune(model, stack[None], config=config)  # any N-D: leading axes are planes
    assert isinstance(data.sampler, AnchoredPairs) and isinstance(data.sampler.pairs, SyntheticPairs)
    from napari_mpt_deblur.config import DeblurSettings
    from napari_mpt_deblur.inference import deblur_array

    # the sharpest quarter of the 8 planes, all in focus: 2, as the starting model deblurs them
    sharp_planes = data.sampler.pairs.sharp
    settings = DeblurSettings(device="cpu", precision="fp32")
    assert len(sharp_planes) == 2
    outputs = [deblur_array(model, s.astype(np.float32), "YX", settings) for s in sharp]  # planes: float32
    assert all(any(np.array_equal(p, out) for out in outputs) for p in sharp_planes)
    record = data.provenance
    assert record["planes"] == record["planes_for_efcr"] == 8 and record["denoised_validation_targets"] is True
    assert record["synthetic_from_sharpest_unlabeled_planes"] == 0.25
    assert record["validation"].startswith("patches of the training planes")  # 2 sharp planes: none to spare
    assert record["blur_estimate"]["in_focus"] and record["synthetic_defocus"]["kinds"] == ["gaussian", "widefield"]
    assert data.config.normalization == model.card.normalization != config.normalization
    assert data.validation.blurry.shape == (16, 1, 32, 32)

    data = prepare_finetune(model, [stack], labeled=(blurry, sharp), config=config, min_focus_quantile=0.5)
    assert isinstance(data.sampler, LabeledPairs) and data.provenance["labeled_pairs"] == 4
    assert data.provenance["planes_for_efcr"] == 4 and data.provenance["min_focus_quantile"] == 0.5

    with pytest.raises(ValueError, match="differ in shape"):
        prepare_finetune(model, stack, labeled=(blurry, sharp[:, :32]), config=config)
    with pytest.raises(ValueError, match="grayscale"):
        prepare_finetune(MPT(tiny_config(in_channels=3, out_channels=3)), stack, config=config)
    with pytest.raises(ValueError, match="shape"):
        prepare_finetune(model, [np.zeros((0, 64))], config=config)


def test_training_log_keeps_the_weights_of_the_best_validation():
    model = small_model()
    log = TrainingLog()
    snapshots = {}

    def step(index: int, psnr: float | None) -> bool:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.01)  # the weights change every step
        snapshots[index] = {k: v.clone() for k, v in model.state_dict().items()}
        scores = None if psnr is None else {"psnr": psnr, "ssim": 0.5, "input_psnr": 18.0, "input_ssim": 0.4}
        return log.update(TrainProgress(index, 5, {"total": 1.0 / index}, 1e-4, index, 5 - index, scores), model)

    assert [step(1, 20.0), step(2, 25.0), step(3, 22.0), step(4, None), step(5, 24.0)] == [1, 1, 0, 0, 0]
    assert log.best_step == 2 and log.best_psnr == 25.0 and log.input_psnr == 18.0
    assert log.psnr == [(1, 20.0), (2, 25.0), (3, 22.0), (5, 24.0)] and len(log.losses) == 5
    assert log.restore_best(model) == 2
    assert all(torch.equal(model.state_dict()[k], v) for k, v in snapshots[2].items())
    assert not all(torch.equal(snapshots[5][k], v) for k, v in snapshots[2].items())
    assert log.summary() == {
        "steps_done": 5,
        "steps_planned": 5,
        "weights_from_step": 2,
        "best_validation_psnr": 25.0,
        "validation_input_psnr": 18.0,
    }

    unvalidated = TrainingLog()
    unvalidated.update(TrainProgress(1, 2, {"total": 0.5}, 1e-4, 1.0, 1.0), model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert unvalidated.restore_best(model) == 1  # no validation: the last weights stay
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


# the dock ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_fine_tune_in_the_dock_then_save_and_deblur(make_napari_viewer, qtbot, model_file, tmp_path, notifications):
    viewer = make_napari_viewer()
    blurry, sharp = cell_planes(3)
    stack = np.concatenate([sharp, blurry])
    layer = viewer.add_image(stack, name="lab stack")
    dock, widget = open_dock(viewer)
    _, deblur = viewer.window.add_plugin_dock_widget(PLUGIN, "Deblur")
    assert type(widget).__name__ == "FinetuneWidget" and layer in widget.unlabeled.choices
    defaults = FINETUNE_DEFAULTS  # small values survive the spin boxes' decimals
    assert (widget.lr.value, widget.beta.value, widget.steps.value) == (defaults.lr, defaults.efcr_beta, defaults.steps)
    configure(widget, model_file, layer, steps=4)
    assert widget.model.value == str(model_file.resolve())

    widget.start_button.native.click()
    assert widget.running and widget.stop_button.enabled and not widget.start_button.enabled
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)

    assert not notifications.errors(), notifications.errors()
    log = widget.log
    assert log.step == 4 and len(log.psnr) == 4  # the dock validates every step of a short run
    assert [x for x, _ in widget.loss_plot.series["loss"]] == [1, 2, 3, 4]
    assert len(widget.psnr_plot.series["network"]) == 4
    assert widget.progress_bar.value == 4 and widget.status.value.startswith("finished after 4/4")
    assert widget.save_button.enabled and widget.start_button.enabled and not widget.stop_button.enabled
    status = widget.status.value.splitlines()
    summary = status[0].removesuffix(". Save the model to use it.")
    assert f"kept the weights of step {log.best_step}" in summary and log.best_psnr > log.start_psnr
    assert status[1].startswith("blur beyond the sharpest planes")  # what the stack told
    # its planes are in focus: the model will sharpen against the optics' in-focus PSF (the dock's default), and says so
    assert widget.sharpen.value and any("will sharpen its output against the in-focus PSF" in s for s in status)

    widget.save_path.value = tmp_path / "tuned"  # the suffix is added
    widget.save_button.native.click()
    saved = tmp_path / "tuned.safetensors"
    assert saved.exists() and widget.status.value == f"{summary} — saved to tuned.safetensors"
    # the saved model comes first and is chosen in both docks' menus, their model-file boxes showing it
    assert session.SESSION.model_choices()[0] == str(saved.resolve())
    for picker in (widget, deblur):
        assert picker.model.choices[0] == picker.model.value == str(saved.resolve())
        assert picker.model_file.value == saved.resolve()
    assert load_model(saved).card.in_focus_optics == widget.microscope_for(layer)
    record = load_model(saved).card.provenance
    assert record["trained_on"] == "discs" and record["fine_tuned_from"] == str(model_file.resolve())
    assert record["fine_tuned_on"]["unlabeled_layers"] == ["lab stack"] and record["fine_tuned_on"]["planes"] == 6
    assert record["fine_tune"]["steps_done"] == 4 and record["fine_tune"]["weights_from_step"] == log.best_step
    assert record["fine_tune"]["best_validation_psnr"] == pytest.approx(log.best_psnr, abs=1e-3)
    assert record["train_config"]["efcr_beta"] == FINETUNE_DEFAULTS.efcr_beta
    tuned, start = load_model(saved), load_model(model_file)
    assert not all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), start.state_dict().values()))
    assert all(torch.equal(tuned.state_dict()[k], v) for k, v in log.best_state.items())
    out = deblur_array(tuned, blurry[:1])
    assert out.shape == (1, 64, 64) and out.dtype == np.uint16
    assert any("saved to" in m for m in notifications.messages())


@pytest.mark.slow
def test_stop_mid_run_keeps_the_best_weights_and_returns_to_idle(make_napari_viewer, qtbot, model_file, monkeypatch):
    from napari_mpt_deblur.training import engine

    validations = iter([10.0, *range(100)])
    scored_first = []

    # the starting model scores 20 dB; the validation gets worse after the first one of the run, so the weights
    # kept must be step 2's, not the last ones; the guard's unblurred and mildly blurred patches (scored second)
    # always score 25 dB: no step loses there
    def evaluate(self, model, device):
        scored_first[:] = scored_first or [self]
        psnr = 30.0 - next(validations) if self is scored_first[0] else 25.0
        return {"psnr": psnr, "ssim": 0.9, "input_psnr": 20.0, "input_ssim": 0.5}

    monkeypatch.setattr(engine.Validation, "evaluate", evaluate)
    last_weights = {}
    update = TrainingLog.update

    def spy(self, progress, model):
        last_weights.update({k: v.clone() for k, v in model.state_dict().items()})
        return update(self, progress, model)

    monkeypatch.setattr(TrainingLog, "update", spy)
    viewer = make_napari_viewer()
    blurry, sharp = cell_planes(2)
    layer = viewer.add_image(np.concatenate([sharp, blurry]), name="stack")
    _, widget = open_dock(viewer)
    configure(widget, model_file, layer, steps=40, beta=0.0)  # validation every 2 steps
    widget.start_button.native.click()
    qtbot.waitUntil(lambda: widget.log.step >= 3, timeout=WAIT_MS)
    widget.stop_button.native.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)

    log = widget.log
    assert 3 <= log.step < 40 and widget.worker is None and log.best_step == 2
    assert widget.start_button.enabled and not widget.stop_button.enabled and widget.save_button.enabled
    assert f"stopped after {log.step}/40 steps; kept the weights of step 2" in widget.status.value
    tuned = widget.tuned_model.state_dict()
    assert all(torch.equal(tuned[k], v) for k, v in log.best_state.items())
    assert not all(torch.equal(tuned[k], v) for k, v in last_weights.items())
    from napari.utils import progress

    assert not any("Fine-tuning" in bar.desc for bar in progress._all_instances)  # napari's bar is closed


def test_the_microscope_row_takes_the_pixel_size_and_z_step_from_the_layer(make_napari_viewer):
    viewer = make_napari_viewer()
    stack = np.zeros((3, 32, 32), np.float32)
    from_file = viewer.add_image(stack, metadata={"pixel_size": (65.0, 65.0), "unit": "nm", "z_spacing": 300.0})
    scaled = viewer.add_image(stack, scale=(0.5, 0.1, 0.1), units=("um", "um", "um"), axis_labels=("z", "y", "x"))
    plain = viewer.add_image(stack)
    _, widget = open_dock(viewer)
    assert widget.pixel_size.value == 0 and "from the first stack's file" in widget.pixel_size.tooltip
    # the box at 0 shows what 0 stands for: the first stack's pixel size, or the size assumed without one
    shown = widget.pixel_size.native
    for stacks, text in [
        ([from_file, plain], "0.065 (from the image)"),  # the first in the layer list
        ([scaled], "0.1 (from the image)"),
        ([plain], "0.2 (the image does not say)"),
    ]:
        widget.unlabeled.value = stacks
        assert shown.text() == text and shown.specialValueText() == text
    microscope = widget.microscope_for(from_file)
    assert microscope.pixel_size_um == pytest.approx(0.065) and microscope.z_step_um == pytest.approx(0.3)
    microscope = widget.microscope_for(scaled)
    assert microscope.pixel_size_um == pytest.approx(0.1) and microscope.z_step_um == pytest.approx(0.5)
    assert widget.microscope_for(plain).pixel_size_um is None
    widget.na.value, widget.medium.value, widget.wavelength.value, widget.pixel_size.value = 1.4, "oil", 610, 0.2
    microscope = widget.microscope_for(from_file)
    assert (microscope.na, microscope.medium, microscope.wavelength_um) == (1.4, "oil", 0.61)
    assert microscope.pixel_size_um == 0.2  # given in the dock: wins over the file

    widget.medium.value = "water"  # NA 1.4 cannot be in water: Start refuses and says why
    widget.unlabeled.value = [from_file]
    widget.start_button.native.click()
    assert not widget.running and widget.status.value.startswith("Microscope: NA 1.4 is not possible in water")


def test_your_stacks_start_on_the_selected_layers_follow_them_and_say_several_can_be_picked(make_napari_viewer):
    from napari_mpt_deblur.plugin.layer_info import RECORD_KEY

    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "defocused_cells")
    sharp, defocused = viewer.layers["sharp cells"], viewer.layers["defocused cells"]
    viewer.layers.selection.active = defocused
    _, widget = open_dock(viewer)
    assert widget.unlabeled.value == [defocused]  # the selected layer
    assert "several" in widget.unlabeled.label and "Ctrl-click" in widget.unlabeled.tooltip
    viewer.layers.selection.update([sharp, defocused])  # several selected in the layer list: all of them
    assert widget.unlabeled.value == [sharp, defocused]
    viewer.add_labels(np.zeros((9, 660, 550), np.uint8), name="masks")  # not an image: the stacks stay
    assert widget.unlabeled.value == [sharp, defocused]
    viewer.add_image(
        defocused.data, name="defocused cells deblurred", metadata={RECORD_KEY: {"source": defocused.name}}
    )
    assert widget.unlabeled.value == [defocused]  # a deblurred result selected: its source, not the result
    widget.unlabeled.value = [sharp]  # picked by hand: the selection no longer changes it
    viewer.layers.selection.active = defocused
    assert widget.unlabeled.value == [sharp]


def test_bad_input_gives_a_notification_and_leaves_the_viewer_untouched(
    make_napari_viewer, qtbot, model_file, notifications
):
    viewer = make_napari_viewer()
    image = viewer.add_image(np.zeros((3, 32, 32), np.uint16), name="image")
    other = viewer.add_image(np.zeros((3, 16, 32), np.uint16), name="other")
    labels = viewer.add_labels(np.zeros((32, 32), np.uint8), name="masks")
    _, widget = open_dock(viewer)
    widget.model_file.value = model_file
    layers_before = list(viewer.layers)

    def attempt() -> str:
        count = len(notifications.messages())
        widget.start_button.native.click()
        assert not widget.running and widget.worker is None and widget.start_button.enabled
        messages = notifications.messages()
        assert len(messages) == count + 1
        assert widget.status.value == messages[-1]  # the dock's status line says it too
        return messages[-1]

    widget.unlabeled.value = []
    assert "Select at least one image layer" in attempt()
    widget.unlabeled.value = [labels]
    assert "Labels layer" in attempt()
    widget.unlabeled.value = [image]
    widget.blurry.value, widget.sharp.value = image, other
    assert "differs in shape" in attempt() and "(3, 32, 32)" in notifications.messages()[-1]
    widget.sharp.value = None
    assert "both a blurry and a sharp" in attempt()
    assert list(viewer.layers) == layers_before and widget.start_button.enabled and widget.log is None


def test_an_unreadable_model_file_is_reported_and_the_dock_returns_to_idle(
    make_napari_viewer, qtbot, tmp_path, notifications
):
    viewer = make_napari_viewer()
    layer = viewer.add_image(cell_planes(2)[1], name="stack")
    _, widget = open_dock(viewer)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a model")
    configure(widget, broken, layer, steps=3)
    widget.start_button.native.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    assert any("broken.safetensors" in m and "Pick another model file" in m for m in notifications.messages())
    assert widget.tuned_model is None and not widget.save_button.enabled and widget.start_button.enabled
    assert "failed" in widget.status.value


def test_a_failed_run_says_why_on_the_status_line(make_napari_viewer, qtbot, tmp_path, notifications):
    viewer = make_napari_viewer()
    layer = viewer.add_image(cell_planes(2)[1], name="stack")
    _, widget = open_dock(viewer)
    rgb = save_model(MPT(tiny_config(in_channels=3, out_channels=3)), tmp_path / "rgb.safetensors")
    configure(widget, rgb, layer, steps=3)  # loads, but fine-tuning needs a grayscale model: the run fails
    widget.start_button.native.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=60_000)
    assert notifications.errors() and "grayscale" in notifications.errors()[-1]
    assert widget.status.value == f"failed: {notifications.errors()[-1]}"
    assert widget.tuned_model is None and widget.start_button.enabled and not widget.save_button.enabled


@pytest.mark.slow
def test_closing_the_dock_mid_run_stops_the_worker(make_napari_viewer, qtbot, model_file):
    viewer = make_napari_viewer()
    layer = viewer.add_image(np.concatenate(cell_planes(2)), name="stack")
    dock, widget = open_dock(viewer)
    configure(widget, model_file, layer, steps=200, beta=0.0)
    widget.start_button.native.click()
    qtbot.waitUntil(lambda: widget.log.step >= 1, timeout=WAIT_MS)
    worker, run = widget.worker, widget._run

    viewer.window.remove_dock_widget(dock)
    assert worker.abort_requested
    qtbot.waitUntil(lambda: run.done, timeout=WAIT_MS)
    assert run.log.step < 200 and not worker.is_running and widget.worker is None
    added = viewer.add_image(np.ones((16, 16)), name="after")  # the viewer still works
    assert viewer.layers[-1] is added and DOCK not in str(list(viewer.window._wrapped_dock_widgets))


@pytest.mark.slow
def test_closing_the_viewer_mid_run_stops_the_worker(make_napari_viewer, qtbot, model_file):
    viewer = make_napari_viewer()
    layer = viewer.add_image(np.concatenate(cell_planes(2)), name="stack")
    _, widget = open_dock(viewer)
    configure(widget, model_file, layer, steps=200, beta=0.0)
    widget.start_button.native.click()
    qtbot.waitUntil(lambda: widget.log.step >= 1, timeout=WAIT_MS)
    worker, run = widget.worker, widget._run

    viewer.close()
    assert worker.abort_requested
    qtbot.waitUntil(lambda: run.done, timeout=WAIT_MS)  # the run cleaned up after itself, without the dock
    assert run.log.step < 200 and not Path(run.folder.name).exists()


# time estimate and save path ---------------------------------------------------------------


def test_the_estimate_times_real_steps_and_fits_a_run_in_the_time_allowed():
    from napari_mpt_deblur.plugin.finetune_job import dock_validations
    from napari_mpt_deblur.plugin.timing import FinetuneEstimate, iter_measure_finetune
    from napari_mpt_deblur.runtime import run_to_end

    model = small_model()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    config = FINETUNE_DEFAULTS.replace(batch_size=2, patch_size=32, device="cpu")
    measured = run_to_end(iter_measure_finetune(model, config))
    assert measured.step_s > 0 and measured.validation_s > 0 and measured.device == "cpu"
    assert all(torch.equal(model.state_dict()[name], value) for name, value in before.items())  # timed on a copy

    estimate = FinetuneEstimate(step_s=2.0, validation_s=3.0, device="cpu")
    assert dock_validations(1000) == 21 and dock_validations(10) == 11  # the start, then every 50 steps, every step
    assert estimate.total_s(1000, dock_validations(1000)) == 2.0 * 1000 + 3.0 * 21
    fits = estimate.steps_within(15 * 60, dock_validations)
    assert fits == 400 and estimate.total_s(fits, dock_validations(fits)) <= 15 * 60  # rounded down to 50s
    assert estimate.total_s(fits + 50, dock_validations(fits + 50)) > 15 * 60
    assert FinetuneEstimate(1e4, 1.0, "cpu").steps_within(15 * 60, dock_validations) == 1  # at least one step


@pytest.mark.slow
def test_the_dock_estimates_a_runs_length_before_it_starts(make_napari_viewer, qtbot, model_file):
    from napari_mpt_deblur.plugin.finetune_job import dock_validations
    from napari_mpt_deblur.plugin.finetune_widget import ESTIMATE_DELAY_MS

    viewer = make_napari_viewer()  # hidden: a dock nobody sees times nothing
    layer = viewer.add_image(np.concatenate(cell_planes(2)), name="stack")
    _, widget = open_dock(viewer)
    configure(widget, model_file, layer, steps=100)
    qtbot.wait(2 * ESTIMATE_DELAY_MS)
    assert widget.time_per_step is None and widget.estimate.value == ""
    viewer.show()  # shown: the chosen model's steps are timed at the chosen batch and patch, on the chosen device
    qtbot.waitUntil(lambda: widget.time_per_step is not None, timeout=WAIT_MS)
    estimate = widget.time_per_step
    assert estimate.device == "cpu" and estimate.step_s > 0
    assert widget.estimate.value.startswith("about ") and "for 100 steps on cpu" in widget.estimate.value
    widget.steps.value = 1_000_000  # far beyond 15 minutes here: a shorter run is suggested, a click away
    suggested = estimate.steps_within(15 * 60, dock_validations)
    assert f"About {suggested} steps fit in 15 min" in widget.estimate.value
    assert f"<a href='{suggested}'" in widget.estimate.value
    widget.estimate.native.linkActivated.emit(str(suggested))
    assert widget.steps.value == suggested and "fit in 15 min" not in widget.estimate.value
    widget.batch.value = 3  # another batch costs another time: timed again
    qtbot.waitUntil(lambda: widget.estimate.value.startswith("timing"), timeout=10_000)
    qtbot.waitUntil(lambda: widget.estimate.value.startswith("about "), timeout=WAIT_MS)
    assert widget.time_per_step is not estimate


def test_the_save_path_shows_its_file_name_and_its_whole_path(make_napari_viewer, tmp_path):
    from qtpy.QtWidgets import QLineEdit

    viewer = make_napari_viewer()
    _, widget = open_dock(viewer)
    path = tmp_path / "a" / "folder" / "deep" / "enough" / "to" / "be" / "cut" / "start-tuned-lab_stack.safetensors"
    widget.save_path.value = path
    line = widget.save_path.native.findChild(QLineEdit)
    assert line.cursorPosition() == len(line.text()) == len(str(path))  # the end, the file name, in view
    assert widget.save_path.tooltip.endswith(f"\n{path}")  # and the whole path on hover
    line.setCursorPosition(0)  # the user clicked at the start, then left the box
    line.editingFinished.emit()
    assert line.cursorPosition() == len(line.text())


# fitting a laptop screen, exporting for bioimage.io ---------------------------------------------------------------


@pytest.mark.slow
def test_the_dock_fits_a_laptop_screen_beside_the_compare_dock(make_napari_viewer, qtbot):
    from test_deblur_widget import check_fits_a_laptop

    viewer = make_napari_viewer()
    viewer.open_sample("napari-mpt-deblur", "defocused_cells")
    dock, widget = open_dock(viewer)
    (advanced,) = widget.sections
    rare = (widget.batch, widget.patch, widget.lr, widget.beta, widget.reblur, widget.min_focus, widget.sharpen)
    rare += (widget.device,)
    assert not advanced.is_expanded() and not any(box.native.isVisibleTo(widget.native) for box in rare)
    assert widget.steps.native.isVisibleTo(widget.native)  # what most runs change stays in view
    compare_dock, compare = viewer.window.add_plugin_dock_widget(PLUGIN, "Compare detections")
    check_fits_a_laptop(
        qtbot,
        viewer,
        [
            (dock, widget, [widget.start_button, widget.save_button, widget.export_button, widget.psnr_plot]),
            (compare_dock, compare, [compare.compare_button, compare.deblur_button, compare.save_button]),
        ],
    )


@pytest.mark.slow
def test_export_for_bioimageio_after_a_fine_tune(
    make_napari_viewer, qtbot, model_file, tmp_path, notifications, monkeypatch
):
    pytest.importorskip("bioimageio.spec", reason="needs the [bioimageio] extra")
    from qtpy.QtWidgets import QFileDialog

    from napari_mpt_deblur.plugin.widgets_common import MODEL_FILTER

    assert "*.zip" in MODEL_FILTER  # the model-file dialogs show packages
    viewer = make_napari_viewer()
    blurry, sharp = cell_planes(3)
    layer = viewer.add_image(np.concatenate([sharp, blurry]), name="lab stack")
    _, widget = open_dock(viewer)
    assert not widget.export_button.enabled  # nothing to export yet
    configure(widget, model_file, layer, steps=2)
    widget.sharpen.value = False  # the network's output as it is: nothing the package would leave out
    widget.start_button.native.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=WAIT_MS)
    assert widget.export_button.enabled and widget.tuned_model is not None
    assert widget.tuned_model.card.in_focus_optics is None
    assert widget.test_layer() is layer
    card = widget.tuned_model.card

    # a folder that cannot be: the status line and an error say so, nothing is written
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    widget.export(blocker / "package.zip")
    qtbot.waitUntil(lambda: not widget.exporting, timeout=WAIT_MS)
    assert widget.status.value.startswith("failed: Could not export for bioimage.io")
    assert any("Could not export for bioimage.io" in m for m in notifications.errors())
    assert widget.start_button.enabled and widget.export_button.enabled

    asked = {}

    def dialog(parent, caption, proposed, filter):
        asked.update(proposed=proposed, filter=filter)
        return str(tmp_path / "tuned"), filter  # the suffix is added

    monkeypatch.setattr(QFileDialog, "getSaveFileName", dialog)
    widget.export_button.native.click()
    assert widget.exporting and not widget.export_button.enabled and not widget.start_button.enabled
    qtbot.waitUntil(lambda: not widget.exporting, timeout=WAIT_MS)
    package = tmp_path / "tuned.zip"
    assert asked["proposed"].endswith(".zip") and "*.zip" in asked["filter"]
    assert package.is_file() and widget.status.value.endswith("— exported to tuned.zip"), widget.status.value
    assert any(f"Exported for bioimage.io to {package}" in m for m in notifications.messages())
    assert not list(tmp_path.glob("*.tmp*")) and sorted(p.name for p in tmp_path.iterdir()) == [
        "a file",
        "start.safetensors",
        "tuned.zip",
    ]

    loaded = load_model(package)  # our own package reads back: the tuned weights, with the fine-tune's record
    tuned = widget.tuned_model.state_dict()
    assert loaded.state_dict().keys() == tuned.keys()
    assert all(torch.equal(value, tuned[key].cpu()) for key, value in loaded.state_dict().items())
    record = loaded.card.provenance
    assert record["trained_on"] == "discs" and record["fine_tuned_from"] == str(model_file.resolve())
    assert record["fine_tuned_on"]["unlabeled_layers"] == ["lab stack"] and record["fine_tune"]["steps_done"] == 2
    assert widget.tuned_model.card is card  # the dock's model keeps its own card (the package got a copy)
    widget.model_file.value = package  # and the model-file box takes it, in every dock
    assert widget.model.value == str(package.resolve()) and not widget._models.problem

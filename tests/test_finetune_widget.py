"""The Fine-tune dock (real viewer, real training of a tiny model) and its headless core."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import pattern_pairs, tiny_config
from napari_mpt_deblur import MPT, load_model, save_model
from napari_mpt_deblur.config import IntensityNormalization, ModelCard
from napari_mpt_deblur.inference import deblur_array
from napari_mpt_deblur.plugin.models import REGISTRY
from napari_mpt_deblur.training.engine import TrainProgress
from napari_mpt_deblur.training.finetune import FINETUNE_DEFAULTS, TrainingLog, prepare_finetune
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
    widget.model_file.value = model_path  # a picked file joins the registry and is selected
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
    assert isinstance(data.sampler, SyntheticPairs)
    from napari_mpt_deblur.data.defocus import denoise_target

    sharp_planes = data.sampler.sharp  # the sharpest quarter of the 8 planes: 2 of the in-focus ones, denoised
    assert len(sharp_planes) == 2
    assert all(any(np.array_equal(p, denoise_target(s)) for s in sharp) for p in sharp_planes)
    assert data.provenance == {
        "planes": 8,
        "planes_for_efcr": 8,
        "synthetic_from_sharpest_unlabeled_planes": 0.25,
        "denoised_targets": True,
    }
    assert data.config.normalization == model.card.normalization != config.normalization
    assert data.validation.blurry.shape == (8, 1, 32, 32)

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
    summary = widget.status.value.removesuffix(". Save the model to use it.")
    assert f"kept the weights of step {log.best_step}" in summary

    widget.save_path.value = tmp_path / "tuned"  # the suffix is added
    widget.save_button.native.click()
    saved = tmp_path / "tuned.safetensors"
    assert saved.exists() and widget.status.value == f"{summary} — saved to tuned.safetensors"
    # the saved model comes first and is chosen in both docks' menus, their model-file boxes showing it
    assert REGISTRY.choices()[0] == str(saved.resolve())
    for picker in (widget, deblur):
        assert picker.model.choices[0] == picker.model.value == str(saved.resolve())
        assert picker.model_file.value == saved.resolve()
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


def test_stop_mid_run_keeps_the_best_weights_and_returns_to_idle(make_napari_viewer, qtbot, model_file, monkeypatch):
    from napari_mpt_deblur.training import engine

    validations = iter(range(100))
    # the validation gets worse after the first one, so the weights kept must be step 2's, not the last ones
    monkeypatch.setattr(
        engine.Validation,
        "evaluate",
        lambda self, model, device: {
            "psnr": 30.0 - next(validations),
            "ssim": 0.9,
            "input_psnr": 20.0,
            "input_ssim": 0.5,
        },
    )
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


def test_your_stacks_start_on_the_selected_layers_follow_them_and_say_several_can_be_picked(make_napari_viewer):
    from napari_mpt_deblur.plugin.deblur_job import METADATA_KEY

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
        defocused.data, name="defocused cells deblurred", metadata={METADATA_KEY: {"source": defocused.name}}
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

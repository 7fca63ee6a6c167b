"""The training engine: a tiny model learns, stops and resumes exactly, and its file drives inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import pattern_pairs, tiny_config
from napari_mpt_deblur import MPT, load_model
from napari_mpt_deblur.config import IntensityNormalization
from napari_mpt_deblur.inference import deblur_array
from napari_mpt_deblur.training.config import TrainConfig
from napari_mpt_deblur.training.engine import CheckpointError, Validation, iter_train, state_path, train
from napari_mpt_deblur.training.patches import LabeledPairs


def write_pair_folders(root) -> None:
    """ROOT/blurry and ROOT/sharp with two uint16 TIFFs each, matched by name."""
    import tifffile

    blurry, sharp = pattern_pairs(2, 64)
    for kind, planes in (("blurry", blurry), ("sharp", sharp)):
        (root / kind).mkdir(parents=True)
        for index, plane in enumerate(planes):
            tifffile.imwrite(root / kind / f"p{index}.tif", (plane * 1000).astype(np.uint16))


FAST = dict(batch_size=2, patch_size=48, scale_range=(1.0, 1.0), lr=2e-3, lr_min=1e-4, efcr_beta=1e-3, device="cpu")


def test_the_learning_rate_rises_over_its_warmup_then_follows_its_cosine():
    from napari_mpt_deblur.config import ConfigError
    from napari_mpt_deblur.training.engine import cosine_lr

    plain = TrainConfig(steps=101, lr=1e-3, lr_min=1e-5)
    warmed = plain.replace(warmup_steps=9)
    assert cosine_lr(0, plain) == pytest.approx(1e-3) and cosine_lr(100, plain) == pytest.approx(1e-5)
    rates = [cosine_lr(step, warmed) for step in range(101)]
    assert rates[0] == pytest.approx(0.1 * cosine_lr(0, plain))  # a tenth of the rate at the first step
    assert all(a < b for a, b in zip(rates[:10], rates[1:10]))  # rising over the warmup
    assert rates[8] == pytest.approx(0.9 * cosine_lr(8, plain))
    assert rates[9:] == [cosine_lr(step, plain) for step in range(9, 101)]  # then the same cosine
    with pytest.raises(ConfigError, match="warmup_steps"):
        TrainConfig(warmup_steps=-1)


def test_input_error_weighting_evens_out_blur_strengths_and_splits_into_shards():
    from napari_mpt_deblur.config import ConfigError
    from napari_mpt_deblur.training.config import INPUT_ERROR_FLOOR
    from napari_mpt_deblur.training.engine import supervised_l1

    sharp = torch.zeros(4, 1, 16, 16)
    blurry = sharp + torch.tensor([0.0, 0.01, 0.1, 0.3]).view(4, 1, 1, 1)  # in focus to strongly blurred
    output = sharp + 0.05  # the same error on every sample
    assert supervised_l1(output, sharp, blurry, "uniform") == pytest.approx(0.05)
    weights = INPUT_ERROR_FLOOR / (INPUT_ERROR_FLOOR + torch.tensor([0.0, 0.01, 0.1, 0.3]))
    weighted = supervised_l1(output, sharp, blurry, "input_error")
    assert weighted == pytest.approx(float(0.05 * weights.mean()))
    assert weighted < 0.05  # the strongly blurred samples count less
    # a mean over samples: shards weighted by their share add up to the batch (backward_in_shards needs it)
    halves = [supervised_l1(output[s], sharp[s], blurry[s], "input_error") / 2 for s in (slice(0, 2), slice(2, 4))]
    assert float(sum(halves)) == pytest.approx(float(weighted))
    with pytest.raises(ConfigError, match="l1_weighting must be one of"):
        TrainConfig(l1_weighting="squared")
    with pytest.raises(ConfigError, match="efcr_beta"):
        TrainConfig(l1_weighting="input_error", efcr_beta=1e-5)


def test_the_mse_pixel_loss_learns_the_mean_where_l1_learns_the_median():
    from napari_mpt_deblur.config import ConfigError
    from napari_mpt_deblur.training.engine import objective

    # one blurry patch, three possible sharp ones: 0, 0 and 1 (a soft blob twice, a point once)
    blurry = torch.zeros(3, 1, 4, 4)
    sharp = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1, 1).expand(3, 1, 4, 4)
    answers = {}
    for loss in ("l1", "mse"):
        config = TrainConfig(pixel_loss=loss, efcr_beta=0.0)
        shift = torch.nn.Conv2d(1, 1, 1)  # output = input + bias: a constant answer
        with torch.no_grad():
            shift.weight.fill_(1.0)
            shift.bias.fill_(0.5)
        shift.weight.requires_grad_(False)
        optimizer = torch.optim.SGD([shift.bias], lr=0.05)
        for _ in range(400):
            optimizer.zero_grad()
            total, losses = objective(shift, None, config, blurry, sharp, None, torch.Generator())
            total.backward()
            optimizer.step()
        answers[loss] = float(shift.bias.detach())
        assert set(losses) == {loss, "total"}
    assert answers["l1"] == pytest.approx(0.0, abs=0.05)  # the median: the blob
    assert answers["mse"] == pytest.approx(1 / 3, abs=0.01)  # the mean
    # psnr and log_l1: each sample's error in decibels, averaged as the suite averages them
    from napari_mpt_deblur.training.engine import LOG_L1_FLOOR, PSNR_LOSS_FLOOR, supervised_pixel_loss

    errors = torch.tensor([0.001, 0.01, 0.1]).view(3, 1, 1, 1).expand(3, 1, 4, 4)
    for kind, expected in (
        ("psnr", np.mean([10 * np.log10(e**2 + PSNR_LOSS_FLOOR) for e in (0.001, 0.01, 0.1)])),
        ("log_l1", np.mean([20 * np.log10(e + LOG_L1_FLOOR) for e in (0.001, 0.01, 0.1)])),
    ):
        decibels = supervised_pixel_loss(errors, torch.zeros(3, 1, 4, 4), kind)
        assert float(decibels) == pytest.approx(expected, rel=1e-5)
        halves = [
            supervised_pixel_loss(errors[s], torch.zeros(3, 1, 4, 4)[s], kind) for s in (slice(0, 1), slice(1, 3))
        ]
        assert float(halves[0] / 3 + halves[1] * 2 / 3) == pytest.approx(expected, rel=1e-5)  # shards add up
    # log_l1 keeps L1's distance: a pixel's error counts by its size, not its square
    one_large = torch.tensor([0.0, 0.0, 0.0, 0.2]).view(1, 1, 2, 2)
    four_small = torch.full((1, 1, 2, 2), 0.05)
    zeros = torch.zeros(1, 1, 2, 2)
    assert float(supervised_pixel_loss(one_large, zeros, "log_l1")) == pytest.approx(
        float(supervised_pixel_loss(four_small, zeros, "log_l1"))
    )
    squared = [float(supervised_pixel_loss(errors, zeros, "psnr")) for errors in (one_large, four_small)]
    assert squared[0] > squared[1]
    with pytest.raises(ConfigError, match="pixel_loss must be one of"):
        TrainConfig(pixel_loss="l2")
    with pytest.raises(ConfigError, match="plain training only"):
        TrainConfig(pixel_loss="mse", efcr_beta=1e-5)
    with pytest.raises(ConfigError, match="plain training only"):
        TrainConfig(pixel_loss="mse", efcr_beta=0.0, orientation_weight=0.5)


def test_orientation_consistency_compares_the_outputs_turned_back_and_only_with_plain_l1():
    from napari_mpt_deblur.config import ConfigError
    from napari_mpt_deblur.training.engine import ORIENTATIONS, objective, turn, turn_back
    from napari_mpt_deblur.training.suite import orient

    images = torch.rand(2, 1, 6, 9)
    turned = [turn(images, k) for k in range(ORIENTATIONS)]
    assert all(torch.equal(turn_back(t, k), images) for k, t in enumerate(turned))
    # orientation k is the view the suite scores as orientation k
    assert all(np.array_equal(t[0, 0].numpy(), orient(images[0, 0].numpy(), k)) for k, t in enumerate(turned))
    assert len({t.numpy().tobytes() + bytes(t.shape) for t in turned}) == ORIENTATIONS  # eight different views

    blurry, sharp = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    config = TrainConfig(orientation_weight=0.5, efcr_beta=0.0)
    pointwise = torch.nn.Conv2d(1, 1, 1)  # answers the same in every orientation
    total, losses = objective(pointwise, None, config, blurry, sharp, None, torch.Generator().manual_seed(0))
    plain = torch.nn.functional.l1_loss(pointwise(blurry), sharp).detach()
    assert losses["orientation"] == pytest.approx(0, abs=1e-7) and float(total.detach()) == pytest.approx(float(plain))

    one_way = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)  # a kernel that is not symmetric
    with torch.no_grad():
        one_way.weight.copy_(torch.arange(9.0).view(1, 1, 3, 3))
    total, losses = objective(one_way, None, config, blurry, sharp, None, torch.Generator().manual_seed(0))
    assert losses["orientation"] > 0.1
    assert float(total.detach()) == pytest.approx(losses["l1"] + 0.5 * losses["orientation"], rel=1e-5)
    total.backward()
    assert one_way.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="orientation_weight applies to plain L1"):
        TrainConfig(orientation_weight=0.5, efcr_beta=1e-5)
    with pytest.raises(ConfigError, match="must be >= 0"):
        TrainConfig(orientation_weight=-1.0, efcr_beta=0.0)


@pytest.mark.slow
def test_a_tiny_model_learns(tmp_path):
    blurry, sharp = pattern_pairs()
    sampler = LabeledPairs(blurry, sharp)
    validation = Validation.from_sampler(sampler, 4, 48)
    config = TrainConfig(steps=60, validate_every=30, checkpoint_every=30, **FAST)
    events = list(iter_train(MPT(tiny_config()), sampler, tmp_path / "m.safetensors", config, validation=validation))
    first = np.mean([e.losses["l1"] for e in events[:5]])
    last = np.mean([e.losses["l1"] for e in events[-5:]])
    assert last < 0.7 * first
    scores = events[-1].validation
    assert scores["psnr"] > scores["input_psnr"] + 1.0  # better than the blurry input
    assert [e.checkpoint is not None for e in events].count(True) == 2
    assert events[-1].remaining_s == 0 and events[0].lr == pytest.approx(2e-3)
    model = load_model(tmp_path / "m.safetensors")
    assert model.card.provenance["step"] == 60 and model.card.provenance["train_config"]["steps"] == 60
    out = deblur_array(model, (blurry[0] * 1000).astype(np.uint16))  # the file drives the inference engine
    assert out.shape == blurry[0].shape


@pytest.mark.slow
@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_stop_and_resume_gives_the_same_weights(tmp_path, ema_decay):
    blurry, sharp = pattern_pairs(2, 64)
    sampler = LabeledPairs(blurry, sharp)
    config = TrainConfig(steps=6, checkpoint_every=3, ema_decay=ema_decay, **FAST)
    torch.manual_seed(0)
    straight = train(MPT(tiny_config()), sampler, tmp_path / "straight.safetensors", config)

    torch.manual_seed(0)
    steps = iter_train(MPT(tiny_config()), sampler, tmp_path / "resumed.safetensors", config)
    for event in steps:
        if event.step == 4:  # killed after step 4: the checkpoint of step 3 survives
            break
    steps.close()
    assert load_model(tmp_path / "resumed.safetensors").card.provenance["step"] == 3
    torch.manual_seed(123)  # a different initialisation: resume must overwrite it
    resumed = train(MPT(tiny_config()), sampler, tmp_path / "resumed.safetensors", config, resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_the_model_file_holds_the_weight_average_and_the_state_file_the_raw_weights(tmp_path):
    blurry, sharp = pattern_pairs(1, 64)
    sampler = LabeledPairs(blurry, sharp)
    config = TrainConfig(steps=3, checkpoint_every=3, ema_decay=0.5, **FAST)
    model = MPT(tiny_config())
    expected = {name: value.detach().clone() for name, value in model.named_parameters()}
    for event in iter_train(model, sampler, tmp_path / "m.safetensors", config):
        # the decay warms up: min(0.5, (1 + n) / (10 + n)) for the n-th update
        keep = min(0.5, (1 + event.step) / (10 + event.step))
        for name, value in model.named_parameters():
            expected[name] = keep * expected[name] + (1 - keep) * value.detach()
    written = load_model(tmp_path / "m.safetensors").state_dict()
    state = torch.load(state_path(tmp_path / "m.safetensors"), weights_only=True)
    assert state["average_updates"] == 4  # the starting weights count as one
    moved = 0.0
    for name, value in model.named_parameters():
        torch.testing.assert_close(written[name], expected[name], msg=name)
        torch.testing.assert_close(state["raw_weights"][name], value.detach(), rtol=0, atol=0, msg=name)
        moved = max(moved, float((written[name] - value.detach()).abs().max()))
    assert moved > 1e-4  # the average is not the last step's weights


@pytest.mark.slow
def test_a_run_without_an_average_resumes_with_one(tmp_path):
    blurry, sharp = pattern_pairs(1, 64)
    sampler = LabeledPairs(blurry, sharp)
    output = tmp_path / "m.safetensors"
    config = TrainConfig(steps=4, checkpoint_every=2, **FAST)
    steps = iter_train(MPT(tiny_config()), sampler, output, config)
    for event in steps:
        if event.step == 2:
            break
    steps.close()
    raw_at_2 = load_model(output).state_dict()  # no average yet: the model file holds the raw weights
    model = MPT(tiny_config())
    resumed = iter_train(model, sampler, output, config.replace(ema_decay=0.99), resume=True)
    first = next(resumed)
    assert first.step == 3
    for name, value in model.named_parameters():  # training went on from the raw weights of step 2
        assert not torch.equal(value.detach(), raw_at_2[name])
    list(resumed)
    state = torch.load(state_path(output), weights_only=True)
    assert state["config"]["ema_decay"] == 0.99 and state["average_updates"] == 3
    assert set(state["raw_weights"]) == set(load_model(output).state_dict())


@pytest.mark.slow
def test_bad_checkpoints_give_clear_errors(tmp_path):
    blurry, sharp = pattern_pairs(1, 64)
    sampler = LabeledPairs(blurry, sharp)
    config = TrainConfig(steps=2, checkpoint_every=1, **FAST)
    output = tmp_path / "m.safetensors"
    train(MPT(tiny_config()), sampler, output, config)
    with pytest.raises(CheckpointError, match="same --steps"):
        train(MPT(tiny_config()), sampler, output, config.replace(steps=5), resume=True)
    with pytest.raises(CheckpointError, match="architecture differs"):
        train(MPT(tiny_config(dim=16)), sampler, output, config, resume=True)
    state_path(output).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable training-state file"):
        train(MPT(tiny_config()), sampler, output, config, resume=True)


def test_patches_are_reproducible_and_normalised():
    blurry, sharp = pattern_pairs(2, 80)
    sampler = LabeledPairs(blurry * 3000, sharp * 3000)  # raw intensities: normalised per patch
    a = sampler.sample(np.random.default_rng(5), 4, 32, (0.8, 1.2))
    b = sampler.sample(np.random.default_rng(5), 4, 32, (0.8, 1.2))
    np.testing.assert_array_equal(a[0], b[0])
    assert a[0].shape == (4, 1, 32, 32) and a[0].dtype == np.float32
    assert -0.1 < np.percentile(a[0], 1) < 0.1 and 0.9 < np.percentile(a[0], 99.8) < 1.1
    with pytest.raises(ValueError, match="differ in shape"):
        LabeledPairs(blurry, sharp[:, :40])


def test_synthetic_pairs_defocus_sharp_planes_on_the_fly():
    from napari_mpt_deblur.data.defocus import DefocusConfig
    from napari_mpt_deblur.training.patches import SyntheticPairs

    _, sharp = pattern_pairs(2, 96)
    sampler = SyntheticPairs(sharp * 1000, DefocusConfig(kinds=("widefield",), noise_probability=0.0))
    blurry, target = sampler.sample(np.random.default_rng(1), 3, 48, (1.0, 1.0))
    assert blurry.shape == target.shape == (3, 1, 48, 48)
    # defocus removes detail: the blurry patches have less gradient energy than their targets
    energy = [np.abs(np.diff(x, axis=-1)).mean() for x in (blurry, target)]
    assert energy[0] < 0.8 * energy[1]
    again = sampler.sample(np.random.default_rng(1), 3, 48, (1.0, 1.0))
    np.testing.assert_array_equal(again[0], blurry)


@pytest.mark.slow
def test_cli_trains_on_pairs_and_on_sharp_images_then_resumes(tmp_path):

    from napari_mpt_deblur.cli import main

    write_pair_folders(tmp_path / "pairs")
    model = tmp_path / "tiny.safetensors"
    from napari_mpt_deblur import save_model

    save_model(MPT(tiny_config()), model)
    common = ["--model", str(model), "--steps", "2", "--batch", "1", "--patch", "32", "--device", "cpu", "--quiet"]
    out = tmp_path / "from-pairs.safetensors"
    assert main(["train", "--pairs", str(tmp_path / "pairs"), "-o", str(out), *common]) == 0
    assert load_model(out).card.provenance["trained_on"]["pair_files"] == 2
    assert main(["train", "--pairs", str(tmp_path / "pairs"), "-o", str(out), *common]) == 2  # exists
    assert main(["train", "--pairs", str(tmp_path / "pairs"), "-o", str(out), *common, "--resume"]) == 0
    out = tmp_path / "from-sharp.safetensors"
    sharp_folder = str(tmp_path / "pairs" / "sharp")
    assert main(["train", "--sharp", sharp_folder, "--denoise-targets", "-o", str(out), *common]) == 0
    trained_on = load_model(out).card.provenance["trained_on"]
    assert trained_on["synthetic_defocus"] is True and trained_on["denoised_targets"] is True
    out = tmp_path / "from-bundled.safetensors"
    assert main(["train", "--bundled", "-o", str(out), *common, "--validate-every", "1"]) == 0
    trained_on = load_model(out).card.provenance["trained_on"]
    assert trained_on["bundled"] and trained_on["synthetic_defocus"] and trained_on["denoised_targets"]


def test_prepare_training_holds_out_data_and_names_what_is_wrong(tmp_path, capsys):
    from napari_mpt_deblur.cli import main
    from napari_mpt_deblur.training.data import TrainingDataError, prepare_training

    write_pair_folders(tmp_path / "pairs")
    config = TrainConfig(patch_size=32)
    data = prepare_training(pairs=tmp_path / "pairs", config=config)
    assert isinstance(data.sampler, LabeledPairs) and len(data.sampler.blurry) == 1  # p0 trains, p1 is held out
    assert isinstance(data.validation, Validation) and data.validation.blurry.shape == (8, 1, 32, 32)
    assert data.provenance == {"pairs": str(tmp_path / "pairs"), "pair_files": 2} and data.blank_planes == 0
    data = prepare_training(sharp=[tmp_path / "pairs" / "sharp"], config=config)
    assert data.provenance["planes"] == 2 and data.validation is not None  # one plane of two held out
    assert data.sampler.defocus.mild_probability == 0 and "mild_share" not in data.provenance
    data = prepare_training(sharp=[tmp_path / "pairs" / "sharp"], config=config, mild_share=0.25)
    assert data.sampler.defocus.mild_probability == 0.25 and data.provenance["mild_share"] == 0.25
    with pytest.raises(ValueError, match="exactly one"):
        prepare_training(pairs=tmp_path / "pairs", sharp=[tmp_path / "pairs" / "sharp"])
    (tmp_path / "pairs" / "sharp" / "p0.tif").rename(tmp_path / "pairs" / "sharp" / "other.tif")
    (tmp_path / "pairs" / "sharp" / "p1.tif").unlink()
    with pytest.raises(TrainingDataError, match="no file name appears in both blurry/ and sharp/"):
        prepare_training(pairs=tmp_path / "pairs")
    # the command line says the same in one line, exit code 2
    assert main(["train", "--pairs", str(tmp_path / "pairs"), "-o", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mpt-deblur train: error: {tmp_path / 'pairs'}: no file name appears in both blurry/ and sharp/"
    assert main(["train", "--sharp", str(tmp_path / "missing"), "-o", str(tmp_path / "m.safetensors")]) == 2
    assert capsys.readouterr().err.strip() == f"mpt-deblur train: error: {tmp_path / 'missing'}: no such file or folder"
    # labeled pairs have their own blur: no share of it can be drawn mild
    args = ["train", "--pairs", str(tmp_path / "pairs"), "-o", str(tmp_path / "m.safetensors"), "--mild-share", "0.5"]
    assert main(args) == 2
    assert "--mild-share draws synthetic defocus: use it with --sharp or --bundled" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_on_an_unlabeled_stack_end_to_end(tmp_path):
    """EFCR_ex + re-blur on the user's own stack; the tuned file drives the inference engine."""
    import tifffile

    from napari_mpt_deblur import save_model
    from napari_mpt_deblur.cli import main

    blurry, sharp = pattern_pairs(4, 64)
    stack = np.concatenate([sharp, blurry]) * 1000  # a lab's stack: some planes in focus, some not
    tifffile.imwrite(tmp_path / "mine.tif", stack.astype(np.uint16), photometric="minisblack")
    start = save_model(MPT(tiny_config()), tmp_path / "start.safetensors", provenance={"trained_on": "patterns"})
    out = tmp_path / "tuned.safetensors"
    args = ["finetune", "--model", str(start), "--unlabeled", str(tmp_path / "mine.tif"), "-o", str(out)]
    common = ["--steps", "3", "--batch", "2", "--patch", "32", "--reblur", "0.5", "--beta", "1e-3", "--device", "cpu"]
    assert main([*args, *common, "--lr", "1e-3", "--quiet", "--min-focus", "0.5"]) == 0
    tuned = load_model(out)
    record = tuned.card.provenance
    assert record["fine_tuned_on"]["planes"] == 8 and record["trained_on"] == "patterns"
    assert record["fine_tune"]["kept_starting_model"] is False  # it beat the untrained start on held-out patches
    assert record["train_config"]["reblur_weight"] == 0.5 and record["train_config"]["efcr_beta"] == 1e-3
    before = load_model(start).state_dict().values()
    assert not all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), before))
    assert deblur_array(tuned, stack[:2].astype(np.uint16)).shape == (2, 64, 64)


def test_unlabeled_planes_keep_the_sharp_ones():
    from napari_mpt_deblur.training.patches import UnlabeledPlanes

    blurry, sharp = pattern_pairs(3, 64)
    planes = UnlabeledPlanes(np.concatenate([blurry, sharp]), min_focus_quantile=0.5)
    assert len(planes.planes) == 3
    assert all(any(np.array_equal(p, s) for s in sharp) for p in planes.planes)
    patches = planes.sample(np.random.default_rng(0), 2, 32, (1.0, 1.0))
    assert patches.shape == (2, 1, 32, 32)


@pytest.mark.slow
def test_distributed_data_parallel_with_two_gloo_processes(tmp_path):
    """The same `mpt-deblur train` entry point under torchrun: 2 CPU processes, one model, one file."""
    import subprocess
    import sys

    from napari_mpt_deblur import save_model

    write_pair_folders(tmp_path / "pairs")
    start = save_model(MPT(tiny_config()), tmp_path / "start.safetensors")
    out = tmp_path / "ddp.safetensors"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "napari_mpt_deblur.cli", "train", "--pairs", str(tmp_path / "pairs"), "-o", str(out),
        "--model", str(start), "--steps", "3", "--batch", "1", "--patch", "32", "--device", "cpu",
        "--checkpoint-every", "2", "--quiet",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    trained = load_model(out)
    assert trained.card.provenance["processes"] == 2 and trained.card.provenance["step"] == 3
    before = load_model(start).state_dict().values()
    assert not all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), before))


def _run_and_keep_state_of(step_to_keep, output, **kwargs) -> bytes:
    """Train to the end; return the state file's bytes as they were right after checkpoint ``step_to_keep``."""
    kept = b""
    for event in iter_train(MPT(tiny_config()), output=output, **kwargs):
        if event.step == step_to_keep:
            kept = state_path(output).read_bytes()
    return kept


@pytest.mark.slow
def test_resume_without_its_state_file_is_refused_and_the_model_kept(tmp_path):
    """A missing state file would restart at step 0 and replace the trained model: refused, with what to do."""
    blurry, sharp = pattern_pairs(1, 64)
    sampler = LabeledPairs(blurry, sharp)
    config = TrainConfig(steps=2, checkpoint_every=1, **FAST)
    output = tmp_path / "m.safetensors"
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(MPT(tiny_config()), sampler, output, config, resume=True)
    train(MPT(tiny_config()), sampler, output, config)
    trained = output.read_bytes()
    state_path(output).unlink()
    with pytest.raises(CheckpointError, match="state.pt is missing.*drop --resume and pass --overwrite"):
        train(MPT(tiny_config()), sampler, output, config, resume=True)
    assert output.read_bytes() == trained


@pytest.mark.slow
def test_a_model_file_and_a_state_file_of_different_checkpoints_are_refused(tmp_path):
    """A kill between the two renames leaves files of different steps: resuming them would mix weights."""
    blurry, sharp = pattern_pairs(1, 64)
    sampler = LabeledPairs(blurry, sharp)
    config = TrainConfig(steps=4, checkpoint_every=2, **FAST)
    output = tmp_path / "m.safetensors"
    state_of_step_2 = _run_and_keep_state_of(2, output, sampler=sampler, config=config)
    assert load_model(output).card.provenance["step"] == 4
    state_path(output).write_bytes(state_of_step_2)  # the model file of step 4 beside the state of step 2
    with pytest.raises(CheckpointError, match=r"\(step 4\) and .*\(step 2\) are not one checkpoint"):
        train(MPT(tiny_config()), sampler, output, config, resume=True)

    other = tmp_path / "other.safetensors"  # same step, another run: the run ids differ
    train(MPT(tiny_config()), sampler, other, config)
    state_path(output).write_bytes(state_path(other).read_bytes())
    with pytest.raises(CheckpointError, match="not one checkpoint"):
        train(MPT(tiny_config()), sampler, output, config, resume=True)


@pytest.mark.slow
def test_cli_resume_never_replaces_a_model_without_overwrite(tmp_path, capsys):
    from napari_mpt_deblur import save_model
    from napari_mpt_deblur.cli import main

    write_pair_folders(tmp_path / "pairs")
    start = save_model(MPT(tiny_config()), tmp_path / "start.safetensors")
    out = tmp_path / "out.safetensors"
    common = ["train", "--pairs", str(tmp_path / "pairs"), "-o", str(out), "--model", str(start), "--steps", "2"]
    common += ["--batch", "1", "--patch", "32", "--device", "cpu", "--quiet"]
    assert main(common) == 0
    trained = out.read_bytes()
    state_path(out).unlink()
    assert main([*common, "--resume"]) == 2
    assert "drop --resume and pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == trained
    assert main([*common, "--resume", "--overwrite"]) == 0  # asked explicitly: no state file, so start over
    assert state_path(out).exists() and out.read_bytes() != trained


def test_blank_planes_are_skipped_and_constant_patches_train_safely():
    """Empty planes at the ends of stacks: left out (and counted); a constant patch from a plane
    with content gives finite gradients and a range that divides by no zero."""
    from napari_mpt_deblur.training.patches import SyntheticPairs, UnlabeledPlanes, safe_range

    blurry, sharp = pattern_pairs(2, 64)
    blank = np.zeros((3, 64, 64), np.float32)
    constant = np.full((1, 64, 64), 500, np.float32)
    pairs = LabeledPairs(np.concatenate([blank, blurry, constant]), np.concatenate([blank, sharp, constant]))
    assert pairs.blank_planes == 4 and len(pairs.blurry) == 2
    assert SyntheticPairs(np.concatenate([blank, sharp])).blank_planes == 3
    assert UnlabeledPlanes(np.concatenate([sharp, blank])).blank_planes == 3
    with pytest.raises(ValueError, match="all 3 planes are blank"):
        LabeledPairs(blank, blank)

    spots = np.zeros((32, 32), np.float32)
    spots[3, 4] = spots[20, 9] = 4000  # percentiles 1 and 99.8 are both 0
    low, high = safe_range(spots, IntensityNormalization())
    assert (spots.max() - low) / (high - low) <= 1.0
    assert safe_range(np.full((8, 8), 7.0, np.float32), IntensityNormalization()) == (7.0, 8.0)

    model = MPT(tiny_config()).train()
    torch.nn.functional.l1_loss(model(torch.zeros(2, 1, 32, 32)), torch.zeros(2, 1, 32, 32)).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_non_finite_loss_names_its_likely_cause(tmp_path):
    class PoisonedPairs:
        def sample(self, rng, batch, patch, scale_range):
            patches = np.ones((batch, 1, patch, patch), np.float32)
            patches[0, 0, 0, 0] = np.nan
            return patches, patches

    config = TrainConfig(steps=2, **FAST)
    with pytest.raises(FloatingPointError, match="training patches hold NaN or infinite values"):
        train(MPT(tiny_config()), PoisonedPairs(), tmp_path / "m.safetensors", config)


@pytest.mark.slow
def test_cli_skips_blank_planes_and_reports_them(tmp_path, capsys):
    import tifffile

    from napari_mpt_deblur import save_model
    from napari_mpt_deblur.cli import main

    _, sharp = pattern_pairs(3, 64)
    stack = np.concatenate([np.zeros((2, 64, 64)), sharp * 1000, np.zeros((4, 64, 64))]).astype(np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    start = save_model(MPT(tiny_config()), tmp_path / "start.safetensors")
    out = tmp_path / "out.safetensors"
    args = ["train", "--sharp", str(tmp_path / "stack.tif"), "-o", str(out), "--model", str(start), "--steps", "2"]
    assert main([*args, "--batch", "2", "--patch", "32", "--device", "cpu", "--beta", "1e-3"]) == 0
    assert "skipped 6 blank (constant) planes" in capsys.readouterr().out
    assert load_model(out).card.provenance["trained_on"]["blank_planes_skipped"] == 6

    tuned = tmp_path / "tuned.safetensors"
    args = ["finetune", "--model", str(start), "--unlabeled", str(tmp_path / "stack.tif"), "-o", str(tuned)]
    assert main([*args, "--steps", "2", "--batch", "2", "--patch", "32", "--device", "cpu"]) == 0
    assert "skipped 6 blank (constant) planes" in capsys.readouterr().out
    assert load_model(tuned).card.provenance["fine_tuned_on"]["blank_planes_skipped"] == 6


def test_a_checkpoint_on_a_full_disk_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    """torch's own writer reports a full disk as "unexpected pos ..."; the state file is written by Python."""
    import builtins
    import errno

    import napari_mpt_deblur.training.engine as engine

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(bytes(data[:10]))
            raise OSError(errno.ENOSPC, "No space left on device")

    def full_disk_open(path, mode="r", *args, **kwargs):
        handle = builtins.open(path, mode, *args, **kwargs)
        return FullDisk(handle) if "w" in mode else handle

    monkeypatch.setattr(engine, "open", full_disk_open, raising=False)
    blurry, sharp = pattern_pairs(1, 64)
    config = TrainConfig(steps=1, **FAST)
    with pytest.raises(OSError, match=r"m\.state\.pt: cannot write"):
        train(MPT(tiny_config()), LabeledPairs(blurry, sharp), tmp_path / "m.safetensors", config)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_train_preset_seed_sets_the_initial_weights(tmp_path):
    from napari_mpt_deblur.cli import main

    write_pair_folders(tmp_path / "pairs")

    def trained_with_seed(seed: int, name: str) -> dict:
        out = tmp_path / name
        args = ["train", "--pairs", str(tmp_path / "pairs"), "-o", str(out), "--preset", "lite", "--seed", str(seed)]
        assert main([*args, "--steps", "1", "--batch", "1", "--patch", "32", "--device", "cpu", "--quiet"]) == 0
        return load_model(out).state_dict()

    first, again = trained_with_seed(1, "a.safetensors"), trained_with_seed(1, "b.safetensors")
    other = trained_with_seed(2, "c.safetensors")
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def _round_spots(height: int, width: int) -> np.ndarray:
    """Disks of radius 8 on a 40-pixel grid: every 80 x 80 window holds a whole one."""
    yy, xx = np.mgrid[:height, :width]
    return (((yy % 40 - 20) ** 2 + (xx % 40 - 20) ** 2) <= 64).astype(np.float32)


def _aspect_ratios(patches: np.ndarray) -> list[float]:
    """Height over width of every spot that does not touch a patch's border."""
    from scipy import ndimage

    ratios = []
    for patch in patches[:, 0]:
        labels, _ = ndimage.label(patch > 0.5 * patch.max())
        for rows, cols in ndimage.find_objects(labels):
            if rows.start > 0 and cols.start > 0 and rows.stop < patch.shape[0] and cols.stop < patch.shape[1]:
                ratios.append((rows.stop - rows.start) / (cols.stop - cols.start))
    return ratios


def test_patches_of_a_plane_too_small_for_the_zoom_out_keep_round_things_round():
    """A 200 x 80 plane asked for a 2x zoom-out: the window is the largest square it holds, not 200 x 80."""
    from napari_mpt_deblur.data.defocus import DefocusConfig
    from napari_mpt_deblur.training.patches import SyntheticPairs, UnlabeledPlanes

    plane = _round_spots(200, 80) + 0.01
    rng = np.random.default_rng(0)
    _, labeled = LabeledPairs(plane, plane).sample(rng, 8, 64, (0.5, 0.5))
    unblurred = DefocusConfig(no_blur_probability=1.0, noise_probability=0.0)
    _, synthetic = SyntheticPairs(plane, unblurred, margin=0).sample(rng, 8, 64, (0.5, 0.5))
    unlabeled = UnlabeledPlanes(plane).sample(rng, 8, 64, (0.5, 0.5))
    for patches in (labeled, synthetic, unlabeled):
        ratios = _aspect_ratios(patches)
        assert len(ratios) >= 8 and 0.85 < np.median(ratios) < 1.18

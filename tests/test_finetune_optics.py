"""Optics-aware fine-tuning: the user's microscope, the blur measured in their stack, and the guard that keeps
the starting model when a fine-tune does not beat it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import tifffile
import torch

from helpers import tiny_config
from napari_mpt_deblur import MPT, load_model, save_model
from napari_mpt_deblur.config import ConfigError, DeblurSettings, Microscope
from napari_mpt_deblur.data.defocus import add_poisson_gaussian_noise, blur, gaussian_psf, widefield_psf
from napari_mpt_deblur.data.optics import (
    MAX_WIDEFIELD_R80_PX,
    estimate_blur,
    microscope_from_metadata,
    sharpen_in_focus,
)
from napari_mpt_deblur.inference import deblur_array
from napari_mpt_deblur.training.engine import TrainProgress, Validation, state_path
from napari_mpt_deblur.training.finetune import (
    ANCHORED_SHARE,
    FINETUNE_DEFAULTS,
    NO_FOCUS_ANCHORED_SHARE,
    NO_FOCUS_EFCR_BETA,
    NO_FOCUS_MAX_STEPS,
    AnchoredPairs,
    TrainingLog,
    prepare_finetune,
)

LAB = Microscope(na=1.4, medium="oil", wavelength_um=0.52, pixel_size_um=0.1, z_step_um=0.3)


def cells(size: int = 128, seed: int = 0) -> np.ndarray:
    """A fluorescence-like field in 0..1: soft nuclei, thin membranes and sparse puncta."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    field = np.zeros((size, size), np.float32)
    for _ in range(10):
        cy, cx, r = rng.uniform(10, size - 10, 2).tolist() + [rng.uniform(5, 11)]
        d = np.hypot(y - cy, x - cx)
        field += 0.5 * (d < r) + 0.4 * (np.abs(d - r - 4) < 1)
    for cy, cx in rng.uniform(4, size - 4, (30, 2)):
        field += 0.8 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 1.5)
    return np.clip(field, 0, 1)


def through_focus(defocus_um, seed: int = 0, photons: float = 2000.0) -> np.ndarray:
    """The LAB microscope's stack of one field at the given distances from focus."""
    rng = np.random.default_rng(seed)
    truth = cells(seed=seed)
    planes = [blur(truth, widefield_psf(z, **LAB.optics())) for z in defocus_um]
    return np.stack([add_poisson_gaussian_noise(plane, photons, 0.002, rng) for plane in planes])


def small_model() -> MPT:
    return MPT(tiny_config(num_blocks=(1, 1, 1, 1), scales=((1 / 4,), (1 / 2,), (1.0,), (1.0,))))


# the microscope ---------------------------------------------------------------------------


def test_the_microscope_refuses_optics_that_cannot_be_and_takes_sizes_from_metadata():
    with pytest.raises(ConfigError, match="NA 1.4 is not possible in water"):
        Microscope(na=1.4, medium="water")
    with pytest.raises(ConfigError, match="medium must be one of air, water"):
        Microscope(medium="honey")
    with pytest.raises(ConfigError, match="give micrometres"):
        Microscope(wavelength_um=520)
    assert Microscope(medium="oil", na=1.4).refractive_index == 1.515
    # the PSF is modelled at no coarser than the Nyquist pixel of the optics (0.52 / 2.8 um here)
    assert Microscope(na=1.4, medium="oil", pixel_size_um=0.65).model_pixel_um == pytest.approx(0.52 / 2.8)

    from_file = microscope_from_metadata((65.0, 65.0), "nm", 250.0, na=1.2, medium="water")
    assert from_file.pixel_size_um == pytest.approx(0.065) and from_file.z_step_um == pytest.approx(0.25)
    assert from_file.na == 1.2
    given = microscope_from_metadata((0.1, 0.1), "micron", None, pixel_size_um=0.2, na=None)
    assert given.pixel_size_um == 0.2 and given.na == Microscope().na  # what the user gives wins; None is not given
    assert microscope_from_metadata((3.0, 3.0), "pixel", None).pixel_size_um is None  # no length unit: unknown


# measuring the blur ---------------------------------------------------------------------------


def test_the_blur_measured_against_the_sharpest_plane_follows_the_true_blur():
    rng = np.random.default_rng(1)
    truth = cells(192)
    sigmas = (0.0, 1.0, 2.0, 3.0, 4.0)
    stack = [add_poisson_gaussian_noise(blur(truth, gaussian_psf(s)) if s else truth, 3000, 0.002, rng) for s in sigmas]
    estimate = estimate_blur(stack)
    assert estimate.reference_planes[0] == 0
    measured = [estimate.extra_sigma_px[i] for i in range(len(sigmas))]
    assert measured[0] == 0 and measured == sorted(measured)
    assert measured[1:] == pytest.approx(sigmas[1:], rel=0.25)
    assert estimate.in_focus and estimate.photons is not None


def test_a_stack_through_focus_has_in_focus_planes_and_a_defocused_one_has_none():
    stack = through_focus((-0.9, -0.6, -0.3, 0.0, 0.3, 0.6, 0.9))
    estimate = estimate_blur(list(stack), LAB)
    assert estimate.reference_planes[0] == 3 and estimate.in_focus and not estimate.notes
    extra = estimate.extra_sigma_px
    assert extra[0] > extra[1] > extra[2] > 0 and extra[6] > extra[5] > extra[4] > 0
    config = estimate.defocus_config()
    # a Z stack with a known step: widefield defocus of the lab's optics up to the farthest plane (0.9 um)
    assert config.na == (1.4, 1.4) and config.refractive_index == (1.515,) and config.pixel_size_um == (0.1, 0.1)
    assert 0.4 < config.defocus_um[1] <= 0.9 and config.widefield_blur_px is None
    assert config.no_blur_probability > 0  # in-focus planes must be left alone

    # blur measured at the Gaussian's cap: the widefield range still reaches the coverage's 16 px, not the cap's 14.3
    strong = dataclasses.replace(estimate, extra_sigma_px={0: 8.0}, microscope=LAB.replace(z_step_um=None))
    config = strong.defocus_config()
    assert config.gaussian_sigma == (0.0, 8.0)
    assert config.widefield_blur_px == (0.0, MAX_WIDEFIELD_R80_PX) == (0.0, 16.0)
    on_a_step = dataclasses.replace(strong, microscope=LAB).defocus_config()  # 0.3 um steps, 3 planes from focus
    assert on_a_step.defocus_um[1] == pytest.approx(0.9)

    defocused = through_focus((0.9, 1.0, 1.1, 1.2, 1.3))
    estimate = estimate_blur(list(defocused), LAB)
    assert not estimate.in_focus and "no usable in-focus planes" in estimate.notes[0]
    assert estimate.defocus_config(unblurred=0.0).no_blur_probability == 0
    assert "no usable in-focus planes" in estimate.describe()
    record = json.loads(json.dumps(estimate.to_dict()))
    assert record["in_focus"] is False and record["microscope"]["medium"] == "oil"

    with pytest.raises(ValueError, match="at least 16 x 16"):
        estimate_blur([np.zeros((8, 8))])


def test_one_richardson_lucy_step_takes_part_of_the_in_focus_blur_out_and_ignores_the_offset():
    psf = widefield_psf(0.0, **LAB.optics())  # NA 1.4 at 0.1 um pixels: spread over several pixels
    truth = cells(size=160)
    in_focus = blur(truth, psf)
    sharpened = sharpen_in_focus(in_focus, psf)
    assert sharpened.dtype == np.float32 and sharpened.shape == truth.shape

    def error(x):
        return float(np.mean((x - truth) ** 2))

    assert error(sharpened) < 0.8 * error(in_focus)  # closer to the truth than the plane it came from
    assert abs(float(sharpened.mean()) - float(in_focus.mean())) < 0.01 * float(in_focus.mean())  # flux kept
    # a camera offset is the background, taken off and put back: the same sharpening on top of it
    assert np.allclose(sharpen_in_focus(in_focus + 100.0, psf), sharpened + 100.0, atol=1e-3)
    # a PSF of one pixel leaves nothing to take out
    assert np.allclose(sharpen_in_focus(in_focus, np.ones((1, 1))), in_focus, atol=1e-6)


def test_a_model_card_keeps_the_optics_to_sharpen_against_and_refuses_impossible_ones():
    from napari_mpt_deblur.config import ModelCard

    card = ModelCard(small_model().config, in_focus_optics=LAB)
    assert ModelCard.from_dict(json.loads(json.dumps(card.to_dict()))).in_focus_optics == LAB
    assert "in_focus_optics" not in ModelCard(small_model().config).to_dict()  # older readers see the same card
    impossible = {**card.to_dict(), "in_focus_optics": {"na": 1.4, "medium": "water"}}
    with pytest.raises(ConfigError, match="NA 1.4 is not possible in water"):
        ModelCard.from_dict(impossible)
    with pytest.raises(ConfigError, match="sharpen_in_focus must be true or false"):
        DeblurSettings(sharpen_in_focus="no")


# preparing and guarding a fine-tune ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_stack_with_focus_holds_out_sharp_planes_and_one_without_fine_tunes_gently():
    config = FINETUNE_DEFAULTS.replace(patch_size=32, batch_size=2, steps=500)
    model = small_model()
    stacks = [through_focus((-0.6, -0.3, 0.0, 0.3, 0.6, 0.9, 1.2, 1.5), seed=s) for s in range(4)]
    data = prepare_finetune(model, stacks, config=config, microscope=LAB)
    assert data.estimate is not None and data.estimate.in_focus
    assert data.notes == [
        "the fine-tuned model will sharpen its output against the in-focus PSF of NA 1.4 (oil), 520 nm, 0.1 um "
        "pixels (in-focus PSF sigma 0.78 px); give your objective's optics where they differ"
    ]
    # of the sharpest quarter of 32 planes only the 4 in focus: the planes 0.3 um away are blurred (80 % radius
    # 4 px) and would teach the network to keep that blur; one of the 4 is held out
    assert data.provenance["sharp_planes"] == 4 and len(data.sampler.pairs.sharp) == 3
    # their targets are the starting model's output on them (denoised, and sharper than the optics leave them);
    # the held-out plane is scored against itself denoised
    from napari_mpt_deblur.config import DeblurSettings
    from napari_mpt_deblur.inference import deblur_array

    settings = DeblurSettings(device="cpu", precision="fp32")
    outputs = [deblur_array(model, s[2].astype(np.float32), "YX", settings) for s in stacks]  # 0.0 um: in focus
    assert all(any(np.array_equal(target, out) for out in outputs) for target in data.sampler.pairs.sharp)
    assert data.provenance["targets"] == "starting model's deblurred in-focus planes"
    assert data.provenance["denoised_validation_targets"] is True
    # the fine-tuned model will sharpen its output against the lab's in-focus PSF, which those targets keep
    assert data.in_focus_optics == LAB and data.provenance["in_focus_optics"]["na"] == 1.4
    assert not prepare_finetune(model, stacks, config=config, microscope=LAB, sharpen_in_focus=False).in_focus_optics
    # a PSF narrower than SHARPEN_MIN_SIGMA_PX (NA 0.5 at 0.65 um pixels: sigma 0.42 px) is left alone
    narrow = prepare_finetune(
        model, stacks, config=config, microscope=Microscope(na=0.5, medium="air", pixel_size_um=0.65)
    )
    assert narrow.estimate.in_focus and narrow.in_focus_optics is None and "in_focus_optics" not in narrow.provenance
    # in-focus planes are kept as the starting model treats them, not copied onto their denoised targets
    assert isinstance(data.sampler, AnchoredPairs) and data.sampler.share == ANCHORED_SHARE
    assert data.sampler.pairs.defocus.no_blur_probability == 0
    assert data.provenance["validation"].startswith("1 of the sharpest planes held out")
    assert data.provenance["blur_estimate"]["microscope"]["na"] == 1.4
    assert data.config.steps == 500 and data.config.lr == config.lr
    # the guard's second score: the same held-out plane unblurred or mildly blurred, much closer to its truth
    gentle, measured = data.gentle_validation, data.validation
    assert gentle is not None and gentle.blurry.shape == measured.blurry.shape
    cpu = torch.device("cpu")
    assert gentle.evaluate(model, cpu)["input_psnr"] > measured.evaluate(model, cpu)["input_psnr"] + 3
    labeled = prepare_finetune(model, stacks, labeled=(stacks[0][4:], stacks[0][:4]), config=config)
    assert labeled.gentle_validation is None  # the user's pairs are the truth to score on

    # one Z stack has one plane in focus: the last quarter of it is held out instead of whole planes
    rng = np.random.default_rng(3)
    truth = cells(size=520)[:160]
    planes = [blur(truth, widefield_psf(z, **LAB.optics())) for z in (0.0, 0.6, 1.2)]
    one_stack = np.stack([add_poisson_gaussian_noise(plane, 2000.0, 0.002, rng) for plane in planes])
    data = prepare_finetune(model, one_stack, config=config, microscope=LAB)
    assert data.provenance["validation"].startswith("the last quarter of the sharpest plane held out")
    assert data.provenance["sharp_planes"] == 1 and [p.shape for p in data.sampler.pairs.sharp] == [(160, 390)]
    assert data.validation.blurry.shape == data.gentle_validation.blurry.shape == (16, 1, 32, 32)

    defocused = [through_focus((0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6), seed=s) for s in range(2)]
    data = prepare_finetune(model, defocused, config=config, microscope=LAB)
    assert "no usable in-focus planes" in data.notes[0] and "fine-tuning gently" in data.notes[1]
    assert data.config.steps == NO_FOCUS_MAX_STEPS and data.config.lr == pytest.approx(config.lr / 12)
    assert data.config.efcr_beta == NO_FOCUS_EFCR_BETA
    assert data.provenance["targets"].startswith("starting model's deblurred")
    assert data.in_focus_optics == LAB  # its targets keep the in-focus blur too: sharpened after as well
    assert isinstance(data.sampler, AnchoredPairs) and data.sampler.share == NO_FOCUS_ANCHORED_SHARE
    assert data.sampler.pairs.defocus.no_blur_probability == 0  # unblurred samples are the anchored ones only
    # a share of every batch keeps the network where it started: unblurred input, the starting model's output
    always = AnchoredPairs(data.sampler.pairs, model, share=1.0)
    blurry, sharp = always.sample(np.random.default_rng(0), 2, 32, (1.0, 1.0))
    with torch.no_grad():
        assert np.allclose(sharp, model.eval()(torch.from_numpy(blurry)).numpy(), atol=1e-6)
    assert not data.provenance["denoised_validation_targets"]


def test_the_starting_model_is_kept_unless_the_fine_tune_beats_it():
    model = small_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    sharp = rng.random((4, 1, 32, 32), dtype=np.float32)
    validation = Validation(sharp + 0.1, sharp)
    log = TrainingLog()
    start_psnr = log.begin(model, validation)
    assert start_psnr == log.start_psnr and log.input_psnr is not None

    def step(index: int, psnr: float) -> None:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.01)
        scores = {"psnr": psnr, "ssim": 0.5, "input_psnr": 18.0, "input_ssim": 0.4}
        log.update(TrainProgress(index, 2, {"total": 1.0}, 1e-4, index, 2 - index, scores), model)

    step(1, start_psnr + 0.01)  # not better by MIN_GAIN_DB
    step(2, start_psnr - 1.0)
    assert log.restore_best(model) == 0 and log.kept_start and log.weights_step == 0
    assert all(torch.equal(model.state_dict()[k], v) for k, v in start.items())
    assert "kept the starting model" in log.outcome()
    assert log.summary()["kept_starting_model"] is True

    better = TrainingLog()
    better.begin(model, validation)
    scores = {"psnr": better.start_psnr + 1.0, "ssim": 0.5, "input_psnr": 18.0, "input_ssim": 0.4}
    better.update(TrainProgress(1, 1, {"total": 1.0}, 1e-4, 1.0, 0.0, scores), model)
    assert better.restore_best(model) == 1 and not better.kept_start
    assert better.summary()["kept_starting_model"] is False and "kept the weights of step 1" in better.outcome()


def test_a_fine_tune_that_gains_on_strong_blur_but_loses_in_focus_is_not_kept():
    model = small_model().eval()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(1)
    sharp = rng.random((4, 1, 32, 32), dtype=np.float32)
    validation = Validation(sharp + 0.1, sharp)
    # in-focus patches the starting model already gets nearly right: any change of its weights loses on them
    in_focus = rng.random((4, 1, 32, 32), dtype=np.float32)
    with torch.no_grad():
        gentle = Validation(in_focus, model(torch.from_numpy(in_focus)).numpy() + 1e-3)

    def progress(index: int, psnr: float) -> TrainProgress:
        scores = {"psnr": psnr, "ssim": 0.5, "input_psnr": 18.0, "input_ssim": 0.4}
        return TrainProgress(index, 2, {"total": 1.0}, 1e-4, index, 2 - index, scores)

    log = TrainingLog()
    log.begin(model, validation, gentle)
    assert log.gentle_start_psnr is not None and log.gentle_start_psnr > 50
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05)
    assert not log.update(progress(1, log.start_psnr + 3.0), model)  # far better on the blur, worse in focus
    assert log.gentle_rejected == [1] and log.gentle_psnr[0][1] < log.gentle_start_psnr
    assert log.restore_best(model) == 0 and log.kept_start
    assert all(torch.equal(model.state_dict()[k], v) for k, v in start.items())
    assert "made planes in focus or mildly blurred worse" in log.outcome()
    assert log.summary()["steps_rejected_for_in_focus_or_mild_loss"] == [1]

    unharmed = TrainingLog()
    unharmed.begin(model, validation, gentle)
    assert unharmed.update(progress(1, unharmed.start_psnr + 1.0), model)  # same weights: nothing lost in focus
    assert unharmed.restore_best(model) == 1 and not unharmed.gentle_rejected
    assert unharmed.summary()["in_focus_or_mild_psnr"] == unharmed.summary()["starting_model_in_focus_or_mild_psnr"]


@pytest.mark.slow
def test_cli_finetune_takes_the_optics_and_the_files_pixel_size(tmp_path, capsys):
    from napari_mpt_deblur.cli import main

    stack = through_focus((-0.6, -0.3, 0.0, 0.3, 0.6, 0.9, 1.2, 1.5))
    path = tmp_path / "lab.tif"
    # an ImageJ hyperstack that records 0.1 um pixels and a 0.3 um Z step, as a camera with an offset writes it
    tifffile.imwrite(
        path,
        (np.clip(stack, 0, None) * 4000 + 100).astype(np.uint16),
        imagej=True,
        resolution=(10.0, 10.0),
        metadata={"axes": "ZYX", "unit": "micron", "spacing": 0.3},
    )
    start = save_model(small_model(), tmp_path / "start.safetensors", provenance={"trained_on": "test"})
    out = tmp_path / "tuned.safetensors"
    args = ["finetune", "--model", str(start), "--unlabeled", str(path), "-o", str(out)]
    common = ["--steps", "2", "--batch", "2", "--patch", "32", "--device", "cpu", "--validate-every", "1"]
    assert main([*args, *common, "--na", "1.4", "--medium", "oil", "--wavelength", "520"]) == 0
    printed = capsys.readouterr().out
    assert "blur beyond the sharpest planes" in printed and "kept" in printed
    record = load_model(out).card.provenance
    microscope = record["fine_tuned_on"]["blur_estimate"]["microscope"]
    assert microscope == {"na": 1.4, "medium": "oil", "wavelength_um": 0.52, "pixel_size_um": 0.1, "z_step_um": 0.3}
    assert "kept_starting_model" in record["fine_tune"]
    assert not state_path(out).exists()  # a finished fine-tune leaves the model, not a checkpoint

    # the stack has in-focus planes: the fine-tuned file sharpens its output against the lab's in-focus PSF
    tuned = load_model(out)
    assert tuned.card.in_focus_optics == LAB  # pixel size and Z step from the file
    assert main(["info", str(out)]) == 0
    assert "sharpened:    after the network, one Richardson-Lucy step against the in-focus PSF of NA 1.4 (oil), " in (
        capsys.readouterr().out
    )
    plane = tifffile.imread(path)[2].astype(np.float32)  # in focus
    settings = DeblurSettings(tile=0, device="cpu", precision="fp32")
    sharpened = deblur_array(tuned, plane, "YX", settings)
    network_alone = deblur_array(tuned, plane, "YX", settings.replace(sharpen_in_focus=False))
    psf = widefield_psf(0.0, **LAB.optics())
    assert not np.allclose(sharpened, network_alone, atol=1e-3)
    assert np.allclose(sharpened, sharpen_in_focus(network_alone, psf), rtol=1e-4, atol=1e-4 * float(plane.max()))
    # and leaves it as the network makes it when asked
    tifffile.imwrite(tmp_path / "plane.tif", plane)
    deblurred = tmp_path / "plane_deblurred.tif"
    cli_deblur = ["deblur", str(tmp_path / "plane.tif"), "--model", str(out), "-o", str(deblurred), "--tile", "0"]
    assert main([*cli_deblur, "--device", "cpu", "--precision", "fp32", "--no-sharpen"]) == 0
    assert np.allclose(tifffile.imread(deblurred), network_alone, atol=1e-5)
    assert "sharpening" not in capsys.readouterr().out
    assert main([*cli_deblur, "--device", "cpu", "--precision", "fp32", "--overwrite"]) == 0
    assert "sharpening every plane against the in-focus PSF of NA 1.4 (oil)" in capsys.readouterr().out
    assert np.allclose(tifffile.imread(deblurred), sharpened, atol=1e-5)
    # training it further makes another network: the step chosen for this one is not carried over
    further = tmp_path / "further.safetensors"
    train = ["train", "--sharp", str(path), "-o", str(further), "--model", str(out), "--steps", "1", "--batch", "1"]
    assert main([*train, "--patch", "32", "--device", "cpu", "--quiet"]) == 0
    assert load_model(further).card.in_focus_optics is None
    # told not to, the fine-tune leaves it out
    assert main([*args, *common, "--overwrite", "--na", "1.4", "--medium", "oil", "--no-sharpen"]) == 0
    assert load_model(out).card.in_focus_optics is None and "will sharpen" not in capsys.readouterr().out

    assert main([*args, *common, "--overwrite", "--na", "1.4", "--medium", "water"]) == 2
    assert "NA 1.4 is not possible in water" in capsys.readouterr().err


@pytest.mark.slow
def test_a_fine_tune_without_focus_keeps_its_starting_network_for_milder_blur_than_its_stack_holds(tmp_path):
    from napari_mpt_deblur.inference import estimate_blur_width
    from napari_mpt_deblur.models.mpt import MilderBlur
    from napari_mpt_deblur.training.finetune import MILDER_BLUR_SHARE

    torch.manual_seed(0)
    model = MPT(tiny_config(blur_conditioned=True, blur_estimator=True)).eval()
    config = FINETUNE_DEFAULTS.replace(patch_size=32, batch_size=2, steps=2)
    defocused = [through_focus((0.9, 1.0, 1.1, 1.2), seed=s) for s in range(2)]
    data = prepare_finetune(model, defocused, config=config, microscope=LAB)
    # the sharpest quarter (the two planes 0.9 um away) sets the least blur the stack holds, as the estimator judges
    least = min(estimate_blur_width(model, stack[0]) for stack in defocused)
    assert data.milder_blur_below_width == pytest.approx(MILDER_BLUR_SHARE * least, rel=1e-5)
    assert data.provenance["milder_blur_below_width"] == round(data.milder_blur_below_width, 3)
    assert any("will still be deblurred by the starting model" in note for note in data.notes)
    # with planes in focus, or a model without an estimator (nothing to judge a plane's width by): one network
    in_focus = [through_focus((-0.3, 0.0, 0.3, 0.6), seed=s) for s in range(2)]
    assert prepare_finetune(model, in_focus, config=config, microscope=LAB).milder_blur_below_width is None
    assert prepare_finetune(small_model(), defocused, config=config, microscope=LAB).milder_blur_below_width is None

    def fine_tune(start: MPT, below_width: float | None, gain: float) -> tuple[MPT, TrainingLog]:
        log = TrainingLog()
        log.begin(start, data.validation)
        with torch.no_grad():
            for parameter in start.parameters():
                parameter.add_(0.01)
        scores = {"psnr": log.start_psnr + gain, "ssim": 0.5, "input_psnr": 18.0, "input_ssim": 0.4}
        log.update(TrainProgress(1, 1, {"total": 1.0}, 1e-4, 1.0, 0.0, scores), start)
        log.restore_best(start, milder_blur_below_width=below_width)
        return start, log

    starting = {key: value.clone() for key, value in model.state_dict().items()}
    tuned, log = fine_tune(model, data.milder_blur_below_width, gain=1.0)
    assert not log.kept_start and tuned.milder_blur.below_width == data.milder_blur_below_width
    for key, value in starting.items():
        assert torch.equal(tuned.milder_blur.network.state_dict()[key], value)
        assert key.startswith("blur_estimator") or not torch.equal(tuned.state_dict()[key], value)
    reloaded = load_model(save_model(tuned, tmp_path / "tuned.safetensors"))
    assert reloaded.milder_blur.below_width == pytest.approx(data.milder_blur_below_width)

    # fine-tuned again: on a stack with focus the new network serves every plane; a run that does not beat its
    # start keeps the start whole, its milder-blur network too
    kept, log = fine_tune(reloaded, None, gain=0.0)
    assert log.kept_start and kept.milder_blur.below_width == pytest.approx(data.milder_blur_below_width)
    again, log = fine_tune(reloaded, None, gain=1.0)
    assert not log.kept_start and again.milder_blur is None
    assert isinstance(fine_tune(again, 1.5, gain=1.0)[0].milder_blur, MilderBlur)

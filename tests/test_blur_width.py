"""A network told the blur's width: grown with the same output, trained with each sample's width, run with one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import pattern_pairs, tiny_config
from napari_mpt_deblur import MPT, load_model, save_model
from napari_mpt_deblur.config import ConfigError, DeblurSettings, MPTConfig
from napari_mpt_deblur.data.defocus import (
    DefocusConfig,
    blur_sigma_px,
    disk_psf,
    gaussian_psf,
    make_defocused,
    widefield_psf,
)
from napari_mpt_deblur.inference import Deblurrer, InputError, deblur_array
from napari_mpt_deblur.models.grow import condition_on_blur
from napari_mpt_deblur.training.config import TrainConfig
from napari_mpt_deblur.training.engine import blur_widths_trained, train
from napari_mpt_deblur.training.patches import LabeledPairs, SyntheticPairs


def trained_like(seed: int = 0, **changes) -> MPT:
    """A tiny network with every weight random, as a trained one has."""
    torch.manual_seed(seed)
    model = MPT(tiny_config(**changes))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def test_the_width_of_a_psf_is_the_sigma_of_the_gaussian_with_its_80_percent_radius():
    assert blur_sigma_px(gaussian_psf(2.5)) == pytest.approx(2.5, rel=0.06)  # pixel rings: a little under
    assert blur_sigma_px(gaussian_psf(0.0)) == 0.0  # a delta
    # a disk holds 80 % within sqrt(0.8) of its radius
    assert blur_sigma_px(disk_psf(6.0)) == pytest.approx(6.0 * math.sqrt(0.8) / 1.7941, rel=0.05)
    mild = widefield_psf(0.5, na=0.8, wavelength_um=0.6, refractive_index=1.33, pixel_size_um=0.2)
    strong = widefield_psf(2.0, na=0.8, wavelength_um=0.6, refractive_index=1.33, pixel_size_um=0.2)
    assert 0.5 < blur_sigma_px(mild) < blur_sigma_px(strong)


def test_a_defocused_sample_records_its_blur_width():
    sharp = pattern_pairs(1, 96)[1][0]
    config = DefocusConfig(kinds=("gaussian",), gaussian_sigma=(2.0, 2.0), no_blur_probability=0.0)
    _, description = make_defocused(sharp, config, np.random.default_rng(0))
    assert description["sigma_px"] == pytest.approx(blur_sigma_px(gaussian_psf(2.0)))
    unblurred = DefocusConfig(no_blur_probability=1.0)
    _, description = make_defocused(sharp, unblurred, np.random.default_rng(0))
    assert description["kind"] == "none" and description["sigma_px"] == 0.0


def test_a_network_given_the_modulation_deblurs_as_before_with_or_without_a_width():
    model = trained_like()
    conditioned = condition_on_blur(model)
    assert conditioned.config.blur_conditioned and not model.config.blur_conditioned
    x = torch.rand(2, 1, 40, 56)
    with torch.no_grad():
        for width in (None, 0.0, 3.0, torch.tensor([1.0, float("nan")])):
            torch.testing.assert_close(conditioned(x, width), model(x), rtol=0, atol=0)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(conditioned.state_dict()[name], value, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="already takes"):
        condition_on_blur(conditioned)


def test_once_trained_the_width_changes_the_output_per_sample_and_nan_means_unknown():
    model = trained_like(blur_conditioned=True)  # its last modulation layer is random too: "trained"
    x = torch.rand(1, 1, 40, 56).expand(3, 1, 40, 56)
    with torch.no_grad():
        out = model(x, torch.tensor([1.0, 4.0, float("nan")]))
        assert not torch.allclose(out[0], out[1], atol=1e-4)
        torch.testing.assert_close(out[0:1], model(x[:1], 1.0))
        torch.testing.assert_close(out[2:3], model(x[:1]))  # NaN is what None means
        torch.testing.assert_close(model(x[:1], -2.0), model(x[:1], 0.0))  # a width is at least 0
    with pytest.raises(ValueError, match="one blur width or one per image"):
        model(x, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="takes no blur width"):
        trained_like()(x, 1.0)


def test_the_architecture_records_whether_it_takes_a_width_and_files_keep_it(tmp_path):
    with pytest.raises(ConfigError, match="blur_conditioned must be true or false"):
        tiny_config(blur_conditioned="yes")
    assert MPTConfig.from_dict({k: v for k, v in tiny_config().to_dict().items() if k != "blur_conditioned"}) == (
        tiny_config()
    )  # cards written before the field read as unconditioned
    model = trained_like(blur_conditioned=True)
    save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.config.blur_conditioned
    x = torch.rand(1, 1, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 2.0), model(x, 2.0), rtol=0, atol=0)


def test_deblurring_passes_the_width_and_refuses_it_for_a_model_that_takes_none():
    with pytest.raises(ConfigError, match="blur_sigma_px must be between 0 and 32"):
        DeblurSettings(blur_sigma_px=-1.0)
    with pytest.raises(ConfigError, match="finite number"):
        DeblurSettings(blur_sigma_px=float("nan"))
    with pytest.raises(InputError, match="takes no blur width"):
        Deblurrer(trained_like(), DeblurSettings(blur_sigma_px=2.0, device="cpu"))
    model = trained_like(blur_conditioned=True)
    plane = pattern_pairs(1, 64)[0][0]
    outputs = {}
    for width in (None, 1.0, 5.0):
        settings = DeblurSettings(tile=0, device="cpu", precision="fp32", blur_sigma_px=width)
        outputs[width] = deblur_array(model, plane, axes="YX", settings=settings)
    assert np.abs(outputs[1.0] - outputs[5.0]).max() > 1e-4
    assert np.abs(outputs[None] - outputs[1.0]).max() > 1e-4
    # tiled, the width reaches every tile
    tiled = deblur_array(model, plane, axes="YX", settings=DeblurSettings(tile=32, device="cpu", blur_sigma_px=5.0))
    assert np.abs(tiled - outputs[5.0]).mean() < np.abs(tiled - outputs[1.0]).mean()


def test_synthetic_pairs_report_each_samples_width_without_changing_the_draws():
    sharp = pattern_pairs(2, 96)[1]
    config = DefocusConfig(kinds=("gaussian",), gaussian_sigma=(0.5, 4.0), no_blur_probability=0.3, noise_probability=0)
    sampler = SyntheticPairs(sharp, config, margin=16)
    blurry, target = sampler.sample(np.random.default_rng(3), 6, 32, (1.0, 1.0))
    again, target_again, widths = sampler.sample_with_widths(np.random.default_rng(3), 6, 32, (1.0, 1.0))
    np.testing.assert_array_equal(blurry, again)
    np.testing.assert_array_equal(target, target_again)
    assert widths.shape == (6,) and widths.dtype == np.float32
    assert ((widths == 0) | ((widths > 0.4) & (widths < 4.2))).all()
    # a sample's width is its blur's: the unblurred ones are their targets, plus nothing
    unblurred = widths == 0
    assert unblurred.any() and (~unblurred).any()
    np.testing.assert_allclose(again[unblurred], target_again[unblurred], atol=1e-5)


def test_training_gives_samples_their_widths_and_withholds_some(tmp_path, monkeypatch):
    sharp = pattern_pairs(2, 96)[1]
    config = DefocusConfig(kinds=("gaussian",), gaussian_sigma=(0.5, 4.0), no_blur_probability=0.0)
    sampler = SyntheticPairs(sharp, config, margin=16)
    model = condition_on_blur(trained_like())
    recipe = TrainConfig(
        steps=6, batch_size=4, patch_size=32, scale_range=(1.0, 1.0), lr=1e-3, efcr_beta=0.0, device="cpu"
    )
    assert blur_widths_trained(model, sampler, recipe)
    assert not blur_widths_trained(model, sampler, recipe.replace(efcr_beta=0.1))
    assert not blur_widths_trained(model, LabeledPairs(*pattern_pairs(2, 64)), recipe)
    assert not blur_widths_trained(trained_like(), sampler, recipe)
    seen = []
    forward = MPT.forward

    def recording(self, x, blur_sigma_px=None):
        seen.append(None if blur_sigma_px is None else blur_sigma_px.clone())
        return forward(self, x, blur_sigma_px)

    monkeypatch.setattr(MPT, "forward", recording)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = train(model, sampler, tmp_path / "m.safetensors", recipe)
    given = torch.cat([w for w in seen if w is not None and w.numel() > 0])
    assert given.numel() == 6 * 4  # every sample of every step, the shards together
    known = given[torch.isfinite(given)]
    assert 0 < known.numel() < given.numel()  # a quarter withheld, on average
    assert ((known > 0.4) & (known < 4.2)).all()
    # the modulation learned: its last layer is no longer zero
    assert not torch.equal(
        trained.state_dict()["blur_modulation.project.weight"], before["blur_modulation.project.weight"]
    )
    assert load_model(tmp_path / "m.safetensors").config.blur_conditioned


def test_cli_grows_a_blur_width_input_and_deblurs_with_one(tmp_path, capsys):
    import tifffile

    from napari_mpt_deblur.cli import main

    source = tmp_path / "trained.safetensors"
    save_model(trained_like(), source)
    grown = tmp_path / "grown.safetensors"
    assert main(["grow", str(source), "-o", str(grown), "--blur-width"]) == 0
    assert "a blur-width input" in capsys.readouterr().out
    assert load_model(grown).card.provenance["grown"] == "blur width"
    assert main(["grow", str(source), "-o", str(tmp_path / "x.safetensors"), "--blur-width", "--level", "1"]) == 2
    assert main(["grow", str(source), "-o", str(tmp_path / "y.safetensors")]) == 2  # neither blocks nor width

    image = tmp_path / "in.tif"
    tifffile.imwrite(image, (pattern_pairs(1, 64)[0][0] * 1000).astype(np.uint16))
    out = tmp_path / "out.tif"
    common = ["deblur", str(image), "-o", str(out), "--device", "cpu", "--quiet"]
    assert main([*common, "--model", str(grown), "--blur-sigma", "2.5"]) == 0
    assert out.exists()
    capsys.readouterr()
    assert main([*common, "--model", str(source), "--blur-sigma", "2.5", "--overwrite"]) == 2
    assert "takes no blur width" in capsys.readouterr().err


def test_a_model_that_takes_the_width_fine_tunes_on_a_users_stack_without_widths(tmp_path):
    from napari_mpt_deblur.config import Microscope
    from napari_mpt_deblur.data.defocus import add_poisson_gaussian_noise, blur
    from napari_mpt_deblur.training.finetune import FINETUNE_DEFAULTS, TrainingLog, prepare_finetune, run_finetune

    lab = Microscope(na=1.4, medium="oil", wavelength_um=0.52, pixel_size_um=0.1, z_step_um=0.3)
    truth = pattern_pairs(1, 96, discs=20)[1][0]
    rng = np.random.default_rng(0)
    stack = np.stack(
        [
            add_poisson_gaussian_noise(blur(truth, widefield_psf(z, **lab.optics())), 2000.0, 0.002, rng)
            for z in (-0.6, -0.3, 0.0, 0.3, 0.6, 0.9, 1.2, 1.5)
        ]
    )
    model = condition_on_blur(trained_like())
    config = FINETUNE_DEFAULTS.replace(patch_size=32, batch_size=2, steps=2, validate_every=1)
    data = prepare_finetune(model, [stack, stack[::-1]], config=config, microscope=lab)
    # the pairs come with the starting model's anchors, whose blur is unknown: no widths, the unknown path trains
    assert not blur_widths_trained(model, data.sampler, data.config)
    events = list(run_finetune(model, data, tmp_path / "tuned.safetensors", TrainingLog()))
    assert [event.step for event in events] == [1, 2]
    assert model.config.blur_conditioned  # still takes a width after the fine-tune


def test_suite_validation_scores_a_conditioned_model_told_and_not_told_and_keeps_it_only_if_both_hold():
    from napari_mpt_deblur.training.suite import SuiteValidation, suite_cases

    cases = suite_cases({"cells": pattern_pairs(1, 64)[1][0]})
    validation = SuiteValidation(cases, orientations=1)
    plain = validation.evaluate(trained_like(), torch.device("cpu"))
    assert not any(key.startswith("judged") for key in plain)
    scores = validation.evaluate(trained_like(blur_conditioned=True), torch.device("cpu"))
    assert {"judged psnr", "judged worst_gain_db", "judged mean_gain_db", "judged gain_db mild"} <= set(scores)
    assert scores["judged psnr"] != pytest.approx(scores["psnr"], abs=1e-4)  # the width changes the output
    both_hold = {**scores, "worst_gain_db": 0.0, "judged worst_gain_db": 0.5}
    expected = (scores["mean_gain_db"] + scores["judged mean_gain_db"]) / 2
    assert validation.selection_score(both_hold) == pytest.approx(expected)
    assert validation.selection_score({**both_hold, "judged worst_gain_db": -0.1}) is None
    assert validation.selection_score({**both_hold, "worst_gain_db": -0.1}) is None

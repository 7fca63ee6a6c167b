"""Held-out defocus evaluation shared by the training benchmarks.

Sharp planes are defocused with the widefield PSF at fixed distances, with mild
Poisson-Gaussian noise and a fixed seed, then restored by a model, by
Richardson-Lucy deconvolution given the true PSF (best of 5/10/20/40
iterations, scored against the truth: an upper bound on what it can do), by
Richardson-Lucy given a Gaussian of the PSF's width, and by a tuned Wiener
filter (``classical``).
PSNR/SSIM use a data range of 1 on planes normalised to 0..1.
"""

from __future__ import annotations

import numpy as np
from classical import best_richardson_lucy, best_wiener, gaussian_of_width

from napari_mpt_deblur.training.suite import normalise, per_channel

STRENGTHS_UM = (1.0, 2.0, 3.0)
"""Defocus distances (widefield PSF, NA 0.8, 520 nm, n 1.33, 0.2 um pixels)."""

PHOTONS = 2000.0
READ_NOISE = 0.005
RL_ITERATIONS = (5, 10, 20, 40)


def defocus_cases(
    images: dict[str, np.ndarray], strengths: tuple[float, ...] = STRENGTHS_UM, seed: int = 7
) -> list[dict]:
    """Every image defocused at every strength. RGB images (Y, X, 3) are blurred per channel."""
    from napari_mpt_deblur.data.defocus import add_poisson_gaussian_noise, blur, widefield_psf

    rng = np.random.default_rng(seed)
    cases = []
    for name, image in images.items():
        sharp = normalise(image.astype(np.float32))
        for strength in strengths:
            psf = widefield_psf(strength)
            blurred = per_channel(sharp, lambda plane, psf=psf: blur(plane, psf))
            blurry = add_poisson_gaussian_noise(blurred, photons=PHOTONS, read_noise=READ_NOISE, rng=rng)
            cases.append({"image": name, "defocus_um": strength, "sharp": sharp, "blurry": blurry, "psf": psf})
    return cases


def scores(output: np.ndarray, sharp: np.ndarray) -> tuple[float, float]:
    """(PSNR dB, SSIM) of ``output`` against ``sharp``; both in 0..1."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    output = output.astype(np.float64)
    channel_axis = -1 if sharp.ndim == 3 else None
    return (
        float(peak_signal_noise_ratio(sharp, output, data_range=1.0)),
        float(structural_similarity(sharp, output, data_range=1.0, channel_axis=channel_axis)),
    )


def richardson_lucy_best(
    blurry: np.ndarray, psf: np.ndarray, sharp: np.ndarray
) -> tuple[float, float, int, np.ndarray]:
    """(PSNR, SSIM, iterations, restored image) of the best Richardson-Lucy result given the true PSF."""
    from skimage.restoration import richardson_lucy

    best = None
    for iterations in RL_ITERATIONS:
        restored = per_channel(
            np.clip(blurry, 0, None).astype(np.float64),
            lambda plane, n=iterations: richardson_lucy(plane, psf, num_iter=n, clip=False),
        )
        psnr, ssim = scores(restored, sharp)
        if best is None or psnr > best[0]:
            best = (psnr, ssim, iterations, restored)
    return best


def evaluate(model, cases: list[dict], with_rl: bool = True, device: str = "cpu") -> list[dict]:
    """Input, model output (fp32 on ``device``) and (optionally) Richardson-Lucy scores for every case."""
    from napari_mpt_deblur.config import DeblurSettings
    from napari_mpt_deblur.inference import deblur_array

    rows = []
    for case in cases:
        axes = "YXS" if case["blurry"].ndim == 3 else "YX"
        settings = DeblurSettings(tile=0, device=device, precision="fp32")
        output = deblur_array(model, case["blurry"], axes=axes, settings=settings)
        row = {
            "image": case["image"],
            "defocus_um": case["defocus_um"],
            "input": scores(case["blurry"], case["sharp"]),
            "mpt": scores(output, case["sharp"]),
        }
        if with_rl:
            rl = richardson_lucy_best(case["blurry"], case["psf"], case["sharp"])
            row["richardson_lucy"], row["rl_iterations"] = rl[:2], rl[2]
            # the baselines without the true PSF's shape: a Gaussian of its width, and a tuned Wiener filter
            score = lambda out, sharp: scores(out, sharp)[0]  # noqa: E731
            gaussian = best_richardson_lucy(case["blurry"], gaussian_of_width(case["psf"]), case["sharp"], score)
            row["rl_gaussian"] = scores(gaussian["output"], case["sharp"])
            wiener = best_wiener(case["blurry"], case["psf"], case["sharp"], score)
            row["wiener"] = scores(wiener["output"], case["sharp"])
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    """One line per case: PSNR of input, model and the classical baselines, then SSIM of each.

    RL is Richardson-Lucy with the true PSF, RLg with a Gaussian of the PSF's width, W a tuned Wiener filter.
    """
    names = [("input", "in"), ("mpt", "MPT")]
    names += [(key, label) for key, label in (("richardson_lucy", "RL"), ("rl_gaussian", "RLg"), ("wiener", "W"))]
    names = [(key, label) for key, label in names if key in rows[0]]
    header = [f"{label} dB" for _, label in names] + [f"{label} SSIM" for _, label in names]
    print(f"{'image':34s} {'defocus':>8s} " + " ".join(f"{h:>9s}" for h in header))
    for row in rows:
        values = [row[key][0] for key, _ in names] + [row[key][1] for key, _ in names]
        print(f"{row['image']:34s} {row['defocus_um']:8.1f} " + " ".join(f"{v:9.3f}" for v in values))
    gain = float(np.mean([r["mpt"][0] - r["input"][0] for r in rows]))
    print(f"mean PSNR gain over the input: {gain:+.2f} dB")

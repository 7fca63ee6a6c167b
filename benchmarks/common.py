"""What the benchmark scripts share: classical restorations and a held-out defocus evaluation.

The scripts import it as ``from common import ...``: Python puts a script's own folder
first on ``sys.path`` (``python benchmarks/NAME.py``), so no path needs adding.

Classical restorations, the baselines biologists use next to the network:

* Richardson-Lucy deconvolution given the true PSF, and given a Gaussian of the
  PSF's width (the usual stand-in when the PSF is not measured): the best of
  several iteration counts, scored against the truth, so an upper bound on what
  each can do.
* A Wiener filter given the true PSF, its noise-to-signal ratio tuned against the
  truth (again an upper bound).

Every convolution reflects the image at its borders
(``napari_mpt_deblur.data.defocus.blur``), as the degradation did.

The defocus evaluation (:func:`defocus_cases`, :func:`evaluate`): sharp planes are
defocused with the widefield PSF at fixed distances, with mild Poisson-Gaussian
noise and a fixed seed, then restored by a model, by scikit-image's
Richardson-Lucy given the true PSF (best of 5/10/20/40 iterations, scored against
the truth), by Richardson-Lucy given a Gaussian of the PSF's width, and by a
tuned Wiener filter. PSNR/SSIM use a data range of 1 on planes normalised to 0..1.
"""

from __future__ import annotations

import numpy as np

from napari_mpt_deblur.training.suite import normalise, per_channel

# --- classical restorations -------------------------------------------------------------------------------------------

RL_ITERATIONS = (5, 10, 20, 40, 70, 100)
"""Iteration counts at which Richardson-Lucy is scored (one run, read out along the way)."""

WIENER_NSR = tuple(np.logspace(-4, -0.5, 15))
"""Noise-to-signal ratios the Wiener filter is tuned over."""


def add_width_argument(parser, default: str = "given", told: str = "the PSF's, as RL with a Gaussian is") -> None:
    """``--width given|judged``: whether a model that takes the blur's width is told it (``told`` says what)."""
    from napari_mpt_deblur.training.suite import WIDTHS

    parser.add_argument(
        "--width",
        choices=WIDTHS,
        default=default,
        help=f"a model that takes the blur's width is told {told} (given) or judges it from the image (judged)",
    )


def width_label(model, width: str) -> str:
    """``", blur width given"`` (or ``judged``) for a model that takes the width, for a report's header; else ``""``."""
    return f", blur width {width}" if model.config.blur_conditioned else ""


def gaussian_of_width(psf: np.ndarray) -> np.ndarray:
    """The Gaussian with the PSF's 80 %-encircled-energy radius (a Gaussian holds 80 % within 1.794 sigma)."""
    from napari_mpt_deblur.data.defocus import blur_sigma_px, gaussian_psf

    return gaussian_psf(max(blur_sigma_px(psf), 0.0), size=psf.shape[0])


def richardson_lucy(blurry: np.ndarray, psf: np.ndarray, iterations=RL_ITERATIONS):
    """Richardson-Lucy estimates of a plane at each of ``iterations`` (yields ``(count, estimate)``)."""
    from napari_mpt_deblur.data.defocus import blur

    observed = np.clip(blurry, 1e-6, None).astype(np.float64)
    flipped = psf[::-1, ::-1]
    estimate = np.full_like(observed, observed.mean())
    done = 0
    for target in sorted(iterations):
        while done < target:
            ratio = observed / np.maximum(blur(estimate, psf).astype(np.float64), 1e-6)
            estimate = estimate * blur(ratio, flipped)
            done += 1
        yield target, estimate.astype(np.float32)


def wiener(blurry: np.ndarray, psf: np.ndarray, nsr: float) -> np.ndarray:
    """Wiener deconvolution of a plane with a constant noise-to-signal ratio (reflected borders)."""
    height, width = blurry.shape
    half = psf.shape[0] // 2
    padded = np.pad(blurry.astype(np.float64), half, mode="symmetric")
    kernel = np.zeros(padded.shape)
    kernel[: psf.shape[0], : psf.shape[1]] = psf
    kernel = np.roll(kernel, (-half, -half), axis=(0, 1))  # the PSF's centre at the origin: no shift
    transfer = np.fft.rfft2(kernel)
    restored = np.fft.irfft2(np.fft.rfft2(padded) * np.conj(transfer) / (np.abs(transfer) ** 2 + nsr), padded.shape)
    return restored[half : half + height, half : half + width].astype(np.float32)


def best_richardson_lucy(blurry: np.ndarray, psf: np.ndarray, sharp: np.ndarray, score) -> dict:
    """The best Richardson-Lucy result over :data:`RL_ITERATIONS`: ``{"output", "iterations", "psnr"}``."""
    channels = [blurry] if blurry.ndim == 2 else [blurry[..., c] for c in range(blurry.shape[-1])]
    runs = [list(richardson_lucy(plane, psf)) for plane in channels]
    best = None
    for index, count in enumerate(sorted(RL_ITERATIONS)):
        planes = [run[index][1] for run in runs]
        output = planes[0] if blurry.ndim == 2 else np.stack(planes, axis=-1)
        value = score(output, sharp)
        if best is None or value > best["psnr"]:
            best = {"output": output, "iterations": count, "psnr": value}
    return best


def best_wiener(blurry: np.ndarray, psf: np.ndarray, sharp: np.ndarray, score) -> dict:
    """The best Wiener result over :data:`WIENER_NSR`: ``{"output", "nsr", "psnr"}``."""
    best = None
    for nsr in WIENER_NSR:
        output = per_channel(blurry, lambda plane, nsr=nsr: wiener(plane, psf, nsr))
        value = score(output, sharp)
        if best is None or value > best["psnr"]:
            best = {"output": output, "nsr": float(nsr), "psnr": value}
    return best


# --- the defocus evaluation -------------------------------------------------------------------------------------------

STRENGTHS_UM = (1.0, 2.0, 3.0)
"""Defocus distances (widefield PSF, NA 0.8, 520 nm, n 1.33, 0.2 um pixels)."""

PHOTONS = 2000.0
READ_NOISE = 0.005
SKIMAGE_RL_ITERATIONS = (5, 10, 20, 40)
"""Iteration counts at which scikit-image's Richardson-Lucy is scored in the defocus evaluation."""


def heaviest_window(weights: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner of the ``size`` x ``size`` window of a 2-D array with the largest sum (box sums of an
    integral image)."""
    integral = np.pad(weights, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    boxes = integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size]
    y, x = np.unravel_index(int(np.argmax(boxes)), boxes.shape)
    return int(y), int(x)


def defocus_cases(
    images: dict[str, np.ndarray], strengths: tuple[float, ...] = STRENGTHS_UM, seed: int = 7, zoom: float = 1.0
) -> list[dict]:
    """Every image defocused at every strength. RGB images (Y, X, 3) are blurred per channel.

    ``zoom`` enlarges the images first (cubic) and gives the PSF pixels ``zoom`` times finer, so
    the same micrometres of defocus are seen on larger objects.
    """
    from napari_mpt_deblur.data.defocus import add_poisson_gaussian_noise, blur, widefield_psf

    rng = np.random.default_rng(seed)
    cases = []
    for name, image in images.items():
        sharp = normalise(image.astype(np.float32))
        if zoom != 1.0:
            from skimage.transform import rescale

            sharp = np.clip(rescale(sharp, zoom, order=3, channel_axis=-1 if sharp.ndim == 3 else None), 0, 1)
            sharp = sharp.astype(np.float32)
        for strength in strengths:
            psf = widefield_psf(strength, pixel_size_um=0.2 / zoom)
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


def best_skimage_richardson_lucy(
    blurry: np.ndarray, psf: np.ndarray, sharp: np.ndarray
) -> tuple[float, float, int, np.ndarray]:
    """(PSNR, SSIM, iterations, restored image) of scikit-image's best Richardson-Lucy result given ``psf``.

    The best of :data:`SKIMAGE_RL_ITERATIONS` by PSNR against ``sharp`` (an upper bound on what it can do).
    """
    from skimage.restoration import richardson_lucy as skimage_richardson_lucy

    best = None
    for iterations in SKIMAGE_RL_ITERATIONS:
        restored = per_channel(
            np.clip(blurry, 0, None).astype(np.float64),
            lambda plane, n=iterations: skimage_richardson_lucy(plane, psf, num_iter=n, clip=False),
        )
        psnr, ssim = scores(restored, sharp)
        if best is None or psnr > best[0]:
            best = (psnr, ssim, iterations, restored)
    return best


def evaluate(model, cases: list[dict], with_rl: bool = True, device: str = "cpu", width: str = "given") -> list[dict]:
    """Input, model output (fp32 on ``device``) and (optionally) Richardson-Lucy scores for every case.

    A model that takes the blur's width is told the PSF's (``width="given"``, as Richardson-Lucy with a
    Gaussian is) or judges it from the image (``"judged"``).
    """
    from napari_mpt_deblur.config import DeblurSettings
    from napari_mpt_deblur.inference import deblur_array
    from napari_mpt_deblur.training.suite import told_width

    rows = []
    for case in cases:
        axes = "YXS" if case["blurry"].ndim == 3 else "YX"
        sigma = told_width(model, case["psf"], width)
        settings = DeblurSettings(tile=0, device=device, precision="fp32", blur_sigma_px=sigma)
        output = deblur_array(model, case["blurry"], axes=axes, settings=settings)
        row = {
            "image": case["image"],
            "defocus_um": case["defocus_um"],
            "input": scores(case["blurry"], case["sharp"]),
            "mpt": scores(output, case["sharp"]),
        }
        if with_rl:
            rl = best_skimage_richardson_lucy(case["blurry"], case["psf"], case["sharp"])
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

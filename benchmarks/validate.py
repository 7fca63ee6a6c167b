"""Validate a model on the held-out suite, next to the classical restorations.

The suite (``napari_mpt_deblur.training.suite``) is eight images no model trains
on (fluorescence, colour histology, brightfield, a soft retina photograph, sparse
puncta, small soft nuclei), each through its own microscope at five strengths (in focus, mild,
moderate, strong widefield defocus, and a pillbox), with fixed, seeded noise.
For every strength the table gives mean PSNR and SSIM of:

* the blurry input;
* the model (whole planes, fp32; colour channel by channel); a model that takes the blur's
  width is given it, as Richardson-Lucy with a Gaussian is (``--width judged``: not given, so
  a model with its own estimator uses its estimate, and ``--per-case`` lists the estimates);
* Richardson-Lucy given the true PSF (best of 5-100 iterations, scored against the truth);
* Richardson-Lucy given a Gaussian of the PSF's 80 %-energy width (best iterations);
* a Wiener filter given the true PSF (noise-to-signal ratio tuned against the truth).

The model sees every case in its eight orientations (quarter turns, each also
mirrored; ``training.suite.ORIENTATIONS``): its row is the mean over them, and a
case counts as worse than its input when any orientation is. The classical
methods, their PSFs symmetric, give the same figures in every orientation.

It then names every case where the model is worse than its input and every
strength where it is behind Richardson-Lucy with the Gaussian, and writes a crop
gallery (PNG) of the worst case: truth, input, model, Richardson-Lucy, so
artefacts are seen and not averaged away. The classical figures do not depend on
the model: they are cached (``--baselines``) and recomputed when the suite changes.
``--against`` compares the model with another one's ``--json``, image by image: a
strength's mean can rise on one image while others fall.

Examples::

    python benchmarks/validate.py --model default
    python benchmarks/validate.py --model default --width judged
    python benchmarks/validate.py --model est.safetensors --width judged --per-case   # and its width estimates
    python benchmarks/validate.py --model default --width-error 0.75 --orientations 1
    python benchmarks/validate.py --model est.safetensors --width judged --width-margin 2 --orientations 1
    python benchmarks/validate.py --model candidate.safetensors --against default.json
    python benchmarks/validate.py --model run.best.safetensors \\
        --json runs/suite.json --gallery runs/worst.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from common import (
    add_width_argument,
    best_richardson_lucy,
    best_wiener,
    gaussian_of_width,
    heaviest_window,
    width_label,
)

METHODS = ("input", "model", "rl_true", "rl_gaussian", "wiener")
LABELS = {
    "input": "input",
    "model": "model",
    "rl_true": "RL true PSF",
    "rl_gaussian": "RL Gaussian",
    "wiener": "Wiener",
}
DEFAULT_BASELINES = Path(__file__).parent / "baselines" / "suite-classical.json"


def ssim(output: np.ndarray, sharp: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    channel_axis = -1 if sharp.ndim == 3 else None
    output = np.clip(output, 0, 1).astype(np.float64)
    return float(structural_similarity(sharp.astype(np.float64), output, data_range=1.0, channel_axis=channel_axis))


def classical_rows(cases, cache: Path, recompute: bool) -> list[dict]:
    """Input, Richardson-Lucy and Wiener figures per case, from the cache when it is of this suite."""
    from napari_mpt_deblur.training.suite import SUITE_VERSION, psnr

    if cache.exists() and not recompute:
        stored = json.loads(cache.read_text())
        if stored.get("suite_version") == SUITE_VERSION and len(stored["rows"]) == len(cases):
            return stored["rows"]
    rows = []
    for number, case in enumerate(cases, 1):
        started = time.perf_counter()
        row = {"image": case.image, "strength": case.strength}
        row["input"] = [psnr(case.blurry, case.sharp), ssim(case.blurry, case.sharp)]
        for name, psf in (("rl_true", case.psf), ("rl_gaussian", gaussian_of_width(case.psf))):
            best = best_richardson_lucy(case.blurry, psf, case.sharp, psnr)
            row[name] = [best["psnr"], ssim(best["output"], case.sharp)]
            row[f"{name}_iterations"] = best["iterations"]
        best = best_wiener(case.blurry, case.psf, case.sharp, psnr)
        row["wiener"], row["wiener_nsr"] = [best["psnr"], ssim(best["output"], case.sharp)], best["nsr"]
        rows.append(row)
        print(
            f"  classical {number}/{len(cases)}: {case.image}, {case.strength} ({time.perf_counter() - started:.1f} s)"
        )
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"suite_version": SUITE_VERSION, "rows": rows}, indent=1))
    return rows


def print_tables(rows: list[dict], per_case: bool) -> None:
    strengths = list(dict.fromkeys(row["strength"] for row in rows))
    header = " ".join(f"{LABELS[m]:>12s}" for m in METHODS)
    for metric, index in (("PSNR dB", 0), ("SSIM", 1)):
        print(f"\nmean {metric} over {len(rows) // len(strengths)} images")
        print(f"{'strength':10s} {header}")
        for strength in strengths:
            chosen = [row for row in rows if row["strength"] == strength]
            means = [np.mean([row[m][index] for row in chosen]) for m in METHODS]
            print(f"{strength:10s} " + " ".join(f"{v:12.3f}" if index else f"{v:12.2f}" for v in means))
    if per_case:
        print("\nPSNR dB per case (model: mean over orientations, then its worst)")
        print(f"{'image':48s} {'strength':10s} {header} {'model worst':>12s}")
        for row in rows:
            figures = " ".join(f"{row[m][0]:12.2f}" for m in METHODS)
            print(f"{row['image']:48s} {row['strength']:10s} {figures} {row['model_worst'][0]:12.2f}")


def record_estimates(model, cases, rows: list[dict]) -> None:
    """Each case's true blur width and the model's own estimate of it (as stored; colour: mean of the channels)."""
    from napari_mpt_deblur.data.defocus import blur_sigma_px
    from napari_mpt_deblur.inference import estimate_blur_width

    for case, row in zip(cases, rows):
        planes = [case.blurry] if case.blurry.ndim == 2 else [case.blurry[..., c] for c in range(case.blurry.shape[-1])]
        row["width_true"] = blur_sigma_px(case.psf)
        row["width_estimated"] = float(np.mean([estimate_blur_width(model, plane) for plane in planes]))


def print_estimates(rows: list[dict]) -> None:
    ratios = np.array([row["width_estimated"] / row["width_true"] for row in rows])
    print("\nblur width (px): true, and the model's own estimate (as stored)")
    for row in rows:
        true, estimated = row["width_true"], row["width_estimated"]
        print(f"{row['image']:48s} {row['strength']:10s} {true:6.2f} {estimated:6.2f} x{estimated / true:.2f}")
    print(
        f"estimate / true: median x{np.median(ratios):.2f}, from x{ratios.min():.2f} to x{ratios.max():.2f}; "
        f"above the true width in {int((ratios > 1).sum())} of {len(ratios)} cases"
    )


def verdict(rows: list[dict]) -> dict:
    """What the targets ask: never below the input, above RL with a Gaussian at every strength."""
    below_input = [
        f"{r['image']}, {r['strength']}: {r['model_worst'][0] - r['input'][0]:+.2f} dB"
        f" (orientation {r['model_worst'][1]}; mean over orientations {r['model'][0] - r['input'][0]:+.2f} dB)"
        for r in rows
        if r["model_worst"][0] < r["input"][0]
    ]
    strengths = list(dict.fromkeys(row["strength"] for row in rows))
    behind_gaussian, behind_true = [], []
    for strength in strengths:
        chosen = [row for row in rows if row["strength"] == strength]
        model = np.mean([row["model"][0] for row in chosen])
        for name, bucket in (("rl_gaussian", behind_gaussian), ("rl_true", behind_true)):
            other = np.mean([row[name][0] for row in chosen])
            if model < other:
                bucket.append(f"{strength}: {model - other:+.2f} dB")
    print("\nworse than its input:", "; ".join(below_input) if below_input else "never")
    print("behind RL with a Gaussian of the PSF's width:", "; ".join(behind_gaussian) if behind_gaussian else "nowhere")
    print("behind RL with the true PSF:", "; ".join(behind_true) if behind_true else "nowhere")
    return {"below_input": below_input, "behind_rl_gaussian": behind_gaussian, "behind_rl_true": behind_true}


def paired(rows: list[dict], earlier: dict) -> dict:
    """Per image and per strength, the model's mean PSNR against another model's on the same suite.

    ``earlier`` is that model's ``--json`` file. Means over strengths (or images) hide an image the
    model loses on when another carries the mean: a new default must not trade one kind for another.
    """
    theirs = {(row["image"], row["strength"]): row["model"][0] for row in earlier["rows"]}
    missing = [key for key in ((r["image"], r["strength"]) for r in rows) if key not in theirs]
    if missing:
        raise SystemExit(f"--against {earlier['model']}: a suite without {missing[0]}; rerun it on this suite")
    change = {(r["image"], r["strength"]): r["model"][0] - theirs[(r["image"], r["strength"])] for r in rows}
    per_image, per_strength = ({key[part]: 0.0 for key in change} for part in (0, 1))
    for part, means in ((0, per_image), (1, per_strength)):
        for name in means:
            means[name] = float(np.mean([d for key, d in change.items() if key[part] == name]))
    print(f"\nagainst {earlier['model']}: mean PSNR change, dB")
    for image, d in per_image.items():
        print(f"{image[:58]:58s} {d:+6.2f}")
    print("per strength: " + "; ".join(f"{s} {d:+.2f}" for s, d in per_strength.items()))
    cases_behind, images_behind = (sum(d < 0 for d in values) for values in (change.values(), per_image.values()))
    print(f"behind it on {cases_behind} of {len(change)} cases, on {images_behind} of {len(per_image)} images")
    return {"against": earlier["model"], "change_per_image": per_image, "change_per_strength": per_strength}


def gallery(case, output: np.ndarray, path: Path, crop: int = 96) -> None:
    """Truth, input, model and Richardson-Lucy (true PSF) crops where the model's error is largest."""
    from skimage.io import imsave

    from napari_mpt_deblur.training.suite import psnr

    rl = best_richardson_lucy(case.blurry, case.psf, case.sharp, psnr)["output"]
    error = np.abs(np.clip(output, 0, 1) - case.sharp)
    error = error.mean(axis=-1) if error.ndim == 3 else error
    size = min(crop, *error.shape)
    y, x = heaviest_window(error, size)  # the crop with the largest summed error
    panels = [np.clip(image[y : y + size, x : x + size], 0, 1) for image in (case.sharp, case.blurry, output, rl)]
    gap = np.ones((size, 4) + panels[0].shape[2:], np.float32)
    strip = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)
    strip = np.repeat(np.repeat(strip, 3, axis=0), 3, axis=1)  # nearest-neighbour zoom: pixels stay visible
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, (strip * 255).round().astype(np.uint8), check_contrast=False)
    print(f"gallery of the worst case ({case.image}, {case.strength}): truth | input | model | RL true PSF -> {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default' or a model file")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--baselines", type=Path, default=DEFAULT_BASELINES, help="cache of the classical figures")
    parser.add_argument("--recompute-baselines", action="store_true")
    parser.add_argument("--per-case", action="store_true", help="also print PSNR per image and strength")
    parser.add_argument("--gallery", type=Path, default=Path("benchmarks/results/suite-worst.png"))
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument(
        "--orientations", type=int, default=None, help="orientations per case (default: all 8; 1: as stored, faster)"
    )
    add_width_argument(parser, told="each case's, as RL with a Gaussian is")
    parser.add_argument(
        "--width-error",
        type=float,
        default=1.0,
        metavar="FACTOR",
        help="with --width given: tell the model each case's width times FACTOR (an estimate that is off)",
    )
    parser.add_argument(
        "--width-margin",
        type=float,
        metavar="MARGIN",
        help="for a model that takes the width: read every width it is given MARGIN times wider instead of its "
        "file's margin (to choose one for mpt-deblur set-margin)",
    )
    parser.add_argument(
        "--against",
        type=Path,
        metavar="JSON",
        help="another model's --json on this suite: print the change per image and per strength against it",
    )
    args = parser.parse_args()
    earlier = json.loads(args.against.read_text()) if args.against else None  # a bad file fails before the work

    import torch

    from napari_mpt_deblur import load_model
    from napari_mpt_deblur.config import ConfigError
    from napari_mpt_deblur.models.grow import with_width_margin
    from napari_mpt_deblur.training.suite import ORIENTATIONS, deblur_case, psnr, suite_cases

    orientations = args.orientations or ORIENTATIONS
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = suite_cases()
    rows = classical_rows(cases, args.baselines, args.recompute_baselines)
    model = load_model(args.model)
    if args.width_margin is not None:
        try:
            model = with_width_margin(model, args.width_margin)
        except ConfigError as error:
            parser.error(f"--width-margin: {error}")
    worst_outputs = []
    for case, row in zip(cases, rows):
        outputs = [deblur_case(model, case, args.device, k, args.width, args.width_error) for k in range(orientations)]
        scores = [(psnr(output, case.sharp), ssim(output, case.sharp)) for output in outputs]
        row["model"] = [float(np.mean([p for p, _ in scores])), float(np.mean([s for _, s in scores]))]
        row["model_orientations"] = [p for p, _ in scores]
        worst_orientation = int(np.argmin(row["model_orientations"]))
        row["model_worst"] = [scores[worst_orientation][0], worst_orientation]
        worst_outputs.append(outputs[worst_orientation])
    if model.config.blur_estimator and args.width == "judged":
        record_estimates(model, cases, rows)
    width = width_label(model, args.width)
    if model.config.blur_conditioned and args.width == "given" and args.width_error != 1:
        width += f" x {args.width_error:g}"
    if model.config.blur_conditioned and model.config.width_margin != 1:
        width += f", read x{model.config.width_margin:g} wider"
    step = model.card.provenance.get("step", "?")
    print(f"model {args.model} (step {step}), {orientations} orientations per case{width}")
    print_tables(rows, args.per_case)
    if args.per_case and "width_estimated" in rows[0]:
        print_estimates(rows)
    result = verdict(rows)
    if earlier:
        result.update(paired(rows, earlier))
    worst = min(range(len(rows)), key=lambda i: rows[i]["model_worst"][0] - rows[i]["input"][0])
    gallery(cases[worst], worst_outputs[worst], args.gallery)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        told = {"width": args.width, "width_margin": model.config.width_margin} if model.config.blur_conditioned else {}
        args.json.write_text(json.dumps({"model": args.model, **told, "rows": rows, **result}, indent=1))


if __name__ == "__main__":
    main()

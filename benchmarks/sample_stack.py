"""The plugin's sample stack through a model: PSNR per plane against its truth, and crops to look at.

The sample (``mpt-deblur sample cells``, napari's File > Open Sample) is
scikit-image's ``cell`` seen through a 0.8 NA widefield microscope at nine
distances from focus (-3 to +3 um), with camera noise. This script deblurs the
stack as a user would (the inference engine on the uint16 counts, default
settings), converts every plane back to intensity (counts minus the offset, over
the photons at full scale) and scores it against the noise-free truth, next to
Richardson-Lucy given the true PSF and given a Gaussian of its width (each the
best of 5-100 iterations, scored against the truth). The planes at +z and -z
share their PSF, so the table has one row per distance, the mean of the two.
A model that takes the blur's width judges it from the image, as in the Deblur
dock by default; ``--width given`` tells it each plane's PSF width instead
(plane by plane, as a user who knows the defocus of each would).

It then writes a crop gallery: for the in-focus plane, 1.5 um and 3 um, the
truth, the input, the model and Richardson-Lucy (true PSF), side by side at 2x
zoom, on the window of the truth with the most edges and the truth's contrast
range, so texture artefacts (a hatched ring, checkerboard) are seen.

Examples::

    python benchmarks/sample_stack.py --model default --gallery docs/images/sample-stack-crops.png
    python benchmarks/sample_stack.py --model run.best.safetensors --json runs/sample.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from common import add_width_argument, best_richardson_lucy, gaussian_of_width, heaviest_window, width_label

CROP_SIZE = 160
"""Side of the gallery's crop: the window of the truth with the most edges (a cell's border, its nucleus)."""

GALLERY_DISTANCES_UM = (0.0, 1.5, 3.0)


def busiest_crop(truth: np.ndarray, size: int = CROP_SIZE) -> tuple[slice, slice]:
    """The ``size`` x ``size`` window of ``truth`` with the largest summed gradient magnitude."""
    y, x = heaviest_window(np.hypot(*np.gradient(truth.astype(np.float64))), size)
    return slice(y, y + size), slice(x, x + size)


def to_intensity(counts: np.ndarray) -> np.ndarray:
    """Camera counts -> intensity in units of full scale (the sample's offset and photon count undone)."""
    from napari_mpt_deblur.plugin.samples import OFFSET, PHOTONS

    return ((counts.astype(np.float32) - OFFSET) / PHOTONS).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default' or a model file")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--gallery", type=Path, default=Path("benchmarks/results/sample-stack-crops.png"))
    parser.add_argument("--json", type=Path, help="write every figure here")
    add_width_argument(parser, default="judged", told="each plane's (judged: the Deblur dock's default)")
    args = parser.parse_args()

    import torch

    from napari_mpt_deblur import load_model
    from napari_mpt_deblur.config import DeblurSettings
    from napari_mpt_deblur.data.defocus import widefield_psf
    from napari_mpt_deblur.inference import deblur_array
    from napari_mpt_deblur.plugin.samples import DEFOCUS_UM, PSF, defocused_cell_stack
    from napari_mpt_deblur.training.suite import psnr, told_width

    if args.threads:
        torch.set_num_threads(args.threads)
    (truth_counts, _, _), (stack, _, _) = defocused_cell_stack()
    truth = to_intensity(truth_counts[0])  # rounded to counts: 1/1000 of full scale, far below the errors here
    model = load_model(args.model)
    started = time.perf_counter()
    if args.width == "given" and model.config.blur_conditioned:
        widths = [told_width(model, widefield_psf(abs(z), **PSF)) for z in DEFOCUS_UM]
        output = np.stack(
            [
                deblur_array(model, plane, axes="YX", settings=DeblurSettings(blur_sigma_px=w))
                for plane, w in zip(stack, widths)
            ]
        )
    else:
        output = deblur_array(model, stack, axes="ZYX")
    seconds = time.perf_counter() - started
    rows: dict[float, dict[str, list[float]]] = {}
    planes: dict[float, dict[str, np.ndarray]] = {}
    for z, blurry_counts, deblurred_counts in zip(DEFOCUS_UM, stack, output):
        distance = round(abs(z), 6)
        blurry, deblurred = to_intensity(blurry_counts), to_intensity(deblurred_counts)
        psf = widefield_psf(distance, **PSF)
        rl_true = best_richardson_lucy(blurry, psf, truth, psnr)
        rl_gaussian = best_richardson_lucy(blurry, gaussian_of_width(psf), truth, psnr)
        row = rows.setdefault(distance, {"input": [], "model": [], "rl_true": [], "rl_gaussian": []})
        row["input"].append(psnr(blurry, truth))
        row["model"].append(psnr(deblurred, truth))
        row["rl_true"].append(rl_true["psnr"])
        row["rl_gaussian"].append(rl_gaussian["psnr"])
        planes.setdefault(distance, {"input": blurry, "model": deblurred, "rl_true": rl_true["output"]})

    label = width_label(model, args.width)
    print(f"model {args.model} (step {model.card.provenance.get('step', '?')}{label}); the stack took {seconds:.1f} s")
    print(
        f"\nPSNR dB against the truth (mean of the planes at +z and -z)\n{'defocus':>8s} "
        + " ".join(f"{name:>12s}" for name in ("input", "model", "RL true PSF", "RL Gaussian"))
    )
    means = {}
    for distance, row in sorted(rows.items()):
        means[distance] = {name: float(np.mean(values)) for name, values in row.items()}
        figures = " ".join(f"{means[distance][name]:12.2f}" for name in ("input", "model", "rl_true", "rl_gaussian"))
        print(f"{distance:6.2f}um {figures}")
    worse = [f"{d:.2f} um: {m['model'] - m['input']:+.2f} dB" for d, m in means.items() if m["model"] < m["input"]]
    print("\nworse than its input:", "; ".join(worse) if worse else "never")

    from skimage.io import imsave

    crop = busiest_crop(truth)
    low, high = np.percentile(truth[crop], (0.5, 99.5))  # one display range for every panel: the truth's
    rows_out = []
    for distance in GALLERY_DISTANCES_UM:
        chosen = planes[distance]
        panels = [truth[crop]] + [chosen[name][crop] for name in ("input", "model", "rl_true")]
        panels = [np.clip((panel - low) / (high - low), 0, 1) for panel in panels]
        gap = np.ones((panels[0].shape[0], 4), np.float32)
        rows_out.append(np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1))
        rows_out.append(np.ones((4, rows_out[-1].shape[1]), np.float32))
    sheet = np.concatenate(rows_out[:-1], axis=0)
    sheet = np.repeat(np.repeat(sheet, 2, axis=0), 2, axis=1)
    args.gallery.parent.mkdir(parents=True, exist_ok=True)
    imsave(args.gallery, (sheet * 255).round().astype(np.uint8), check_contrast=False)
    print(
        f"crops (rows: {', '.join(f'{d} um' for d in GALLERY_DISTANCES_UM)}; truth | input | model | RL true PSF)"
        f" -> {args.gallery}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"model": args.model, "seconds": seconds, "psnr": {str(d): m for d, m in means.items()}}
        args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()

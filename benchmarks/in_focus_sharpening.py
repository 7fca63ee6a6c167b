"""What one Richardson-Lucy step against the in-focus PSF does to a model's output, with right and wrong optics.

A fine-tune on a stack with in-focus planes has its model sharpen the output against the in-focus PSF of the
optics it was given (``ModelCard.in_focus_optics``, :func:`~napari_mpt_deblur.data.optics.sharpen_in_focus`).
This script measures that step on its own, on the default model's output: procedural fluorescence fields (seeds
the default never saw) imaged in focus through several objectives, with Poisson and read noise as in
``finetune_lab.py``. Each row sharpens with the true optics and with the optics assumed when none are given
(NA 0.8, water, 520 nm, 0.2 um pixels): a wrong NA or pixel size is what a user who leaves the boxes as they are
risks.

Example::

    python benchmarks/in_focus_sharpening.py
"""

from __future__ import annotations

import argparse

import numpy as np

from napari_mpt_deblur.config import DeblurSettings, Microscope
from napari_mpt_deblur.data.bundled import procedural_fluorescence
from napari_mpt_deblur.data.defocus import add_poisson_gaussian_noise, blur, widefield_psf
from napari_mpt_deblur.data.optics import sharpen_in_focus
from napari_mpt_deblur.inference import deblur_array
from napari_mpt_deblur.models.files import load_model
from napari_mpt_deblur.training.suite import psnr

OBJECTIVES = {
    "NA 1.4 oil, 0.1 um (finetune_lab's lab)": Microscope(na=1.4, medium="oil", pixel_size_um=0.1),
    "NA 0.8 water, 0.2 um (the assumed optics)": Microscope(pixel_size_um=0.2),
    "NA 0.8 water, 0.1 um (wider than assumed)": Microscope(pixel_size_um=0.1),
    "NA 1.4 oil, 0.2 um (narrower than assumed)": Microscope(na=1.4, medium="oil", pixel_size_um=0.2),
    "NA 0.5 air, 0.65 um (under a pixel)": Microscope(na=0.5, medium="air", pixel_size_um=0.65),
}
PHOTONS, READ_NOISE = 500.0, 0.003
SEEDS = (200, 201, 202)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default' or a model file")
    args = parser.parse_args()
    model = load_model(args.model)
    settings = DeblurSettings(tile=0, device="cpu", precision="fp32", sharpen_in_focus=False)
    assumed = widefield_psf(0.0, **Microscope().optics())
    rng = np.random.default_rng(5)
    print(f"mean PSNR dB over {len(SEEDS)} fields in focus, {PHOTONS:g} photons")
    print("| objective | input | model | sharpened, true optics | sharpened, assumed optics |")
    print("| --- | --- | --- | --- | --- |")
    for name, optics in OBJECTIVES.items():
        true = widefield_psf(0.0, **optics.optics())
        rows = []
        for seed in SEEDS:
            truth = procedural_fluorescence(seed)
            plane = add_poisson_gaussian_noise(blur(truth, true), PHOTONS, READ_NOISE, rng)
            output = deblur_array(model, plane, axes="YX", settings=settings)
            rows.append(
                [
                    psnr(x, truth)
                    for x in (plane, output, sharpen_in_focus(output, true), sharpen_in_focus(output, assumed))
                ]
            )
        mean = np.mean(rows, axis=0)
        print(f"| {name} | " + " | ".join(f"{value:.2f}" for value in mean) + " |")


if __name__ == "__main__":
    main()

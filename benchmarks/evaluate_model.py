"""Held-out evaluation of a model on StarDist's test images, next to Richardson-Lucy.

StarDist ships two test images that no bundled model trains on:
``test_image_nuclei_2d`` (fluorescent nuclei, 512x512) and ``test_image_he_2d``
(H&E, 300x500 RGB, deblurred channel by channel by a 1-channel model). Each is
defocused with the widefield PSF at 1, 2 and 3 um with mild noise
(``common.defocus_cases``); the table gives PSNR/SSIM of the blurry input, the model's
output, Richardson-Lucy given the true PSF and given a Gaussian of its width
(best of several iteration counts) and a tuned Wiener filter.
Needs the ``[stardist]`` extra (for the images only; no network). It ends by naming
every case where the model is worse than its input. ``--zoom 2`` enlarges the
images first (and computes the PSF for pixels twice as fine): the same optics on
objects twice the size, to tell a model's failure on small objects from one on the
content.

Examples::

    python benchmarks/evaluate_model.py --model default --json runs/default-eval.json
    python benchmarks/evaluate_model.py --model default --zoom 2 --no-rl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import add_width_argument, defocus_cases, evaluate, print_table, width_label


def stardist_images() -> dict:
    from stardist.data import test_image_he_2d, test_image_nuclei_2d

    return {"stardist nuclei_2d": test_image_nuclei_2d(), "stardist he_2d (RGB)": test_image_he_2d()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default' or a model file")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--no-rl", action="store_true", help="skip Richardson-Lucy (it does not depend on the model)")
    parser.add_argument(
        "--zoom", type=float, default=1.0, help="enlarge the images (and make the PSF's pixels finer) by this factor"
    )
    add_width_argument(parser)
    args = parser.parse_args()

    import torch

    from napari_mpt_deblur import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    rows = evaluate(model, defocus_cases(stardist_images(), zoom=args.zoom), with_rl=not args.no_rl, width=args.width)
    print(f"model {args.model} (step {model.card.provenance.get('step', '?')}{width_label(model, args.width)}):")
    print_table(rows)
    worse = [
        f"{row['image']} at {row['defocus_um']:g} um: {row['mpt'][0] - row['input'][0]:+.2f} dB"
        for row in rows
        if row["mpt"][0] < row["input"][0]
    ]
    print("worse than its input:", "; ".join(worse) if worse else "never")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": args.model, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

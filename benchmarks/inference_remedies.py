"""Two remedies at inference time, without training: smaller statistics windows, and averaged orientations.

Both are known to help restoration networks elsewhere; this measures whether they help
the bundled model where it trails (mild blur, in-focus cases below their input):

* ``windows``: the network's channel attention takes statistics over the whole tile it
  sees, while training showed it 128^2 patches. Deblurring in tiles of the training
  patch's size (``--tiles``) gives it statistics of the size it learned on (the idea of
  test-time local statistics). Scored on stardist's test images at 1, 2 and 3 um
  (``evaluate_model.py``'s cases), PSNR dB per tile size; 0 is the whole plane.
* ``ensemble``: every case of the held-out suite (``validate.py``) deblurred in its eight
  orientations and the outputs, turned back, averaged (all eight; four: as stored,
  turned by 180 degrees and the two mirrors; two: as stored and turned by 180 degrees).
  The mean PSNR per strength next to one orientation's (the suite's figure), and each
  averaging's worst gain over the input. It costs as many forward passes as orientations.

Examples::

    python benchmarks/inference_remedies.py windows --model default --tiles 0 512 256 128
    python benchmarks/inference_remedies.py ensemble --model default --json runs/ensemble.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

AVERAGES = {"8 orientations": (0, 1, 2, 3, 4, 5, 6, 7), "4 orientations": (0, 2, 5, 7), "2 orientations": (0, 2)}
"""Orientations (``training.suite.ORIENTATIONS``) averaged by each arm of ``ensemble``."""


def windows(model, tiles: list[int]) -> list[dict]:
    """PSNR of the model on stardist's test images deblurred in tiles of each size (0: the whole plane)."""
    from common import defocus_cases, scores
    from evaluate_model import stardist_images
    from napari_mpt_deblur.config import DeblurSettings
    from napari_mpt_deblur.inference import deblur_array

    rows = []
    for case in defocus_cases(stardist_images()):
        axes = "YXS" if case["blurry"].ndim == 3 else "YX"
        row = {"image": case["image"], "defocus_um": case["defocus_um"]}
        row["input"] = scores(case["blurry"], case["sharp"])[0]
        for tile in tiles:
            overlap = 32 if 0 < tile <= 256 else None  # the default overlap would be half a small tile
            settings = DeblurSettings(tile=tile, overlap=overlap, device="cpu", precision="fp32")
            row[f"tile {tile}"] = scores(
                deblur_array(model, case["blurry"], axes=axes, settings=settings), case["sharp"]
            )[0]
        rows.append(row)
        print(
            f"{row['image'][:24]:24s} {row['defocus_um']:g} um "
            + "  ".join(f"{key} {value:.2f}" for key, value in row.items() if key not in ("image", "defocus_um")),
            flush=True,
        )
    return rows


def ensemble(model) -> list[dict]:
    """Per suite case: input PSNR, one orientation's (mean and worst over eight) and each average's."""
    from napari_mpt_deblur.training.suite import deblur_case, psnr, suite_cases

    rows = []
    for case in suite_cases():
        outputs = [deblur_case(model, case, "cpu", orientation) for orientation in range(8)]
        single = [psnr(output, case.sharp) for output in outputs]
        row = {"image": case.image, "strength": case.strength, "input": psnr(case.blurry, case.sharp)}
        row["one orientation"], row["one orientation, worst"] = float(np.mean(single)), float(min(single))
        for name, chosen in AVERAGES.items():
            row[name] = psnr(np.mean([outputs[k] for k in chosen], axis=0), case.sharp)
        rows.append(row)
        print(
            f"{case.image[:30]:30s} {case.strength:9s} "
            + "  ".join(f"{key} {row[key]:.2f}" for key in ("input", "one orientation", *AVERAGES)),
            flush=True,
        )
    print(
        f"\n{'strength':10s} {'input':>8s} {'one':>8s} "
        + " ".join(f"{name.split()[0] + ' avg':>8s}" for name in AVERAGES)
        + "   worst gain over the input: one / "
        + " / ".join(name.split()[0] for name in AVERAGES)
    )
    for strength in dict.fromkeys(row["strength"] for row in rows):
        chosen = [row for row in rows if row["strength"] == strength]
        means = [np.mean([row[key] for row in chosen]) for key in ("input", "one orientation", *AVERAGES)]
        worst = [min(row["one orientation, worst"] - row["input"] for row in chosen)]
        worst += [min(row[name] - row["input"] for row in chosen) for name in AVERAGES]
        print(
            f"{strength:10s} " + " ".join(f"{m:8.2f}" for m in means) + "   " + " / ".join(f"{w:+.2f}" for w in worst)
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("remedy", choices=["windows", "ensemble"])
    parser.add_argument("--model", default="default", help="'default' or a model file")
    parser.add_argument("--tiles", type=int, nargs="+", default=[0, 512, 256, 128], help="tile sizes (windows)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()

    from napari_mpt_deblur import load_model

    model = load_model(args.model)
    rows = windows(model, args.tiles) if args.remedy == "windows" else ensemble(model)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": args.model, "remedy": args.remedy, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

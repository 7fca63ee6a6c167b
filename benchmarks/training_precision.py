"""fp32 against bf16 autocast for CPU training: seconds per step and the loss curve, paired step by step.

Two copies of one model train on the same batches (the bundled data with the
product's coverage defocus, step ``s`` drawn from seed ``(seed, s)`` as the engine
draws them), one in fp32 and one under bf16 autocast, with the engine's own step
(``training.engine.compute_gradients``: shards side by side on the CPU, AdamW,
gradient clipping). Their steps alternate, so a shared, noisy machine slows
both alike. The script prints the median seconds per step and their ratio, the
two loss curves in windows of steps, and both models' mean PSNR gain per
strength on the held-out suite at the end.

bf16 is fast only on CPUs that compute it in hardware (AVX-512 BF16, AMX); the
script says whether this one does.

Examples::

    python benchmarks/training_precision.py --model default --steps 200 --lr 2e-5     # the fine-tune's recipe
    python benchmarks/training_precision.py --model run.safetensors --steps 200 \\
        --lr 1e-4 --json runs/precision.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default' or a model file to start both arms from")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-5, help="constant learning rate of both arms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=25, help="steps per row of the loss table")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--no-suite", action="store_true", help="skip the suite validation at the end")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()

    from napari_mpt_deblur import load_model
    from napari_mpt_deblur.losses.efcr import EFCRLoss
    from napari_mpt_deblur.runtime import cpu_has_native_bf16, tune_cpu_allocator
    from napari_mpt_deblur.training.config import TrainConfig
    from napari_mpt_deblur.training.data import prepare_training
    from napari_mpt_deblur.training.engine import compute_gradients, training_shards
    from napari_mpt_deblur.training.prefetch import draw_batch

    tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        patch_size=args.patch,
        scale_range=(0.7, 1.8),
        lr=args.lr,
        efcr_beta=0.0,
        seed=args.seed,
        device="cpu",
    )
    data = prepare_training(bundled=True, config=config)
    device = torch.device("cpu")
    shards = training_shards(device, config.batch_size, 1, False)
    loss_fn = EFCRLoss()
    arms = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        model = load_model(args.model).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas, weight_decay=1e-4)
        arms[name] = {"model": model, "optimizer": optimizer, "dtype": dtype, "losses": [], "seconds": []}
    for step in range(args.steps):
        batch = draw_batch(data.sampler, config, step)  # the batch the training loop draws at this step
        blurry, sharp = torch.from_numpy(batch.blurry), torch.from_numpy(batch.sharp)
        torch_rng = torch.Generator().manual_seed(batch.torch_seed)
        seed = int(torch.randint(2**62, (1,), generator=torch_rng))
        for arm in arms.values():
            started = time.perf_counter()
            arm["optimizer"].zero_grad(set_to_none=True)
            generator = torch.Generator().manual_seed(seed)
            losses = compute_gradients(
                arm["model"], loss_fn, config, blurry, sharp, None, generator, shards, arm["dtype"]
            )
            torch.nn.utils.clip_grad_norm_(arm["model"].parameters(), config.grad_clip)
            arm["optimizer"].step()
            arm["seconds"].append(time.perf_counter() - started)
            arm["losses"].append(losses["l1"])

    print(
        f"model {args.model}, batch {args.batch} of {args.patch}^2, lr {args.lr:g}, {torch.get_num_threads()} threads, "
        f"{shards} shard(s); native bf16 on this CPU: {cpu_has_native_bf16()}"
    )
    timed = {name: arm["seconds"][2:] for name, arm in arms.items()}  # the first steps warm the allocator up
    fp32, bf16 = (statistics.median(timed[name]) for name in ("fp32", "bf16"))
    print(f"s/step: fp32 {fp32:.3f}, bf16 {bf16:.3f} ({fp32 / bf16:.2f}x as fast)")
    print(
        f"\nmean L1 loss per window of {args.window} steps\n{'steps':>11s} {'fp32':>8s} {'bf16':>8s} {'bf16/fp32':>10s}"
    )
    windows = []
    for start in range(0, args.steps, args.window):
        means = [float(np.mean(arms[name]["losses"][start : start + args.window])) for name in ("fp32", "bf16")]
        windows.append({"steps": [start + 1, min(start + args.window, args.steps)], "fp32": means[0], "bf16": means[1]})
        print(
            f"{start + 1:5d}-{min(start + args.window, args.steps):5d} {means[0]:8.4f} {means[1]:8.4f} "
            f"{means[1] / means[0]:10.3f}"
        )
    record = {"fp32_s_per_step": fp32, "bf16_s_per_step": bf16, "loss_windows": windows}
    if not args.no_suite and data.validation is not None:
        print("\nsuite: mean PSNR gain over the input per strength (dB)")
        for name, arm in arms.items():
            scores = data.validation.evaluate(arm["model"], device)
            gains = {key.removeprefix("gain_db "): value for key, value in scores.items() if key.startswith("gain_db")}
            record[f"{name}_suite"] = scores
            print(
                f"{name:5s} "
                + "  ".join(f"{key} {value:+.2f}" for key, value in gains.items())
                + f"  mean {scores['mean_gain_db']:+.2f}  worst {scores['worst_gain_db']:+.2f}"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()

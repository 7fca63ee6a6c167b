"""Where a CPU training step goes, and what the candidate speed-ups give, paired in one process.

The default model's recipe (``lite``, L1, AdamW, gradient clipping) is timed step by
step on fixed random batches, with the variants interleaved round by round, so a
noisy, shared machine slows them alike and the ratios hold:

* ``baseline``: batch ``--batch`` of ``--patch``^2, fp32, contiguous tensors;
* ``channels-last``: the model and its batches in channels-last memory format;
* ``batch x2``: twice the batch (reported per sample: the same data per second?);
* ``side by side``: the batch cut in two halves computed side by side, one thread each, as
  the training engine does on the CPU (``training.engine.backward_in_shards``);
* ``side by side, bf16``: the same under bf16 autocast, as the engine runs it on a CPU
  with bf16 in hardware (``training.engine.training_autocast_dtype``);
* ``compile`` (``--compile``): ``torch.compile`` of the model (compilation not timed).

It also times the data pipeline alone: a batch of the bundled training planes
defocused with the product's coverage (``DefocusConfig.coverage()``), which a
worker would have to hide behind the step.

Example::

    python benchmarks/training_speed.py --rounds 8 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def make_step(model: torch.nn.Module, channels_last: bool, shards: int = 1, amp_dtype: torch.dtype | None = None):
    """One step of the recipe as the engine runs it (``training.engine.compute_gradients``); ``shards`` > 1
    cuts the batch as the engine does on the CPU (side by side, one thread each); ``amp_dtype`` autocasts."""
    from napari_mpt_deblur.losses.efcr import EFCRLoss
    from napari_mpt_deblur.training.config import TrainConfig
    from napari_mpt_deblur.training.engine import compute_gradients

    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4)
    config, loss_fn = TrainConfig(efcr_beta=0.0), EFCRLoss()

    def step(blurry: torch.Tensor, sharp: torch.Tensor) -> None:
        if channels_last:
            blurry, sharp = (t.contiguous(memory_format=torch.channels_last) for t in (blurry, sharp))
        optimizer.zero_grad(set_to_none=True)
        compute_gradients(model, loss_fn, config, blurry, sharp, None, torch.Generator(), shards, amp_dtype)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="lite")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=8, help="timed steps per variant (after 2 untimed)")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compiling)")
    parser.add_argument("--no-data", action="store_true", help="skip timing the data pipeline")
    args = parser.parse_args()

    from napari_mpt_deblur import build_model
    from napari_mpt_deblur.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)

    def batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(rng.random((size, 1, args.patch, args.patch), dtype=np.float32))
        return x, x.clone()

    variants = {
        "baseline": (make_step(build_model(args.preset), False), batch(args.batch), args.batch),
        "channels-last": (
            make_step(build_model(args.preset).to(memory_format=torch.channels_last), True),
            batch(args.batch),
            args.batch,
        ),
        "batch x2": (make_step(build_model(args.preset), False), batch(2 * args.batch), 2 * args.batch),
        "side by side": (make_step(build_model(args.preset), False, shards=2), batch(args.batch), args.batch),
        "side by side, bf16": (
            make_step(build_model(args.preset), False, shards=2, amp_dtype=torch.bfloat16),
            batch(args.batch),
            args.batch,
        ),
    }
    if args.compile:
        compiled = torch.compile(build_model(args.preset), dynamic=False)
        variants["compile"] = (make_step(compiled, False), batch(args.batch), args.batch)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for step, (x, y), _ in variants.values():
        for _ in range(2):  # warm-up: allocator, caches, compilation
            step(x, y)
    for _ in range(args.rounds):
        for name, (step, (x, y), _) in variants.items():
            started = time.perf_counter()
            step(x, y)
            times[name].append(time.perf_counter() - started)
    from napari_mpt_deblur.runtime import cpu_has_native_bf16

    print(
        f"{args.preset}, batch {args.batch} of {args.patch}^2, {torch.get_num_threads()} threads, fp32 unless named; "
        f"bf16 in hardware: {cpu_has_native_bf16()}"
    )
    base = statistics.median(times["baseline"]) / args.batch
    print(f"{'variant':16s} {'s/step':>8s} {'s/sample':>9s} {'vs baseline':>12s}")
    for name, (_, _, size) in variants.items():
        per_step = statistics.median(times[name])
        print(f"{name:16s} {per_step:8.3f} {per_step / size:9.4f} {per_step / size / base:11.2f}x")
    if not args.no_data:
        from napari_mpt_deblur.data.bundled import training_groups, training_weights
        from napari_mpt_deblur.data.defocus import DefocusConfig
        from napari_mpt_deblur.training.patches import SyntheticPairs

        planes, weights = training_weights(training_groups())
        sampler = SyntheticPairs(planes, DefocusConfig.coverage(), margin=48, weights=weights)
        data = []
        for index in range(max(6, args.rounds)):
            started = time.perf_counter()
            sampler.sample(np.random.default_rng([0, index]), args.batch, args.patch, (0.7, 1.8))
            data.append(time.perf_counter() - started)
        share = statistics.median(data) / (statistics.median(data) + statistics.median(times["baseline"]))
        print(
            f"data pipeline: {statistics.median(data):.3f} s per batch ({share:.0%} of a baseline step with its data)"
        )


if __name__ == "__main__":
    main()

"""Training speed: seconds per step, steps per second and peak memory of one training configuration.

Each configuration runs in a fresh process (peak memory is per process) on
synthetic pairs made from random sharp planes, so no data package is needed.
The first ``--warmup`` steps (compilation, allocator warm-up) are not timed;
the median of the rest is reported.

Examples::

    python benchmarks/bench_training.py --preset lite --batch 4 --patch 128 --beta 0
    python benchmarks/bench_training.py --preset lite --batch 4 --patch 128 --beta 0 --compile
    python benchmarks/bench_training.py --preset lite --batch 4 --patch 128 --beta 1e-5
    python benchmarks/bench_training.py --preset paper --batch 1 --patch 128 --steps 6
    python benchmarks/bench_training.py --preset lite --json lite.json --baseline old-lite.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path


def measure(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from napari_mpt_deblur import build_model
    from napari_mpt_deblur.runtime import tune_cpu_allocator
    from napari_mpt_deblur.training.config import TrainConfig
    from napari_mpt_deblur.training.engine import iter_train
    from napari_mpt_deblur.training.patches import SyntheticPairs, UnlabeledPlanes

    tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    planes = [rng.random((512, 512), dtype=np.float32) for _ in range(4)]
    config = TrainConfig(
        steps=args.warmup + args.steps,
        batch_size=args.batch,
        patch_size=args.patch,
        efcr_beta=args.beta,
        reblur_weight=args.reblur,
        device=args.device,
        compile=args.compile,
        checkpoint_every=10**9,
    )
    unlabeled = UnlabeledPlanes(planes) if args.unlabeled else None
    times, last = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        events = iter_train(
            build_model(args.preset, pairing=args.pairing),
            SyntheticPairs(planes),
            Path(folder) / "model.safetensors",
            config,
            unlabeled=unlabeled,
        )
        for event in events:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            if event.step > args.warmup:
                times.append(now - last)
            last = now
    median = statistics.median(times)
    result = {
        "preset": args.preset,
        "pairing": args.pairing,
        "batch": args.batch,
        "patch": args.patch,
        "beta": args.beta,
        "reblur": args.reblur,
        "unlabeled": args.unlabeled,
        "compile": args.compile,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "seconds_per_step": median,
        "steps_per_second": 1 / median,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if torch.cuda.is_available():
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="lite")
    parser.add_argument("--pairing", default="aligned", choices=("aligned", "official"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--beta", type=float, default=0.0, help="EFCR weight (0: L1 only)")
    parser.add_argument("--reblur", type=float, default=0.0, help="re-blur term weight (with --unlabeled)")
    parser.add_argument("--unlabeled", action="store_true", help="draw an unlabeled batch too (fine-tuning)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--baseline", help="a result JSON to compare against")
    args = parser.parse_args()

    result = measure(args)
    print(
        f"{result['preset']} {result['pairing']} batch {result['batch']} x {result['patch']}^2, "
        f"beta {result['beta']}, reblur {result['reblur']}, compile {result['compile']}, "
        f"{result['device']} ({result['threads']} threads): {result['seconds_per_step']:.3f} s/step "
        f"({result['steps_per_second']:.2f} steps/s), peak RSS {result['peak_rss_mb']:.0f} MB"
    )
    if args.baseline:
        baseline = json.loads(Path(args.baseline).read_text())
        ratio = result["seconds_per_step"] / baseline["seconds_per_step"]
        print(f"vs baseline: {ratio:.2f}x the time per step ({baseline['seconds_per_step']:.3f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())

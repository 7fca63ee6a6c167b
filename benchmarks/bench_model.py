"""Forward-pass speed and peak memory of an MPT preset or a model file.

Each configuration runs in a fresh subprocess so that its peak memory is its own.
Prints a table; ``--json`` saves the figures and ``--baseline`` compares the
medians with an earlier ``--json`` file (ratio < 1: faster than the baseline).

Examples::

    python benchmarks/bench_model.py --preset paper --pairing official --sizes 256 --threads 2
    python benchmarks/bench_model.py --preset lite --sizes 256 512 1024 --json lite.json
    python benchmarks/bench_model.py --preset paper --device cuda --dtype bf16 --sizes 256 1024 --batch 4
    python benchmarks/bench_model.py --preset paper --pairing official --sizes 256 --per-level
    python benchmarks/bench_model.py --model grown.safetensors --sizes 1024   # e.g. a network from mpt-deblur grow
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def measure(args: argparse.Namespace) -> dict:
    """One configuration, in this process."""
    import torch

    from napari_mpt_deblur import build_model
    from napari_mpt_deblur.runtime import tune_cpu_allocator

    if not args.default_allocator:
        tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if args.model:
        from napari_mpt_deblur import load_model

        model = load_model(args.model, device=device)
        args.channels, args.pairing = model.config.in_channels, model.config.pairing
    else:
        model = build_model(args.preset, pairing=args.pairing, channels=args.channels).to(device).eval()
    if args.compile:
        model = torch.compile(model, dynamic=False)
    x = torch.rand(args.batch, args.channels, args.size, args.size, device=device)
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]

    def forward() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    forward()  # warm-up: caches masks, picks kernels (and compiles with --compile)
    warmup = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        forward()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    median = statistics.median(times)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    levels = time_per_level(model, forward, args.repeats, synchronize) if args.per_level else None
    return {
        "preset": Path(args.model).stem if args.model else args.preset,
        "pairing": args.pairing,
        "size": args.size,
        "batch": args.batch,
        "channels": args.channels,
        "dtype": args.dtype,
        "device": args.device,
        "threads": args.threads,
        "compile": args.compile,
        "median_s": median,
        "min_s": min(times),
        "warmup_s": warmup,
        "megapixels_per_s": args.batch * args.size**2 / median / 1e6,
        "peak_memory_mb": peak_mb,
        "parameters": sum(p.numel() for p in model.parameters()),
        "per_level_ms": levels,
    }


def time_per_level(model, forward, repeats: int, synchronize) -> dict:
    """Milliseconds spent in each level's blocks (encoder and decoder together) in the fastest of ``repeats`` forwards.

    Timed with hooks around every stage, so these forwards are not the ones in
    the table; ``other`` is the stem, the head, the resampling convs and padding.
    """
    levels = [1, 2, 3, 4, 3, 2, 1]  # encoders, latent, decoders
    stages = [*model.encoders, model.latent, *model.decoders]
    spent: dict[str, float] = {}
    started: list[float] = []

    def begin(module, inputs) -> None:
        synchronize()
        started.append(time.perf_counter())

    def end_for(level: int):
        def end(module, inputs, output) -> None:
            synchronize()
            spent[f"level {level}"] = spent.get(f"level {level}", 0.0) + time.perf_counter() - started.pop()

        return end

    handles = [stage.register_forward_pre_hook(begin) for stage in stages]
    handles += [stage.register_forward_hook(end_for(level)) for stage, level in zip(stages, levels)]
    runs = []
    try:
        for _ in range(repeats):
            spent.clear()
            start = time.perf_counter()
            forward()
            total = time.perf_counter() - start
            runs.append({**spent, "other": total - sum(spent.values()), "total": total})
    finally:
        for handle in handles:
            handle.remove()
    fastest = min(runs, key=lambda run: run["total"])
    return {name: round(seconds * 1000, 1) for name, seconds in sorted(fastest.items())}


def key(row: dict) -> tuple:
    return tuple(row[k] for k in ("preset", "pairing", "size", "batch", "channels", "dtype", "device", "compile"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--model", help="a model file or bundled model name instead of a fresh --preset network")
    parser.add_argument("--pairing", default="official", choices=("aligned", "official"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="autocast dtype")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (compile time not counted)")
    parser.add_argument(
        "--default-allocator", action="store_true", help="skip tune_cpu_allocator (glibc defaults, as a bare script)"
    )
    parser.add_argument(
        "--per-level", action="store_true", help="then time each level's blocks (hooked forwards, fastest of --repeats)"
    )
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--baseline", help="compare with figures written earlier by --json")
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)  # one configuration (subprocess)
    args = parser.parse_args()

    if args.size is not None:
        print(json.dumps(measure(args)))
        return

    rows = []
    for size in args.sizes:
        command = [sys.executable, __file__, *sys.argv[1:], "--size", str(size)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            print(f"size {size}: failed\n{result.stderr.strip()[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))

    baseline = {}
    if args.baseline:
        with open(args.baseline) as handle:
            baseline = {key(row): row for row in json.load(handle)}
    header = (
        f"{'preset':7s} {'pairing':8s} {'size':>5s} {'batch':>5s} {'dtype':5s} {'device':6s} "
        f"{'median s':>9s} {'min s':>7s} {'MPix/s':>7s} {'peak MB':>8s}"
    )
    print(header + ("  vs baseline" if baseline else ""))
    for row in rows:
        line = (
            f"{row['preset']:7s} {row['pairing']:8s} {row['size']:5d} {row['batch']:5d} {row['dtype']:5s} "
            f"{row['device']:6s} {row['median_s']:9.3f} {row['min_s']:7.3f} {row['megapixels_per_s']:7.3f} "
            f"{row['peak_memory_mb']:8.0f}"
        )
        if key(row) in baseline:
            line += f"  x{row['median_s'] / baseline[key(row)]['median_s']:.2f} time"
        print(line)
        if row.get("per_level_ms"):
            print("    ms per level:", ", ".join(f"{name} {ms:.0f}" for name, ms in row["per_level_ms"].items()))
    if rows:
        print(
            f"({rows[0]['parameters']:,} parameters, {rows[0]['threads']} threads, "
            f"{'compiled' if rows[0]['compile'] else 'eager'}, median of {args.repeats})"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()

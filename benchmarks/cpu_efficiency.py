"""How close the default model runs to this CPU's limit, and how it holds up when the CPU is shared.

Figures that survive a change of machine are ratios, measured in one process,
with the arms interleaved so that both see the same background load:

- **FLOP efficiency**: the network's achieved GFLOP/s (FLOPs of every tile it
  computes, counted by ``torch.utils.flop_counter``, over the wall time) divided
  by a 2048 x 2048 ``torch.matmul``'s GFLOP/s on the same threads, timed between
  the deblurring runs;
- **tile waste**: the pixels the network computes (every tile, padded to its
  size multiple) over the pixels of the plane;
- **side by side vs one at a time**: the engine now runs planes (or a plane's
  tiles) side by side, one torch thread each (``runtime.cpu_workers``); the
  other arm is the engine as it was, one plane at a time on every thread;
- **contention**: with ``--companions N``, N processes that keep a core busy
  (a browser, another job) run during a second round; the slowdown is compared
  with the share of the CPU they take, ``(threads + N) / threads`` for N up to
  the free cores.

Examples::

    python benchmarks/cpu_efficiency.py                      # a 1024^2 plane and a 4 x 1024^2 stack
    python benchmarks/cpu_efficiency.py --shapes 9x660x550 --companions 1 --repeats 3
    python benchmarks/cpu_efficiency.py --json now.json --baseline benchmarks/baselines/cpu-efficiency.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import napari_mpt_deblur.inference as inference
from napari_mpt_deblur.inference import Deblurrer, deblur_array
from napari_mpt_deblur.models.files import load_model
from napari_mpt_deblur.runtime import tune_cpu_allocator
from napari_mpt_deblur.tiling import plan_tiles

MATMUL_SIZE = 2048


def matmul_gflops(repeats: int = 3) -> float:
    """GFLOP/s of a square fp32 ``torch.matmul`` on torch's current threads (best of ``repeats``)."""
    a, b = torch.rand(MATMUL_SIZE, MATMUL_SIZE), torch.rand(MATMUL_SIZE, MATMUL_SIZE)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * MATMUL_SIZE**3 / best / 1e9


def _timed(work: Callable[[], Any]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def forward_gflop(model: torch.nn.Module, height: int, width: int) -> float:
    """GFLOP of one forward pass of an (height, width) tile (matmuls and convolutions)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, model.config.in_channels, height, width))
    return counter.get_total_flops() / 1e9


def plane_work(model: torch.nn.Module, height: int, width: int) -> tuple[float, float, int]:
    """(GFLOP, computed pixels / plane pixels, tiles) of deblurring one plane at default settings."""
    deblurrer = Deblurrer(model)
    plan = plan_tiles(height, width, deblurrer.tile, deblurrer.overlap, deblurrer.size_multiple, deblurrer.tile_growth)
    gflop = plan.count * forward_gflop(model, *plan.tile_shape)
    return gflop, plan.computed_pixels / (height * width), plan.count


@contextlib.contextmanager
def one_at_a_time() -> Iterator[None]:
    """The engine as it was before side-by-side workers: one plane, one tile at a time, on every thread."""
    original = inference.cpu_workers
    inference.cpu_workers = lambda tasks: 1
    try:
        yield
    finally:
        inference.cpu_workers = original


def _spin() -> None:
    while True:
        pass


@contextlib.contextmanager
def companions(count: int) -> Iterator[None]:
    """``count`` processes that keep a core busy each, for the duration."""
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_spin, daemon=True) for _ in range(count)]
    for process in processes:
        process.start()
    try:
        time.sleep(0.5 if count else 0)
        yield
    finally:
        for process in processes:
            process.terminate()
            process.join()


def measure(model: torch.nn.Module, shape: tuple[int, ...], repeats: int, busy: int) -> dict[str, Any]:
    """Both engine arms and matmul, interleaved ``repeats`` times, on a random uint16 stack of ``shape``."""
    stack = (np.random.default_rng(0).random(shape) * 4000).astype(np.uint16)
    axes = "ZYX"[-len(shape) :]
    height, width = shape[-2:]
    planes = int(np.prod(shape[:-2], dtype=np.int64))
    gflop, waste, tiles = plane_work(model, height, width)
    arms: dict[str, list[float]] = {"side_by_side": [], "one_at_a_time": []}
    matmul: list[float] = []
    with companions(busy):
        deblur_array(model, stack[(0,) * (len(shape) - 2)], axes[-2:])  # warm-up: per-size caches
        for _ in range(repeats):
            arms["side_by_side"].append(_timed(lambda: deblur_array(model, stack, axes)))
            with one_at_a_time():
                arms["one_at_a_time"].append(_timed(lambda: deblur_array(model, stack, axes)))
            matmul.append(matmul_gflops())
    megapixels = planes * height * width / 1e6
    row: dict[str, Any] = {
        "shape": "x".join(map(str, shape)),
        "companions": busy,
        "threads": torch.get_num_threads(),
        "tiles_per_plane": tiles,
        "tile_waste": waste,
        "matmul_gflops": statistics.median(matmul),
        "paired_speedup": statistics.median(b / a for a, b in zip(arms["side_by_side"], arms["one_at_a_time"])),
    }
    for arm, times in arms.items():
        seconds = statistics.median(times)
        row[f"{arm}_s"] = seconds
        row[f"{arm}_mpix_s"] = megapixels / seconds
        row[f"{arm}_gflops"] = planes * gflop / seconds
        row[f"{arm}_efficiency"] = row[f"{arm}_gflops"] / row["matmul_gflops"]
    return row


def print_row(row: dict[str, Any], baseline: dict[str, Any] | None) -> None:
    print(
        f"{row['shape']:>12}  companions {row['companions']}  threads {row['threads']}  "
        f"tiles/plane {row['tiles_per_plane']}  tile waste {row['tile_waste']:.2f}x  "
        f"matmul {row['matmul_gflops']:.0f} GFLOP/s"
    )
    for arm in ("side_by_side", "one_at_a_time"):
        line = (
            f"    {arm.replace('_', ' '):14} {row[f'{arm}_s']:8.2f} s  {row[f'{arm}_mpix_s']:6.3f} MPix/s  "
            f"{row[f'{arm}_gflops']:6.1f} GFLOP/s  {row[f'{arm}_efficiency']:5.2f} of matmul"
        )
        if baseline:
            line += f"  (baseline {baseline[f'{arm}_efficiency']:.2f})"
        print(line)
    print(f"    side by side is {row['paired_speedup']:.2f}x as fast (median of paired runs)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="a model file or bundled name (default: default)")
    parser.add_argument("--shapes", nargs="+", default=["1024x1024", "4x1024x1024"], help="ZxYxX or YxX")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--companions", type=int, nargs="+", default=[0], help="busy processes per round")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="save the rows")
    parser.add_argument("--baseline", type=Path, help="an earlier --json file to compare the efficiency with")
    args = parser.parse_args(argv)

    tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    baseline = {}
    if args.baseline:
        baseline = {(r["shape"], r["companions"]): r for r in json.loads(args.baseline.read_text())}
    rows = []
    for busy in args.companions:
        for text in args.shapes:
            shape = tuple(int(n) for n in text.lower().split("x"))
            row = measure(model, shape, args.repeats, busy)
            print_row(row, baseline.get((row["shape"], busy)))
            rows.append(row)
    by_shape = {(r["shape"], r["companions"]): r for r in rows}
    for (shape, busy), row in by_shape.items():
        quiet = by_shape.get((shape, 0))
        if busy and quiet:
            share = (row["threads"] + min(busy, row["threads"])) / row["threads"]
            for arm in ("side_by_side", "one_at_a_time"):
                slowdown = row[f"{arm}_s"] / quiet[f"{arm}_s"]
                name = arm.replace("_", " ")
                print(f"{shape} with {busy} busy: {name} {slowdown:.2f}x slower (CPU share: {share:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

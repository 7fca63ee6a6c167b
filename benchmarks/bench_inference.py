"""Speed, memory and accuracy of the inference engine (``napari_mpt_deblur.inference``).

Five measurements, one subcommand each; every timed configuration runs in a
fresh subprocess (so its peak memory is its own, and ``tune_cpu_allocator()`` is on):

- ``throughput``: megapixels per second of ``deblur_array`` on a synthetic uint16
  stack (median over ``--repeats`` whole calls, after one warm-up plane);
- ``memory``: peak resident memory and time of ``deblur_file`` from a uint16 TIFF
  stack to a TIFF, for several stack depths (it should not grow with Z);
- ``agreement``: PSNR of tiled against whole-plane output, on a float32 image;
- ``overhead``: the engine (``deblur_lazy``, ``deblur_array``) against the bare
  forward passes of the same tiles, and against one whole-plane forward per plane;
- ``waste``: pixels the network computes (every tile, padded to the network's size
  multiple) over the plane's pixels, for the tile planner before issue 20 (computed
  analytically) and now, plain and with planes of fewer tiles cut for ``--split`` CPU
  workers (as the engine does), for a table of plane shapes and the worst case over a grid.

Without ``--model FILE`` the network is a randomly initialised preset
(``torch.manual_seed(0)``): a worst case for ``agreement``. ``--json FILE`` saves
the rows; ``--baseline FILE`` prints each figure's ratio to the row of an earlier
``--json`` file with the same key.

Examples::

    python benchmarks/bench_inference.py throughput --preset lite --planes 4 --size 1024 --threads 2
    python benchmarks/bench_inference.py throughput --preset paper --device cuda --precision fp16 --json gpu.json
    python benchmarks/bench_inference.py memory --planes 2 5 20 --size 2048
    python benchmarks/bench_inference.py agreement --tiles 256 512 --overlaps 32 64 96 --model mpt.safetensors
    python benchmarks/bench_inference.py overhead --cases 4x512 8x256 --repeats 5 --baseline overhead.json
    python benchmarks/bench_inference.py waste --shapes 1024x1024 660x550 1x5000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Row = dict[str, Any]

KEYS = {
    "throughput": ("model", "planes", "size", "device", "precision", "tile"),
    "memory": ("model", "planes", "size", "device", "tile"),
    "agreement": ("model", "size", "tile", "overlap", "device", "precision"),
    "overhead": ("model", "planes", "size", "device", "precision"),
    "waste": ("model", "shape", "tile", "overlap"),
}
# (field, header, format) of the table columns
COLUMNS: dict[str, list[tuple[str, str, str]]] = {
    "throughput": [
        ("planes", "Z", "4d"), ("size", "size", "5d"), ("device", "device", "6s"), ("precision", "prec", "5s"),
        ("tile", "tile", "5d"), ("tiles_per_plane", "tiles", "5d"), ("median_s", "median s", "9.3f"),
        ("min_s", "min s", "8.3f"), ("megapixels_per_s", "MPix/s", "8.3f"),
    ],
    "memory": [
        ("planes", "Z", "4d"), ("size", "size", "5d"), ("device", "device", "6s"), ("tile", "tile", "5d"),
        ("input_mb", "input MB", "9.1f"), ("model_rss_mb", "start MB", "9.0f"), ("peak_rss_mb", "peak MB", "8.0f"),
        ("time_s", "time s", "8.2f"), ("megapixels_per_s", "MPix/s", "7.3f"),
    ],
    "agreement": [
        ("size", "size", "5d"), ("tile", "tile", "5d"), ("overlap", "overlap", "7d"), ("overlap_used", "used", "5d"),
        ("tiles_per_plane", "tiles", "5d"), ("psnr_db", "PSNR dB", "8.2f"), ("max_abs_diff", "max |d|", "8.4f"),
        ("time_s", "tiled s", "8.2f"), ("whole_s", "whole s", "8.2f"),
    ],
    "overhead": [
        ("planes", "Z", "4d"), ("size", "size", "5d"), ("tiles_per_plane", "tiles", "5d"), ("lazy_s", "lazy s", "8.3f"),
        ("array_s", "array s", "8.3f"), ("tiles_s", "tiles s", "8.3f"), ("whole_s", "whole s", "8.3f"),
        ("lazy_vs_tiles_pct", "lazy/tiles%", "+11.1f"), ("array_vs_tiles_pct", "array/tiles%", "+12.1f"),
        ("lazy_vs_whole_pct", "lazy/whole%", "+11.1f"), ("array_vs_whole_pct", "array/whole%", "+12.1f"),
    ],
    "waste": [
        ("shape", "plane", "11s"), ("old_tiles", "old tiles", "9d"), ("old_tile_shape", "old tile", "10s"),
        ("old_ratio", "old x", "7.3f"), ("tiles", "tiles", "5d"), ("tile_shape", "tile", "10s"),
        ("ratio", "new x", "7.3f"), ("split_tiles", "cut tiles", "9d"), ("split_ratio", "cut x", "7.3f"),
    ],
}  # fmt: skip
FIGURES = {
    "throughput": ("median_s", "megapixels_per_s"),
    "memory": ("peak_rss_mb", "time_s"),
    "agreement": ("psnr_db",),
    "overhead": ("lazy_s", "array_s", "tiles_s", "whole_s"),
    "waste": ("ratio", "split_ratio"),
}
DEFAULT_SHAPES = [
    "512x512", "660x550", "768x768", "1000x1000", "1024x1024", "1024x2048", "1500x1500", "2048x2048", "3000x3000",
    "4096x4096", "4096x513", "1025x777", "1x5000", "64x5000", "9x660x550",
]  # fmt: skip


# --- inputs ---------------------------------------------------------------------------------------------------------


def synthetic_plane(rng: np.random.Generator, size: int) -> np.ndarray:
    """A uint16 plane: smooth stripes and blobs plus noise (the timing does not depend on the content)."""
    y, x = np.ogrid[:size, :size]
    pattern = 1 + np.sin(x / 17.0 + rng.uniform(0, 6)) * np.cos(y / 23.0)
    return np.clip(300 + 1500 * pattern + rng.normal(0, 50, (size, size)), 0, 65535).astype(np.uint16)


def synthetic_stack(planes: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([synthetic_plane(rng, size) for _ in range(planes)])


def sample_image(size: int) -> np.ndarray:
    """skimage's ``cell`` (660x550, bundled: no download), float32 in [0, 1], mirrored or cropped to size x size."""
    from skimage.data import cell

    image = cell().astype(np.float32) / 255
    pad = ((0, max(0, size - image.shape[0])), (0, max(0, size - image.shape[1])))
    return np.ascontiguousarray(np.pad(image, pad, mode="symmetric")[:size, :size])


def write_stack(path: Path, planes: int, size: int) -> None:
    """A ZYX uint16 TIFF, written plane by plane (the whole stack is never in memory)."""
    import tifffile

    rng = np.random.default_rng(0)
    pages = (synthetic_plane(rng, size) for _ in range(planes))
    tifffile.imwrite(path, pages, shape=(planes, size, size), dtype=np.uint16, metadata={"axes": "ZYX"})


# --- one configuration, in a fresh process --------------------------------------------------------------------------


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(function: Callable[[], Any], sync: Callable[[], None]) -> float:
    start = time.perf_counter()
    function()
    sync()
    return time.perf_counter() - start


def measure(job: dict[str, Any]) -> list[Row]:
    import torch

    from napari_mpt_deblur import build_model, load_model
    from napari_mpt_deblur.config import ConfigError, DeblurSettings
    from napari_mpt_deblur.inference import Deblurrer, deblur_array, deblur_file, deblur_lazy
    from napari_mpt_deblur.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    if job["model"]:
        model, label = load_model(job["model"]), Path(job["model"]).name
    else:
        overrides = {"pairing": job["pairing"]} if job["pairing"] else {}
        model = build_model(job["preset"], **overrides)
        label = f"{job['preset']}/{model.config.pairing} (random)"
    device_settings = {"device": job["device"], "precision": job["precision"]}
    deblurrer = Deblurrer(model, DeblurSettings(tile=job.get("tile"), **device_settings))
    device = deblurrer.device
    precision = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[deblurrer.autocast]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    what, size = job["what"], job["size"]
    common = {"what": what, "model": label, "size": size, "device": device.type, "precision": precision}
    common |= {"threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    pixels = job.get("planes", 1) * size * size

    # the tiles the engine runs: Deblurrer.overlap is the overlap in use (the setting may be adjusted)
    grid = deblurrer.tile_windows(size, size)
    common |= {"tile": deblurrer.tile, "overlap": deblurrer.overlap, "tiles_per_plane": len(grid)}

    if what == "throughput":
        stack = synthetic_stack(job["planes"], size)
        deblur_array(deblurrer, stack[:1])  # warm-up: per-size caches, kernels
        times = [timed(lambda: deblur_array(deblurrer, stack), sync) for _ in range(job["repeats"])]
        median = statistics.median(times)
        return [common | {"planes": job["planes"], "median_s": median, "min_s": min(times),
                          "megapixels_per_s": pixels / median / 1e6, "peak_rss_mb": maxrss_mb()}]  # fmt: skip

    if what == "memory":
        side = min(deblurrer.tile or size, size)  # warm-up on one tile: the model's caches are not the stack's cost
        deblur_array(deblurrer, synthetic_stack(1, side)[0])
        start_mb = maxrss_mb()
        elapsed = timed(lambda: deblur_file(deblurrer, job["source"], job["target"]), sync)
        row = common | {"planes": job["planes"], "input_mb": pixels * 2 / 2**20, "model_rss_mb": start_mb}
        row |= {"peak_rss_mb": maxrss_mb(), "time_s": elapsed, "megapixels_per_s": pixels / elapsed / 1e6}
        row |= {"output_mb": os.path.getsize(job["target"]) / 2**20}
        if device.type == "cuda":
            row["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return [row]

    if what == "agreement":
        image = sample_image(size)
        start = time.perf_counter()
        reference = deblur_array(model, image, settings=DeblurSettings(tile=0, **device_settings))
        whole_s = time.perf_counter() - start
        data_range = float(reference.max() - reference.min())
        rows = []
        for tile in job["tiles"]:
            for overlap in job["overlaps"]:
                try:
                    settings = DeblurSettings(tile=tile, overlap=overlap, **device_settings)
                except ConfigError as error:
                    print(f"tile {tile}, overlap {overlap}: skipped ({error})", file=sys.stderr)
                    continue
                used = Deblurrer(model, settings)
                start = time.perf_counter()
                tiled = deblur_array(model, image, settings=settings)
                elapsed = time.perf_counter() - start
                error = tiled.astype(np.float64) - reference
                mse = float(np.mean(error**2))
                psnr = 10 * math.log10(data_range**2 / mse) if mse > 0 else math.inf
                rows.append(common | {"tile": tile, "overlap": overlap, "overlap_used": used.overlap,
                                      "tiles_per_plane": used.tiles_per_plane(size, size), "psnr_db": psnr,
                                      "max_abs_diff": float(np.abs(error).max()), "time_s": elapsed,
                                      "whole_s": whole_s, "data_range": data_range})  # fmt: skip
        return rows

    # overhead: the engine against bare forwards of the same (normalised) tiles
    stack = synthetic_stack(job["planes"], size)
    ranges = [np.percentile(plane, (1, 99.8)) for plane in stack]  # as the engine normalises by default
    planes = [
        torch.from_numpy(((p - lo) / (hi - lo)).astype(np.float32))[None, None].to(device)
        for p, (lo, hi) in zip(stack, ranges)
    ]
    batch = deblurrer.batch
    tile_batches = [
        torch.cat([plane[(0, ..., *w)][None] for w in grid[i : i + batch]]).contiguous()
        for plane in planes
        for i in range(0, len(grid), batch)
    ]
    autocast = deblurrer.autocast

    def bare(inputs: list[torch.Tensor]) -> None:
        cast = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
        with torch.inference_mode(), cast:
            for x in inputs:
                model(x)

    variants: dict[str, Callable[[], Any]] = {
        "lazy_s": lambda: deblur_lazy(deblurrer, stack).compute(scheduler="threads"),
        "array_s": lambda: deblur_array(deblurrer, stack),
        "tiles_s": lambda: bare(tile_batches),
        "whole_s": lambda: bare(planes),
    }
    for run in variants.values():  # warm-up: caches for the tile and the plane size
        timed(run, sync)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(job["repeats"]):  # interleaved, so drifts hit every variant alike
        for name, run in variants.items():
            times[name].append(timed(run, sync))
    row = common | {"planes": job["planes"], "batch": batch}
    row |= {name: statistics.median(values) for name, values in times.items()}
    for engine in ("lazy", "array"):
        for bare_name in ("tiles", "whole"):
            row[f"{engine}_vs_{bare_name}_pct"] = 100 * (row[f"{engine}_s"] / row[f"{bare_name}_s"] - 1)
    return [row]


# --- tile waste (no forward passes) ---------------------------------------------------------------------------------


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def legacy_axis_tiles(length: int, tile: int, overlap: int) -> tuple[int, int]:
    """(count, size) along one axis, as planned before issue 20: tiles of min(tile, length), tile - overlap apart."""
    if tile >= length:
        return 1, length
    return math.ceil((length - tile) / (tile - overlap)) + 1, tile


def legacy_plan(height: int, width: int, tile: int, multiple: int) -> tuple[int, tuple[int, int], int]:
    """(tiles, tile shape, computed pixels) of the old planner at its default overlap (a quarter of the tile, <= 64)."""
    overlap = min(64, tile // 4)
    (rows, tile_h), (columns, tile_w) = (
        legacy_axis_tiles(height, tile, overlap),
        legacy_axis_tiles(width, tile, overlap),
    )
    return rows * columns, (tile_h, tile_w), rows * columns * round_up(tile_h, multiple) * round_up(tile_w, multiple)


def parse_shape(text: str) -> tuple[int, int, int]:
    """'HxW' or 'ZxHxW' (planes, height, width)."""
    numbers = [int(n) for n in text.lower().split("x")]
    return (1, *numbers) if len(numbers) == 2 else tuple(numbers)  # type: ignore[return-value]


def waste_rows(args: argparse.Namespace) -> list[Row]:
    """Computed over plane pixels, old planner and new, for ``args.shapes``, then the worst over a grid."""
    from napari_mpt_deblur import build_model, load_model
    from napari_mpt_deblur.config import DeblurSettings
    from napari_mpt_deblur.inference import Deblurrer
    from napari_mpt_deblur.tiling import TilePlan, plan_for_workers, plan_tiles

    model = load_model(args.model) if args.model else build_model(args.preset)
    label = Path(args.model).name if args.model else args.preset
    deblurrer = Deblurrer(model, DeblurSettings(tile=args.tile, overlap=args.overlap, device="cpu"))
    tile, overlap, multiple = deblurrer.tile, deblurrer.overlap, deblurrer.size_multiple

    def ratios(height: int, width: int) -> tuple[float, float]:
        plan = plan_tiles(height, width, tile, overlap, multiple, deblurrer.tile_growth)
        return legacy_plan(height, width, tile, multiple)[2] / (height * width), plan.computed_pixels / (height * width)

    def cut_plan(height: int, width: int) -> TilePlan:
        return plan_for_workers(height, width, tile, overlap, multiple, deblurrer.tile_growth, args.split)

    def cut_ratio(height: int, width: int) -> float:
        return cut_plan(height, width).computed_pixels / (height * width)

    rows = []
    for text in args.shapes:
        planes, height, width = parse_shape(text)
        old_tiles, old_shape, _ = legacy_plan(height, width, tile, multiple)
        plan = plan_tiles(height, width, tile, overlap, multiple, deblurrer.tile_growth)
        old_ratio, ratio = ratios(height, width)
        rows.append({"what": "waste", "model": label, "shape": text, "tile": tile, "overlap": overlap,
                     "multiple": multiple, "device": "any", "threads": 0, "old_tiles": planes * old_tiles,
                     "old_tile_shape": "x".join(map(str, old_shape)), "old_ratio": old_ratio,
                     "tiles": planes * plan.count, "tile_shape": "x".join(map(str, plan.tile_shape)),
                     "ratio": ratio, "split": args.split, "split_tiles": planes * cut_plan(height, width).count,
                     "split_ratio": cut_ratio(height, width)})  # fmt: skip
    squares = range(512, 4097)
    rectangles = [(h, w) for h in range(512, 4097, 64) for w in range(512 + 29, 4097, 67)]
    for name, shapes in (("squares 512..4096", [(s, s) for s in squares]), ("rectangles 512..4096", rectangles)):
        old_worst = max(shapes, key=lambda shape: ratios(*shape)[0])
        worst = max(shapes, key=lambda shape: ratios(*shape)[1])
        cut_worst = max(shapes, key=lambda shape: cut_ratio(*shape))
        print(f"# {name} ({len(shapes)} shapes): worst old {ratios(*old_worst)[0]:.3f} at {old_worst}, "
              f"worst new {ratios(*worst)[1]:.3f} at {worst}, cut for {args.split} workers "
              f"{cut_ratio(*cut_worst):.3f} at {cut_worst}; mean old "
              f"{statistics.mean(ratios(*s)[0] for s in shapes):.3f}, new "
              f"{statistics.mean(ratios(*s)[1] for s in shapes):.3f}, cut "
              f"{statistics.mean(cut_ratio(*s) for s in shapes):.3f}")  # fmt: skip
    return rows


# --- driver ---------------------------------------------------------------------------------------------------------


def run_child(job: dict[str, Any]) -> list[Row]:
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
    if result.returncode:
        print(f"{job['what']} {job.get('planes', '')} {job['size']}: failed\n{result.stderr[-3000:]}", file=sys.stderr)
        return []
    if result.stderr.strip():  # skipped configurations, warnings
        print(result.stderr.strip()[-2000:], file=sys.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def jobs_and_rows(args: argparse.Namespace) -> list[Row]:
    if args.what == "waste":
        return waste_rows(args)
    job = {k: getattr(args, k, None) for k in ("model", "preset", "pairing", "device", "precision", "threads", "tile")}
    job |= {"what": args.what, "repeats": args.repeats}
    if args.what == "throughput":
        return run_child(job | {"planes": args.planes, "size": args.size})
    if args.what == "agreement":
        return run_child(job | {"size": args.size, "tiles": args.tiles, "overlaps": args.overlaps})
    rows: list[Row] = []
    if args.what == "overhead":
        for case in args.cases:
            planes, size = (int(n) for n in case.lower().split("x"))
            rows += run_child(job | {"planes": planes, "size": size})
        return rows
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as folder:
        for planes in args.planes:
            source, target = Path(folder) / f"in-{planes}.tif", Path(folder) / f"out-{planes}.tif"
            write_stack(source, planes, args.size)  # in this process: the measured one only reads it
            rows += run_child(job | {"planes": planes, "size": args.size, "source": str(source), "target": str(target)})
            source.unlink()
            target.unlink(missing_ok=True)
    return rows


def print_table(what: str, rows: list[Row], baseline: dict[tuple, Row]) -> None:
    columns = COLUMNS[what]
    widths = [int(fmt.strip("+sdf").split(".")[0]) for _, _, fmt in columns]
    print(" ".join(f"{h:<{w}}" if f.endswith("s") else f"{h:>{w}}" for (_, h, f), w in zip(columns, widths)))
    for row in rows:
        print(" ".join(f"{row[field]:{fmt}}" for field, _, fmt in columns))
        old = baseline.get(tuple(row[k] for k in KEYS[what]))
        if old:
            ratios = [f"x{row[f] / old[f]:.2f} {f}" for f in FIGURES[what] if old.get(f)]
            threads = "" if old.get("threads") == row["threads"] else f" (baseline: {old.get('threads')} threads)"
            print("    vs baseline: " + ", ".join(ratios) + threads)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(measure(json.loads(sys.argv[2]))))
        return

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--preset", "--model-preset", default="lite", help="preset, randomly initialised (seed 0)")
    common.add_argument("--pairing", choices=("aligned", "official"), help="default: the preset's")
    common.add_argument("--model", help="a model file (load_model) instead of a random preset")
    common.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    common.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    common.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    common.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    common.add_argument("--json", help="write the rows to this file")
    common.add_argument("--baseline", help="compare with rows written earlier by --json")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    throughput = sub.add_parser("throughput", parents=[common], help="MPix/s of deblur_array")
    throughput.add_argument("--planes", type=int, default=4)
    throughput.add_argument("--size", type=int, default=1024)
    throughput.add_argument("--tile", type=int, help="default: the model's tile size")
    memory = sub.add_parser("memory", parents=[common], help="peak RSS of deblur_file TIFF -> TIFF")
    memory.add_argument("--planes", type=int, nargs="+", default=[20], help="stack depths, e.g. 2 5 20")
    memory.add_argument("--size", type=int, default=2048)
    memory.add_argument("--tile", type=int, help="default: the model's tile size")
    memory.add_argument("--tmpdir", help="where the TIFF files go (default: the system's temporary folder)")
    agreement = sub.add_parser("agreement", parents=[common], help="PSNR of tiled against whole-plane output")
    agreement.add_argument("--size", type=int, default=1024)
    agreement.add_argument("--tiles", type=int, nargs="+", default=[256, 512])
    agreement.add_argument("--overlaps", type=int, nargs="+", default=[32, 64, 96])
    overhead = sub.add_parser("overhead", parents=[common], help="engine time against bare forward passes")
    overhead.add_argument("--cases", nargs="+", default=["4x512", "8x256"], help="PLANESxSIZE")
    waste = sub.add_parser("waste", parents=[common], help="pixels computed over plane pixels, old and new planner")
    waste.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="HxW or ZxHxW")
    waste.add_argument("--tile", type=int, help="default: the model's tile size")
    waste.add_argument("--overlap", type=int, help="default: the engine's")
    waste.add_argument(
        "--split", type=int, default=2, help="CPU workers a plane of fewer tiles is cut for (the engine: its threads)"
    )
    args = parser.parse_args()

    import torch

    threads = args.threads or torch.get_num_threads()
    print(f"# {args.what}: {os.cpu_count()} CPUs, {threads} torch threads, torch {torch.__version__}", flush=True)
    rows = jobs_and_rows(args)
    baseline: dict[tuple, Row] = {}
    if args.baseline:
        with open(args.baseline) as handle:
            baseline = {tuple(r[k] for k in KEYS[args.what]): r for r in json.load(handle) if r["what"] == args.what}
    if rows:
        timing = f", median of {args.repeats}" if args.what in ("throughput", "overhead") else ""
        if args.what == "waste":
            timing = f", tile {rows[0]['tile']}, overlap {rows[0]['overlap']}, size multiple {rows[0]['multiple']}"
        print(f"# model: {rows[0]['model']}, device {rows[0]['device']}{timing}")
        print_table(args.what, rows, baseline)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()

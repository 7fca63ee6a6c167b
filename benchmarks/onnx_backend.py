"""Whether ONNX Runtime or OpenVINO runs the default network faster on the CPU than torch eager.

The network is exported to ONNX once (the TorchScript exporter, ``dynamo=False``,
fixed input shape), then one image is deblurred by every arm in turn, round after
round in one process, so that all arms see the same background load:

- ``torch``: eager fp32 under ``torch.inference_mode()`` (the engine's path);
- ``ort-all`` / ``ort-extended``: ONNX Runtime's CPUExecutionProvider with graph
  optimisation ``ORT_ENABLE_ALL`` / ``ORT_ENABLE_EXTENDED``;
- ``ort-all-nospin``: ``ORT_ENABLE_ALL`` with ``session.intra_op.allow_spinning = 0``
  (idle threads sleep instead of spinning: fairer to a CPU shared with other work);
- ``openvino``: the same ONNX file compiled by OpenVINO for its CPU plugin, f32
  inference precision, latency hint.

All arms run on ``--threads`` threads. For each the table gives the median and
the fastest time of one forward, GFLOP/s (the FLOPs that ``cpu_efficiency.forward_gflop``
counts, over the median time), that over a 2048^2 ``torch.matmul``'s GFLOP/s timed
once a round between the arms, the median of the per-round time ratios to torch,
and the largest absolute difference of its output from torch's on a smooth
random image in 0..1. An arm whose package is not installed is skipped with a message.

The exporter traces the network with gradients enabled (and parameters that
require them): there the network computes whole maps with out-of-place ops,
instead of the CPU's strip-by-strip, in-place inference path, which the
exporter cannot trace (``softmax(out=...)``). Some window layouts may be
baked into the graph as index constants: the file took 9 MB traced at 544^2
but 345 MB in a trial at 576^2. ``--dynamic HxW`` also exports with dynamic
height and width and reports whether that file runs, and agrees with torch, at HxW.

Examples::

    python benchmarks/onnx_backend.py                                  # 544^2 (the network pads it to 576^2), 5 rounds
    python benchmarks/onnx_backend.py --shape 1024x576 --rounds 7 --arms torch ort-all openvino
    python benchmarks/onnx_backend.py --shape 128x128 --dynamic 192x192 --rounds 3 --keep model.onnx
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cpu_efficiency import forward_gflop, matmul_gflops
from napari_mpt_deblur.models.files import load_model
from napari_mpt_deblur.runtime import tune_cpu_allocator

ARMS = ("torch", "ort-all", "ort-extended", "ort-all-nospin", "openvino")

Runner = Callable[[np.ndarray], np.ndarray]


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A (1, 1, height, width) float32 image in 0..1: bicubic upsampling of coarse uniform noise."""
    coarse = torch.from_numpy(np.random.default_rng(seed).random((1, 1, height // 32 + 2, width // 32 + 2)))
    image = F.interpolate(coarse.float(), size=(height, width), mode="bicubic", align_corners=True)
    return image.clamp(0, 1).numpy()


def export_onnx(model: torch.nn.Module, path: Path, shape: tuple[int, int], opset: int, dynamic: bool) -> float:
    """Export ``model`` for a (1, C, *shape) input to ``path``; the seconds it took."""
    flags = [p.requires_grad for p in model.parameters()]
    example = torch.zeros(1, model.config.in_channels, *shape)
    axes = {"image": {2: "height", 3: "width"}, "deblurred": {2: "height", 3: "width"}} if dynamic else None
    start = time.perf_counter()
    try:
        for p in model.parameters():
            p.requires_grad_(True)  # whole maps, out-of-place ops (see the module docstring)
        with torch.enable_grad():
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=["image"],
                output_names=["deblurred"],
                dynamic_axes=axes,
            )
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return time.perf_counter() - start


def torch_runner(model: torch.nn.Module) -> Runner:
    def run(image: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(image)).numpy()

    return run


def ort_runner(path: Path, threads: int, level: str, spinning: bool) -> Runner | str:
    """An ONNX Runtime CPU session's runner, or why there is none."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed (pip install onnxruntime)"
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda image: session.run(None, {name: image})[0]


def openvino_runner(path: Path, threads: int) -> Runner | str:
    """An OpenVINO CPU runner (f32, latency hint), or why there is none."""
    try:
        import openvino as ov
    except ImportError:
        return "openvino is not installed (pip install openvino)"
    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(str(path)),
        "CPU",
        {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"},
    )
    request = compiled.create_infer_request()

    def run(image: np.ndarray) -> np.ndarray:
        request.infer({0: image})
        return request.get_output_tensor(0).data.copy()

    return run


def make_runner(arm: str, model: torch.nn.Module, path: Path, threads: int) -> Runner | str:
    if arm == "torch":
        return torch_runner(model)
    if arm == "openvino":
        return openvino_runner(path, threads)
    level = "ORT_ENABLE_EXTENDED" if arm == "ort-extended" else "ORT_ENABLE_ALL"
    return ort_runner(path, threads, level, spinning=arm != "ort-all-nospin")


def check_dynamic(model: torch.nn.Module, shape: tuple[int, int], other: tuple[int, int], opset: int) -> str:
    """Export with dynamic height and width at ``shape``; what happens at ``other`` under ONNX Runtime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "dynamic export not checked: onnxruntime is not installed"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "dynamic.onnx"
        try:
            export_onnx(model, path, shape, opset, dynamic=True)
        except Exception as error:  # noqa: BLE001 - report any exporter failure
            return f"dynamic export failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        image = smooth_image(*other)
        try:
            out = session.run(None, {"image": image})[0]
        except Exception as error:  # noqa: BLE001 - report any runtime failure
            return f"dynamic export at {shape}, run at {other} failed: {str(error).splitlines()[0][:300]}"
        reference = torch_runner(model)(image)
        if out.shape != reference.shape:
            return f"dynamic export ran at {other} but gave shape {out.shape}, torch {reference.shape}"
        return f"dynamic export ran at {other}: max |ORT - torch| {np.abs(out - reference).max():.2e}"


def measure(args: argparse.Namespace, model: torch.nn.Module, path: Path) -> dict[str, Any]:
    height, width = args.shape
    image = smooth_image(height, width)
    runners: dict[str, Runner] = {}
    report: dict[str, Any] = {"shape": f"{height}x{width}", "threads": args.threads, "arms": {}, "skipped": {}}
    for arm in args.arms:
        start = time.perf_counter()
        runner = make_runner(arm, model, path, args.threads)
        if isinstance(runner, str):
            print(f"skipping {arm}: {runner}")
            report["skipped"][arm] = runner
            continue
        runners[arm] = runner
        output = runner(image)  # warm-up: per-size caches, ORT's first-run allocations
        report["arms"][arm] = {"setup_s": time.perf_counter() - start, "output": output, "times": []}
    reference = report["arms"]["torch"]["output"] if "torch" in runners else None
    gflop = forward_gflop(model, height, width)
    matmul = []
    names = list(runners)
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for arm in names[shift:] + names[:shift]:  # rotate the order: no arm always runs first
            start = time.perf_counter()
            runners[arm](image)
            report["arms"][arm]["times"].append(time.perf_counter() - start)
        matmul.append(matmul_gflops())
    report["gflop"] = gflop
    report["matmul_gflops"] = statistics.median(matmul)
    for row in report["arms"].values():
        output = row.pop("output")
        times = row["times"]
        row["median_s"] = statistics.median(times)
        row["min_s"] = min(times)
        row["gflops"] = gflop / row["median_s"]
        row["of_matmul"] = row["gflops"] / report["matmul_gflops"]
        if reference is not None:
            row["max_abs_diff"] = float(np.abs(output - reference).max())
            torch_times = report["arms"]["torch"]["times"]
            row["paired_ratio"] = statistics.median(t / r for t, r in zip(times, torch_times))
    return report


def print_report(report: dict[str, Any]) -> None:
    print(
        f"input 1x1x{report['shape']}  threads {report['threads']}  {report['gflop']:.1f} GFLOP per forward  "
        f"matmul {report['matmul_gflops']:.0f} GFLOP/s (median)"
    )
    header = ("arm", "median s", "min s", "GFLOP/s", "of matmul", "/torch", "max|d|", "setup s")
    print(" ".join(f"{name:>{width}}" for name, width in zip(header, (15, 9, 7, 8, 9, 7, 9, 8))))
    for arm, row in report["arms"].items():
        ratio = f"{row['paired_ratio']:7.2f}" if "paired_ratio" in row else f"{'-':>7}"
        diff = f"{row['max_abs_diff']:9.1e}" if "max_abs_diff" in row else f"{'-':>9}"
        print(
            f"{arm:>15} {row['median_s']:9.3f} {row['min_s']:7.3f} {row['gflops']:8.1f} {row['of_matmul']:9.2f} "
            f"{ratio} {diff} {row['setup_s']:8.1f}"
        )
    print("/torch: median over rounds of the arm's time over torch's in the same round (below 1 = faster)")


def parse_shape(text: str) -> tuple[int, int]:
    height, width = (int(n) for n in text.lower().split("x"))
    return height, width


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="a model file or bundled name (default: default)")
    parser.add_argument("--shape", type=parse_shape, default=(544, 544), help="HxW of the input (default: 544x544)")
    parser.add_argument("--rounds", type=int, default=5, help="timed forwards of every arm, interleaved")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--keep", type=Path, help="write the ONNX file here (default: a temporary folder)")
    parser.add_argument("--dynamic", type=parse_shape, metavar="HxW", help="also try a dynamic-size export run at HxW")
    parser.add_argument("--json", type=Path, help="save the figures")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    model = load_model(args.model).eval()
    with tempfile.TemporaryDirectory() as folder:
        path = args.keep or Path(folder) / "model.onnx"
        seconds = export_onnx(model, path, args.shape, args.opset, dynamic=False)
        print(f"exported {path.stat().st_size / 2**20:.0f} MB ONNX (opset {args.opset}) in {seconds:.0f} s")
        report = measure(args, model, path)
    print_report(report)
    if args.dynamic:
        report["dynamic"] = check_dynamic(model, args.shape, args.dynamic, args.opset)
        print(report["dynamic"])
    versions = {"torch": torch.__version__}
    for package in ("onnxruntime", "onnx", "openvino"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            pass
    report["versions"] = versions
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

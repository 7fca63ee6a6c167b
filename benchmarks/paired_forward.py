"""Forward time of this checkout against another git revision, paired in one process.

On a shared machine the speed drifts by 10 % from one minute (or process) to
the next, more than most changes to the network are worth. This script loads
the network of revision ``--against`` (from ``git archive``, under another
package name) next to the working tree's, gives both the same weights,
checks that they agree, and alternates their forward passes. The median of the
per-pair time ratios cancels the drift; the medians alone do not.

With ``--engine`` it times the whole inference engine instead, as a user meets
it: each revision loads ``--model`` (default: the bundled default model) with its
own code and deblurs a ``--size`` x ``--size`` plane (scikit-image's ``cell``,
mirrored to size) with ``deblur_array`` at its own default settings (tiles,
overlap, threads), so tile planning and threading count as well as the network.
It prints megapixels per second and how closely the two outputs agree.

Examples::

    python benchmarks/paired_forward.py --against HEAD
    python benchmarks/paired_forward.py --against v0.1.0 --pairing aligned --size 512 --pairs 6
    python benchmarks/paired_forward.py --against 5b4dc6f --engine --size 1024 --pairs 6
"""

from __future__ import annotations

import argparse
import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "src/napari_mpt_deblur"


def import_revision(revision: str, folder: Path):
    """The ``models.presets`` module of ``revision``, imported as package ``mpt_deblur_baseline``."""
    result = subprocess.run(["git", "archive", "--format=tar", revision, PACKAGE], cwd=REPO, capture_output=True)
    if result.returncode:
        sys.exit(f"cannot read {PACKAGE} at {revision!r}: {result.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(result.stdout)) as tar:
        tar.extractall(folder, filter="data")
    (folder / PACKAGE).rename(folder / "mpt_deblur_baseline")
    sys.path.insert(0, str(folder))
    return importlib.import_module("mpt_deblur_baseline.models.presets")


def paired_times(first, second, pairs: int) -> tuple[list[float], list[float]]:
    """Seconds of ``pairs`` calls of each function, alternating which goes first."""
    first_times: list[float] = []
    second_times: list[float] = []
    timed = [(first, first_times), (second, second_times)]
    for index in range(pairs):
        for function, times in timed if index % 2 == 0 else reversed(timed):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
    return first_times, second_times


def report(label: str, against: str, baseline_times: list[float], current_times: list[float], pairs: int) -> None:
    ratios = [new / old for new, old in zip(current_times, baseline_times)]
    print(label)
    print(f"  {against:>12s}: median {statistics.median(baseline_times):.3f} s")
    print(f"  {'working tree':>12s}: median {statistics.median(current_times):.3f} s")
    quartiles = statistics.quantiles(ratios, n=4)
    print(
        f"  paired time ratio (working tree / {against}): median {statistics.median(ratios):.3f} "
        f"(quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}, {pairs} pairs)"
    )


def engine(args: argparse.Namespace) -> None:
    """The inference engine of both revisions at their default settings on one plane."""
    import numpy as np

    from bench_inference import sample_image
    from napari_mpt_deblur.inference import deblur_array
    from napari_mpt_deblur.models.files import load_model

    plane = sample_image(args.size)
    model_file = args.model or str(REPO / PACKAGE / "weights" / "default.safetensors")
    with tempfile.TemporaryDirectory() as folder:
        import_revision(args.against, Path(folder))
        baseline_engine = importlib.import_module("mpt_deblur_baseline.inference")
        baseline_model = importlib.import_module("mpt_deblur_baseline.models.files").load_model(model_file)
        current_model = load_model(model_file)
        outputs = {}

        def run_baseline() -> None:
            outputs["baseline"] = baseline_engine.deblur_array(baseline_model, plane)

        def run_current() -> None:
            outputs["current"] = deblur_array(current_model, plane)

        run_baseline()  # warm-up, both
        run_current()
        baseline_times, current_times = paired_times(run_baseline, run_current, args.pairs)
    megapixels = plane.size / 1e6
    report(
        f"engine at default settings, {args.size}x{args.size} plane, model {Path(model_file).name}",
        args.against,
        baseline_times,
        current_times,
        args.pairs,
    )
    for name, times in ((args.against, baseline_times), ("working tree", current_times)):
        print(f"  {name:>12s}: {megapixels / statistics.median(times):.3f} megapixels per second")
    difference = outputs["current"].astype(np.float64) - outputs["baseline"]
    peak = float(np.ptp(outputs["baseline"])) or 1.0
    agreement = 10 * np.log10(peak**2 / max(float(np.mean(difference**2)), 1e-20))
    print(f"  outputs agree to {agreement:.2f} dB (PSNR of one against the other, range of {args.against}'s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", default="HEAD", help="git revision to compare with (default: HEAD)")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--pairing", default="official", choices=("aligned", "official"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=12, help="forward passes of each network")
    parser.add_argument(
        "--engine", action="store_true", help="time the whole inference engine at default settings (see above)"
    )
    parser.add_argument("--model", help="with --engine: the model file (default: the bundled default model)")
    args = parser.parse_args()
    if args.pairs < 2:
        parser.error("--pairs must be at least 2 (the ratios' quartiles need two)")
    if args.engine:
        engine(args)
        return

    import torch

    from napari_mpt_deblur.models.presets import build_model
    from napari_mpt_deblur.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        baseline_presets = import_revision(args.against, Path(folder))
        torch.manual_seed(0)
        baseline = baseline_presets.build_model(args.preset, pairing=args.pairing, channels=args.channels).eval()
        current = build_model(args.preset, pairing=args.pairing, channels=args.channels).eval()
        current.load_state_dict(baseline.state_dict())
        x = torch.rand(1, args.channels, args.size, args.size)
        with torch.inference_mode():
            difference = (baseline(x) - current(x)).abs().max().item()  # also the warm-up
            baseline_times, current_times = paired_times(lambda: baseline(x), lambda: current(x), args.pairs)
    label = f"{args.preset} {args.pairing} 1x{args.channels}x{args.size}x{args.size}, {args.threads} threads"
    report(label, args.against, baseline_times, current_times, args.pairs)
    print(f"  max output difference: {difference:.2e}")


if __name__ == "__main__":
    main()

"""Forward time of this checkout against another git revision, paired in one process.

On a shared machine the speed drifts by 10 % from one minute (or process) to
the next, more than most changes to the network are worth. This script loads
the network of revision ``--against`` (from ``git archive``, under another
package name) next to the working tree's, gives both the same weights,
checks that they agree, and alternates their forward passes. The median of the
per-pair time ratios cancels the drift; the medians alone do not.

Examples::

    python benchmarks/paired_forward.py --against HEAD
    python benchmarks/paired_forward.py --against v0.1.0 --pairing aligned --size 512 --pairs 6
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", default="HEAD", help="git revision to compare with (default: HEAD)")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--pairing", default="official", choices=("aligned", "official"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=12, help="forward passes of each network")
    args = parser.parse_args()
    if args.pairs < 2:
        parser.error("--pairs must be at least 2 (the ratios' quartiles need two)")

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
        baseline_times: list[float] = []
        current_times: list[float] = []
        timed = [(baseline, baseline_times), (current, current_times)]
        with torch.inference_mode():
            difference = (baseline(x) - current(x)).abs().max().item()  # also the warm-up
            for index in range(args.pairs):
                for network, times in timed if index % 2 == 0 else reversed(timed):
                    start = time.perf_counter()
                    network(x)
                    times.append(time.perf_counter() - start)
    ratios = [new / old for new, old in zip(current_times, baseline_times)]
    print(f"{args.preset} {args.pairing} 1x{args.channels}x{args.size}x{args.size}, {args.threads} threads")
    print(f"  {args.against:>12s}: median {statistics.median(baseline_times):.3f} s")
    print(f"  {'working tree':>12s}: median {statistics.median(current_times):.3f} s")
    quartiles = statistics.quantiles(ratios, n=4)
    print(
        f"  paired time ratio (working tree / {args.against}): median {statistics.median(ratios):.3f} "
        f"(quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}, {args.pairs} pairs)"
    )
    print(f"  max output difference: {difference:.2e}")


if __name__ == "__main__":
    main()

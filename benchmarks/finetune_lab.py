"""Experiment 4: a lab whose microscope is not the default's, fine-tuned with and without its optics.

The lab images fluorescence with an NA 1.4 oil objective, 0.1 um pixels and 520 nm
emission, so a micrometre of defocus blurs by far more pixels than the fixed optics the
fine-tune used to assume (NA 0.8, 0.2 um). Its fields are procedural fluorescence
(membranes, nuclei, filaments, puncta) from seeds the default model never saw; each field
is imaged through focus with the true widefield PSF and Poisson and read noise. Two
situations:

- ``zstack``: the lab's unlabeled Z stacks pass through focus (steps of 0.3 um, up to
  1.2 um away), so their sharpest planes are in focus;
- ``timelapse``: every frame is defocused, mildly to strongly (0.6-1.5 um), the case where
  pairs from the least blurred frames used to teach the network to reproduce blur.

Held-out fields, with their truth, are scored in focus and at 0.3, 0.6 and 1.2 um for
Richardson-Lucy and a Wiener filter given the true PSF (each at its best iteration count or
noise-to-signal ratio against the truth: a ceiling no user reaches), and for:

- ``default``: the starting model, not fine-tuned;
- ``fixed optics``: the former recipe (synthetic pairs from the sharpest quarter with the
  fixed NA 0.8, 0.2 um defocus, validation on the training planes, its best weights kept);
- ``optics-aware``: :func:`~napari_mpt_deblur.training.finetune.prepare_finetune` given the
  lab's microscope (blur measured in the stack, widefield PSFs of its optics, held-out
  planes for validation, the starting model kept unless beaten).

Example::

    python benchmarks/finetune_lab.py --steps 300 --json runs/finetune-lab.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_mpt_deblur.config import DeblurSettings, Microscope
from napari_mpt_deblur.data.bundled import procedural_fluorescence
from napari_mpt_deblur.data.defocus import DefocusConfig, add_poisson_gaussian_noise, blur, widefield_psf
from napari_mpt_deblur.data.optics import sharpen_in_focus
from napari_mpt_deblur.inference import deblur_array
from napari_mpt_deblur.models.files import load_model
from napari_mpt_deblur.training.engine import iter_train
from napari_mpt_deblur.training.finetune import (
    FINETUNE_DEFAULTS,
    SHARPEST_FRACTION,
    FinetuneData,
    TrainingLog,
    prepare_finetune,
    run_finetune,
)
from napari_mpt_deblur.training.suite import psnr

LAB = Microscope(na=1.4, medium="oil", wavelength_um=0.52, pixel_size_um=0.1, z_step_um=0.3)
STACK_DEFOCUS_UM = {
    "zstack": (-1.2, -0.9, -0.6, -0.3, 0.0, 0.3, 0.6, 0.9, 1.2),
    "timelapse": (0.6, 0.75, 0.9, 1.05, 1.2, 1.35, 1.5),
}
TEST_DEFOCUS_UM = {"in focus": 0.0, "0.3 um": 0.3, "0.6 um": 0.6, "1.2 um": 1.2}
TRAIN_SEEDS = range(100, 104)
TEST_SEEDS = range(200, 203)
PHOTONS, READ_NOISE = 500.0, 0.003


def image(truth: np.ndarray, defocus_um: float, rng: np.random.Generator) -> np.ndarray:
    """The lab's camera image of ``truth`` (0..1) at ``defocus_um`` from focus."""
    return add_poisson_gaussian_noise(blur(truth, widefield_psf(defocus_um, **LAB.optics())), PHOTONS, READ_NOISE, rng)


def lab_stacks(situation: str, seed: int = 7) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        np.stack([image(procedural_fluorescence(s), z, rng) for z in STACK_DEFOCUS_UM[situation]]) for s in TRAIN_SEEDS
    ]


def test_cases(seed: int = 8) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    truths = [procedural_fluorescence(s) for s in TEST_SEEDS]
    return {name: [(image(t, z, rng), t) for t in truths] for name, z in TEST_DEFOCUS_UM.items()}


def score(
    model,
    cases: dict[str, list[tuple[np.ndarray, np.ndarray]]],
    in_focus_psf: np.ndarray | None = None,
    sharpen: bool = True,
) -> dict[str, float]:
    """Mean PSNR per distance. With ``in_focus_psf``, of each output sharpened against it (``sharpen_in_focus``);
    ``sharpen=False`` leaves out the sharpening a fine-tuned model records (the network alone)."""
    settings = DeblurSettings(tile=0, device="cpu", precision="fp32", sharpen_in_focus=sharpen)

    def output(blurry: np.ndarray) -> np.ndarray:
        deblurred = deblur_array(model, blurry, axes="YX", settings=settings)
        return deblurred if in_focus_psf is None else sharpen_in_focus(deblurred, in_focus_psf)

    return {name: float(np.mean([psnr(output(b), t) for b, t in pairs])) for name, pairs in cases.items()}


def classical(cases: dict[str, list[tuple[np.ndarray, np.ndarray]]]) -> dict[str, dict[str, float]]:
    """Richardson-Lucy and a Wiener filter given the lab's true PSF, each at its best setting against the truth."""
    from common import best_richardson_lucy, best_wiener

    rows: dict[str, dict[str, float]] = {"Richardson-Lucy, true PSF": {}, "Wiener, true PSF": {}}
    for name, pairs in cases.items():
        psf = widefield_psf(TEST_DEFOCUS_UM[name], **LAB.optics())
        rows["Richardson-Lucy, true PSF"][name] = float(
            np.mean([best_richardson_lucy(b, psf, t, psnr)["psnr"] for b, t in pairs])
        )
        rows["Wiener, true PSF"][name] = float(np.mean([best_wiener(b, psf, t, psnr)["psnr"] for b, t in pairs]))
    return rows


def fixed_optics_data(model, stacks: list[np.ndarray], config) -> FinetuneData:
    """The former recipe: pairs from the sharpest quarter with the fixed default optics."""
    from napari_mpt_deblur.data.focus import sharpest_planes
    from napari_mpt_deblur.training.engine import Validation
    from napari_mpt_deblur.training.patches import SyntheticPairs, UnlabeledPlanes

    planes = [plane for stack in stacks for plane in stack]
    sampler = SyntheticPairs(
        sharpest_planes(planes, SHARPEST_FRACTION), DefocusConfig(), config.normalization, denoise_targets=True
    )
    validation = Validation.from_sampler(sampler, 8, config.patch_size)
    return FinetuneData(sampler, validation, UnlabeledPlanes(planes, config.normalization), config)


def finetune(
    model_name: str, data_of, steps: int, patch: int, guard: bool, lr: float | None = None, seed: int = 0
) -> tuple[object, TrainingLog, float]:
    model = load_model(model_name)
    config = FINETUNE_DEFAULTS.replace(
        steps=steps, patch_size=patch, device="cpu", normalization=model.card.normalization, seed=seed
    )
    if lr is not None:
        config = config.replace(lr=lr, lr_min=min(config.lr_min, lr))
    config = config.replace(validate_every=max(1, steps // 6), checkpoint_every=steps)
    data = data_of(model, config)
    for note in data.notes:
        print(f"  note: {note}")
    if data.estimate is not None:
        print(f"  {data.estimate.describe()}")
    log = TrainingLog()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "tuned.safetensors"
        if guard:
            for _ in run_finetune(model, data, output, log):
                pass
        else:  # the former loop: best validation kept, the starting model never scored
            steps = iter_train(model, data.sampler, output, data.config, validation=data.validation)
            for event in steps:
                log.update(event, model)
            log.restore_best(model)
    print(f"  {log.outcome()}")
    if log.gentle_start_psnr is not None:
        scored = ", ".join(f"step {step}: {value:.2f}" for step, value in log.gentle_psnr)
        start = f"starting model {log.gentle_start_psnr:.2f} dB"
        print(f"  unblurred or mildly blurred held-out patches: {start}; {scored}")
    return model, log, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="starting model: 'default' or a model file")
    parser.add_argument("--situations", nargs="+", default=list(STACK_DEFOCUS_UM), choices=list(STACK_DEFOCUS_UM))
    parser.add_argument("--arms", nargs="+", default=["fixed optics", "optics-aware"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument(
        "--lr", type=float, help=f"learning rate of the fine-tunes (default: the recipe's {FINETUNE_DEFAULTS.lr:g})"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the fine-tunes' patches, blur and noise (the lab's fields stay fixed)",
    )
    parser.add_argument(
        "--sharpen-after",
        action="store_true",
        help="also score the default model with its output sharpened against the lab's in-focus PSF",
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    cases = test_cases()
    results: dict[str, dict[str, dict[str, float]]] = {}
    in_focus_psf = widefield_psf(0.0, **LAB.optics())
    baseline = score(load_model(args.model), cases)
    after = {}
    if args.sharpen_after:
        after["default, sharpened after"] = score(load_model(args.model), cases, in_focus_psf)
    inputs = {name: float(np.mean([psnr(b, t) for b, t in pairs])) for name, pairs in cases.items()}
    deconvolved = classical(cases)
    for situation in args.situations:
        stacks = lab_stacks(situation)
        rows = {"input": inputs, **deconvolved, "default": baseline, **after}
        arms = {
            "fixed optics": lambda model, config, stacks=stacks: fixed_optics_data(model, stacks, config),
            "optics-aware": lambda model, config, stacks=stacks: prepare_finetune(
                model, stacks, config=config, microscope=LAB
            ),
        }
        for arm, data_of in arms.items():
            if arm not in args.arms:
                continue
            print(f"{situation}: {arm}...", file=sys.stderr)
            model, log, seconds = finetune(
                args.model, data_of, args.steps, args.patch, guard=arm == "optics-aware", lr=args.lr, seed=args.seed
            )
            rows[arm] = score(model, cases)
            rows[arm]["seconds"] = round(seconds, 1)
            rows[arm]["kept starting model"] = float(log.kept_start)
            rows[arm]["validations"] = {"psnr": log.psnr, "start": log.start_psnr}
            if log.gentle_start_psnr is not None:
                rows[arm]["validations"].update(gentle=log.gentle_psnr, gentle_start=log.gentle_start_psnr)
            if model.card.in_focus_optics is not None:  # the row above is sharpened after the network: this one is not
                rows[f"{arm}, network alone"] = score(model, cases, sharpen=False)
        results[situation] = rows
        print(f"\n{situation} (mean PSNR dB over {len(TEST_SEEDS)} held-out fields; {args.steps} steps)")
        print("| arm | " + " | ".join(TEST_DEFOCUS_UM) + " |")
        print("| --- |" + " --- |" * len(TEST_DEFOCUS_UM))
        for arm, row in rows.items():
            cells = [f"{row[name]:.2f}" for name in TEST_DEFOCUS_UM]
            if arm not in ("input", "default", *deconvolved):
                cells = [f"{row[n]:.2f} ({row[n] - baseline[n]:+.2f})" for n in TEST_DEFOCUS_UM]
            print(f"| {arm} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {"steps": args.steps, "patch": args.patch, "lr": args.lr, "seed": args.seed, "results": results},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
